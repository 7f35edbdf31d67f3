"""Validation and defaulting of the core/v1 kinds: Namespace, ServiceAccount, Secret and Pod
(with the pod status IPs, which the CNI plugin also reads)."""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from datastore.k8s._common import _CORE_API, NAMESPACE_NAME_LABEL, Obj
from datastore.k8s._syntax import (
    _dns_label_problem,
    _dns_subdomain_problem,
    _port_name_problem,
    _port_number_problem,
)
from datastore.k8s._walk import _check_kind, _join, _metadata, _protocol, _subject, _Walk


def _validate_namespace(obj: Any, default_namespace: str) -> Obj:
    obj, api = _check_kind(obj, "Namespace", (_CORE_API,))
    w = _Walk()
    meta = _metadata(w, obj, namespaced=False, default_namespace=default_namespace,
                     name_rule=_dns_label_problem)
    if isinstance(meta.get("name"), str):
        # The API server always (re)writes this label to the namespace's name.
        meta["labels"] = {**meta.get("labels", {}), NAMESPACE_NAME_LABEL: meta["name"]}
    w.raise_if_any(_subject("Namespace", meta))
    out = copy.deepcopy(obj)
    out.update(apiVersion=api, kind="Namespace", metadata=meta)
    return out


def _validate_serviceaccount(obj: Any, default_namespace: str) -> Obj:
    obj, api = _check_kind(obj, "ServiceAccount", (_CORE_API,))
    w = _Walk()
    meta = _metadata(w, obj, namespaced=True, default_namespace=default_namespace,
                     name_rule=_dns_subdomain_problem)
    w.raise_if_any(_subject("ServiceAccount", meta))
    out = copy.deepcopy(obj)
    out.update(apiVersion=api, kind="ServiceAccount", metadata=meta)
    return out


_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
MAX_SECRET_BYTES = 1 << 20  # the API server's limit on a Secret's data


def _validate_secret(obj: Any, default_namespace: str) -> Obj:
    """As the API server stores one: `stringData` merged into `data` (base64, stringData wins)
    and dropped; keys of letters, digits, '-', '_' and '.'; `type` defaults to Opaque.
    Tabby's routing agent reads BGP passwords from these (BGPPeer `password.secretKeyRef`)."""
    obj, api = _check_kind(obj, "Secret", (_CORE_API,))
    w = _Walk()
    meta = _metadata(w, obj, namespaced=True, default_namespace=default_namespace,
                     name_rule=_dns_subdomain_problem)
    secret_type = w.string(obj.get("type"), "type") or "Opaque"
    data: dict[str, str] = {}
    size = 0
    for field in ("data", "stringData"):
        for key, value in (w.mapping(obj.get(field), field) or {}).items():
            path = _join(field, str(key))
            if not isinstance(key, str) or not _SECRET_KEY.fullmatch(key) or key in (".", ".."):
                w.add(path, "a key must consist of letters, digits, '-', '_' or '.'")
                continue
            text = w.string(value, path)
            if text is None:
                if value is None:
                    w.add(path, "must be a string, not null")
                continue
            if field == "data":
                try:
                    raw = base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError):
                    w.add(path, "is not base64 (use stringData for plain text)")
                    continue
            else:
                raw = text.encode()
            size += len(raw)
            data[key] = base64.b64encode(raw).decode()
    if size > MAX_SECRET_BYTES:
        w.add("data", f"{size} bytes: a Secret holds at most {MAX_SECRET_BYTES}")
    w.raise_if_any(_subject("Secret", meta))
    out = {k: copy.deepcopy(v) for k, v in obj.items() if k != "stringData"}
    out.update(apiVersion=api, kind="Secret", metadata=meta, type=secret_type)
    if data:
        out["data"] = dict(sorted(data.items()))
    return out


def _container_ports(w: _Walk, value: Any, path: str) -> list[dict[str, Any]]:
    out = []
    seen: set[str] = set()
    for i, item in enumerate(w.sequence(value, path)):
        ppath = f"{path}[{i}]"
        raw = w.mapping(item, ppath)
        if raw is None:
            w.add(ppath, "must be a mapping with containerPort")
            continue
        port = copy.deepcopy(raw)
        if raw.get("containerPort") is None:
            w.add(_join(ppath, "containerPort"), "required")
        else:
            reason = _port_number_problem(raw["containerPort"])
            if reason:
                w.add(_join(ppath, "containerPort"), reason)
        name = w.string(raw.get("name"), _join(ppath, "name"))
        if name:
            reason = _port_name_problem(name)
            if reason:
                w.add(_join(ppath, "name"), reason)
            elif name in seen:
                w.add(_join(ppath, "name"), f"duplicate port name {name!r}")
            seen.add(name)
        elif "name" in port:
            del port["name"]
        if raw.get("hostPort") not in (None, 0):
            reason = _port_number_problem(raw["hostPort"])
            if reason:
                w.add(_join(ppath, "hostPort"), reason)
        host_ip = w.string(raw.get("hostIP"), _join(ppath, "hostIP"))
        if host_ip:
            try:
                ipaddress.ip_address(host_ip)
            except ValueError:
                w.add(_join(ppath, "hostIP"), f"{host_ip!r} is not a valid IP address")
        port["protocol"] = _protocol(w, raw.get("protocol"), _join(ppath, "protocol"))
        out.append(port)
    return out


def _validate_pod(obj: Any, default_namespace: str, complete: bool = True) -> Obj:
    """`complete=False` accepts a pod without containers: callers building endpoints often
    hold only the parts of a pod that matter to networking."""
    obj, api = _check_kind(obj, "Pod", (_CORE_API,))
    w = _Walk()
    meta = _metadata(w, obj, namespaced=True, default_namespace=default_namespace,
                     name_rule=_dns_subdomain_problem)
    spec = copy.deepcopy(w.mapping(obj.get("spec"), "spec") or {})
    if obj.get("spec") is None and complete:
        w.add("spec", "required")
    # The ServiceAccount admission plugin fills in "default"; `serviceAccount` is the old alias.
    sa = w.string(spec.get("serviceAccountName") or spec.get("serviceAccount"),
                  "spec.serviceAccountName") or "default"
    reason = _dns_subdomain_problem(sa)
    if reason:
        w.add("spec.serviceAccountName", reason)
    spec["serviceAccountName"] = sa
    node = w.string(spec.get("nodeName"), "spec.nodeName")
    if node:
        reason = _dns_subdomain_problem(node)
        if reason:
            w.add("spec.nodeName", reason)
    if not isinstance(spec.get("hostNetwork", False), bool):
        w.add("spec.hostNetwork", "must be true or false")
    names: set[str] = set()
    for field in ("containers", "initContainers"):
        containers = w.sequence(spec.get(field), f"spec.{field}")
        if field == "containers" and not containers and complete and spec:
            w.add("spec.containers", "must have at least one container")
        normalised = []
        for i, item in enumerate(containers):
            cpath = f"spec.{field}[{i}]"
            raw = w.mapping(item, cpath)
            if raw is None:
                w.add(cpath, "must be a mapping")
                continue
            container = copy.deepcopy(raw)
            cname = w.string(raw.get("name"), _join(cpath, "name"))
            if not cname:
                if raw.get("name") in (None, ""):
                    w.add(_join(cpath, "name"), "required")
            else:
                reason = _dns_label_problem(cname)
                if reason:
                    w.add(_join(cpath, "name"), reason)
                elif cname in names:
                    w.add(_join(cpath, "name"), f"duplicate container name {cname!r}")
                names.add(cname)
            if raw.get("ports") is not None:
                container["ports"] = _container_ports(w, raw["ports"], _join(cpath, "ports"))
            normalised.append(container)
        if spec.get(field) is not None:
            spec[field] = normalised
    status = w.mapping(obj.get("status"), "status")
    if status:
        _pod_status_ips(w, status)
    w.raise_if_any(_subject("Pod", meta))
    out = copy.deepcopy(obj)
    out.update(apiVersion=api, kind="Pod", metadata=meta, spec=spec)
    return out


def _pod_status_ips(w: _Walk | None, status: Mapping[str, Any]) -> list[str]:
    """The pod's IPs from status.podIPs (or podIP); problems go to `w` when given."""
    def bad(path: str, reason: str) -> None:
        if w is not None:
            w.add(path, reason)

    ips: list[str] = []
    for i, item in enumerate(status.get("podIPs") or []):
        ip = item.get("ip") if isinstance(item, dict) else None
        if not isinstance(ip, str):
            bad(f"status.podIPs[{i}].ip", "required")
            continue
        ips.append(ip)
    single = status.get("podIP")
    if not ips and isinstance(single, str) and single:
        ips.append(single)
    elif isinstance(single, str) and single and ips and single != ips[0]:
        bad("status.podIP", f"{single!r} must equal status.podIPs[0].ip {ips[0]!r}")
    good = []
    families: set[int] = set()
    for i, ip in enumerate(ips):
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            bad(f"status.podIPs[{i}].ip", f"{ip!r} is not a valid IP address")
            continue
        if addr.version in families:
            bad(f"status.podIPs[{i}].ip", "at most one IP per address family")
        families.add(addr.version)
        good.append(str(addr))
    return good

"""HostEndpoint and WorkloadEndpoint specs, and Calico's workload endpoint naming (pure)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from datastore.errors import Problems
from datastore.validation._checks import (
    _INTERFACE,
    _NAME,
    _NAME_LIST,
    LABEL_NAMESPACE,
    LABEL_ORCHESTRATOR,
    Check,
    _anything,
    _as_network,
    _at,
    _cidr,
    _Ctx,
    _fields,
    _has_problem,
    _idx,
    _integer,
    _ip,
    _items,
    _list,
    _mac,
    _named,
    _pattern,
    _struct,
    parse_ip,
)
from datastore.validation.names import port_name_problem
from datastore.validation.rules import _endpoint_protocol

_IFACE_RE = re.compile(r"[a-zA-Z0-9_.-]{1,15}")
_CONTAINER_ID_RE = re.compile(r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?")


# ---- host endpoints -----------------------------------------------------------------------------


def _endpoint_port(value: Any, path: str, p: Problems) -> Any:
    fields = {"name": _named(port_name_problem), "protocol": _endpoint_protocol,
              "port": _integer(1, 65535)}
    out = _fields(value, fields, path, p)
    if out is None:
        return value
    for key in ("name", "protocol", "port"):
        if out.get(key) in (None, "") and not _has_problem(p, _at(path, key)):
            p.add(_at(path, key), "required")
    return out


def _host_endpoint(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    fields = {"node": _NAME, "interfaceName": _INTERFACE, "expectedIPs": _list(_ip()),
              "profiles": _NAME_LIST, "ports": _list(_endpoint_port)}
    out = _fields(spec, fields, "spec", p)
    if out is None:
        return None
    if not out.get("node") and not _has_problem(p, "spec.node"):
        p.add("spec.node", "required: the node this host endpoint belongs to")
    if not out.get("interfaceName") and not out.get("expectedIPs"):
        p.add("spec", "at least one of interfaceName or expectedIPs is required")
    return out


# ---- workload endpoints -------------------------------------------------------------------------


def _optional_host_ip(value: Any, path: str, p: Problems) -> Any:
    """Calico writes `hostIP: ""` for every port without one, so empty means unset."""
    if value == "":
        return value
    return _ip()(value, path, p)


def _wep_port(value: Any, path: str, p: Problems) -> Any:
    fields = {"name": _named(port_name_problem), "protocol": _endpoint_protocol,
              "port": _integer(1, 65535), "hostPort": _integer(0, 65535),
              "hostIP": _optional_host_ip}
    out = _fields(value, fields, path, p)
    if out is None:
        return value
    if "port" not in out and not _has_problem(p, _at(path, "port")):
        p.add(_at(path, "port"), "required")
    if "protocol" not in out:
        p.add(_at(path, "protocol"), "required")
    if not out.get("name") and not out.get("hostPort"):
        p.add(_at(path, "name"), "required unless hostPort is set")
    return out


def _single_address(value: Any, path: str, p: Problems) -> Any:
    value = _cidr(strict=True, bare_ip=True)(value, path, p)
    if not _has_problem(p, path) and "/" in value and not value.endswith(("/32", "/128")):
        p.add(path, f"{value!r}: a workload address must be a single /32 or /128")
    return value


_QOS_FIELDS = ("ingressBandwidth", "ingressBurst", "ingressPeakrate", "ingressMinburst",
               "egressBandwidth", "egressBurst", "egressPeakrate", "egressMinburst",
               "ingressPacketRate", "ingressPacketBurst", "egressPacketRate", "egressPacketBurst",
               "ingressMaxConnections", "egressMaxConnections")
_QOS: dict[str, Check] = {k: _integer(0) for k in _QOS_FIELDS} | {"dscp": _anything}

_WEP_FIELDS: dict[str, Check] = {
    "orchestrator": _NAME,
    "workload": _NAME,
    "node": _NAME,
    "containerID": _pattern(_CONTAINER_ID_RE, "a container ID (letters, digits and '-')"),
    "pod": _NAME,
    "endpoint": _NAME,
    "serviceAccountName": _NAME,
    "ipNetworks": _list(_single_address),
    "ipNATs": _list(_struct({"internalIP": _ip(), "externalIP": _ip()})),
    "ipv4Gateway": _ip(4),
    "ipv6Gateway": _ip(6),
    "profiles": _NAME_LIST,
    "interfaceName": _pattern(_IFACE_RE, "an interface name (1-15 of letters, digits, '_.-')"),
    "mac": _mac,
    "ports": _list(_wep_port),
    "allowSpoofedSourcePrefixes": _list(_cidr(strict=False, bare_ip=True)),
    "qosControls": _struct(_QOS),
}


def workload_endpoint_name(spec: Mapping[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """Calico's WEP name from its spec: `<node>-<orch>-<pod|containerID|workload>-<endpoint>`.

    Each segment has its dashes doubled. Returns (name or None, problems).
    """
    orch = spec.get("orchestrator")
    middle = {"k8s": "pod", "cni": "containerID", "libnetwork": "orchestrator"}.get(
        orch if isinstance(orch, str) else "", "workload")
    segments: list[str] = []
    problems: list[tuple[str, str]] = []
    for field_name in ("node", "orchestrator", middle, "endpoint"):
        value = spec.get(field_name)
        if not isinstance(value, str) or not value:
            problems.append((f"spec.{field_name}", "required to name the workload endpoint"))
        elif value.startswith("-") or value.endswith("-"):
            problems.append((f"spec.{field_name}", "must not begin or end with '-'"))
        else:
            segments.append(value.replace("-", "--"))
    return (None if problems else "-".join(segments)), problems


def _workload_endpoint(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _WEP_FIELDS, "spec", p)
    if out is None:
        return None
    if "interfaceName" not in out and not _has_problem(p, "spec.interfaceName"):
        p.add("spec.interfaceName", "required: the host side interface (e.g. cali1234567890a)")
    _check_wep_nats(out, p)
    expected, problems = workload_endpoint_name(out)
    for path, reason in problems:
        if not _has_problem(p, path):
            p.add(path, reason)
    if expected and not ctx.name:
        ctx.meta["name"] = expected
    elif expected and ctx.name != expected:
        p.add("metadata.name", f"{ctx.name!r} does not match the spec: expected {expected!r}")
    # Calico overrides these two labels on every write; selectors rely on them.
    ctx.set_label(LABEL_NAMESPACE, str(ctx.meta.get("namespace", "")))
    if isinstance(out.get("orchestrator"), str):
        ctx.set_label(LABEL_ORCHESTRATOR, out["orchestrator"])
    return out


def _check_wep_nats(spec: dict[str, Any], p: Problems) -> None:
    """Each NAT maps one of the endpoint's own addresses, within one IP family."""
    networks = [n for n in map(_as_network, _items(spec.get("ipNetworks"))) if n]
    for i, nat in enumerate(_items(spec.get("ipNATs"))):
        if not isinstance(nat, dict):
            continue
        inside, outside = parse_ip(nat.get("internalIP")), parse_ip(nat.get("externalIP"))
        path = _idx("spec.ipNATs", i)
        if inside and outside and inside.version != outside.version:
            p.add(path, "internalIP and externalIP must be the same IP version")
        if inside and not any(inside in n for n in networks if n.version == inside.version):
            p.add(_at(path, "internalIP"), f"{nat['internalIP']} is not in the ipNetworks")

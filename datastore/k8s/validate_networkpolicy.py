"""Validation and defaulting of networking.k8s.io/v1 NetworkPolicy, as the API server does it."""

from __future__ import annotations

from typing import Any

from datastore.k8s._common import (
    _NP_API,
    _NP_LEGACY_APIS,
    _OPERATORS,
    _POLICY_TYPES,
    Obj,
    _parse_network,
)
from datastore.k8s._syntax import (
    _dns_subdomain_problem,
    _is_int,
    _label_key_problem,
    _label_value_problem,
    _port_name_problem,
    _port_number_problem,
)
from datastore.k8s._walk import _check_kind, _join, _metadata, _protocol, _subject, _Walk

_SELECTOR_FIELDS = ("matchLabels", "matchExpressions")
_EXPRESSION_FIELDS = ("key", "operator", "values")
_PEER_FIELDS = ("podSelector", "namespaceSelector", "ipBlock")
_PORT_FIELDS = ("protocol", "port", "endPort")


def _label_selector(w: _Walk, value: Any, path: str) -> dict[str, Any] | None:
    raw = w.mapping(value, path, _SELECTOR_FIELDS)
    if raw is None:
        return None
    out: dict[str, Any] = {}
    labels = w.labels(raw.get("matchLabels"), _join(path, "matchLabels"))
    if labels:
        out["matchLabels"] = labels
    exprs = []
    for i, item in enumerate(w.sequence(raw.get("matchExpressions"),
                                        _join(path, "matchExpressions"))):
        epath = f"{path}.matchExpressions[{i}]"
        expr = w.mapping(item, epath, _EXPRESSION_FIELDS)
        if expr is None:
            w.add(epath, "must be a mapping with key and operator")
            continue
        key = w.string(expr.get("key"), _join(epath, "key"))
        if not key:
            w.add(_join(epath, "key"), "required")
        else:
            reason = _label_key_problem(key)
            if reason:
                w.add(_join(epath, "key"), reason)
        op_raw = w.string(expr.get("operator"), _join(epath, "operator"))
        op = next((o for o in _OPERATORS if op_raw and o.lower() == op_raw.lower()), None)
        if op is None and expr.get("operator") is None:
            w.add(_join(epath, "operator"), "required")
        elif op is None and op_raw is not None:
            w.add(_join(epath, "operator"),
                  f"{op_raw!r} is not a valid operator; use one of: {', '.join(_OPERATORS)}")
        values: list[str] = []
        for j, val in enumerate(w.sequence(expr.get("values"), _join(epath, "values"))):
            vpath = f"{epath}.values[{j}]"
            sval = w.string(val, vpath)
            if sval is None:
                if val is None:
                    w.add(vpath, "must be a string, not null")
                continue
            reason = _label_value_problem(sval)
            if reason:
                w.add(vpath, reason)
            values.append(sval)
        if op in ("In", "NotIn") and not values:
            w.add(_join(epath, "values"), f"must be non-empty for operator {op}")
        if op in ("Exists", "DoesNotExist") and expr.get("values"):
            w.add(_join(epath, "values"), f"must be empty for operator {op}")
        norm: dict[str, Any] = {"key": key or "", "operator": op or op_raw or ""}
        if op in ("In", "NotIn"):
            norm["values"] = values
        exprs.append(norm)
    if exprs:
        out["matchExpressions"] = exprs
    return out


def _ip_block(w: _Walk, value: Any, path: str) -> dict[str, Any] | None:
    raw = w.mapping(value, path, ("cidr", "except"))
    if raw is None:
        return None
    cidr_text = w.string(raw.get("cidr"), _join(path, "cidr"))
    cidr = None
    if not cidr_text:
        if raw.get("cidr") in (None, ""):
            w.add(_join(path, "cidr"), "required")
    else:
        cidr = _parse_network(cidr_text)
        if cidr is None:
            w.add(_join(path, "cidr"),
                  f"{cidr_text!r} is not a valid CIDR (e.g. 10.9.8.0/24 or 2001:db8::/64)")
    out: dict[str, Any] = {"cidr": cidr_text or ""}
    excepts: list[str] = []
    for i, item in enumerate(w.sequence(raw.get("except"), _join(path, "except"))):
        epath = f"{path}.except[{i}]"
        text = w.string(item, epath)
        if text is None:
            if item is None:
                w.add(epath, "must be a CIDR, not null")
            continue
        excepts.append(text)
        net = _parse_network(text)
        if net is None:
            w.add(epath, f"{text!r} is not a valid CIDR (e.g. 10.9.8.0/24 or 2001:db8::/64)")
        elif cidr is not None and not (
            net.version == cidr.version
            and net.prefixlen > cidr.prefixlen
            and net.subnet_of(cidr)  # type: ignore[arg-type]
        ):
            w.add(epath, f"{text} must be a strict subset of cidr {cidr_text}")
    if excepts:
        out["except"] = excepts
    return out


def _peer(w: _Walk, value: Any, path: str) -> dict[str, Any] | None:
    raw = w.mapping(value, path, _PEER_FIELDS)
    if raw is None:
        w.add(path, "must be a mapping with podSelector, namespaceSelector or ipBlock")
        return None
    out: dict[str, Any] = {}
    for key, parse in (("podSelector", _label_selector), ("namespaceSelector", _label_selector),
                       ("ipBlock", _ip_block)):
        parsed = parse(w, raw.get(key), _join(path, key))
        if parsed is not None:
            out[key] = parsed
    if not out:
        w.add(path, "must specify a peer: podSelector, namespaceSelector or ipBlock")
    elif "ipBlock" in out and len(out) > 1:
        w.add(path, "may not specify both ipBlock and another peer")
    return out


def _np_port(w: _Walk, value: Any, path: str) -> dict[str, Any] | None:
    raw = w.mapping(value, path, _PORT_FIELDS)
    if raw is None:
        w.add(path, "must be a mapping with protocol, port and endPort")
        return None
    out: dict[str, Any] = {"protocol": _protocol(w, raw.get("protocol"),
                                                  _join(path, "protocol"))}
    port = raw.get("port")
    end = raw.get("endPort")
    if port is not None:
        if _is_int(port):
            reason = _port_number_problem(port)
            if reason:
                w.add(_join(path, "port"), reason)
        elif isinstance(port, str):
            reason = _port_name_problem(port)
            if reason and port.isdigit():
                reason += f" (write {port} without quotes for a port number)"
            if reason:
                w.add(_join(path, "port"), reason)
        else:
            w.add(_join(path, "port"), f"{port!r} must be a port number or a port name")
        out["port"] = port
    if end is not None:
        epath = _join(path, "endPort")
        if port is None:
            w.add(epath, "may not be specified when port is not specified")
        elif not _is_int(port):
            w.add(epath, "may not be specified when port is a named port")
        reason = _port_number_problem(end)
        if reason:
            w.add(epath, reason)
        elif _is_int(port) and end < port:
            w.add(epath, f"{end} must be greater than or equal to port {port}")
        out["endPort"] = end
    return out



def _np_rules(w: _Walk, value: Any, path: str, peers_key: str) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    wrong = "to" if peers_key == "from" else "from"
    hint = {wrong: f"{path.rsplit('.', 1)[-1]} rules use {peers_key!r}"}
    rules = []
    for i, item in enumerate(w.sequence(value, path)):
        rpath = f"{path}[{i}]"
        raw = w.mapping(item, rpath, (peers_key, "ports"), hint)
        if raw is None and item is not None:
            continue
        raw = raw or {}
        rule: dict[str, Any] = {}
        peers = [_peer(w, p, f"{rpath}.{peers_key}[{j}]")
                 for j, p in enumerate(w.sequence(raw.get(peers_key), _join(rpath, peers_key)))]
        if peers:
            rule[peers_key] = [p for p in peers if p is not None]
        ports = [_np_port(w, p, f"{rpath}.ports[{j}]")
                 for j, p in enumerate(w.sequence(raw.get("ports"), _join(rpath, "ports")))]
        if ports:
            rule["ports"] = [p for p in ports if p is not None]
        rules.append(rule)
    return rules


def _validate_network_policy(obj: Any, default_namespace: str) -> Obj:
    obj, api = _check_kind(obj, "NetworkPolicy", (_NP_API, *_NP_LEGACY_APIS))
    w = _Walk()
    w.mapping(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = _metadata(w, obj, namespaced=True, default_namespace=default_namespace,
                     name_rule=_dns_subdomain_problem)
    raw = w.mapping(obj.get("spec"), "spec", ("podSelector", "policyTypes", "ingress", "egress"),
                    {"ingres": "did you mean 'ingress'?", "egres": "did you mean 'egress'?"})
    raw = raw or {}
    # An absent/null podSelector is the empty selector (all pods in the namespace), as in Go.
    spec: dict[str, Any] = {
        "podSelector": _label_selector(w, raw.get("podSelector"), "spec.podSelector") or {},
    }
    ingress = _np_rules(w, raw.get("ingress"), "spec.ingress", "from")
    egress = _np_rules(w, raw.get("egress"), "spec.egress", "to")
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    types: list[str] = []
    for i, item in enumerate(w.sequence(raw.get("policyTypes"), "spec.policyTypes")):
        tpath = f"spec.policyTypes[{i}]"
        text = w.string(item, tpath)
        canon = next((t for t in _POLICY_TYPES if text and t.lower() == text.lower()), None)
        if canon is None:
            if text is not None or item is None:
                w.add(tpath, f"{item!r} is not supported; use Ingress and/or Egress")
        elif canon in types:
            w.add(tpath, f"duplicate policy type {canon}")
        else:
            types.append(canon)
    if not types:
        # Kubernetes defaulting: Ingress always, Egress only when there are egress rules.
        types = ["Ingress"] + (["Egress"] if egress else [])
    spec["policyTypes"] = types
    w.raise_if_any(_subject(f"NetworkPolicy.{_NP_API.split('/')[0]}", meta))
    return {"apiVersion": api, "kind": "NetworkPolicy", "metadata": meta, "spec": spec}

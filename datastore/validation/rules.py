"""Policy and profile rules: Rule, EntityRule, ports, ICMP and protocols (pure)."""

from __future__ import annotations

import re
from typing import Any

from datastore.errors import Problems
from datastore.validation._checks import (
    _DIGITS_RE,
    _NAME,
    _SELECTOR,
    Check,
    _anything,
    _at,
    _check_annotations,
    _cidr,
    _enum,
    _fields,
    _has_problem,
    _idx,
    _int_choice,
    _integer,
    _is_in,
    _is_int,
    _list,
    _net_version,
    _selector,
    _string,
    _struct,
    _type_name,
    parse_cidr,
)
from datastore.validation.names import port_name_problem

_NAMED_PORT_RE = re.compile(r"[a-zA-Z0-9_.-]{1,128}")
_PORT_RANGE_RE = re.compile(r"([0-9]+):([0-9]+)")


# ---- protocols and ports ------------------------------------------------------------------------

PROTOCOL_NAMES = ("TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite")
PORT_PROTOCOLS = frozenset({"TCP", "UDP", "SCTP", 6, 17, 132})
_ICMP_V4 = frozenset({"ICMP", 1})
_ICMP_V6 = frozenset({"ICMPv6", 58})


def _protocol(value: Any, path: str, p: Problems) -> Any:
    """A rule protocol: 1-255 or one of Calico's names, case-sensitive as Calico's validator."""
    if isinstance(value, str) and _DIGITS_RE.fullmatch(value) and int(value) <= 255:
        value = int(value)  # Calico stores numeric protocols as numbers
    if _is_int(value):
        if not 1 <= value <= 255:
            p.add(path, f"protocol number {value} is out of range 1..255")
    elif not isinstance(value, str):
        p.add(path, f"must be a protocol name or number, not {_type_name(value)}")
    elif value not in PROTOCOL_NAMES:
        exact = next((n for n in PROTOCOL_NAMES if n.lower() == value.lower()), None)
        hint = f" (names are case-sensitive: {exact!r})" if exact else ""
        p.add(path, f"unknown protocol {value!r}{hint}; use {', '.join(PROTOCOL_NAMES)} or 1..255")
    return value


def _endpoint_protocol(value: Any, path: str, p: Problems) -> Any:
    """An endpoint port's protocol: must carry ports; names take Calico's case ("tcp" → "TCP")."""
    if isinstance(value, str):
        value = next((n for n in PROTOCOL_NAMES if n.lower() == value.lower()), value)
    value = _protocol(value, path, p)
    if not _has_problem(p, path) and not _is_in(value, PORT_PROTOCOLS):
        p.add(path, f"protocol {value!r} has no ports; use TCP, UDP or SCTP")
    return value


def _port_number(text: str, value: Any, path: str, p: Problems) -> int | None:
    n = int(text)
    if not 1 <= n <= 65535:
        p.add(path, f"port {value!r} is out of range 1..65535")
        return None
    return n


def _port(value: Any, path: str, p: Problems) -> Any:
    """A rule port: a number, a "min:max" range or a named port (returns Calico's stored form)."""
    if _is_int(value):
        _port_number(str(value), value, path, p)
        return value
    if not isinstance(value, str):
        p.add(path, f"must be a port number, a 'min:max' range or a port name, not {value!r}")
        return value
    if _DIGITS_RE.fullmatch(value):
        return _port_number(value, value, path, p) or value
    if m := _PORT_RANGE_RE.fullmatch(value):
        lo, hi = (int(g) for g in m.groups())
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            p.add(path, f"port range {value!r} is out of range 1..65535")
        elif lo > hi:
            p.add(path, f"port range {value!r} ends before it starts")
        return lo if lo == hi else value
    if not _NAMED_PORT_RE.fullmatch(value):
        p.add(path, f"{value!r} is not a port number, 'min:max' range or port name")
    elif why := port_name_problem(value):
        p.add(path, why)
    return value


def is_named_port(port: Any) -> bool:
    return isinstance(port, str) and not _DIGITS_RE.fullmatch(port) and ":" not in port


# ---- rules --------------------------------------------------------------------------------------


def _not_nets_item(value: Any, path: str, p: Problems) -> Any:
    value = _cidr(strict=True, bare_ip=False)(value, path, p)
    parsed = None if _has_problem(p, path) else parse_cidr(value)
    if parsed and parsed[1].prefixlen == 0:
        p.add(path, f"{value!r} in notNets matches everything, so the rule could never match")
    return value


_RULE_NET = _cidr(strict=True, bare_ip=False)

_ENTITY_FIELDS: dict[str, Check] = {
    "nets": _list(_RULE_NET, max_items=256, unique=True),
    "notNets": _list(_not_nets_item, max_items=256, unique=True),
    "selector": _SELECTOR,
    "notSelector": _SELECTOR,
    "namespaceSelector": _selector(None),
    "ports": _list(_port, max_items=50),
    "notPorts": _list(_port, max_items=50),
    "serviceAccounts": _struct({"names": _list(_string, unique=True), "selector": _SELECTOR}),
    "services": _struct({"name": _NAME, "namespace": _NAME}),
}


def validate_entity_rule(entity: Any, path: str, problems: Problems) -> dict[str, Any]:
    """Check a rule's `source` / `destination`; returns the normalised copy."""
    out = _fields(entity, _ENTITY_FIELDS, path, problems)
    if out is None:
        return entity if isinstance(entity, dict) else {}
    if "services" in out:
        _check_services_match(out, path, problems)
    return out


def _check_services_match(entity: dict[str, Any], path: str, p: Problems) -> None:
    """A `services` match stands alone: it names its own endpoints."""
    if isinstance(entity["services"], dict) and not entity["services"].get("name"):
        p.add(_at(path, "services.name"), "required: the name of a Kubernetes Service")
    for other in ("selector", "notSelector", "namespaceSelector", "nets", "notNets",
                  "serviceAccounts"):
        if entity.get(other):
            p.add(_at(path, other), "cannot be combined with services in the same rule")


def _icmp(value: Any, path: str, p: Problems) -> Any:
    out = _fields(value, {"type": _integer(0, 254), "code": _integer(0, 255)}, path, p)
    if out is not None and "code" in out and "type" not in out:
        p.add(_at(path, "code"), "an ICMP code needs an ICMP type")
    return value if out is None else out


def _http_path(value: Any, path: str, p: Problems) -> Any:
    out = _fields(value, {"exact": _string, "prefix": _string}, path, p)
    if out is None:
        return value
    if "exact" in out and "prefix" in out:
        p.add(path, "set either exact or prefix, not both")
    text = out.get("exact") or out.get("prefix")
    if not text:
        p.add(path, "one of exact or prefix is required")
    elif isinstance(text, str) and (not text.startswith("/") or re.search("[? #]", text)):
        p.add(path, f"{text!r} must start with '/' and contain no '?', '#' or space")
    return out


_HTTP = _struct({
    "methods": _list(_string, max_items=20, unique=True),
    "paths": _list(_http_path, max_items=20),
})

_RULE_FIELDS: dict[str, Check] = {
    "action": _enum("Allow", "Deny", "Log", "Pass"),
    "ipVersion": _int_choice(4, 6),
    "protocol": _protocol,
    "notProtocol": _protocol,
    "icmp": _icmp,
    "notICMP": _icmp,
    "source": validate_entity_rule,
    "destination": validate_entity_rule,
    "http": _HTTP,
    "metadata": _struct({"annotations": _anything}),
}


def validate_rule(rule: Any, path: str, problems: Problems, *, direction: str | None = None,
                  global_policy: bool = False) -> dict[str, Any]:
    """Check one policy/profile rule; returns the normalised copy.

    `direction` ("ingress"/"egress") enables the direction-specific checks (services, http);
    `global_policy` requires a namespace on service matches (a GNP has no namespace of its own).
    """
    out = _fields(rule, _RULE_FIELDS, path, problems)
    if out is None:
        return rule if isinstance(rule, dict) else {}
    if "action" not in out and not _has_problem(problems, _at(path, "action")):
        problems.add(_at(path, "action"), "required: one of Allow, Deny, Log, Pass")
    if isinstance(out.get("metadata"), dict) and "annotations" in out["metadata"]:
        _check_annotations(out["metadata"]["annotations"], _at(path, "metadata.annotations"),
                           problems)
    _check_rule_icmp(out, path, problems)
    _check_rule_ports(out, path, problems)
    _check_rule_nets(out, path, problems)
    _check_rule_http(out, path, problems, direction)
    _check_rule_services(out, path, problems, direction, global_policy)
    return out


def _check_rule_icmp(rule: dict[str, Any], path: str, p: Problems) -> None:
    if _has_problem(p, _at(path, "protocol")) or _has_problem(p, _at(path, "ipVersion")):
        return
    proto = rule.get("protocol")
    if "icmp" in rule and not _is_in(proto, _ICMP_V4 | _ICMP_V6):
        got = "no protocol is set" if proto is None else f"protocol is {proto!r}"
        p.add(_at(path, "icmp"), f"needs protocol ICMP or ICMPv6 ({got})")
    version = rule.get("ipVersion")
    for key in ("protocol", "notProtocol"):
        value = rule.get(key)
        if _is_in(value, _ICMP_V4) and version == 6:
            p.add(_at(path, key), "protocol ICMP needs ipVersion 4 (use ICMPv6 for IPv6)")
        elif _is_in(value, _ICMP_V6) and version == 4:
            p.add(_at(path, key), "protocol ICMPv6 needs ipVersion 6 (use ICMP for IPv4)")


def _check_rule_ports(rule: dict[str, Any], path: str, p: Problems) -> None:
    if _has_problem(p, _at(path, "protocol")):
        return
    proto = rule.get("protocol")
    for side in ("source", "destination"):
        entity = rule.get(side)
        if not isinstance(entity, dict):
            continue
        for key in ("ports", "notPorts"):
            ports = entity.get(key)
            if not isinstance(ports, list) or not ports:
                continue
            where = _at(_at(path, side), key)
            if proto is None and not all(is_named_port(x) for x in ports):
                p.add(where, "numeric ports and port ranges need protocol TCP, UDP or SCTP")
            elif proto is not None and not _is_in(proto, PORT_PROTOCOLS):
                p.add(where, f"ports need protocol TCP, UDP or SCTP, not {proto!r}")
            if side == "destination" and entity.get("services"):
                p.add(where, "cannot be combined with destination services")


def _check_rule_nets(rule: dict[str, Any], path: str, p: Problems) -> None:
    """One IP family per rule, and the one ipVersion names if it is set."""
    version = rule.get("ipVersion") if rule.get("ipVersion") in (4, 6) else None
    seen: set[int] = set()
    for side in ("source", "destination"):
        entity = rule.get(side)
        if not isinstance(entity, dict):
            continue
        for key in ("nets", "notNets"):
            nets = entity.get(key)
            if not isinstance(nets, list):
                continue
            where = _at(_at(path, side), key)
            here = {v for v in map(_net_version, nets) if v}
            if version and here - {version}:
                p.add(where, f"has IPv{(here - {version}).pop()} CIDRs but ipVersion is {version}")
            if len(here | seen) > 1:
                p.add(where, "a rule cannot mix IPv4 and IPv6 CIDRs")
            seen |= here


def _check_rule_http(rule: dict[str, Any], path: str, p: Problems, direction: str | None) -> None:
    if "http" not in rule:
        return
    where = _at(path, "http")
    if direction == "egress":
        p.add(where, "HTTP matches are not allowed in egress rules")
    if rule.get("action", "Allow") != "Allow":
        p.add(where, "HTTP matches are only valid on Allow rules")
    if not _is_in(rule.get("protocol", "TCP"), ("TCP", 6)):
        p.add(where, "HTTP matches need protocol TCP (or no protocol)")


def _check_rule_services(rule: dict[str, Any], path: str, p: Problems, direction: str | None,
                         global_policy: bool) -> None:
    # Services name the far end: the source of ingress traffic, the destination of egress.
    far, near = ("source", "destination") if direction == "ingress" else ("destination", "source")
    if direction is None:
        return
    near_entity = rule.get(near)
    if isinstance(near_entity, dict) and near_entity.get("services"):
        p.add(_at(_at(path, near), "services"), f"not allowed in {direction} rule {near}")
    far_entity = rule.get(far)
    services = far_entity.get("services") if isinstance(far_entity, dict) else None
    if global_policy and isinstance(services, dict) and not services.get("namespace"):
        p.add(_at(_at(path, far), "services.namespace"),
              "required in a GlobalNetworkPolicy (it has no namespace of its own)")


def _rules(direction: str, *, global_policy: bool = False) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        if not isinstance(value, list):
            p.add(path, f"must be a list of rules, not {_type_name(value)}")
            return value
        return [validate_rule(r, _idx(path, i), p, direction=direction,
                              global_policy=global_policy) for i, r in enumerate(value)]
    return check

"""Policy rules in the form Felix enforces them, and how one packet matches one rule (pure).

`compile_rule` turns a projectcalico.org/v3 rule dict into a `CompiledRule` the way Calico's
update processors do (`syncersv1/updateprocessors/rules.go`): entity selectors are namespaced,
service accounts become selectors, protocols become numbers. `rule_matches` then answers whether
a `Packet` matches it, with selectors matched the way the dataplane does: as IP sets (the peer IP
is in the set of nets of every endpoint and network set whose labels match).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from datastore.selector import Selector, parse

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Direction = Literal["ingress", "egress"]
DIRECTIONS: tuple[Direction, ...] = ("ingress", "egress")

NAMESPACE_LABEL = "projectcalico.org/namespace"
SERVICEACCOUNT_LABEL = "projectcalico.org/serviceaccount"
NAMESPACE_PREFIX = "pcns."
SERVICEACCOUNT_PREFIX = "pcsa."

PROTOCOLS: dict[str, int] = {
    "icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132, "udplite": 136,
}
PROTOCOL_NAMES: dict[int, str] = {
    1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP", 136: "UDPLite",
}
# Only these carry ports (Calico rejects ports with any other protocol).
PORT_PROTOCOLS = frozenset({6, 17, 132})
ICMP_PROTOCOLS = frozenset({1, 58})

ALL = parse("all()")


def protocol_number(value: str | int) -> int:
    """A protocol name (any case) or number, as a number: "TCP" -> 6, "132" -> 132."""
    if isinstance(value, int):
        number = value
    elif value.strip().isdigit():
        number = int(value)
    else:
        try:
            return PROTOCOLS[value.strip().lower()]
        except KeyError:
            raise ValueError(f"unknown protocol {value!r}") from None
    if not 0 < number < 256:
        raise ValueError(f"protocol number {number} is out of range 1-255")
    return number


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


def parse_net(text: str) -> IPNetwork:
    # Calico masks host bits ("10.0.0.1/8" means 10.0.0.0/8) and reads a bare IP as /32 or /128.
    return ipaddress.ip_network(text.strip(), strict=False)


# --- ports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


@dataclass(frozen=True)
class Ports:
    """A ports list split as Felix splits it: numeric ranges and named ports."""

    ranges: tuple[PortRange, ...] = ()
    names: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ranges or self.names)

    def numeric_match(self, port: int | None) -> bool:
        return port is not None and any(port in r for r in self.ranges)


def parse_ports(values: Iterable[int | str] | None) -> Ports:
    ranges: list[PortRange] = []
    names: list[str] = []
    for value in values or ():
        if isinstance(value, int):
            ranges.append(PortRange(value, value))
            continue
        text = value.strip()
        first, sep, last = text.partition(":")
        if first.isdigit() and (not sep or last.isdigit()):
            ranges.append(PortRange(int(first), int(last) if sep else int(first)))
        else:
            names.append(text)
    return Ports(tuple(ranges), tuple(names))


# --- compiled rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class IcmpMatch:
    type: int
    code: int | None = None

    def matches(self, icmp_type: int | None, icmp_code: int | None) -> bool:
        if icmp_type != self.type:
            return False
        return self.code is None or icmp_code == self.code


@dataclass(frozen=True)
class EntityMatch:
    """One side (source or destination) of a rule, selectors already namespaced."""

    nets: tuple[IPNetwork, ...] = ()
    not_nets: tuple[IPNetwork, ...] = ()
    selector: Selector | None = None
    not_selector: Selector | None = None
    ports: Ports = field(default_factory=Ports)
    not_ports: Ports = field(default_factory=Ports)

    def set_selectors(self) -> tuple[Selector | None, Selector | None]:
        """The (positive, negative) selector IP sets Felix builds for this side.

        Like Felix's rule scanner, a positive and a negative selector are folded into one set
        `(pos) && (!(neg))`, so membership is decided per contributor, not per IP.
        """
        if self.selector is None or self.not_selector is None:
            return self.selector, self.not_selector
        both = f"({self.selector.canonical}) && (!({self.not_selector.canonical}))"
        return parse(both), None

    def named_port_selector(self) -> Selector:
        # A named port with no selector on its side means "any endpoint exposing that name".
        return self.selector or ALL


@dataclass(frozen=True)
class CompiledRule:
    action: str  # Allow | Deny | Pass | Log
    ip_version: int | None = None
    protocol: int | None = None
    not_protocol: int | None = None
    icmp: IcmpMatch | None = None
    not_icmp: IcmpMatch | None = None
    source: EntityMatch = field(default_factory=EntityMatch)
    destination: EntityMatch = field(default_factory=EntityMatch)
    # Fields present in the rule that this model does not enforce (e.g. "http", "services").
    unenforced: tuple[str, ...] = ()


def _prefixed(text: str, prefix: str) -> str:
    return parse(text).with_label_prefix(prefix).canonical


def _namespace_clause(ns_selector: str, namespace: str | None) -> str:
    """Which namespaces an entity rule covers, as a selector over endpoint labels ("" = any)."""
    if ns_selector:
        # all() means "any namespace", global() "no namespace" (HEPs, GlobalNetworkSets).
        text = _prefixed(ns_selector, NAMESPACE_PREFIX)
        text = text.replace("all()", f"has({NAMESPACE_LABEL})")
        return text.replace("global()", f"!has({NAMESPACE_LABEL})")
    if namespace:
        return f"{NAMESPACE_LABEL} == '{namespace}'"
    return ""


def _service_account_clause(accounts: Mapping[str, Any] | None) -> str:
    if not accounts:
        return ""
    clauses = []
    if accounts.get("selector"):
        clauses.append(_prefixed(accounts["selector"], SERVICEACCOUNT_PREFIX))
    if accounts.get("names"):
        names = ", ".join(f"'{n}'" for n in accounts["names"])
        clauses.append(parse(f"{SERVICEACCOUNT_LABEL} in {{{names}}}").canonical)
    return " && ".join(f"({c})" for c in clauses) if len(clauses) > 1 else "".join(clauses)


def entity_selector(entity: Mapping[str, Any], namespace: str | None) -> str:
    """The selector text an entity rule matches endpoints with, namespaced like Calico ("" = none).

    The namespace restriction is added only when something selector-ish is present (selector,
    notSelector, serviceAccounts, namespaceSelector): a rule with only nets stays global.
    """
    ns_selector = entity.get("namespaceSelector") or ""
    parts = [p for p in (_service_account_clause(entity.get("serviceAccounts")),
                         entity.get("selector") or "") if p]
    selector = parts[0] if len(parts) == 1 else " && ".join(f"({p})" for p in parts)
    ns_clause = _namespace_clause(ns_selector, namespace)
    selectorish = selector or entity.get("notSelector") or ns_selector
    if not ns_clause or not selectorish:
        return selector
    return f"({ns_clause}) && ({selector})" if selector else ns_clause


def _optional_selector(text: str) -> Selector | None:
    return parse(text) if text else None


def compile_entity(entity: Mapping[str, Any] | None, namespace: str | None) -> EntityMatch:
    entity = entity or {}
    return EntityMatch(
        nets=tuple(parse_net(n) for n in entity.get("nets") or ()),
        not_nets=tuple(parse_net(n) for n in entity.get("notNets") or ()),
        selector=_optional_selector(entity_selector(entity, namespace)),
        # notSelector is never namespaced: "not from these" includes everything else.
        not_selector=_optional_selector(entity.get("notSelector") or ""),
        ports=parse_ports(entity.get("ports")),
        not_ports=parse_ports(entity.get("notPorts")),
    )


def _icmp(value: Mapping[str, Any] | None) -> IcmpMatch | None:
    if not value or value.get("type") is None:
        return None
    return IcmpMatch(int(value["type"]), value.get("code"))


def _unenforced(rule: Mapping[str, Any]) -> tuple[str, ...]:
    found = ["http"] if rule.get("http") else []
    for side in ("source", "destination"):
        if (rule.get(side) or {}).get("services"):
            found.append(f"{side}.services")
    return tuple(found)


def compile_rule(rule: Mapping[str, Any], namespace: str | None) -> CompiledRule:
    """One v3 rule as Felix sees it; `namespace` is the policy's (None for global resources)."""
    proto = rule.get("protocol")
    not_proto = rule.get("notProtocol")
    version = rule.get("ipVersion")
    return CompiledRule(
        action=str(rule.get("action", "Deny")).capitalize(),
        ip_version=int(version) if version else None,
        protocol=protocol_number(proto) if proto is not None else None,
        not_protocol=protocol_number(not_proto) if not_proto is not None else None,
        icmp=_icmp(rule.get("icmp")),
        not_icmp=_icmp(rule.get("notICMP")),
        source=compile_entity(rule.get("source"), namespace),
        destination=compile_entity(rule.get("destination"), namespace),
        unenforced=_unenforced(rule),
    )


def compile_rules(rules: Iterable[Mapping[str, Any]] | None,
                  namespace: str | None) -> tuple[CompiledRule, ...]:
    return tuple(compile_rule(r, namespace) for r in rules or ())


# --- matching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """The first packet of a flow, with both addresses resolved."""

    src_ip: IPAddress
    dst_ip: IPAddress
    protocol: int
    src_port: int | None = None
    dst_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    @property
    def version(self) -> int:
        return self.src_ip.version

    def address(self, side: str) -> tuple[IPAddress, int | None]:
        return (self.src_ip, self.src_port) if side == "source" else (self.dst_ip, self.dst_port)


class IPSets(Protocol):
    """What a rule needs from the cluster state: the members of selector and named-port sets."""

    def selector_members(self, selector: Selector) -> frozenset[IPNetwork]: ...

    def named_port_members(self, selector: Selector, name: str,
                           protocol: int | None) -> frozenset[tuple[IPAddress, int, int]]: ...


def _in_nets(ip: IPAddress, nets: Iterable[IPNetwork]) -> bool:
    return any(ip in n for n in nets)


def _in_set(ip: IPAddress, sets: IPSets, selector: Selector) -> bool:
    return _in_nets(ip, sets.selector_members(selector))


def _family(nets: tuple[IPNetwork, ...], version: int) -> tuple[IPNetwork, ...] | None:
    """Nets of one IP family; None when filtering empties the list (Felix drops the rule)."""
    if not nets:
        return ()
    kept = tuple(n for n in nets if n.version == version)
    return kept or None


def _nets_match(entity: EntityMatch, ip: IPAddress) -> bool:
    nets = _family(entity.nets, ip.version)
    not_nets = _family(entity.not_nets, ip.version)
    if nets is None or not_nets is None:
        return False
    # A negated catch-all can never match; Felix drops such a rule rather than render it.
    if any(n.prefixlen == 0 for n in not_nets):
        return False
    if nets and not _in_nets(ip, nets):
        return False
    return not _in_nets(ip, not_nets)


def _named_port_hit(packet: Packet, side: str, entity: EntityMatch, names: Iterable[str],
                    sets: IPSets, protocol: int | None) -> bool:
    ip, port = packet.address(side)
    member = (ip, packet.protocol, port)
    sel = entity.named_port_selector()
    return any(member in sets.named_port_members(sel, name, protocol) for name in names)


def _selectors_and_ports_match(packet: Packet, side: str, entity: EntityMatch, sets: IPSets,
                               protocol: int | None) -> bool:
    ip, port = packet.address(side)
    positive, negative = entity.set_selectors()
    ports, not_ports = entity.ports, entity.not_ports
    if (ports or not_ports) and packet.protocol not in PORT_PROTOCOLS:
        return False
    # With only named ports, the named-port set already carries the selector (as in Felix).
    needs_set = ports.ranges or not ports.names
    if positive is not None and needs_set and not _in_set(ip, sets, positive):
        return False
    if negative is not None and _in_set(ip, sets, negative):
        return False
    if ports and not (ports.numeric_match(port)
                      or _named_port_hit(packet, side, entity, ports.names, sets, protocol)):
        return False
    if not_ports.numeric_match(port):
        return False
    return not _named_port_hit(packet, side, entity, not_ports.names, sets, protocol)


def _protocol_match(rule: CompiledRule, packet: Packet) -> bool:
    if rule.ip_version is not None and rule.ip_version != packet.version:
        return False
    if rule.protocol is not None and rule.protocol != packet.protocol:
        return False
    if rule.not_protocol is not None and rule.not_protocol == packet.protocol:
        return False
    if (rule.icmp or rule.not_icmp) and packet.protocol not in ICMP_PROTOCOLS:
        return False
    if rule.icmp and not rule.icmp.matches(packet.icmp_type, packet.icmp_code):
        return False
    return not (rule.not_icmp and rule.not_icmp.matches(packet.icmp_type, packet.icmp_code))


def rule_matches(rule: CompiledRule, packet: Packet, sets: IPSets) -> bool:
    """Whether every criterion of `rule` holds for `packet` (criteria ANDed, lists ORed).

    HTTP matches are ignored, as Felix's iptables rules ignore them. Service matches need
    Kubernetes Services, which this model lacks: such a rule may still deny but never opens
    traffic (an Allow or Pass with a services match never matches).
    """
    if rule.action in ("Allow", "Pass") and any(u.endswith("services") for u in rule.unenforced):
        return False
    if not _protocol_match(rule, packet):
        return False
    for side, entity in (("source", rule.source), ("destination", rule.destination)):
        ip, _ = packet.address(side)
        if not _nets_match(entity, ip):
            return False
        if not _selectors_and_ports_match(packet, side, entity, sets, rule.protocol):
            return False
    return True


# --- describing ----------------------------------------------------------------------------


def _describe_ports(ports: Ports) -> str:
    return ",".join([*(str(r) for r in ports.ranges), *ports.names])


def _describe_entity(entity: EntityMatch) -> list[str]:
    parts = []
    if entity.nets:
        parts.append("nets " + ",".join(map(str, entity.nets)))
    if entity.not_nets:
        parts.append("not nets " + ",".join(map(str, entity.not_nets)))
    if entity.selector is not None:
        parts.append(f"selector {entity.selector.canonical}")
    if entity.not_selector is not None:
        parts.append(f"not selector {entity.not_selector.canonical}")
    if entity.ports:
        parts.append("ports " + _describe_ports(entity.ports))
    if entity.not_ports:
        parts.append("not ports " + _describe_ports(entity.not_ports))
    return parts


def _describe_icmp(icmp: IcmpMatch) -> str:
    return f"type {icmp.type}" + (f" code {icmp.code}" if icmp.code is not None else "")


def describe_rule(rule: CompiledRule) -> str:
    """One line a person can read: `Allow TCP from selector ... to ports 80`."""
    parts = [rule.action]
    if rule.ip_version:
        parts.append(f"IPv{rule.ip_version}")
    if rule.protocol is not None:
        parts.append(protocol_name(rule.protocol))
    if rule.not_protocol is not None:
        parts.append(f"not {protocol_name(rule.not_protocol)}")
    if rule.icmp:
        parts.append(_describe_icmp(rule.icmp))
    if rule.not_icmp:
        parts.append("not " + _describe_icmp(rule.not_icmp))
    for word, entity in (("from", rule.source), ("to", rule.destination)):
        described = _describe_entity(entity)
        if described:
            parts.append(f"{word} " + ", ".join(described))
    if len(parts) == 1:
        parts.append("all")
    if rule.unenforced:
        parts.append(f"(not enforced: {', '.join(rule.unenforced)})")
    return " ".join(parts)

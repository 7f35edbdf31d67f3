"""Policy and profile rules as iptables rules, the way Felix's rules/policy.go renders them (pure).

One `CompiledRule` becomes, per IP family: optional match-block rules (iptables cannot OR
inside one rule, so lists of CIDRs, >15 ports or ports plus named ports are evaluated into the
scratch mark bits first), then the rule itself ANDed with "all blocks passed", then its action:
Allow/Pass set the accept/pass bit and return, Deny sets the drop bit and drops, Log logs and
goes on. A rule that cannot match in a family is left out of that family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from datastore.selector import Selector
from felix.model import Rule
from felix.render_config import MarkBits
from felix.render_ipsets import NamedPortSet, SelectorSet, SetCollector
from felix.rules import (
    ALL,
    PORT_PROTOCOLS,
    CompiledRule,
    EntityMatch,
    IcmpMatch,
    IPNetwork,
    PortRange,
)

MULTIPORT_SLOTS = 15  # a multiport match holds 15 ports; a range takes two slots
LOG_PREFIX_MAX = 29  # the kernel's LOG prefix limit (with the trailing ": ")
_PROTOCOL_TEXT = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp", 136: "udplite"}
_ACTIONS = ("Allow", "Deny", "Pass", "Log")


class RuleError(ValueError):
    """A rule this renderer cannot express; its owner is rendered as a DROP instead."""


# --- mark and match text -------------------------------------------------------------------


def set_mark(bits: int) -> str:
    return f"-j MARK --set-xmark {bits:#x}/{bits:#x}"


def clear_mark(bits: int) -> str:
    return f"-j MARK --set-xmark 0x0/{bits:#x}"


def set_masked_mark(bits: int, mask: int) -> str:
    return f"-j MARK --set-xmark {bits:#x}/{mask:#x}"


def mark_is_set(bits: int) -> str:
    return f"-m mark --mark {bits:#x}/{bits:#x}"


def mark_is_clear(bits: int) -> str:
    return f"-m mark --mark 0x0/{bits:#x}"


def protocol_text(number: int) -> str:
    return _PROTOCOL_TEXT.get(number, str(number))


def _ports_text(ranges: Sequence[PortRange]) -> str:
    return ",".join(str(r) for r in ranges)


def multiport(side: str, ranges: Sequence[PortRange], negate: bool = False) -> str:
    flag = "--sports" if side == "src" else "--dports"
    return f"-m multiport {'! ' if negate else ''}{flag} {_ports_text(ranges)}"


def set_match(name: str, side: str, negate: bool = False, ip_port: bool = False) -> str:
    direction = f"{side},{side}" if ip_port else side
    return f"-m set {'! ' if negate else ''}--match-set {name} {direction}"


def net_match(side: str, net: IPNetwork, negate: bool = False) -> str:
    flag = "-s" if side == "src" else "-d"
    return f"{'! ' if negate else ''}{flag} {net}"


def icmp_match(family: int, icmp: IcmpMatch, negate: bool = False) -> str:
    value = str(icmp.type) if icmp.code is None else f"{icmp.type}/{icmp.code}"
    bang = "! " if negate else ""
    if family == 4:
        return f"-m icmp {bang}--icmp-type {value}"
    return f"-m icmp6 {bang}--icmpv6-type {value}"


def split_ports(ranges: Sequence[PortRange]) -> list[list[PortRange]]:
    """Felix's SplitPortList: chunks that fit one multiport match."""
    splits: list[list[PortRange]] = []
    current: list[PortRange] = []
    slots = MULTIPORT_SLOTS
    for r in ranges:
        needed = 1 if r.first == r.last else 2
        if slots < needed:
            splits.append(current)
            current, slots = [], MULTIPORT_SLOTS
        current.append(r)
        slots -= needed
    if current:
        splits.append(current)
    return splits


def join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


# --- validation and family filtering -------------------------------------------------------


def _check_ports(ranges: Sequence[PortRange]) -> None:
    for r in ranges:
        if not 0 <= r.first <= r.last <= 65535:
            raise RuleError(f"port range {r} is invalid")


def check_rule(rule: CompiledRule) -> None:
    """Raise RuleError for what iptables cannot express (Calico's validation rejects these)."""
    if rule.action not in _ACTIONS:
        raise RuleError(f"unknown action {rule.action!r}")
    for entity in (rule.source, rule.destination):
        has_ports = entity.ports or entity.not_ports
        if has_ports and rule.protocol is None:
            raise RuleError("ports need a protocol (TCP, UDP or SCTP)")
        _check_ports(entity.ports.ranges)
        _check_ports(entity.not_ports.ranges)
    for icmp in (rule.icmp, rule.not_icmp):
        if icmp and not (0 <= icmp.type <= 255 and (icmp.code is None or 0 <= icmp.code <= 255)):
            raise RuleError(f"ICMP type/code {icmp.type}/{icmp.code} out of range")


def _family_nets(nets: tuple[IPNetwork, ...], family: int) -> tuple[IPNetwork, ...] | None:
    """Nets of one family; None when filtering empties a non-empty list (Felix drops the rule)."""
    if not nets:
        return ()
    kept = tuple(n for n in nets if n.version == family)
    return kept or None


def for_family(rule: CompiledRule, family: int) -> CompiledRule | None:
    """The rule as it applies to one IP family, or None where it can never match there."""
    if rule.ip_version is not None and rule.ip_version != family:
        return None
    if rule.action in ("Allow", "Pass") and any(u.endswith("services") for u in rule.unenforced):
        return None  # services are not modelled: such a rule must never open traffic
    sides = []
    for entity in (rule.source, rule.destination):
        nets = _family_nets(entity.nets, family)
        not_nets = _family_nets(entity.not_nets, family)
        if nets is None or not_nets is None:
            return None
        if any(n.prefixlen == 0 for n in not_nets):
            return None  # a negated catch-all can never match
        sides.append(replace(entity, nets=nets, not_nets=not_nets))
    return _protocol_for_family(replace(rule, source=sides[0], destination=sides[1]), family)


def _protocol_for_family(rule: CompiledRule, family: int) -> CompiledRule | None:
    icmp_proto = 1 if family == 4 else 58
    protocol, not_protocol = rule.protocol, rule.not_protocol
    if rule.icmp or rule.not_icmp:
        # ICMP matches need this family's ICMP protocol; any other protocol never matches.
        if protocol is not None and protocol != icmp_proto:
            return None
        protocol = icmp_proto
    ports = any(e.ports or e.not_ports for e in (rule.source, rule.destination))
    if ports and protocol not in PORT_PROTOCOLS:
        return None
    if not_protocol is not None and protocol is not None:
        if not_protocol == protocol:
            return None
        not_protocol = None  # implied by the positive protocol; iptables allows one -p
    return replace(rule, protocol=protocol, not_protocol=not_protocol)


# --- match blocks --------------------------------------------------------------------------


@dataclass
class _Blocks:
    """Felix's matchBlockBuilder: ORed lists evaluated into scratch0 ("all blocks passed")."""

    marks: MarkBits
    rules: list[Rule] = field(default_factory=list)
    used: bool = False
    positive_done: bool = False

    def _start(self, initial: int) -> None:
        if not self.used:
            both = self.marks.scratch0 | self.marks.scratch1
            self.rules.append(Rule(action=set_masked_mark(initial, both)))
            self.used = True

    def positive(self, matches: Sequence[str]) -> None:
        self._start(0)
        if not self.positive_done:
            bit = self.marks.scratch0
        else:
            bit = self.marks.scratch1
            # Reset "this block passed" so an earlier block's hit does not leak into this one.
            self.rules.append(Rule(action=clear_mark(bit)))
        self.rules.extend(Rule(match=m, action=set_mark(bit)) for m in matches)
        if self.positive_done:
            self.rules.append(
                Rule(match=mark_is_clear(bit), action=clear_mark(self.marks.scratch0)))
        self.positive_done = True

    def negative(self, matches: Sequence[str]) -> None:
        self._start(self.marks.scratch0)
        self.rules.extend(Rule(match=m, action=clear_mark(self.marks.scratch0)) for m in matches)


# --- one rule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleContext:
    family: int
    marks: MarkBits
    sets: SetCollector
    log_prefix: str  # already expanded for the owning policy/profile
    deny_action: str = "DROP"


@dataclass
class _Side:
    name: str  # src | dst
    nets: tuple[IPNetwork, ...]
    not_nets: tuple[IPNetwork, ...]
    set_names: list[str]
    not_set_names: list[str]
    port_splits: list[list[PortRange]]
    named: list[str]
    not_port_splits: list[list[PortRange]]
    not_named: list[str]


def _side(name: str, entity: EntityMatch, protocol: int | None, sets: SetCollector) -> _Side:
    positive, negative = entity.set_selectors()
    ports, not_ports = entity.ports, entity.not_ports
    # Felix filters named-port sets by the (folded) positive selector and then skips the
    # selector set when only named ports are given: the named-port set already implies it.
    np_selector: Selector = positive or ALL
    set_names = []
    if positive is not None and (ports.ranges or not ports.names):
        set_names.append(sets.name(SelectorSet(positive)))
    return _Side(
        name=name,
        nets=entity.nets,
        not_nets=entity.not_nets,
        set_names=set_names,
        not_set_names=[sets.name(SelectorSet(negative))] if negative is not None else [],
        port_splits=split_ports(ports.ranges),
        named=[sets.name(NamedPortSet(np_selector, n, protocol)) for n in ports.names],
        not_port_splits=split_ports(not_ports.ranges),
        not_named=[sets.name(NamedPortSet(np_selector, n, protocol)) for n in not_ports.names],
    )


def _port_block(side: _Side, protocol: str) -> list[str]:
    numeric = [join(protocol, multiport(side.name, split)) for split in side.port_splits]
    named = [set_match(n, side.name, ip_port=True) for n in side.named]
    return numeric + named


def _blocks(sides: list[_Side], protocol: str, blocks: _Blocks) -> None:
    """Move what needs ORing out of the sides into match blocks (Felix's order)."""
    for side in sides:
        if len(side.port_splits) + len(side.named) > 1:
            blocks.positive(_port_block(side, protocol))
            side.port_splits, side.named = [], []
    for side in sides:
        if len(side.nets) > 1:
            blocks.positive([net_match(side.name, n) for n in side.nets])
            side.nets = ()
    for side in sides:
        if len(side.nets) + len(side.not_nets) > 1:
            blocks.negative([net_match(side.name, n) for n in side.not_nets])
            side.not_nets = ()


def _header_side(side: _Side) -> list[str]:
    parts = [net_match(side.name, n) for n in side.nets]
    return parts + [multiport(side.name, split) for split in side.port_splits]


def _not_header_side(side: _Side) -> list[str]:
    parts = [net_match(side.name, n, negate=True) for n in side.not_nets]
    return parts + [multiport(side.name, split, negate=True) for split in side.not_port_splits]


def _set_side(side: _Side) -> list[str]:
    parts = [set_match(n, side.name) for n in side.set_names]
    parts += [set_match(n, side.name, ip_port=True) for n in side.named]
    parts += [set_match(n, side.name, negate=True) for n in side.not_set_names]
    return parts + [set_match(n, side.name, negate=True, ip_port=True) for n in side.not_named]


def _main_match(rule: CompiledRule, sides: list[_Side], family: int) -> str:
    """Every criterion ANDed. Header matches (protocol, addresses, ports, ICMP) come first and
    IP set lookups last: iptables-nft evaluates the former natively and stops at the first
    miss, while each set match is a costlier xtables call."""
    parts = [f"-p {protocol_text(rule.protocol)}" if rule.protocol is not None else ""]
    for side in sides:
        parts += _header_side(side)
    if rule.icmp:
        parts.append(icmp_match(family, rule.icmp))
    if rule.not_protocol is not None:
        parts.append(f"! -p {protocol_text(rule.not_protocol)}")
    for side in sides:
        parts += _not_header_side(side)
    if rule.not_icmp:
        parts.append(icmp_match(family, rule.not_icmp, negate=True))
    for side in sides:
        parts += _set_side(side)
    return join(*parts)


def _actions(rule: CompiledRule, match: str, ctx: RuleContext) -> list[Rule]:
    marks = ctx.marks
    if rule.action == "Log":
        return [Rule(match=match, action=f'-j LOG --log-prefix "{ctx.log_prefix}"')]
    if rule.action == "Deny":
        return [Rule(match=match, action=set_mark(marks.drop)),
                Rule(match=mark_is_set(marks.drop), action=f"-j {ctx.deny_action}")]
    bit = marks.accept if rule.action == "Allow" else marks.pass_
    return [Rule(match=match, action=set_mark(bit)),
            Rule(match=mark_is_set(bit), action="-j RETURN")]


def render_rule(rule: CompiledRule, ctx: RuleContext) -> list[Rule]:
    """iptables rules for one compiled rule in ctx.family ([] when it cannot match there)."""
    check_rule(rule)
    filtered = for_family(rule, ctx.family)
    if filtered is None:
        return []
    proto = f"-p {protocol_text(filtered.protocol)}" if filtered.protocol is not None else ""
    sides = [_side("src", filtered.source, filtered.protocol, ctx.sets),
             _side("dst", filtered.destination, filtered.protocol, ctx.sets)]
    blocks = _Blocks(ctx.marks)
    _blocks(sides, proto, blocks)
    match = _main_match(filtered, sides, ctx.family)
    if blocks.used:
        match = join(match, mark_is_set(ctx.marks.scratch0))
    return blocks.rules + _actions(filtered, match, ctx)


def render_rules(rules: Sequence[CompiledRule], ctx: RuleContext, comment: str) -> list[Rule]:
    """A policy/profile chain body: every rule, trailing RETURNs dropped, owner comment first."""
    out: list[Rule] = []
    for rule in rules:
        out += render_rule(rule, ctx)
    while out and out[-1].action == "-j RETURN":
        out.pop()  # falling off the end returns anyway (as Felix trims them)
    if not out:
        return [Rule(comment=comment)]
    return [replace(out[0], comment=comment), *out[1:]]


def log_prefix(template: str, kind: str, name: str, namespace: str | None, tier: str) -> str:
    """Calico's %k/%p/%n/%t expansion, cut to what the kernel's LOG target accepts."""
    full = f"{namespace}/{name}" if namespace else name
    text = template
    for key, value in (("%k", kind), ("%p", full), ("%n", name), ("%t", tier)):
        text = text.replace(key, value)
    text = text.replace('"', "")
    return text[: LOG_PREFIX_MAX - 2] + ": "


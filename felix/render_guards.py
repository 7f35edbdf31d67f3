"""Port guards on policy jumps: an endpoint chain skips a policy chain that cannot match (pure).

A policy chain only acts on a packet through a rule whose match holds: Allow/Pass set their
mark bit and return, Deny sets the drop bit and drops, Log logs. The mark tests that follow an
action only see bits that action set: the endpoint chain jumps with the accept and pass bits
clear, and a set drop bit is always followed at once by the DROP. Match blocks also write the
two scratch bits, but every reader of those bits sets them first. So when every rule of a
policy's direction requires one protocol and numeric destination ports, a packet of another
protocol or port passes through the chain with no effect, and the jump to it can carry
`-p P -m multiport --dports <union of the rules' ports>` without changing any verdict.

Not guarded: a policy with no rules in the direction, a rule without a port protocol or without
numeric destination ports, named ports (their ports live in IP sets), rules of different
protocols, more ports than one multiport match holds, and anything rendered fail-closed (its
DROP must see every packet). Rules rendered only in one IP family still widen the union in the
other, which is safe: a guard may let through more than the chain matches, never less.

Consecutive guarded jumps of a tier are gathered into group chains (`cali-gi-`/`cali-go-` + a
hash of their rules) holding exactly the jumps (and returns) the endpoint chain would have had,
behind one guard on the union of their ports; groups gather into groups the same way, at most
GROUP_MAX to a group. A packet outside a group's union skips it with one test; one inside meets
what it met before, plus that test. Groups first gather only runs whose union is no more
scattered than its most scattered member (nearby ports: traffic to one is likely to be traffic
to the others), then any that still fit one guard (`guard_tree`).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

from felix.rules import PORT_PROTOCOLS, CompiledRule, PortRange

MULTIPORT_SLOTS = 15  # a multiport match holds 15 ports; a range takes two slots
# At most this many jumps in one group: a packet its union lets in tests at most this many
# guards there, however many policies the tier has.
GROUP_MAX = 16

Span = tuple[int, int]  # a port range, first to last: plain ints hash fast (guards are keys)


class Guard(NamedTuple):
    """Protocol and merged destination port ranges every rule of a policy direction needs."""

    protocol: int
    ports: tuple[Span, ...]

    def merged(self, other: Guard, compact: bool = False) -> Guard | None:
        """One guard covering both, or None when the protocols differ, it would not fit one
        multiport match or, `compact`, it would have more ranges than either has."""
        if other.protocol != self.protocol:
            return None
        union = _fitting(self.protocol, [*self.ports, *other.ports])
        scattered = union is not None and len(union.ports) > max(len(self.ports),
                                                                 len(other.ports))
        return None if union is None or (compact and scattered) else union

    def port_ranges(self) -> list[PortRange]:
        return [PortRange(first, last) for first, last in self.ports]


def _merge(spans: Sequence[Span]) -> tuple[Span, ...]:
    """Sorted, overlapping and adjacent ranges joined: the fewest multiport slots."""
    out: list[Span] = []
    for first, last in sorted(spans):
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
            continue
        out.append((first, last))
    return tuple(out)


def _slots(spans: Sequence[Span]) -> int:
    return sum(1 if first == last else 2 for first, last in spans)


def _fitting(protocol: int, spans: Sequence[Span]) -> Guard | None:
    merged = _merge(spans)
    return Guard(protocol, merged) if _slots(merged) <= MULTIPORT_SLOTS else None


def rules_guard(rules: Sequence[CompiledRule]) -> Guard | None:
    """The guard for a policy direction with these rules, or None when it cannot have one."""
    if not rules:
        return None
    protocols = {r.protocol for r in rules}
    if len(protocols) != 1:
        return None
    protocol = rules[0].protocol
    if protocol not in PORT_PROTOCOLS:
        return None
    spans: list[Span] = []
    for rule in rules:
        ports = rule.destination.ports
        if ports.names or not ports.ranges:
            return None
        spans += ((r.first, r.last) for r in ports.ranges)
    return _fitting(protocol, spans)


def group_chain_name(prefix: str, rules_text: Sequence[str]) -> str:
    """`prefix` + a hash of the group's rules, 28 characters: equal groups share a chain."""
    digest = hashlib.sha224("\n".join(rules_text).encode()).digest()
    encoded = base64.urlsafe_b64encode(digest).decode().rstrip("=")
    return prefix + encoded[: 28 - len(prefix)]


class _Guarded(Protocol):
    @property
    def guard(self) -> Guard | None: ...


_J = TypeVar("_J", bound=_Guarded)


class Group(NamedTuple, Generic[_J]):
    """Jumps (or groups) behind one guard on the union of theirs."""

    children: tuple[_J | Group[_J], ...]
    guard: Guard


def _gather(nodes: Sequence[_J | Group[_J]], compact: bool) -> list[_J | Group[_J]]:
    """One level: consecutive guarded nodes (at most GROUP_MAX) whose union fits one guard
    become a group; anything else stays as it is."""
    out: list[_J | Group[_J]] = []
    run: list[_J | Group[_J]] = []
    union: Guard | None = None

    def flush() -> None:
        if len(run) > 1 and union is not None:
            out.append(Group(tuple(run), union))
        else:
            out.extend(run)

    for node in nodes:
        merged = None
        if run and union is not None and node.guard is not None and len(run) < GROUP_MAX:
            merged = union.merged(node.guard, compact)
        if merged is not None:
            run.append(node)
            union = merged
            continue
        flush()
        run, union = [node], node.guard
    flush()
    return out


def guard_tree(jumps: Sequence[_J]) -> list[_J | Group[_J]]:
    """The jumps in order, gathered into groups level by level while any gather."""
    nodes: list[_J | Group[_J]] = list(jumps)
    for compact in (True, False):
        while len(gathered := _gather(nodes, compact)) < len(nodes):
            nodes = gathered
    return nodes

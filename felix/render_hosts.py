"""Host endpoints: which interface each one governs, and what applies there (pure).

Resolution follows Felix's endpoint_mgr.go. A HostEndpoint with `interfaceName: "*"` governs
every interface as the dispatch chains' default (the earliest by name wins if there are several);
one naming an interface governs it; one with only `expectedIPs` governs each of the node's
interfaces carrying one of those addresses (`RenderConfig.host_interfaces`, which the agent
fills). One endpoint per interface: the earliest by name wins. Unlike Felix, a named endpoint is
rendered even when the interface is not (yet) known: `-i eth1` simply matches nothing until
eth1 appears.

Each governed interface carries four policy lists (Felix's tierInfoToProtoTierInfo): normal
policy (filter, plus mangle for DNAT'd egress), its applyOnForward subset (forwarded traffic),
doNotTrack policy (raw) and preDNAT policy (mangle, ingress only).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from felix.calc import Endpoint, HostPolicyKind, PolicyIndex, TierPolicies
from felix.render_names import ALL_INTERFACES
from felix.rules import DIRECTIONS, Direction, IPAddress

Tiers = Mapping[Direction, list[TierPolicies]]


@dataclass(frozen=True)
class HostPlan:
    """One governed interface (ALL_INTERFACES for `interfaceName: "*"`) and its policy lists."""

    iface: str
    endpoint: Endpoint
    normal: Tiers
    forward: Tiers
    untracked: Tiers
    prednat: list[TierPolicies]  # ingress only

    @property
    def wildcard(self) -> bool:
        return self.iface == ALL_INTERFACES

    def tiers(self, kind: HostPolicyKind, direction: Direction) -> list[TierPolicies]:
        if kind == "prednat":
            return self.prednat if direction == "ingress" else []
        by_kind = {"normal": self.normal, "forward": self.forward, "untracked": self.untracked}
        return by_kind[kind][direction]

    @property
    def has_untracked(self) -> bool:
        return any(self.untracked.values())

    def uses(self) -> Iterator[tuple[str, Direction, list[TierPolicies]]]:
        """(table, direction, tiers) for every policy chain this interface jumps to."""
        for direction in DIRECTIONS:
            yield "filter", direction, self.tiers("normal", direction)
            yield "filter", direction, self.tiers("forward", direction)
            if self.has_untracked and not self.wildcard:
                yield "raw", direction, self.tiers("untracked", direction)
        yield "mangle", "egress", self.tiers("normal", "egress")
        yield "mangle", "ingress", self.prednat


@dataclass(frozen=True)
class Resolution:
    governed: list[tuple[str, Endpoint]]  # (interface or ALL_INTERFACES, endpoint), sorted
    unresolved: list[tuple[Endpoint, str]]  # endpoints governing nothing here, and why


def _addresses(texts: Sequence[str]) -> set[IPAddress]:
    out = set()
    for text in texts:
        try:
            out.add(ipaddress.ip_interface(text.strip()).ip)
        except ValueError:
            continue
    return out


def resolve(heps: Sequence[Endpoint], host_interfaces: Mapping[str, Sequence[str]],
            workload_prefix: str) -> Resolution:
    ordered = sorted(heps, key=lambda e: e.name)
    candidates: dict[str, list[Endpoint]] = {}
    wildcards = [e for e in ordered if e.interface == "*"]
    for ep in ordered:
        if ep.interface and ep.interface != "*":
            candidates.setdefault(ep.interface, []).append(ep)
    for iface, texts in sorted(host_interfaces.items()):
        if iface.startswith(workload_prefix):
            continue
        addrs = _addresses(texts)
        for ep in ordered:
            if not ep.interface and any(n.network_address in addrs for n in ep.nets):
                candidates.setdefault(iface, []).append(ep)
    governed = [(iface, min(eps, key=lambda e: e.name)) for iface, eps in candidates.items()]
    if wildcards:
        governed.append((ALL_INTERFACES, wildcards[0]))
    governed.sort(key=lambda g: g[0])
    winners = {ep.name for _, ep in governed}
    unresolved = []
    for ep in ordered:
        if ep.name in winners:
            continue
        if ep.interface == "*" or any(ep in eps for eps in candidates.values()):
            reason = "another host endpoint with an earlier name governs its interface"
        elif not host_interfaces:
            reason = "only expectedIPs, and the node's interfaces are not known"
        else:
            reason = "no interface on this node carries its expectedIPs"
        unresolved.append((ep, reason))
    return Resolution(governed, unresolved)


def _tiers(index: PolicyIndex, ep: Endpoint, kind: HostPolicyKind) -> Tiers:
    return {d: index.host_tiers_for(ep, d, kind) for d in DIRECTIONS}


def host_plan(index: PolicyIndex, iface: str, ep: Endpoint) -> HostPlan:
    return HostPlan(iface, ep, normal=_tiers(index, ep, "normal"),
                    forward=_tiers(index, ep, "forward"),
                    untracked=_tiers(index, ep, "untracked"),
                    prednat=index.host_tiers_for(ep, "ingress", "prednat"))

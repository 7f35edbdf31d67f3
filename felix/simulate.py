"""The executable specification of policy: a flow in, a verdict and its rule trace out (pure).

A flow is allowed when the source endpoint's egress (if the source is one of ours) and the
destination endpoint's ingress (if the destination is one of ours) both allow it. Each
direction runs like Felix's endpoint chain (`felix/rules/endpoints.go`): tiers in order, each
tier's policies in order, each policy's rules in order; Allow/Deny decide, Log records and goes
on, Pass leaves the tier; a tier nobody decided in ends with its defaultAction; when no tier
decides, the endpoint's profiles do, and when no profile allows, the packet is dropped.

Not modelled: connection tracking (every flow is a first packet), preDNAT/doNotTrack policies
and forwarded traffic through host endpoints (applyOnForward): a verdict lists such policies
selecting a host endpoint of a node on the flow's path as caveats; DefaultEndpointToHostAction
(workload-to-host traffic is policed by the workload's egress only), services, HTTP matches.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from felix.calc import (
    CompiledPolicy,
    CompiledProfile,
    Endpoint,
    EndpointRef,
    PolicyIndex,
    TierPolicies,
    ip_address,
)
from felix.rules import (
    PORT_PROTOCOLS,
    CompiledRule,
    Direction,
    IPAddress,
    Packet,
    describe_rule,
    protocol_name,
    protocol_number,
    rule_matches,
)

__all__ = ["EndpointRef", "Flow", "TraceStep", "Verdict", "simulate"]

EPHEMERAL_PORT = 33333
# Felix's default failsafe ports (config_params.go), matched on the destination port.
FAILSAFE_INBOUND = frozenset({(6, 22), (17, 68), (6, 179), (6, 2379), (6, 2380), (6, 5473),
                              (6, 6443), (6, 6666), (6, 6667)})
FAILSAFE_OUTBOUND = frozenset({(17, 53), (17, 67), (6, 179), (6, 2379), (6, 2380), (6, 5473),
                               (6, 6443), (6, 6666), (6, 6667)})


@dataclass(frozen=True)
class Flow:
    """One connection attempt. src/dst: an EndpointRef, `ns/pod`, an endpoint name or an IP."""

    src: EndpointRef | str | None  # None only with from_host: the host itself
    dst: EndpointRef | str
    protocol: str | int = "TCP"
    port: int | None = None  # destination port
    src_port: int | None = EPHEMERAL_PORT
    icmp_type: int | None = None
    icmp_code: int | None = None
    from_host: bool = False  # the source is the node that hosts the destination


@dataclass(frozen=True)
class TraceStep:
    direction: Direction
    endpoint: str
    tier: str | None  # tier name, "profile", or None for steps outside the tiers
    policy: str | None  # policy (see PolicyId.__str__) or profile name
    rule: int | None  # rule index; None for end-of-tier, no-match and special steps
    action: str  # Allow, Deny, Pass, Log, "no match", "end-of-tier deny", ...
    explanation: str


@dataclass
class Verdict:
    allowed: bool
    reason: str
    trace: list[TraceStep] = field(default_factory=list)
    # what the kernel also checks on this path but the simulation does not model
    caveats: list[str] = field(default_factory=list)


# --- resolving the flow --------------------------------------------------------------------


@dataclass(frozen=True)
class _Side:
    endpoint: Endpoint | None
    ip: IPAddress | None  # the literal address given, if any


def _side(index: PolicyIndex, value: EndpointRef | str | None) -> _Side:
    if value is None:
        raise ValueError("a flow needs a source unless it comes from the host (from_host)")
    if isinstance(value, str):
        ip = ip_address(value)
        if ip is not None:
            # An IP that belongs to an endpoint is that endpoint.
            return _Side(index.endpoint_for_ip(ip), ip)
        value = EndpointRef.parse(value)
    endpoint = index.find_endpoint(value)
    if endpoint is None:
        raise ValueError(f"no endpoint {value}")
    return _Side(endpoint, None)


def _version(src: _Side, dst: _Side) -> int:
    literal = {s.ip.version for s in (src, dst) if s.ip is not None}
    if len(literal) > 1:
        raise ValueError("source and destination addresses are of different IP versions")
    candidates = sorted(literal) or [4, 6]
    for version in candidates:
        if all(s.ip is not None or (s.endpoint and s.endpoint.addresses(version))
               for s in (src, dst)):
            return version
    raise ValueError("source and destination have no addresses of a common IP version")


def _address(side: _Side, version: int) -> IPAddress:
    if side.ip is not None:
        return side.ip
    assert side.endpoint is not None
    return side.endpoint.addresses(version)[0]


def _packet(flow: Flow, src: _Side, dst: _Side) -> Packet:
    version = _version(src, dst)
    proto = protocol_number(flow.protocol)
    if version == 6 and proto == 1:
        proto = 58  # "ICMP" on an IPv6 flow can only mean ICMPv6
    ports = proto in PORT_PROTOCOLS
    return Packet(
        src_ip=_address(src, version),
        dst_ip=_address(dst, version),
        protocol=proto,
        src_port=flow.src_port if ports else None,
        dst_port=flow.port if ports else None,
        icmp_type=flow.icmp_type,
        icmp_code=flow.icmp_code,
    )


# --- one direction of one endpoint ---------------------------------------------------------


@dataclass(frozen=True)
class _Decision:
    allowed: bool
    reason: str


@dataclass
class _Run:
    """Evaluating one direction of one endpoint; collects the trace as it goes."""

    index: PolicyIndex
    packet: Packet
    endpoint: Endpoint
    direction: Direction
    steps: list[TraceStep] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.direction} of {self.endpoint.display}"

    def step(self, tier: str | None, policy: str | None, rule: int | None, action: str,
             explanation: str) -> None:
        self.steps.append(TraceStep(self.direction, self.endpoint.display, tier, policy, rule,
                                    action, explanation))

    def first_match(self, rules: Sequence[CompiledRule], tier: str,
                    owner: str) -> tuple[int, str] | None:
        """Run rules in order; the first non-Log match decides (index, action)."""
        for i, rule in enumerate(rules):
            if not rule_matches(rule, self.packet, self.index):
                continue
            self.step(tier, owner, i, rule.action, describe_rule(rule))
            if rule.action != "Log":
                return i, rule.action
        return None


def _verb(action: str) -> str:
    return "allowed" if action == "Allow" else "denied"


def _run_policy(run: _Run, tier: str, policy: CompiledPolicy) -> _Decision | str | None:
    """A decision, "Pass", or None when no rule matched."""
    owner = str(policy.id)
    hit = run.first_match(policy.rules(run.direction), tier, owner)
    if hit is None:
        run.step(tier, owner, None, "no match", "no rule matched; next policy")
        return None
    index, action = hit
    if action == "Pass":
        return action
    return _Decision(action == "Allow",
                     f"{_verb(action)} by rule {index} of policy {owner} "
                     f"in tier {tier} on {run.where}")


def _run_tier(run: _Run, tier_policies: TierPolicies) -> _Decision | None:
    tier = tier_policies.tier
    for policy in tier_policies.policies:
        outcome = _run_policy(run, tier.name, policy)
        if outcome == "Pass":
            return None  # skip the rest of this tier
        if isinstance(outcome, _Decision):
            return outcome
    names = ", ".join(str(p.id) for p in tier_policies.policies)
    if tier.default_action == "Pass":
        run.step(tier.name, None, None, "end-of-tier pass",
                 f"no policy decided; tier {tier.name} defaultAction Pass: next tier")
        return None
    run.step(tier.name, None, None, "end-of-tier deny",
             f"no policy in tier {tier.name} allowed or passed the packet ({names})")
    return _Decision(False, f"denied by end of tier {tier.name} on {run.where} (policies: {names})")


def _run_profile(run: _Run, profile: CompiledProfile, context: str) -> _Decision | None:
    hit = run.first_match(profile.rules(run.direction), "profile", profile.name)
    if hit is None:
        run.step("profile", profile.name, None, "no match", "no rule matched; next profile")
        return None
    index, action = hit
    if action == "Pass":
        return None
    if profile.missing:
        return _Decision(False, f"denied by missing profile {profile.name} (fails closed) "
                                f"on {run.where}")
    return _Decision(action == "Allow", f"{_verb(action)} by rule {index} of profile "
                                        f"{profile.name} on {run.where} ({context})")


def _run_profiles(run: _Run, had_tiers: bool) -> _Decision:
    if had_tiers:
        context = "every tier passed"
        run.step("profile", None, None, "tiers passed: profile", "no tier decided; profiles do")
    else:
        context = "no policy applies"
        run.step("profile", None, None, "no policy: profile",
                 f"no policy applies to {run.where}; profiles decide")
    profiles = run.index.profiles_for(run.endpoint)
    for profile in profiles:
        if profile.missing:
            run.step("profile", profile.name, None, "missing profile",
                     "profile not in the datastore: deny-all stand-in")
        decision = _run_profile(run, profile, context)
        if decision is not None:
            return decision
    names = ", ".join(p.name for p in profiles) or "none"
    run.step("profile", None, None, "no profile matched: deny",
             f"no profile allowed the packet (profiles: {names})")
    return _Decision(False, f"denied: no profile allowed it on {run.where} (profiles: {names})")


def _failsafe(run: _Run) -> _Decision | None:
    table = FAILSAFE_INBOUND if run.direction == "ingress" else FAILSAFE_OUTBOUND
    key = (run.packet.protocol, run.packet.dst_port)
    if key not in table:
        return None
    what = f"{protocol_name(key[0]).lower()}:{key[1]}"
    run.step(None, None, None, "failsafe allow", f"{what} is a failsafe port for host endpoints")
    return _Decision(True, f"allowed by failsafe port {what} on {run.where}")


def _evaluate(run: _Run) -> _Decision:
    if run.endpoint.is_host and (decision := _failsafe(run)) is not None:
        return decision
    tiers = run.index.tiers_for(run.endpoint, run.direction)
    for tier_policies in tiers:
        decision = _run_tier(run, tier_policies)
        if decision is not None:
            return decision
    return _run_profiles(run, had_tiers=bool(tiers))


# --- the flow ------------------------------------------------------------------------------


def _host_to_local(src: Endpoint | None, dst: Endpoint | None) -> bool:
    """A host endpoint sending to a workload on its own node is the host itself."""
    return bool(src and dst and src.is_host and not dst.is_host and src.node == dst.node)


def _from_host(dst: Endpoint | None) -> Verdict:
    if dst is None or dst.is_host:
        raise ValueError("from_host needs a workload endpoint as destination")
    reason = f"allowed: traffic from a host to its local workload {dst.display} always is"
    step = TraceStep("ingress", dst.display, None, None, None, "host-to-local allow",
                     "kubelet probes must work: host-to-local-workload traffic bypasses policy")
    return Verdict(True, reason, [step])


def _shortcut(src: _Side, dst: _Side) -> Verdict | None:
    """Flows that never meet policy."""
    dst_ep = dst.endpoint
    if _host_to_local(src.endpoint, dst_ep):
        return _from_host(dst_ep)
    if dst_ep is not None and src.endpoint is dst_ep:
        return Verdict(True, f"allowed: traffic within {dst_ep.display} never leaves it")
    if src.endpoint is None and dst_ep is None:
        return Verdict(True, "allowed: neither side is an endpoint, so no policy applies")
    return None


def _checks(src: Endpoint | None, dst: Endpoint | None) -> list[tuple[Direction, Endpoint]]:
    checks: list[tuple[Direction, Endpoint]] = []
    if src is not None:
        checks.append(("egress", src))
    if dst is not None:
        checks.append(("ingress", dst))
    return checks


def _workload_to_host(direction: Direction, endpoint: Endpoint, src: Endpoint | None) -> bool:
    # Host endpoint policy does not police workloads' traffic in this model.
    return direction == "ingress" and endpoint.is_host and src is not None and not src.is_host


def simulate(index: PolicyIndex, flow: Flow) -> Verdict:
    """The verdict on `flow` and the rules that decided it, with caveats naming the host
    policies on its path it does not model. Raises ValueError on a bad flow."""
    dst = _side(index, flow.dst)
    src = _side(index, flow.src) if not flow.from_host else _Side(None, None)
    verdict = _simulate(index, flow, src, dst)
    nodes = {side.endpoint.node for side in (src, dst) if side.endpoint}
    verdict.caveats.extend(unmodelled_host_policy(index, nodes))
    return verdict


def unmodelled_host_policy(index: PolicyIndex, nodes: set[str]) -> list[str]:
    """preDNAT, doNotTrack and applyOnForward policy selecting a host endpoint of one of
    `nodes`: the kernel runs them on traffic through that node's host interfaces (raw and
    mangle tables, forwarded traffic), which the simulation leaves out, so its verdict may not
    be the kernel's there."""
    by_node = _HOST_NOTES.get(index)
    if by_node is None:  # once per index: a scenario asks for every pair of its pods
        by_node = _HOST_NOTES[index] = _host_notes(index)
    return [note for node in sorted(nodes) for note in by_node.get(node, ())]


_HOST_NOTES: weakref.WeakKeyDictionary[PolicyIndex, dict[str, list[str]]] = \
    weakref.WeakKeyDictionary()


def _host_notes(index: PolicyIndex) -> dict[str, list[str]]:
    flagged = [(p, [k for k, on in (("doNotTrack", p.do_not_track), ("preDNAT", p.pre_dnat),
                                    ("applyOnForward", p.apply_on_forward)) if on])
               for p in index.policies if not p.staged]
    flagged = [(p, kinds) for p, kinds in flagged if kinds]
    out: dict[str, list[str]] = {}
    for endpoint in index.endpoints:
        if not endpoint.is_host:
            continue
        for policy, kinds in flagged:
            if policy.selector.matches(endpoint.labels):
                out.setdefault(endpoint.node, []).append(
                    f"not simulated: {'/'.join(kinds)} policy {policy.id} applies to "
                    f"{endpoint.display} on node {endpoint.node}")
    return out


def _simulate(index: PolicyIndex, flow: Flow, src: _Side, dst: _Side) -> Verdict:
    if flow.from_host:
        return _from_host(dst.endpoint)
    shortcut = _shortcut(src, dst)
    if shortcut is not None:
        return shortcut
    packet = _packet(flow, src, dst)
    trace: list[TraceStep] = []
    reasons: list[str] = []
    for direction, endpoint in _checks(src.endpoint, dst.endpoint):
        if _workload_to_host(direction, endpoint, src.endpoint):
            trace.append(TraceStep(direction, endpoint.display, None, None, None, "not policed",
                                   "workload-to-host traffic is policed by workload egress only"))
            continue
        run = _Run(index, packet, endpoint, direction)
        decision = _evaluate(run)
        trace.extend(run.steps)
        if not decision.allowed:
            return Verdict(False, decision.reason, trace)
        reasons.append(decision.reason)
    return Verdict(True, "; ".join(reasons), trace)

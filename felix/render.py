"""The desired dataplane for one node: PolicyIndex in, iptables chains + IP sets out (pure).

`render` lays out Calico's chain tree for the endpoints on `node` in both IP families: static
chains and hooks (`render_static`), dispatch and per-endpoint chains (`render_endpoints`), one
chain per policy/profile direction in use (`render_rules`), and the IP sets those rules name
(`render_ipsets`). A policy or profile that cannot be rendered becomes a single DROP and is
reported, so a rendering gap never opens traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from felix.calc import CompiledPolicy, CompiledProfile, Endpoint, PolicyIndex, TierPolicies
from felix.model import Chain, Dataplane, Hook, IPSet, Rule, Table
from felix.render_config import RenderConfig
from felix.render_endpoints import (
    ChainOptions,
    EndpointSpec,
    dispatch_chain,
    endpoint_chain,
    policy_chain_name,
    profile_chain_name,
)
from felix.render_ipsets import SetCollector, build_sets, net_set
from felix.render_names import (
    ALL_POOLS_ID,
    FROM_HOST,
    FROM_HOST_DISPATCH,
    FROM_WL_DISPATCH,
    FROM_WORKLOAD,
    MASQ_POOLS_ID,
    TO_HOST,
    TO_HOST_DISPATCH,
    TO_WL_DISPATCH,
    TO_WORKLOAD,
)
from felix.render_names import (
    endpoint_chain as endpoint_chain_name,
)
from felix.render_rules import (
    RuleContext,
    RuleError,
    check_rule,
    log_prefix,
    render_rules,
)
from felix.render_static import filter_hooks, filter_static, nat_static, raw_static
from felix.rules import DIRECTIONS, CompiledRule, Direction

__all__ = ["Problem", "RenderResult", "local_endpoints", "render", "render_with_report"]


@dataclass(frozen=True)
class Problem:
    kind: str  # policy | profile | endpoint
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.reason}"


@dataclass(frozen=True)
class RenderResult:
    dataplane: Dataplane
    problems: tuple[Problem, ...] = ()


def local_endpoints(index: PolicyIndex, node: str) -> tuple[list[Endpoint], list[Endpoint]]:
    """(workload endpoints, host endpoints) on `node`, sorted by interface."""
    local = sorted((ep for ep in index.endpoints if ep.node == node), key=lambda e: e.interface)
    return [e for e in local if not e.is_host], [e for e in local if e.is_host]


def _rule_problem(rules: Sequence[CompiledRule]) -> str | None:
    for i, rule in enumerate(rules):
        try:
            check_rule(rule)
        except RuleError as err:
            return f"rule {i}: {err}"
    return None


@dataclass
class _Plan:
    """What the local endpoints need, independent of IP family."""

    workloads: list[tuple[Endpoint, dict[Direction, list[TierPolicies]]]]
    hosts: list[tuple[Endpoint, dict[Direction, list[TierPolicies]]]]
    policies: dict[tuple[str, Direction], tuple[CompiledPolicy, str]] = field(default_factory=dict)
    profiles: dict[str, CompiledProfile] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # policy/profile chain id -> reason


def _usable(ep: Endpoint, problems: list[Problem]) -> bool:
    if not ep.interface or ep.interface == "*":
        what = "wildcard interface" if ep.interface else "no interface name"
        problems.append(Problem("endpoint", ep.display,
                                f"{what}: not rendered (interface resolution is the agent's job)"))
        return False
    return True


def _plan(index: PolicyIndex, node: str) -> _Plan:
    workloads, hosts = local_endpoints(index, node)
    problems: list[Problem] = []
    plan = _Plan([], [], problems=problems)
    for eps, out in ((workloads, plan.workloads), (hosts, plan.hosts)):
        for ep in eps:
            if not _usable(ep, problems):
                continue
            tiers = {d: index.tiers_for(ep, d) for d in DIRECTIONS}
            out.append((ep, tiers))
            for direction, tier_list in tiers.items():
                for tier in tier_list:
                    for policy in tier.policies:
                        plan.policies[(policy_chain_name(policy, direction), direction)] = (
                            policy, tier.tier.name)
            for profile in index.profiles_for(ep):
                plan.profiles[profile.name] = profile
    for policy, _ in plan.policies.values():
        key = policy.id.chain_id
        if key not in plan.broken:
            reason = _rule_problem([*policy.ingress, *policy.egress])
            if reason:
                plan.broken[key] = reason
                problems.append(Problem("policy", str(policy.id), reason))
    for profile in plan.profiles.values():
        reason = _rule_problem([*profile.ingress, *profile.egress])
        if reason:
            plan.broken["profile:" + profile.name] = reason
            problems.append(Problem("profile", profile.name, reason))
    return plan


def _drop_chain(name: str, reason: str) -> Chain:
    return Chain(name, (Rule(action="-j DROP", comment=f"Unrenderable, fails closed: {reason}"),))


def _policy_chains(plan: _Plan, config: RenderConfig, sets: SetCollector) -> list[Chain]:
    chains = []
    for (name, direction), (policy, tier) in sorted(plan.policies.items()):
        reason = plan.broken.get(policy.id.chain_id)
        if reason:
            chains.append(_drop_chain(name, reason))
            continue
        ctx = RuleContext(sets.family, config.marks, sets,
                          log_prefix(config.log_prefix, policy.id.short_kind, policy.name,
                                     policy.namespace, tier), config.deny_action)
        where = f"{policy.namespace}/{policy.name}" if policy.namespace else policy.name
        comment = f"{policy.id.kind} {where} {direction}"
        chains.append(Chain(name, tuple(render_rules(policy.rules(direction), ctx, comment))))
    return chains


def _profile_chains(plan: _Plan, config: RenderConfig, sets: SetCollector) -> list[Chain]:
    chains = []
    for profile in sorted(plan.profiles.values(), key=lambda p: p.name):
        for direction in DIRECTIONS:
            name = profile_chain_name(profile.name, direction)
            reason = plan.broken.get("profile:" + profile.name)
            if reason:
                chains.append(_drop_chain(name, reason))
                continue
            ctx = RuleContext(sets.family, config.marks, sets,
                              log_prefix(config.log_prefix, "pro", profile.name, None, ""),
                              config.deny_action)
            comment = f"Profile {profile.name} {direction}"
            chains.append(Chain(name, tuple(render_rules(profile.rules(direction), ctx, comment))))
    return chains


def _endpoint_chains(plan: _Plan, config: RenderConfig) -> list[Chain]:
    marks = config.marks
    chains: list[Chain] = []
    to_wl, from_wl, to_host, from_host = [], [], [], []
    for group, is_host in ((plan.workloads, False), (plan.hosts, True)):
        for ep, tiers in group:
            to_prefix, from_prefix = (TO_HOST, FROM_HOST) if is_host else (TO_WORKLOAD,
                                                                           FROM_WORKLOAD)
            # "to" the endpoint is its ingress for workloads; for a host endpoint, "to" is
            # traffic leaving the host through the interface: its egress.
            to_dir: Direction = "egress" if is_host else "ingress"
            from_dir: Direction = "ingress" if is_host else "egress"
            profiles = list(ep.profiles)
            for prefix, direction, dispatch in ((to_prefix, to_dir, to_host if is_host else to_wl),
                                                (from_prefix, from_dir,
                                                 from_host if is_host else from_wl)):
                name = endpoint_chain_name(prefix, ep.interface)
                opts = ChainOptions(marks, config.deny_action,
                                    drop_encap=(config.drop_encap_from_workloads
                                                and not is_host and direction == "egress"),
                                    vxlan_port=config.vxlan_port)
                spec = EndpointSpec(name, direction, tiers[direction], profiles, is_host)
                chains.append(endpoint_chain(spec, opts))
                dispatch.append((ep.interface, name))
    chains += [
        dispatch_chain(TO_WL_DISPATCH, "-o", to_wl, drop_unknown=True),
        dispatch_chain(FROM_WL_DISPATCH, "-i", from_wl, drop_unknown=True),
        dispatch_chain(TO_HOST_DISPATCH, "-o", to_host, drop_unknown=False),
        dispatch_chain(FROM_HOST_DISPATCH, "-i", from_host, drop_unknown=False),
    ]
    return chains


def _table(name: str, chains: list[Chain], hooks: tuple[Hook, ...] = ()) -> Table:
    return Table(name, {c.name: c for c in chains}, hooks)


def _pool_sets(config: RenderConfig, family: int) -> dict[str, IPSet]:
    if not config.pool_nets(family):
        return {}
    sets = (net_set(family, MASQ_POOLS_ID, config.pool_nets(family, nat_only=True)),
            net_set(family, ALL_POOLS_ID, config.pool_nets(family)))
    return {s.name: s for s in sets}


def render_with_report(index: PolicyIndex, node: str, config: RenderConfig) -> RenderResult:
    plan = _plan(index, node)
    tables: dict[tuple[int, str], Table] = {}
    ipsets: dict[str, IPSet] = {}
    for family in config.ip_versions:
        sets = SetCollector(family)
        filter_chains = [*filter_static(config, family), *_endpoint_chains(plan, config),
                         *_policy_chains(plan, config, sets), *_profile_chains(plan, config, sets)]
        tables[(family, "filter")] = _table("filter", filter_chains, filter_hooks(config))
        raw_chains, raw_hooks = raw_static(config)
        tables[(family, "raw")] = _table("raw", raw_chains, raw_hooks)
        nat_chains, nat_hooks = nat_static(config, family)
        tables[(family, "nat")] = _table("nat", nat_chains, nat_hooks)
        ipsets.update(build_sets(index, sets))
        ipsets.update(_pool_sets(config, family))
    return RenderResult(Dataplane(tables, ipsets), tuple(plan.problems))


def render(index: PolicyIndex, node: str, config: RenderConfig | None = None) -> Dataplane:
    """The desired dataplane for `node`; see render_with_report for what could not be rendered."""
    return render_with_report(index, node, config or RenderConfig()).dataplane

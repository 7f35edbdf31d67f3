"""The desired dataplane for one node: PolicyIndex in, iptables chains + IP sets out (pure).

`render` lays out Calico's chain tree for the endpoints on `node` in both IP families: static
chains and hooks (`render_static`), workload dispatch and per-endpoint chains
(`render_endpoints`), host endpoints resolved to interfaces (`render_hosts`) with their filter,
mangle (preDNAT) and raw (doNotTrack) chains (`render_host_chains`), one chain per policy/profile
direction in use in each table (`render_rules`), and the IP sets those rules name
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
from felix.render_host_chains import filter_host_chains, mangle_host_chains, raw_host_chains
from felix.render_hosts import HostPlan, host_plan, resolve
from felix.render_ipsets import SetCollector, build_sets, net_set
from felix.render_names import (
    ALL_POOLS_ID,
    FROM_WL_DISPATCH,
    FROM_WORKLOAD,
    MASQ_POOLS_ID,
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
from felix.render_static import (
    filter_hooks,
    filter_static,
    mangle_static,
    nat_static,
    raw_static,
)
from felix.rules import DIRECTIONS, CompiledRule, Direction

TABLES = ("filter", "raw", "mangle")  # the tables policy chains are rendered into

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


Uses = dict[tuple[str, Direction], tuple[CompiledPolicy, str]]  # (chain, dir) -> (policy, tier)


@dataclass
class _Plan:
    """What the local endpoints need, independent of IP family; policies/profiles per table."""

    workloads: list[tuple[Endpoint, dict[Direction, list[TierPolicies]]]]
    hosts: list[HostPlan] = field(default_factory=list)
    policies: dict[str, Uses] = field(default_factory=lambda: {t: {} for t in TABLES})
    profiles: dict[str, dict[str, CompiledProfile]] = field(
        default_factory=lambda: {t: {} for t in TABLES})
    problems: list[Problem] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # policy/profile chain id -> reason

    def use(self, table: str, direction: Direction, tiers: list[TierPolicies]) -> None:
        for tier in tiers:
            for policy in tier.policies:
                self.policies[table][(policy_chain_name(policy, direction), direction)] = (
                    policy, tier.tier.name)


def _host_policy_problem(policy: CompiledPolicy) -> str | None:
    """Calico's GlobalNetworkPolicy constraints on preDNAT and doNotTrack."""
    if policy.pre_dnat and policy.do_not_track:
        return "preDNAT and doNotTrack are mutually exclusive"
    if (policy.pre_dnat or policy.do_not_track) and not policy.apply_on_forward:
        return f"{'preDNAT' if policy.pre_dnat else 'doNotTrack'} requires applyOnForward"
    if policy.pre_dnat and ("egress" in policy.types or policy.egress):
        return "preDNAT policy cannot have egress rules or type"
    return None


def _plan_hosts(index: PolicyIndex, heps: list[Endpoint], config: RenderConfig,
                plan: _Plan) -> None:
    resolution = resolve(heps, config.host_interfaces, config.interface_prefix)
    for ep, reason in resolution.unresolved:
        plan.problems.append(Problem("endpoint", ep.display, f"not rendered: {reason}"))
    for iface, ep in resolution.governed:
        host = host_plan(index, iface, ep)
        if host.wildcard and host.has_untracked:
            plan.problems.append(Problem("endpoint", ep.display, "doNotTrack policy is not "
                                         "supported for interfaceName '*'; ignored, as Felix"))
        plan.hosts.append(host)
        for table, direction, tiers in host.uses():
            plan.use(table, direction, tiers)
        for profile in index.profiles_for(ep):
            plan.profiles["filter"][profile.name] = profile
            plan.profiles["mangle"][profile.name] = profile


def _plan_workloads(index: PolicyIndex, weps: list[Endpoint], plan: _Plan) -> None:
    for ep in weps:
        if not ep.interface or ep.interface == "*":
            what = "wildcard interface" if ep.interface else "no interface name"
            plan.problems.append(Problem("endpoint", ep.display, f"{what}: not rendered"))
            continue
        tiers = {d: index.tiers_for(ep, d) for d in DIRECTIONS}
        plan.workloads.append((ep, tiers))
        for direction, tier_list in tiers.items():
            plan.use("filter", direction, tier_list)
        for profile in index.profiles_for(ep):
            plan.profiles["filter"][profile.name] = profile


def _check(plan: _Plan) -> None:
    """Mark every policy/profile in use that cannot be rendered: its chains become a DROP."""
    policies = {p.id.chain_id: p for uses in plan.policies.values() for p, _ in uses.values()}
    for key, policy in policies.items():
        reason = _host_policy_problem(policy) or _rule_problem([*policy.ingress, *policy.egress])
        if reason:
            plan.broken[key] = reason
            plan.problems.append(Problem("policy", str(policy.id), reason))
    profiles = {p.name: p for by_name in plan.profiles.values() for p in by_name.values()}
    for profile in sorted(profiles.values(), key=lambda p: p.name):
        reason = _rule_problem([*profile.ingress, *profile.egress])
        if reason:
            plan.broken["profile:" + profile.name] = reason
            plan.problems.append(Problem("profile", profile.name, reason))


def _plan(index: PolicyIndex, node: str, config: RenderConfig) -> _Plan:
    workloads, hosts = local_endpoints(index, node)
    plan = _Plan([])
    _plan_workloads(index, workloads, plan)
    _plan_hosts(index, hosts, config, plan)
    _check(plan)
    return plan


def _drop_chain(name: str, reason: str) -> Chain:
    return Chain(name, (Rule(action="-j DROP", comment=f"Unrenderable, fails closed: {reason}"),))


def _deny(config: RenderConfig, table: str) -> str:
    return config.deny_action if table == "filter" else "DROP"  # REJECT is filter-only


def _policy_chains(plan: _Plan, table: str, config: RenderConfig,
                   sets: SetCollector) -> list[Chain]:
    chains = []
    for (name, direction), (policy, tier) in sorted(plan.policies[table].items()):
        reason = plan.broken.get(policy.id.chain_id)
        if reason:
            chains.append(_drop_chain(name, reason))
            continue
        ctx = RuleContext(sets.family, config.marks, sets,
                          log_prefix(config.log_prefix, policy.id.short_kind, policy.name,
                                     policy.namespace, tier), _deny(config, table))
        where = f"{policy.namespace}/{policy.name}" if policy.namespace else policy.name
        comment = f"{policy.id.kind} {where} {direction}"
        chains.append(Chain(name, tuple(render_rules(policy.rules(direction), ctx, comment))))
    return chains


def _profile_chains(plan: _Plan, table: str, config: RenderConfig,
                    sets: SetCollector) -> list[Chain]:
    chains = []
    for profile in sorted(plan.profiles[table].values(), key=lambda p: p.name):
        for direction in DIRECTIONS:
            name = profile_chain_name(profile.name, direction)
            reason = plan.broken.get("profile:" + profile.name)
            if reason:
                chains.append(_drop_chain(name, reason))
                continue
            ctx = RuleContext(sets.family, config.marks, sets,
                              log_prefix(config.log_prefix, "pro", profile.name, None, ""),
                              _deny(config, table))
            comment = f"Profile {profile.name} {direction}"
            chains.append(Chain(name, tuple(render_rules(profile.rules(direction), ctx, comment))))
    return chains


def _workload_chains(plan: _Plan, config: RenderConfig) -> list[Chain]:
    chains: list[Chain] = []
    to_wl: list[tuple[str, str]] = []
    from_wl: list[tuple[str, str]] = []
    for ep, tiers in plan.workloads:
        for prefix, direction, dispatch in ((TO_WORKLOAD, "ingress", to_wl),
                                            (FROM_WORKLOAD, "egress", from_wl)):
            name = endpoint_chain_name(prefix, ep.interface)
            opts = ChainOptions(config.marks, config.deny_action,
                                drop_encap=config.drop_encap_from_workloads
                                and direction == "egress", vxlan_port=config.vxlan_port)
            spec = EndpointSpec(name, direction, tiers[direction], list(ep.profiles))
            chains.append(endpoint_chain(spec, opts))
            dispatch.append((ep.interface, name))
    return [*chains,
            dispatch_chain(TO_WL_DISPATCH, "-o", to_wl, drop_unknown=True),
            dispatch_chain(FROM_WL_DISPATCH, "-i", from_wl, drop_unknown=True)]


def _table(name: str, chains: list[Chain], hooks: tuple[Hook, ...] = ()) -> Table:
    return Table(name, {c.name: c for c in chains}, hooks)


def _pool_sets(config: RenderConfig, family: int) -> dict[str, IPSet]:
    if not config.pool_nets(family):
        return {}
    sets = (net_set(family, MASQ_POOLS_ID, config.pool_nets(family, nat_only=True)),
            net_set(family, ALL_POOLS_ID, config.pool_nets(family)))
    return {s.name: s for s in sets}


def _rule_chains(plan: _Plan, table: str, config: RenderConfig,
                 sets: SetCollector) -> list[Chain]:
    return [*_policy_chains(plan, table, config, sets),
            *_profile_chains(plan, table, config, sets)]


def render_with_report(index: PolicyIndex, node: str, config: RenderConfig) -> RenderResult:
    plan = _plan(index, node, config)
    tables: dict[tuple[int, str], Table] = {}
    ipsets: dict[str, IPSet] = {}
    for family in config.ip_versions:
        sets = SetCollector(family)
        filter_chains = [*filter_static(config, family), *_workload_chains(plan, config),
                         *filter_host_chains(plan.hosts, config),
                         *_rule_chains(plan, "filter", config, sets)]
        tables[(family, "filter")] = _table("filter", filter_chains, filter_hooks(config))
        raw_chains, raw_hooks = raw_static(config)
        raw_chains += [*raw_host_chains(plan.hosts, config),
                       *_rule_chains(plan, "raw", config, sets)]
        tables[(family, "raw")] = _table("raw", raw_chains, raw_hooks)
        mangle_chains, mangle_hooks = mangle_static(config)
        mangle_chains += [*mangle_host_chains(plan.hosts, config),
                          *_rule_chains(plan, "mangle", config, sets)]
        tables[(family, "mangle")] = _table("mangle", mangle_chains, mangle_hooks)
        nat_chains, nat_hooks = nat_static(config, family)
        tables[(family, "nat")] = _table("nat", nat_chains, nat_hooks)
        ipsets.update(build_sets(index, sets))
        ipsets.update(_pool_sets(config, family))
    return RenderResult(Dataplane(tables, ipsets), tuple(plan.problems))


def render(index: PolicyIndex, node: str, config: RenderConfig | None = None) -> Dataplane:
    """The desired dataplane for `node`; see render_with_report for what could not be rendered."""
    return render_with_report(index, node, config or RenderConfig()).dataplane

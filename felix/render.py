"""The desired dataplane for one node: PolicyIndex in, iptables chains + IP sets out (pure).

`render` lays out Calico's chain tree for the endpoints on `node` in both IP families: static
chains and hooks (`render_static`), workload dispatch and per-endpoint chains
(`render_endpoints`), host endpoints resolved to interfaces (`render_hosts`) with their filter,
mangle (preDNAT) and raw (doNotTrack) chains (`render_host_chains`), one chain per policy/profile
direction in use in each table (`render_rules`), and the IP sets those rules name
(`render_ipsets`). A policy or profile that cannot be rendered becomes a single DROP and is
reported (`render_plan`), so a rendering gap never opens traffic.

Given the `RenderCache` of the previous call (the agent keeps one), every piece whose inputs
are unchanged is taken from it instead of rendered again; the result is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from felix.calc import CompiledPolicy, CompiledProfile, PolicyIndex
from felix.model import Chain, Dataplane, Hook, IPSet, Rule, Table
from felix.render_cache import RenderCache
from felix.render_config import RenderConfig
from felix.render_endpoints import (
    ChainOptions,
    EndpointSpec,
    GuardOf,
    dispatch_chain,
    endpoint_chains,
    profile_chain_name,
    tier_jumps,
)
from felix.render_guards import Guard, rules_guard
from felix.render_host_chains import filter_host_chains, mangle_host_chains, raw_host_chains
from felix.render_ipsets import SetCollector, SetSpec, build_sets, net_set
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
from felix.render_plan import Plan, Problem, local_endpoints, plan
from felix.render_rules import RuleContext, log_prefix, render_rules
from felix.render_static import (
    filter_hooks,
    filter_static,
    mangle_static,
    nat_static,
    raw_static,
)
from felix.rules import DIRECTIONS, Direction

__all__ = ["Problem", "RenderResult", "local_endpoints", "render", "render_with_report"]

# A rule chain and the IP sets its rules name, in the order they name them.
RuleChain = tuple[Chain, tuple[tuple[str, SetSpec], ...]]


@dataclass(frozen=True)
class RenderResult:
    dataplane: Dataplane
    problems: tuple[Problem, ...] = ()


def _drop_chain(name: str, reason: str) -> Chain:
    return Chain(name, (Rule(action="-j DROP", comment=f"Unrenderable, fails closed: {reason}"),))


def _deny(config: RenderConfig, table: str) -> str:
    return config.deny_action if table == "filter" else "DROP"  # REJECT is filter-only


def _config_key(config: RenderConfig) -> tuple[object, ...]:
    """Everything in the config but the host's interfaces (only host endpoint resolution
    reads those, and that is not cached)."""
    return tuple(getattr(config, f.name) for f in fields(config) if f.name != "host_interfaces")


def _rule_chain(name: str, reason: str | None, family: int, table: str, config: RenderConfig,
                prefix: str, render: Callable[[RuleContext], list[Rule]]) -> RuleChain:
    if reason:
        return _drop_chain(name, reason), ()
    sets = SetCollector(family)
    ctx = RuleContext(family, config.marks, sets, prefix, _deny(config, table))
    return Chain(name, tuple(render(ctx))), tuple(sets.specs.items())


def _policy_chains(plan: Plan, table: str, config: RenderConfig, sets: SetCollector,
                   cache: RenderCache) -> list[Chain]:
    chains = []
    key = (table, sets.family, config.mark_mask, config.log_prefix, _deny(config, table))
    for (name, direction), (policy, tier) in sorted(plan.policies[table].items()):
        reason = plan.broken.get(policy.id.chain_id)

        def make(name: str = name, direction: Direction = direction,
                 policy: CompiledPolicy = policy, tier: str = tier,
                 reason: str | None = reason) -> RuleChain:
            prefix = log_prefix(config.log_prefix, policy.id.short_kind, policy.name,
                                policy.namespace, tier)
            where = f"{policy.namespace}/{policy.name}" if policy.namespace else policy.name
            comment = f"{policy.id.kind} {where} {direction}"
            return _rule_chain(name, reason, sets.family, table, config, prefix,
                               lambda ctx: render_rules(policy.rules(direction), ctx, comment))

        chain, used = cache.get_for(policy, ("policy", name, direction, tier, reason, key), make)
        sets.specs.update(used)
        chains.append(chain)
    return chains


def _profile_chains(plan: Plan, table: str, config: RenderConfig, sets: SetCollector,
                    cache: RenderCache) -> list[Chain]:
    chains = []
    key = (table, sets.family, config.mark_mask, config.log_prefix, _deny(config, table))
    for profile in sorted(plan.profiles[table].values(), key=lambda p: p.name):
        reason = plan.broken.get("profile:" + profile.name)
        for direction in DIRECTIONS:
            name = profile_chain_name(profile.name, direction)

            def make(name: str = name, direction: Direction = direction,
                     profile: CompiledProfile = profile, reason: str | None = reason
                     ) -> RuleChain:
                prefix = log_prefix(config.log_prefix, "pro", profile.name, None, "")
                comment = f"Profile {profile.name} {direction}"
                return _rule_chain(name, reason, sets.family, table, config, prefix,
                                   lambda ctx: render_rules(profile.rules(direction), ctx,
                                                            comment))

            chain, used = cache.get_for(profile, ("profile", name, direction, reason, key), make)
            sets.specs.update(used)
            chains.append(chain)
    return chains


def _guard_of(plan: Plan, cache: RenderCache) -> GuardOf:
    def guard(policy: CompiledPolicy, direction: Direction) -> Guard | None:
        if policy.id.chain_id in plan.broken:
            return None  # its DROP must see every packet
        return cache.get_for(policy, ("guard", direction),
                             lambda: rules_guard(policy.rules(direction)))
    return guard


def _workload_chains(plan: Plan, config: RenderConfig, cache: RenderCache) -> list[Chain]:
    chains: dict[str, Chain] = {}
    guard_of = _guard_of(plan, cache)
    broken = frozenset(plan.broken)  # guards depend on it
    to_wl: list[tuple[str, str]] = []
    from_wl: list[tuple[str, str]] = []
    options = {d: ChainOptions(config.marks, config.deny_action,
                               drop_encap=config.drop_encap_from_workloads and d == "egress",
                               vxlan_port=config.vxlan_port) for d in DIRECTIONS}
    for ep, tiers in plan.workloads:
        for prefix, direction, dispatch in ((TO_WORKLOAD, "ingress", to_wl),
                                            (FROM_WORKLOAD, "egress", from_wl)):
            name = endpoint_chain_name(prefix, ep.interface)
            opts = options[direction]
            # the same tier list as last time (IncrementalIndex) makes the same jumps
            jumps = cache.get_for(tiers[direction], ("jumps", direction, broken),
                                  lambda t=tiers[direction], d=direction: tier_jumps(
                                      t, d, guard_of))
            spec = EndpointSpec(name, direction, jumps, tuple(ep.profiles))
            made = cache.get(("endpoint", spec, opts), lambda s=spec, o=opts: endpoint_chains(s, o))
            chains.update((c.name, c) for c in made)
            dispatch.append((ep.interface, name))
    dispatchers = [cache.get(("dispatch", name, flag, tuple(targets)),
                             lambda n=name, f=flag, t=targets: dispatch_chain(n, f, t, True))
                   for name, flag, targets in ((TO_WL_DISPATCH, "-o", to_wl),
                                               (FROM_WL_DISPATCH, "-i", from_wl))]
    return [*chains.values(), *dispatchers]


def _table(name: str, chains: list[Chain], hooks: tuple[Hook, ...] = ()) -> Table:
    return Table(name, {c.name: c for c in chains}, hooks)


def _pool_sets(config: RenderConfig, family: int) -> dict[str, IPSet]:
    if not config.pool_nets(family):
        return {}
    sets = (net_set(family, MASQ_POOLS_ID, config.pool_nets(family, nat_only=True)),
            net_set(family, ALL_POOLS_ID, config.pool_nets(family)))
    return {s.name: s for s in sets}


def _rule_chains(plan: Plan, table: str, config: RenderConfig, sets: SetCollector,
                 cache: RenderCache) -> list[Chain]:
    return [*_policy_chains(plan, table, config, sets, cache),
            *_profile_chains(plan, table, config, sets, cache)]


@dataclass(frozen=True)
class _Static:
    """The chains and hooks that depend on the config and family alone."""

    filter: tuple[list[Chain], tuple[Hook, ...]]
    raw: tuple[list[Chain], tuple[Hook, ...]]
    mangle: tuple[list[Chain], tuple[Hook, ...]]
    nat: tuple[list[Chain], tuple[Hook, ...]]
    pools: dict[str, IPSet]


def _static(config: RenderConfig, family: int) -> _Static:
    return _Static((filter_static(config, family), filter_hooks(config)), raw_static(config),
                   mangle_static(config), nat_static(config, family), _pool_sets(config, family))


def render_with_report(index: PolicyIndex, node: str, config: RenderConfig,
                       cache: RenderCache | None = None) -> RenderResult:
    cache = cache if cache is not None else RenderCache()
    cache.start()
    planned = plan(index, node, config, cache)
    guard_of = _guard_of(planned, cache)
    workload_chains = _workload_chains(planned, config, cache)
    config_key = _config_key(config)
    tables: dict[tuple[int, str], Table] = {}
    ipsets: dict[str, IPSet] = {}
    for family in config.ip_versions:
        static = cache.get(("static", family, config_key), lambda f=family: _static(config, f))
        sets = SetCollector(family)
        filter_chains = [*static.filter[0], *workload_chains,
                         *filter_host_chains(planned.hosts, config, guard_of, cache),
                         *_rule_chains(planned, "filter", config, sets, cache)]
        tables[(family, "filter")] = _table("filter", filter_chains, static.filter[1])
        raw_chains = [*static.raw[0], *raw_host_chains(planned.hosts, config, guard_of, cache),
                      *_rule_chains(planned, "raw", config, sets, cache)]
        tables[(family, "raw")] = _table("raw", raw_chains, static.raw[1])
        mangle_chains = [*static.mangle[0],
                         *mangle_host_chains(planned.hosts, config, guard_of, cache),
                         *_rule_chains(planned, "mangle", config, sets, cache)]
        tables[(family, "mangle")] = _table("mangle", mangle_chains, static.mangle[1])
        tables[(family, "nat")] = _table("nat", *static.nat)
        ipsets.update(build_sets(index, sets, cache))
        ipsets.update(static.pools)
    return RenderResult(Dataplane(tables, ipsets), tuple(planned.problems))


def render(index: PolicyIndex, node: str, config: RenderConfig | None = None) -> Dataplane:
    """The desired dataplane for `node`; see render_with_report for what could not be rendered."""
    return render_with_report(index, node, config or RenderConfig()).dataplane

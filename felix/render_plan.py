"""What a node's rendering needs, independent of IP family and table layout (pure).

`plan` picks the local endpoints, asks the PolicyIndex what applies to each (workloads by
interface; host endpoints resolved to interfaces, `render_hosts`), records every policy and
profile chain in use per table, and checks each of those once: a policy or profile that
cannot be rendered is marked broken (its chains become a DROP) and reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from felix.calc import CompiledPolicy, CompiledProfile, Endpoint, PolicyIndex, TierPolicies
from felix.render_cache import RenderCache
from felix.render_config import RenderConfig
from felix.render_endpoints import policy_chain_name
from felix.render_hosts import HostPlan, host_plan, resolve
from felix.render_rules import RuleError, check_rule
from felix.rules import DIRECTIONS, CompiledRule, Direction

TABLES = ("filter", "raw", "mangle")  # the tables policy chains are rendered into


@dataclass(frozen=True)
class Problem:
    kind: str  # policy | profile | endpoint
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.reason}"


Uses = dict[tuple[str, Direction], tuple[CompiledPolicy, str]]  # (chain, dir) -> (policy, tier)


@dataclass
class Plan:
    """What the local endpoints need, independent of IP family; policies/profiles per table."""

    workloads: list[tuple[Endpoint, dict[Direction, list[TierPolicies]]]]
    hosts: list[HostPlan] = field(default_factory=list)
    policies: dict[str, Uses] = field(default_factory=lambda: {t: {} for t in TABLES})
    profiles: dict[str, dict[str, CompiledProfile]] = field(
        default_factory=lambda: {t: {} for t in TABLES})
    problems: list[Problem] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # policy/profile chain id -> reason

    def use(self, table: str, direction: Direction, tiers: list[TierPolicies],
            cache: RenderCache) -> None:
        self.policies[table].update(cache.get_for(tiers, ("uses", direction), lambda: [
            ((policy_chain_name(policy, direction), direction), (policy, tier.tier.name))
            for tier in tiers for policy in tier.policies]))


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


def _host_policy_problem(policy: CompiledPolicy) -> str | None:
    """Calico's GlobalNetworkPolicy constraints on preDNAT and doNotTrack."""
    if policy.pre_dnat and policy.do_not_track:
        return "preDNAT and doNotTrack are mutually exclusive"
    if (policy.pre_dnat or policy.do_not_track) and not policy.apply_on_forward:
        return f"{'preDNAT' if policy.pre_dnat else 'doNotTrack'} requires applyOnForward"
    if policy.pre_dnat and ("egress" in policy.types or policy.egress):
        return "preDNAT policy cannot have egress rules or type"
    return None


def policy_problem(policy: CompiledPolicy) -> str | None:
    return _host_policy_problem(policy) or _rule_problem([*policy.ingress, *policy.egress])


def profile_problem(profile: CompiledProfile) -> str | None:
    return _rule_problem([*profile.ingress, *profile.egress])


def _plan_hosts(index: PolicyIndex, heps: list[Endpoint], config: RenderConfig,
                plan: Plan, cache: RenderCache) -> None:
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
            plan.use(table, direction, tiers, cache)
        for profile in index.profiles_for(ep):
            plan.profiles["filter"][profile.name] = profile
            plan.profiles["mangle"][profile.name] = profile


def _plan_workloads(index: PolicyIndex, weps: list[Endpoint], plan: Plan,
                    cache: RenderCache) -> None:
    for ep in weps:
        if not ep.interface or ep.interface == "*":
            what = "wildcard interface" if ep.interface else "no interface name"
            plan.problems.append(Problem("endpoint", ep.display, f"{what}: not rendered"))
            continue
        tiers = {d: index.tiers_for(ep, d) for d in DIRECTIONS}
        plan.workloads.append((ep, tiers))
        for direction, tier_list in tiers.items():
            plan.use("filter", direction, tier_list, cache)
        for profile in index.profiles_for(ep):
            plan.profiles["filter"][profile.name] = profile


def _check(plan: Plan, cache: RenderCache) -> None:
    """Mark every policy/profile in use that cannot be rendered: its chains become a DROP."""
    policies = {p.id.chain_id: p for uses in plan.policies.values() for p, _ in uses.values()}
    for key, policy in policies.items():
        reason = cache.get_for(policy, "problem", lambda p=policy: policy_problem(p))
        if reason:
            plan.broken[key] = reason
            plan.problems.append(Problem("policy", str(policy.id), reason))
    profiles = {p.name: p for by_name in plan.profiles.values() for p in by_name.values()}
    for profile in sorted(profiles.values(), key=lambda p: p.name):
        reason = cache.get_for(profile, "problem", lambda p=profile: profile_problem(p))
        if reason:
            plan.broken["profile:" + profile.name] = reason
            plan.problems.append(Problem("profile", profile.name, reason))


def plan(index: PolicyIndex, node: str, config: RenderConfig, cache: RenderCache) -> Plan:
    workloads, hosts = local_endpoints(index, node)
    out = Plan([])
    _plan_workloads(index, workloads, out, cache)
    _plan_hosts(index, hosts, config, out, cache)
    _check(out, cache)
    return out

"""Per-endpoint chains and interface dispatch chains, as Felix's endpoints.go/dispatch.go (pure).

An endpoint chain runs: conntrack fast path, clear accept/pass, then each tier (policies jumped
to while no pass bit is set, return once one accepts, drop at the end of a tier nobody passed),
then the profiles, then a final drop. Dispatch chains send each known interface to its chain
with a goto and drop anything else on a workload interface (fail closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from felix.calc import CompiledPolicy, TierPolicies
from felix.model import Chain, Rule
from felix.render_config import MarkBits
from felix.render_names import (
    FAILSAFE_IN,
    FAILSAFE_OUT,
    POLICY_IN,
    POLICY_OUT,
    PROFILE_IN,
    PROFILE_OUT,
    length_limited,
    policy_chain,
)
from felix.render_rules import clear_mark, mark_is_clear, mark_is_set, multiport
from felix.rules import Direction, PortRange


def policy_chain_name(policy: CompiledPolicy, direction: Direction) -> str:
    return policy_chain(POLICY_IN if direction == "ingress" else POLICY_OUT, policy.id.chain_id)


def profile_chain_name(profile: str, direction: Direction) -> str:
    return length_limited(PROFILE_IN if direction == "ingress" else PROFILE_OUT, profile)


@dataclass(frozen=True)
class EndpointSpec:
    """What one endpoint chain needs: where it is, which way, and what applies."""

    chain: str
    direction: Direction
    tiers: Sequence[TierPolicies]
    profiles: Sequence[str]
    is_host: bool = False


@dataclass(frozen=True)
class ChainOptions:
    marks: MarkBits
    deny_action: str = "DROP"
    drop_encap: bool = False  # workload egress only: pods may not send VXLAN/IPIP
    vxlan_port: int = 4789


def _conntrack(deny: str) -> list[Rule]:
    return [Rule(match="-m conntrack --ctstate RELATED,ESTABLISHED", action="-j ACCEPT"),
            Rule(match="-m conntrack --ctstate INVALID", action=f"-j {deny}")]


def _encap_drops(opts: ChainOptions) -> list[Rule]:
    port = [PortRange(opts.vxlan_port, opts.vxlan_port)]
    deny = f"-j {opts.deny_action}"
    return [Rule(match=f"-p udp {multiport('dst', port)}", action=deny,
                 comment="Drop VXLAN encapped packets originating in workloads"),
            Rule(match="-p 4", action=deny,
                 comment="Drop IPinIP encapped packets originating in workloads")]


def _tier_rules(tier: TierPolicies, direction: Direction, opts: ChainOptions) -> list[Rule]:
    marks = opts.marks
    rules = [Rule(action=clear_mark(marks.pass_), comment=f"Start of tier {tier.tier.name}")]
    for policy in tier.policies:
        rules.append(Rule(match=mark_is_clear(marks.pass_),
                          action=f"-j {policy_chain_name(policy, direction)}"))
        rules.append(Rule(match=mark_is_set(marks.accept), action="-j RETURN",
                          comment="Return if policy accepted"))
    if tier.tier.default_action != "Pass":
        rules.append(Rule(match=mark_is_clear(marks.pass_), action=f"-j {opts.deny_action}",
                          comment=f"End of tier {tier.tier.name}. "
                                  f"{opts.deny_action} if no policies passed packet"))
    return rules


def endpoint_chain(spec: EndpointSpec, opts: ChainOptions) -> Chain:
    marks = opts.marks
    rules = _conntrack(opts.deny_action)
    if spec.is_host:
        failsafe = FAILSAFE_IN if spec.direction == "ingress" else FAILSAFE_OUT
        rules.append(Rule(action=f"-j {failsafe}"))
    rules.append(Rule(action=clear_mark(marks.accept | marks.pass_)))
    if opts.drop_encap:
        rules += _encap_drops(opts)
    for tier in spec.tiers:
        rules += _tier_rules(tier, spec.direction, opts)
    for profile in spec.profiles:
        rules.append(Rule(action=f"-j {profile_chain_name(profile, spec.direction)}"))
        rules.append(Rule(match=mark_is_set(marks.accept), action="-j RETURN",
                          comment="Return if profile accepted"))
    rules.append(Rule(action=f"-j {opts.deny_action}",
                      comment=f"{opts.deny_action} if no profiles matched"))
    return Chain(spec.chain, tuple(rules))


def dispatch_chain(name: str, flag: str, targets: Sequence[tuple[str, str]],
                   drop_unknown: bool) -> Chain:
    """`flag` is -i or -o; targets are (interface, endpoint chain), sorted by interface.

    Workload dispatch is only entered for workload interfaces, so whatever is left is an
    interface Felix has not heard of: drop it (fail closed). Host endpoint dispatch returns.
    """
    rules = [Rule(match=f"{flag} {iface}", action=f"-g {chain}") for iface, chain in targets]
    if drop_unknown:
        rules.append(Rule(action="-j DROP", comment="Unknown interface"))
    return Chain(name, tuple(rules))

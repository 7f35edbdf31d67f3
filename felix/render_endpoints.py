"""Per-endpoint chains and interface dispatch chains, as Felix's endpoints.go/dispatch.go (pure).

An endpoint chain runs: conntrack fast path, [host endpoints: failsafe jump], clear accept/pass,
then each tier (policies jumped to while no pass bit is set, return once one accepts, drop at
the end of a tier nobody passed), then the profiles, then a final drop. Host endpoints also get
chains of other kinds (`ChainKind`): "forward" (applyOnForward policy only, no profiles, allow
when no policy applies), "untracked" (raw: no conntrack, allow = NOTRACK, no drops) and
"prednat" (mangle: no end-of-tier drop, no profiles). Dispatch chains send each known interface
to its chain with a goto and drop anything else on a workload interface (fail closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from felix.calc import CompiledPolicy, TierPolicies
from felix.model import Chain, Rule
from felix.render_config import MarkBits
from felix.render_names import (
    POLICY_IN,
    POLICY_OUT,
    PROFILE_IN,
    PROFILE_OUT,
    length_limited,
    policy_chain,
)
from felix.render_rules import clear_mark, mark_is_clear, mark_is_set, multiport, set_mark
from felix.rules import Direction, PortRange

ChainKind = Literal["normal", "forward", "untracked", "prednat"]
ACCEPT = "-j ACCEPT"


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
    failsafe: str = ""  # host endpoints: the failsafe chain jumped to before any policy
    kind: ChainKind = "normal"


@dataclass(frozen=True)
class ChainOptions:
    marks: MarkBits
    deny_action: str = "DROP"
    drop_encap: bool = False  # workload egress only: pods may not send VXLAN/IPIP
    vxlan_port: int = 4789
    # What "allowed" means: ACCEPT, or (mangle egress) RETURN with the accept mark set.
    allow: str = ACCEPT


def _conntrack(opts: ChainOptions) -> list[Rule]:
    established = "-m conntrack --ctstate RELATED,ESTABLISHED"
    rules = []
    if opts.allow != ACCEPT:
        rules.append(Rule(match=established, action=set_mark(opts.marks.accept)))
    return [*rules, Rule(match=established, action=opts.allow),
            Rule(match="-m conntrack --ctstate INVALID", action=f"-j {opts.deny_action}")]


def _encap_drops(opts: ChainOptions) -> list[Rule]:
    port = [PortRange(opts.vxlan_port, opts.vxlan_port)]
    deny = f"-j {opts.deny_action}"
    return [Rule(match=f"-p udp {multiport('dst', port)}", action=deny,
                 comment="Drop VXLAN encapped packets originating in workloads"),
            Rule(match="-p 4", action=deny,
                 comment="Drop IPinIP encapped packets originating in workloads")]


def _tier_rules(tier: TierPolicies, spec: EndpointSpec, opts: ChainOptions) -> list[Rule]:
    marks = opts.marks
    rules = [Rule(action=clear_mark(marks.pass_), comment=f"Start of tier {tier.tier.name}")]
    for policy in tier.policies:
        rules.append(Rule(match=mark_is_clear(marks.pass_),
                          action=f"-j {policy_chain_name(policy, spec.direction)}"))
        if spec.kind == "untracked":  # an untracked allow also skips conntrack
            rules.append(Rule(match=mark_is_set(marks.accept), action="-j NOTRACK"))
        rules.append(Rule(match=mark_is_set(marks.accept), action="-j RETURN",
                          comment="Return if policy accepted"))
    # Untracked and preDNAT tiers never drop: the filter table's policy still follows.
    if spec.kind in ("normal", "forward") and tier.tier.default_action != "Pass":
        rules.append(Rule(match=mark_is_clear(marks.pass_), action=f"-j {opts.deny_action}",
                          comment=f"End of tier {tier.tier.name}. "
                                  f"{opts.deny_action} if no policies passed packet"))
    return rules


def endpoint_chain(spec: EndpointSpec, opts: ChainOptions) -> Chain:
    marks = opts.marks
    rules = [] if spec.kind == "untracked" else _conntrack(opts)
    if spec.failsafe:
        rules.append(Rule(action=f"-j {spec.failsafe}"))
    rules.append(Rule(action=clear_mark(marks.accept | marks.pass_)))
    if opts.drop_encap:
        rules += _encap_drops(opts)
    for tier in spec.tiers:
        rules += _tier_rules(tier, spec, opts)
    if spec.kind == "forward" and not spec.tiers:
        # Forwarded traffic is allowed when no applyOnForward policy applies this way.
        rules += [Rule(action=set_mark(marks.accept), comment="Allow forwarded traffic by default"),
                  Rule(action="-j RETURN", comment="Return for accepted forward traffic")]
    if spec.kind != "normal":
        return Chain(spec.chain, tuple(rules))
    for profile in spec.profiles:
        rules.append(Rule(action=f"-j {profile_chain_name(profile, spec.direction)}"))
        rules.append(Rule(match=mark_is_set(marks.accept), action="-j RETURN",
                          comment="Return if profile accepted"))
    rules.append(Rule(action=f"-j {opts.deny_action}",
                      comment=f"{opts.deny_action} if no profiles matched"))
    return Chain(spec.chain, tuple(rules))


def dispatch_chain(name: str, flag: str, targets: Sequence[tuple[str, str]],
                   drop_unknown: bool, default: Sequence[Rule] = ()) -> Chain:
    """`flag` is -i or -o; targets are (interface, endpoint chain), sorted by interface.

    Workload dispatch is only entered for workload interfaces, so whatever is left is an
    interface Felix has not heard of: drop it (fail closed). Host endpoint dispatch returns, or
    ends in `default` (the goto to an all-interfaces host endpoint's chain).
    """
    rules = [Rule(match=f"{flag} {iface}", action=f"-g {chain}") for iface, chain in targets]
    if drop_unknown:
        rules.append(Rule(action="-j DROP", comment="Unknown interface"))
    return Chain(name, (*rules, *default))

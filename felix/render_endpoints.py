"""Per-endpoint chains and interface dispatch chains, as Felix's endpoints.go/dispatch.go (pure).

An endpoint chain runs: conntrack fast path, [host endpoints: failsafe jump], clear accept/pass,
then each tier (policies jumped to while no pass bit is set, return once one accepts, drop at
the end of a tier nobody passed), then the profiles, then a final drop. A policy jump may carry
a port guard, and runs of guarded jumps share a group chain behind one guard (`render_guards`).
Host endpoints also get chains of other kinds (`ChainKind`): "forward" (applyOnForward policy
only, no profiles, allow when no policy applies), "untracked" (raw: no conntrack, allow =
NOTRACK, no drops) and "prednat" (mangle: no end-of-tier drop, no profiles). Dispatch chains
send each known interface to its chain with a goto and drop anything else on a workload
interface (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from felix.calc import CompiledPolicy, TierPolicies
from felix.model import Chain, Rule
from felix.render_config import MarkBits
from felix.render_guards import Group, Guard, group_chain_name, guard_tree
from felix.render_names import (
    GROUP_IN,
    GROUP_OUT,
    POLICY_IN,
    POLICY_OUT,
    PROFILE_IN,
    PROFILE_OUT,
    length_limited,
    policy_chain,
)
from felix.render_rules import (
    clear_mark,
    join,
    mark_is_clear,
    mark_is_set,
    multiport,
    protocol_text,
    set_mark,
)
from felix.rules import Direction, PortRange

ChainKind = Literal["normal", "forward", "untracked", "prednat"]
ACCEPT = "-j ACCEPT"


def policy_chain_name(policy: CompiledPolicy, direction: Direction) -> str:
    return policy_chain(POLICY_IN if direction == "ingress" else POLICY_OUT, policy.id.chain_id)


def profile_chain_name(profile: str, direction: Direction) -> str:
    return length_limited(PROFILE_IN if direction == "ingress" else PROFILE_OUT, profile)


GuardOf = Callable[[CompiledPolicy, Direction], Guard | None]


class PolicyJump(NamedTuple):  # tuples: endpoint chains are cached by these, hashed often
    """One policy of a tier as an endpoint chain sees it: its chain and the guard (if any)."""

    chain: str
    guard: Guard | None = None


class TierJumps(NamedTuple):
    """One tier of an endpoint chain: its policies in order, and how the tier ends."""

    name: str
    default_action: str
    jumps: tuple[PolicyJump, ...]


def tier_jumps(tiers: Sequence[TierPolicies], direction: Direction,
               guard_of: GuardOf) -> tuple[TierJumps, ...]:
    return tuple(
        TierJumps(t.tier.name, t.tier.default_action,
                  tuple(PolicyJump(policy_chain_name(p, direction), guard_of(p, direction))
                        for p in t.policies))
        for t in tiers)


@dataclass(frozen=True)
class EndpointSpec:
    """What one endpoint chain needs: where it is, which way, and what applies."""

    chain: str
    direction: Direction
    tiers: Sequence[TierJumps]
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


def guard_match(guard: Guard | None) -> str:
    if guard is None:
        return ""
    return join(f"-p {protocol_text(guard.protocol)}", multiport("dst", guard.port_ranges()))


def _jump_rules(target: str, guard: Guard | None, spec: EndpointSpec,
                marks: MarkBits) -> list[Rule]:
    """Jump to a policy (or group) chain unless a policy passed, then return if it accepted.
    The guard goes first: a packet it rules out costs one header comparison."""
    rules = [Rule(match=join(guard_match(guard), mark_is_clear(marks.pass_)),
                  action=f"-j {target}")]
    if spec.kind == "untracked":  # an untracked allow also skips conntrack
        rules.append(Rule(match=mark_is_set(marks.accept), action="-j NOTRACK"))
    rules.append(Rule(match=mark_is_set(marks.accept), action="-j RETURN",
                      comment="Return if policy accepted"))
    return rules


def _node_rules(node: PolicyJump | Group[PolicyJump], spec: EndpointSpec, marks: MarkBits,
                groups: dict[str, Chain]) -> list[Rule]:
    if isinstance(node, PolicyJump):
        return _jump_rules(node.chain, node.guard, spec, marks)
    # The group's rules are the jumps the endpoint chain would have had, so a packet that
    # passes the union guard meets exactly what it met before.
    inner = tuple(r for child in node.children for r in _node_rules(child, spec, marks, groups))
    name = group_chain_name(GROUP_IN if spec.direction == "ingress" else GROUP_OUT,
                            [r.text() for r in inner])
    groups[name] = Chain(name, inner)
    return _jump_rules(name, node.guard, spec, marks)


def _tier_rules(tier: TierJumps, spec: EndpointSpec, opts: ChainOptions,
                groups: dict[str, Chain]) -> list[Rule]:
    marks = opts.marks
    rules = [Rule(action=clear_mark(marks.pass_), comment=f"Start of tier {tier.name}")]
    for node in guard_tree(tier.jumps):
        rules += _node_rules(node, spec, marks, groups)
    # Untracked and preDNAT tiers never drop: the filter table's policy still follows.
    if spec.kind in ("normal", "forward") and tier.default_action != "Pass":
        rules.append(Rule(match=mark_is_clear(marks.pass_), action=f"-j {opts.deny_action}",
                          comment=f"End of tier {tier.name}. "
                                  f"{opts.deny_action} if no policies passed packet"))
    return rules


def endpoint_chains(spec: EndpointSpec, opts: ChainOptions) -> list[Chain]:
    """The endpoint chain, followed by the group chains it jumps to."""
    marks = opts.marks
    groups: dict[str, Chain] = {}
    rules = [] if spec.kind == "untracked" else _conntrack(opts)
    if spec.failsafe:
        rules.append(Rule(action=f"-j {spec.failsafe}"))
    rules.append(Rule(action=clear_mark(marks.accept | marks.pass_)))
    if opts.drop_encap:
        rules += _encap_drops(opts)
    for tier in spec.tiers:
        rules += _tier_rules(tier, spec, opts, groups)
    if spec.kind == "forward" and not spec.tiers:
        # Forwarded traffic is allowed when no applyOnForward policy applies this way.
        rules += [Rule(action=set_mark(marks.accept), comment="Allow forwarded traffic by default"),
                  Rule(action="-j RETURN", comment="Return for accepted forward traffic")]
    if spec.kind != "normal":
        return [Chain(spec.chain, tuple(rules)), *groups.values()]
    for profile in spec.profiles:
        rules.append(Rule(action=f"-j {profile_chain_name(profile, spec.direction)}"))
        rules.append(Rule(match=mark_is_set(marks.accept), action="-j RETURN",
                          comment="Return if profile accepted"))
    rules.append(Rule(action=f"-j {opts.deny_action}",
                      comment=f"{opts.deny_action} if no profiles matched"))
    return [Chain(spec.chain, tuple(rules)), *groups.values()]


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

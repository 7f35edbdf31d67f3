"""The fixed part of Felix's chain tree and its hooks into the kernel chains (pure).

Follows felix/rules/static.go for what Tabby supports: filter INPUT/FORWARD/OUTPUT, the
workload-to-host chain, failsafe chains, raw mark clearing with the strict RPF check and the
untracked (doNotTrack) host endpoint dispatch, mangle preDNAT and DNAT'd-egress host endpoint
dispatch, and nat POSTROUTING for natOutgoing. IPIP/VXLAN/WireGuard host rules and IPVS are
not rendered.
"""

from __future__ import annotations

from felix.model import Chain, Hook, Rule
from felix.render_config import RenderConfig
from felix.render_names import (
    ALL_POOLS_ID,
    FAILSAFE_IN,
    FAILSAFE_OUT,
    FILTER_FORWARD,
    FILTER_INPUT,
    FILTER_OUTPUT,
    FROM_HOST_DISPATCH,
    FROM_HOST_FWD_DISPATCH,
    FROM_WL_DISPATCH,
    MASQ_POOLS_ID,
    NAT_OUTGOING,
    OUTPUT,
    POSTROUTING,
    PREROUTING,
    TO_HOST_DISPATCH,
    TO_HOST_FWD_DISPATCH,
    TO_WL_DISPATCH,
    WORKLOAD_TO_HOST,
    ipset_name,
)
from felix.render_rules import (
    clear_mark,
    mark_is_clear,
    mark_is_set,
    multiport,
    set_mark,
    set_match,
)
from felix.rules import PortRange

# ICMPv6 a pod needs to reach its host before any policy: MLD and router/neighbour discovery.
ICMPV6_TO_HOST_TYPES = (130, 131, 132, 133, 135, 136)


def _accept_if_accepted(config: RenderConfig, comment: str = "") -> Rule:
    return Rule(match=mark_is_set(config.marks.accept), action="-j ACCEPT", comment=comment)


def filter_input(config: RenderConfig) -> Chain:
    return Chain(FILTER_INPUT, (
        Rule(match=f"-i {config.workload_wildcard}", action=f"-g {WORKLOAD_TO_HOST}"),
        _accept_if_accepted(config),
        Rule(action=clear_mark(config.marks.all)),
        Rule(action=f"-j {FROM_HOST_DISPATCH}"),
        _accept_if_accepted(config, "Host endpoint policy accepted packet."),
    ))


def workload_to_host(config: RenderConfig, family: int) -> Chain:
    rules = []
    if family == 6:
        rules = [Rule(match=f"-p ipv6-icmp -m icmp6 --icmpv6-type {t}", action="-j ACCEPT")
                 for t in ICMPV6_TO_HOST_TYPES]
    rules.append(Rule(action=f"-j {FROM_WL_DISPATCH}"))
    rules.append(Rule(action=f"-j {config.endpoint_to_host_action}",
                      comment="Configured DefaultEndpointToHostAction"))
    return Chain(WORKLOAD_TO_HOST, tuple(rules))


def filter_forward(config: RenderConfig) -> Chain:
    marks, wildcard = config.marks, config.workload_wildcard
    return Chain(FILTER_FORWARD, (
        Rule(action=clear_mark(marks.all & ~marks.accept)),
        # Host endpoint applyOnForward policy, unless preDNAT/untracked policy accepted already.
        Rule(match=mark_is_clear(marks.accept), action=f"-j {FROM_HOST_FWD_DISPATCH}"),
        Rule(match=f"-i {wildcard}", action=f"-j {FROM_WL_DISPATCH}"),
        Rule(match=f"-o {wildcard}", action=f"-j {TO_WL_DISPATCH}"),
        Rule(action=f"-j {TO_HOST_FWD_DISPATCH}"),
    ))


def filter_output(config: RenderConfig) -> Chain:
    return Chain(FILTER_OUTPUT, (
        _accept_if_accepted(config),
        # Host -> local workload is never policed (kubelet probes must work).
        Rule(match=f"-o {config.workload_wildcard}", action="-j RETURN"),
        Rule(action=clear_mark(config.marks.all)),
        Rule(match="-m conntrack ! --ctstate DNAT", action=f"-j {TO_HOST_DISPATCH}"),
        _accept_if_accepted(config, "Host endpoint policy accepted packet."),
    ))


Ports = tuple[tuple[str, int], ...]


def failsafe_chain(name: str, ports: Ports, replies: Ports = ()) -> Chain:
    """ACCEPT each failsafe destination port; in raw, also the replies from the other list's."""
    return Chain(name, tuple(
        Rule(match=f"-p {proto} {multiport(side, [PortRange(port, port)])}", action="-j ACCEPT")
        for side, entries in (("dst", ports), ("src", replies)) for proto, port in entries
    ))


def failsafe_chains(config: RenderConfig, table: str) -> list[Chain]:
    """Untracked packets have no conntrack to let replies back: raw also allows those."""
    inbound, outbound = config.failsafe_inbound, config.failsafe_outbound
    raw = table == "raw"
    return [failsafe_chain(FAILSAFE_IN, inbound, outbound if raw else ()),
            failsafe_chain(FAILSAFE_OUT, outbound, inbound if raw else ())]


def filter_hooks(config: RenderConfig) -> tuple[Hook, ...]:
    accept = config.marks.accept
    return (
        Hook("INPUT", Rule(action=f"-j {FILTER_INPUT}")),
        Hook("FORWARD", Rule(action=f"-j {FILTER_FORWARD}")),
        Hook("OUTPUT", Rule(action=f"-j {FILTER_OUTPUT}")),
        # Appended: what policy accepted in cali-FORWARD is accepted; the mark tells later
        # tables the packet was forwarded.
        Hook("FORWARD", Rule(match=mark_is_set(accept), action="-j ACCEPT",
                             comment="Policy explicitly accepted packet."), append=True),
        Hook("FORWARD", Rule(action=set_mark(accept)), append=True),
    )


def filter_static(config: RenderConfig, family: int) -> list[Chain]:
    return [
        filter_input(config), workload_to_host(config, family), filter_forward(config),
        filter_output(config), *failsafe_chains(config, "filter"),
    ]


def raw_static(config: RenderConfig) -> tuple[list[Chain], tuple[Hook, ...]]:
    """Clear Felix's marks on entry; drop workload packets whose source fails strict RPF;
    send other packets through untracked host endpoint policy, accepting what it allowed."""
    marks = config.marks
    prerouting = [Rule(action=clear_mark(marks.all)),
                  Rule(match=f"-i {config.workload_wildcard}", action=set_mark(marks.scratch0))]
    if config.strict_rpf:
        prerouting.append(
            Rule(match=f"{mark_is_set(marks.scratch0)} -m rpfilter --validmark --invert",
                 action="-j DROP", comment="Drop workload packets with a spoofed source"))
    prerouting += [Rule(match=mark_is_clear(marks.scratch0), action=f"-j {FROM_HOST_DISPATCH}"),
                   _accept_if_accepted(config)]
    output = (Rule(action=clear_mark(marks.all)), Rule(action=f"-j {TO_HOST_DISPATCH}"),
              _accept_if_accepted(config))
    chains = [Chain(PREROUTING, tuple(prerouting)), Chain(OUTPUT, output),
              *failsafe_chains(config, "raw")]
    hooks = (Hook("PREROUTING", Rule(action=f"-j {PREROUTING}")),
             Hook("OUTPUT", Rule(action=f"-j {OUTPUT}")))
    return chains, hooks


def mangle_static(config: RenderConfig) -> tuple[list[Chain], tuple[Hook, ...]]:
    """preDNAT host endpoint policy in PREROUTING (before kube-proxy's DNAT); normal egress
    policy for DNAT'd host traffic in POSTROUTING (the filter OUTPUT chain skips it)."""
    marks = config.marks
    accepted = mark_is_set(marks.accept)
    prerouting = (
        Rule(match="-m conntrack --ctstate RELATED,ESTABLISHED", action="-j ACCEPT"),
        Rule(match=accepted, action="-j ACCEPT"),
        Rule(action=f"-j {FROM_HOST_DISPATCH}"),
        Rule(match=accepted, action="-j ACCEPT", comment="Host endpoint policy accepted packet."),
    )
    postrouting = (
        Rule(match=accepted, action="-j RETURN"),  # forwarded: filter FORWARD marked it
        Rule(action=clear_mark(marks.all)),
        Rule(match="-m conntrack --ctstate DNAT", action=f"-j {TO_HOST_DISPATCH}"),
        Rule(match=accepted, action="-j RETURN", comment="Host endpoint policy accepted packet."),
    )
    chains = [*failsafe_chains(config, "mangle"), Chain(PREROUTING, prerouting),
              Chain(POSTROUTING, postrouting)]
    hooks = (Hook("PREROUTING", Rule(action=f"-j {PREROUTING}")),
             Hook("POSTROUTING", Rule(action=f"-j {POSTROUTING}")))
    return chains, hooks


def nat_static(config: RenderConfig, family: int) -> tuple[list[Chain], tuple[Hook, ...]]:
    """MASQUERADE pool traffic leaving all pools, for pools with natOutgoing."""
    outgoing: tuple[Rule, ...] = ()
    if config.pool_nets(family, nat_only=True):
        outgoing = (Rule(
            match=join_sets(set_match(ipset_name(family, MASQ_POOLS_ID), "src"),
                            set_match(ipset_name(family, ALL_POOLS_ID), "dst", negate=True)),
            action="-j MASQUERADE"),)
    chains = [Chain(POSTROUTING, (Rule(action=f"-j {NAT_OUTGOING}"),)),
              Chain(NAT_OUTGOING, outgoing)]
    # Appended, after kube-proxy's POSTROUTING so its masquerade mark is handled first.
    hooks = (Hook("POSTROUTING", Rule(action=f"-j {POSTROUTING}"), append=True),)
    return chains, hooks


def join_sets(*parts: str) -> str:
    return " ".join(parts)

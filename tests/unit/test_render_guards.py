"""Port guards on policy jumps and group chains: which policies get one, that a guard never
skips a packet some rule of the policy matches, and how endpoint chains carry them."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from datastore.selector import Selector
from datastore.snapshot import Snapshot
from felix.calc import PolicyIndex
from felix.counters import DenyKey, deny_index
from felix.model import Dataplane
from felix.render import render_with_report
from felix.render_config import RenderConfig
from felix.render_endpoints import PolicyJump
from felix.render_guards import GROUP_MAX, Group, Guard, guard_tree, rules_guard
from felix.rules import IPNetwork, Packet, compile_rule, rule_matches

API = "projectcalico.org/v3"
NODE = "n"
PASS_CLEAR = "-m mark --mark 0x0/0x20000"


def tcp(*ports: int | str, action: str = "Allow", **extra: Any) -> dict[str, Any]:
    return {"action": action, "protocol": "TCP", "destination": {"ports": list(ports)}, **extra}


def guard_of(*rules: dict[str, Any]) -> Guard | None:
    return rules_guard([compile_rule(r, "dev") for r in rules])


# --- which policies get a guard ------------------------------------------------------------


def test_one_protocol_with_numeric_ports_is_guarded_on_the_union() -> None:
    assert guard_of(tcp(80), tcp(443, action="Deny")) == Guard(6, ((80, 80), (443, 443)))
    # ranges merge when they overlap or touch, to use few multiport slots
    assert guard_of(tcp(8000, 8001), tcp("8002:8010"), tcp(8005)) == Guard(6, ((8000, 8010),))
    udp = {"action": "Log", "protocol": "UDP", "destination": {"ports": [53]}}
    assert guard_of(udp) == Guard(17, ((53, 53),))


def test_what_cannot_be_guarded() -> None:
    assert guard_of() is None  # no rules: nothing to guard (the chain is one comment)
    assert guard_of(tcp(80), {"action": "Allow", "protocol": "UDP",
                              "destination": {"ports": [53]}}) is None  # two protocols
    assert guard_of(tcp("http")) is None  # named ports live in IP sets
    assert guard_of(tcp(80, "http")) is None
    assert guard_of({"action": "Allow", "protocol": "TCP"}) is None  # any port
    assert guard_of({"action": "Deny"}) is None  # anything
    assert guard_of({"action": "Allow", "protocol": "ICMP"}) is None
    assert guard_of({"action": "Allow", "protocol": "TCP", "source": {"ports": [80]}}) is None
    assert guard_of(tcp(*range(1000, 1032, 2))) is None  # 16 ports: over one multiport match
    assert guard_of(tcp(*range(1000, 1030, 2))) is not None  # 15 fit


def shape(nodes: list[Any]) -> list[Any]:
    """A tree of groups as nested lists of jump chain names."""
    return [shape(list(n.children)) if isinstance(n, Group) else n.chain for n in nodes]


def test_groups_gather_nearby_ports_first_then_whatever_fits() -> None:
    g = {p: Guard(6, ((p, p),)) for p in (80, 81, 82, 443)}
    jumps = [PolicyJump(name, guard) for name, guard in (
        ("a80", g[80]), ("a81", g[81]), ("b443", g[443]), ("free", None), ("c82", g[82]),
        ("c80", g[80]), ("u53", Guard(17, ((53, 53),))))]
    tree = guard_tree(jumps)
    assert shape(tree) == [[["a80", "a81"], "b443"], "free", ["c82", "c80"], "u53"]
    assert tree[0].guard == Guard(6, ((80, 81), (443, 443)))
    assert tree[2].guard == Guard(6, ((80, 80), (82, 82)))  # only one fits, never mind
    flat = [j for j in _leaves(tree)]
    assert flat == jumps  # nothing lost, nothing reordered


def _leaves(nodes: list[Any]) -> list[Any]:
    return [leaf for n in nodes
            for leaf in (_leaves(list(n.children)) if isinstance(n, Group) else [n])]


def test_groups_hold_at_most_group_max_and_nest() -> None:
    jumps = [PolicyJump(f"p{i}", Guard(6, ((8000 + i % 100, 8000 + i % 100),)))
             for i in range(300)] + [PolicyJump("web", Guard(6, ((80, 80),)))]
    tree = guard_tree(jumps)
    assert _leaves(tree) == jumps

    def sizes(nodes: list[Any]) -> list[int]:
        return [len(nodes), *(s for n in nodes if isinstance(n, Group)
                              for s in sizes(list(n.children)))]
    assert max(sizes(tree)) <= GROUP_MAX
    # the fillers' ports are nearby: they end up under one guard apart from port 80's policy,
    # so traffic to port 80 tests two guards to reach it
    [top] = tree
    assert isinstance(top, Group) and [n.guard for n in top.children] == [
        Guard(6, ((8000, 8099),)), Guard(6, ((80, 80),))]


# --- a guard never skips a packet a rule matches --------------------------------------------


class EverySet:
    """IP sets holding every address: the guard must hold whatever the sets contain."""

    def selector_members(self, selector: Selector) -> frozenset[IPNetwork]:
        return frozenset({ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")})

    def named_port_members(self, selector: Selector, name: str,
                           protocol: int | None) -> frozenset[Any]:
        return frozenset()


PORT = st.integers(1, 40)
PORTS = st.lists(st.one_of(PORT, st.tuples(PORT, PORT).map(lambda t: f"{min(t)}:{max(t)}")),
                 min_size=1, max_size=4)


@st.composite
def rules_of_a_policy(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rules mostly sharing one protocol and giving destination ports (so most are guarded),
    with the other criteria a rule may add."""
    protocol = draw(st.sampled_from(["TCP", "UDP", "SCTP"]))
    rules = []
    for _ in range(draw(st.integers(1, 4))):
        rule: dict[str, Any] = {"action": draw(st.sampled_from(["Allow", "Deny", "Pass", "Log"])),
                                "protocol": draw(st.sampled_from([protocol] * 8 + ["UDP"]))}
        destination: dict[str, Any] = {"ports": draw(PORTS)} if draw(st.integers(0, 9)) else {}
        if draw(st.integers(0, 3)) == 0:
            destination["notPorts"] = draw(st.lists(PORT, min_size=1, max_size=2))
        if draw(st.booleans()):
            destination["selector"] = "app == 'x'"
        source: dict[str, Any] = {}
        if draw(st.integers(0, 3)) == 0:
            source["ports"] = draw(st.lists(PORT, min_size=1, max_size=2))
        if draw(st.integers(0, 3)) == 0:
            source["nets"] = ["10.0.0.0/8"]
        if draw(st.integers(0, 4)) == 0:
            rule["ipVersion"] = draw(st.sampled_from([4, 6]))
        rules.append({**rule, "destination": destination, "source": source})
    return rules


@settings(max_examples=400, deadline=None)
@given(rules=rules_of_a_policy(), data=st.data())
def test_a_guard_admits_every_packet_some_rule_matches(rules: list[dict[str, Any]],
                                                       data: st.DataObject) -> None:
    compiled = [compile_rule(r, "dev") for r in rules]
    guard = rules_guard(compiled)
    if guard is None:
        return
    # half the packets aim at a port some rule names, so that rules do match
    named = [r.first for c in compiled for r in c.destination.ports.ranges]
    dport = data.draw(st.sampled_from(named) if named and data.draw(st.booleans()) else PORT)
    protocol = data.draw(st.sampled_from([guard.protocol] * 3 + [6, 17, 132, 1]))
    src, dst = data.draw(st.sampled_from([("10.1.2.3", "10.4.5.6"), ("fd00::1", "fd00::2")]))
    packet = Packet(ipaddress.ip_address(src), ipaddress.ip_address(dst), protocol,
                    data.draw(PORT), dport)
    if any(rule_matches(r, packet, EverySet()) for r in compiled):
        assert protocol == guard.protocol
        assert any(first <= dport <= last for first, last in guard.ports)


# --- endpoint chains ------------------------------------------------------------------------


WEP = {"apiVersion": API, "kind": "WorkloadEndpoint",
       "metadata": {"name": "n-k8s-a-eth0", "namespace": "dev", "labels": {"app": "a"}},
       "spec": {"orchestrator": "k8s", "node": NODE, "pod": "a", "endpoint": "eth0",
                "interfaceName": "cali1234", "ipNetworks": ["10.244.1.5/32"],
                "profiles": ["open"]}}
OPEN = {"kind": "Profile", "apiVersion": API, "metadata": {"name": "open"},
        "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}}


def policy(name: str, order: int, *ingress: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "dev"},
            "spec": {"selector": "app == 'a'", "order": order, "types": ["Ingress"],
                     "ingress": list(ingress)}}


def render(*objs: dict[str, Any]) -> tuple[Dataplane, Any]:
    snap = Snapshot()
    for obj in (WEP, OPEN, *objs):
        snap.add(obj)
    result = render_with_report(PolicyIndex(snap), NODE, RenderConfig(ip_versions=(4,)))
    return result.dataplane, result


def texts(dp: Dataplane, name: str) -> list[str]:
    return [r.text() for r in dp.tables[(4, "filter")].chains[name].rules]


def test_single_guarded_policy_and_its_return() -> None:
    dp, _ = render(policy("web", 1, tcp(80, 443)))
    tw = texts(dp, "cali-tw-cali1234")
    at = tw.index(f"-p tcp -m multiport --dports 80,443 {PASS_CLEAR} -j cali-pi-np/dev/web")
    assert tw[at + 1] == "-m mark --mark 0x10000/0x10000 -j RETURN"
    assert tw[at + 2] == f"{PASS_CLEAR} -j DROP"  # end of tier: unguarded


def test_a_run_of_guarded_policies_shares_a_group_chain() -> None:
    pols = [policy(f"p{i}", i, tcp(8000 + i, action=a))
            for i, a in enumerate(["Allow", "Deny", "Log", "Pass"])]
    dp, _ = render(*pols, policy("any", 9, {"action": "Allow", "protocol": "UDP"}))
    tw = texts(dp, "cali-tw-cali1234")
    jump = next(t for t in tw if "-j cali-gi-" in t)
    assert jump.startswith(f"-p tcp -m multiport --dports 8000:8003 {PASS_CLEAR} -j cali-gi-")
    group = jump.rsplit(" ", 1)[1]
    # inside: exactly the jumps the endpoint chain would have had, each with its own guard
    assert texts(dp, group) == [
        line for i in range(4) for line in (
            f"-p tcp -m multiport --dports {8000 + i} {PASS_CLEAR} -j cali-pi-np/dev/p{i}",
            "-m mark --mark 0x10000/0x10000 -j RETURN")]
    assert f"{PASS_CLEAR} -j cali-pi-np/dev/any" in tw  # unguarded: not in the run


def test_an_unrenderable_policy_is_never_guarded() -> None:
    dp, result = render(policy("bad", 1, tcp("70000")), policy("ok", 2, tcp(80)))
    assert result.problems
    tw = texts(dp, "cali-tw-cali1234")
    assert f"{PASS_CLEAR} -j cali-pi-np/dev/bad" in tw  # every packet meets its DROP
    assert texts(dp, "cali-pi-np/dev/bad")[0] == "-j DROP"


def test_counters_follow_jumps_through_group_chains() -> None:
    dp, _ = render(policy("p0", 1, tcp(8000, action="Deny")), policy("p1", 2, tcp(8001)))
    keys = set(deny_index(dp.tables)[(4, "filter")].values())
    assert keys == {DenyKey("default", "dev", "p0", "ingress", "rule"),
                    DenyKey("default", "dev", "p0,p1", "ingress", "end-of-tier")}

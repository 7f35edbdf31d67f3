"""The pure renderer: Calico's chain tree, rule features and fail-closed behaviour, on the text."""

from __future__ import annotations

from typing import Any

import pytest

from datastore.selector import parse
from felix import scenario
from felix.calc import PolicyIndex
from felix.model import Chain, Dataplane
from felix.render import render, render_with_report
from felix.render_config import MarkBits, Pool, RenderConfig
from felix.render_ipsets import SetCollector
from felix.render_names import length_limited, named_port_set_id
from felix.render_rules import RuleContext, log_prefix, render_rule, split_ports
from felix.rules import PortRange, compile_rule, parse_net

NODE = "sim-node"
MARKS = MarkBits.from_mask(0xFFFF0000)


# --- helpers -------------------------------------------------------------------------------


def rule_text(rule: dict[str, Any], family: int = 4, namespace: str | None = None) -> list[str]:
    ctx = RuleContext(family, MARKS, SetCollector(family), "calico-np x: ")
    return [r.text() for r in render_rule(compile_rule(rule, namespace), ctx)]


def snapshot_dataplane(manifests: list[dict[str, Any]], pods: dict[str, Any] | None = None,
                       config: RenderConfig | None = None) -> tuple[Dataplane, Any]:
    data = {
        "name": "t",
        "namespaces": {"x": {}},
        "pods": pods or {"x/a": {"ip": "10.244.1.1", "labels": {"app": "a"}},
                         "x/b": {"ip": "10.244.1.2", "labels": {"app": "b"}}},
        "steps": [{"apply": manifests}],
    }
    for state, _ in scenario.steps_of(data):
        snap = scenario.snapshot_of(state)
    result = render_with_report(PolicyIndex(snap), NODE, config or RenderConfig())
    return result.dataplane, result


def chain(dp: Dataplane, name: str, family: int = 4, table: str = "filter") -> list[str]:
    return [r.text() for r in dp.tables[(family, table)].chains[name].rules]


def chains_like(dp: Dataplane, prefix: str, family: int = 4) -> dict[str, Chain]:
    return {n: c for n, c in dp.tables[(family, "filter")].chains.items() if n.startswith(prefix)}


def np(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x"}, "spec": spec}


# --- names and marks -----------------------------------------------------------------------


def test_length_limited_names_follow_calico() -> None:
    assert length_limited("cali-pi-", "gnp/short") == "cali-pi-gnp/short"
    long = length_limited("cali-pi-", "knp.default.a-rather-long-policy-name")
    assert len(long) == 28 and long.startswith("cali-pi-_")
    exactly = "_" + "x" * 19  # 8 + 20 = 28 characters starting with "_": hashed too
    assert length_limited("cali-pi-", exactly) != "cali-pi-" + exactly
    assert length_limited("cali-pi-", "y" * 20) == "cali-pi-" + "y" * 20


def test_mark_bits_allocated_low_to_high() -> None:
    assert (MARKS.accept, MARKS.pass_, MARKS.drop, MARKS.scratch0, MARKS.scratch1) == (
        0x10000, 0x20000, 0x40000, 0x80000, 0x100000)
    assert MarkBits.from_mask(0xF8).accept == 0x8
    with pytest.raises(ValueError):
        MarkBits.from_mask(0xF)


def test_named_port_set_id_is_calico_unique_id() -> None:
    set_id = named_port_set_id(parse("all()"), "tcp", "http")
    assert set_id.startswith("n:") and len(set_id) == 2 + 38


# --- the static tree and hooks ---------------------------------------------------------------


def test_hooks_and_static_chains() -> None:
    dp = render(PolicyIndex(scenario.snapshot_of(scenario.initial_state(
        {"name": "t", "pods": {"x/a": {"ip": "10.244.1.1"}}, "steps": [{}]}))), NODE)
    hooks = {(h.chain, h.rule.text(), h.append) for h in dp.tables[(4, "filter")].hooks}
    assert ("INPUT", "-j cali-INPUT", False) in hooks
    assert ("FORWARD", "-j cali-FORWARD", False) in hooks
    assert ("OUTPUT", "-j cali-OUTPUT", False) in hooks
    assert ("FORWARD", "-m mark --mark 0x10000/0x10000 -j ACCEPT", True) in hooks
    assert "-i cali+ -g cali-wl-to-host" in chain(dp, "cali-INPUT")
    assert chain(dp, "cali-OUTPUT")[1] == "-o cali+ -j RETURN"
    assert "-i cali+ -j cali-from-wl-dispatch" in chain(dp, "cali-FORWARD")
    assert "-o cali+ -j cali-to-wl-dispatch" in chain(dp, "cali-FORWARD")
    assert chain(dp, "cali-wl-to-host")[-1] == "-j ACCEPT"
    v6 = chain(dp, "cali-wl-to-host", 6)
    assert "-p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT" in v6
    raw = dp.tables[(4, "raw")]
    assert {h.chain for h in raw.hooks} == {"PREROUTING", "OUTPUT"}
    assert any("rpfilter --validmark --invert" in r.text()
               for r in raw.chains["cali-PREROUTING"].rules)


def test_failsafe_chains_have_calico_defaults() -> None:
    dp, _ = snapshot_dataplane([])
    assert "-p tcp -m multiport --dports 22 -j ACCEPT" in chain(dp, "cali-failsafe-in")
    assert "-p udp -m multiport --dports 53 -j ACCEPT" in chain(dp, "cali-failsafe-out")


def test_nat_outgoing_masquerades_pool_traffic_leaving_all_pools() -> None:
    pools = (Pool(parse_net("10.244.0.0/16"), nat_outgoing=True),
             Pool(parse_net("10.250.0.0/16")))
    dp, _ = snapshot_dataplane([], config=RenderConfig(pools=pools))
    nat = dp.tables[(4, "nat")]
    assert [(h.chain, h.append) for h in nat.hooks] == [("POSTROUTING", True)]
    assert chain(dp, "cali-nat-outgoing", table="nat") == [
        "-m set --match-set cali40masq-ipam-pools src "
        "-m set ! --match-set cali40all-ipam-pools dst -j MASQUERADE"]
    assert dp.ipsets["cali40masq-ipam-pools"].members == {"10.244.0.0/16"}
    assert dp.ipsets["cali40all-ipam-pools"].members == {"10.244.0.0/16", "10.250.0.0/16"}
    assert chain(dp, "cali-nat-outgoing", 6, "nat") == []  # no v6 pool with natOutgoing


# --- dispatch and endpoint chains ----------------------------------------------------------


def test_dispatch_gotos_local_endpoints_and_drops_unknown_interfaces() -> None:
    pods = {"x/a": {"ip": "10.244.1.1"}, "x/far": {"ip": "10.244.9.1", "node": "other"}}
    dp, _ = snapshot_dataplane([], pods=pods)
    for family in (4, 6):
        to = chain(dp, "cali-to-wl-dispatch", family)
        frm = chain(dp, "cali-from-wl-dispatch", family)
        assert to[-1] == frm[-1] == "-j DROP"
        assert all(r.startswith("-o cali") and " -g cali-tw-cali" in r for r in to[:-1])
        assert all(r.startswith("-i cali") and " -g cali-fw-cali" in r for r in frm[:-1])
    assert len(chains_like(dp, "cali-tw-")) == len(chain(dp, "cali-to-wl-dispatch")) - 1


def _tw_chain(dp: Dataplane, family: int = 4) -> list[str]:
    chains = chains_like(dp, "cali-tw-", family)
    return [r.text() for c in chains.values() for r in c.rules]


def test_endpoint_without_policy_is_decided_by_its_profiles() -> None:
    dp, _ = snapshot_dataplane([], pods={"x/a": {"ip": "10.244.1.1"}})
    rules = _tw_chain(dp)
    assert rules[:3] == ["-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                         "-m conntrack --ctstate INVALID -j DROP",
                         "-j MARK --set-xmark 0x0/0x30000"]
    assert rules[3] == "-j cali-pri-kns.x"
    assert rules[4] == "-m mark --mark 0x10000/0x10000 -j RETURN"
    assert rules[-1] == "-j DROP"
    assert not any("cali-pi-" in r for r in rules)
    # the kns profile allows: default-allow as in Calico
    assert chain(dp, "cali-pri-kns.x")[0] == "-j MARK --set-xmark 0x10000/0x10000"


def test_tier_structure_with_policies_and_end_of_tier_drop() -> None:
    policies = [np("p1", {"selector": "all()", "order": 1, "ingress": [{"action": "Allow"}]}),
                np("p2", {"selector": "all()", "order": 2, "ingress": [{"action": "Deny"}]})]
    dp, _ = snapshot_dataplane(policies, pods={"x/a": {"ip": "10.244.1.1"}})
    rules = _tw_chain(dp)
    start = rules.index("-j MARK --set-xmark 0x0/0x20000")
    assert rules[start + 1] == "-m mark --mark 0x0/0x20000 -j cali-pi-np/x/p1"
    assert rules[start + 2] == "-m mark --mark 0x10000/0x10000 -j RETURN"
    assert rules[start + 3] == "-m mark --mark 0x0/0x20000 -j cali-pi-np/x/p2"
    assert rules[start + 5] == "-m mark --mark 0x0/0x20000 -j DROP"
    assert rules[start + 6] == "-j cali-pri-kns.x"
    # egress has no policy: no tier in the from-workload chain
    fw = [r.text() for c in chains_like(dp, "cali-fw-").values() for r in c.rules]
    assert not any("cali-po-" in r for r in fw)


def test_tier_with_default_action_pass_has_no_end_of_tier_drop() -> None:
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": "sec"}, "spec": {"order": 10, "defaultAction": "Pass"}}
    pol = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
           "metadata": {"name": "sec.g"},
           "spec": {"tier": "sec", "selector": "all()", "ingress": [{"action": "Log"}]}}
    dp, _ = snapshot_dataplane([tier, pol], pods={"x/a": {"ip": "10.244.1.1"}})
    assert "-m mark --mark 0x0/0x20000 -j DROP" not in _tw_chain(dp)


def test_policy_chains_rendered_once_whatever_the_endpoint_count() -> None:
    def counts(n_pods: int) -> tuple[int, int]:
        pods = {f"x/p{i}": {"ip": f"10.244.1.{i + 1}", "labels": {"app": "a"}}
                for i in range(n_pods)}
        rules = [{"action": "Allow", "protocol": "TCP",
                  "source": {"selector": f"app == 'a{i}'"}, "destination": {"ports": [80 + i]}}
                 for i in range(10)]
        dp, _ = snapshot_dataplane([np("big", {"selector": "app == 'a'", "ingress": rules})],
                                   pods=pods)
        policy = sum(len(c.rules) for c in chains_like(dp, "cali-pi-").values())
        members = sum(len(s.members) for s in dp.ipsets.values())
        return policy, members

    assert counts(2)[0] == counts(20)[0]


# --- rule features -------------------------------------------------------------------------


def test_actions() -> None:
    assert rule_text({"action": "Allow"}) == ["-j MARK --set-xmark 0x10000/0x10000",
                                               "-m mark --mark 0x10000/0x10000 -j RETURN"]
    assert rule_text({"action": "Pass"}) == ["-j MARK --set-xmark 0x20000/0x20000",
                                              "-m mark --mark 0x20000/0x20000 -j RETURN"]
    assert rule_text({"action": "Deny"}) == ["-j MARK --set-xmark 0x40000/0x40000",
                                              "-m mark --mark 0x40000/0x40000 -j DROP"]
    assert rule_text({"action": "Log", "protocol": "TCP"}) == [
        '-p tcp -j LOG --log-prefix "calico-np x: "']


def test_log_prefix_names_the_policy_within_the_kernel_limit() -> None:
    assert log_prefix("calico-%k %p", "np", "deny-all", "prod", "default") == (
        "calico-np prod/deny-all: ")
    long = log_prefix("calico-%k %p", "knp", "x" * 80, "ns", "default")
    assert len(long) <= 29 and long.endswith(": ")


def test_protocols_by_name_and_number_and_not_protocol() -> None:
    assert rule_text({"action": "Allow", "protocol": "UDP"})[0].startswith("-p udp ")
    assert rule_text({"action": "Allow", "protocol": 47})[0].startswith("-p 47 ")
    assert rule_text({"action": "Allow", "protocol": "SCTP"})[0].startswith("-p sctp ")
    assert rule_text({"action": "Allow", "notProtocol": "TCP"})[0].startswith("! -p tcp ")
    # notProtocol implied by a different protocol: iptables takes one -p
    assert rule_text({"action": "Allow", "protocol": "UDP", "notProtocol": "TCP"})[0] == (
        "-p udp -j MARK --set-xmark 0x10000/0x10000")
    assert rule_text({"action": "Allow", "protocol": "UDP", "notProtocol": "UDP"}) == []


def test_ports_ranges_and_multiport_split() -> None:
    assert split_ports([PortRange(i, i) for i in range(15)]) == [
        [PortRange(i, i) for i in range(15)]]
    assert len(split_ports([PortRange(1, 2)] * 8)) == 2  # a range takes two slots
    text = rule_text({"action": "Allow", "protocol": "TCP",
                      "destination": {"ports": [80, "8000:8100"]}})
    assert text[0] == ("-p tcp -m multiport --dports 80,8000:8100 "
                       "-j MARK --set-xmark 0x10000/0x10000")
    many = rule_text({"action": "Allow", "protocol": "TCP",
                      "destination": {"ports": list(range(1, 21))}})
    assert many[0] == "-j MARK --set-xmark 0x0/0x180000"
    assert many[1].startswith("-p tcp -m multiport --dports 1,2,3") and many[1].endswith(
        "-j MARK --set-xmark 0x80000/0x80000")
    assert many[2] == ("-p tcp -m multiport --dports 16,17,18,19,20 "
                       "-j MARK --set-xmark 0x80000/0x80000")
    assert many[3] == "-p tcp -m mark --mark 0x80000/0x80000 -j MARK --set-xmark 0x10000/0x10000"


def test_not_ports_are_anded_negative_matches() -> None:
    text = rule_text({"action": "Deny", "protocol": "UDP",
                      "source": {"notPorts": list(range(1, 18))}})
    assert text[0].count("-m multiport ! --sports") == 2


def test_named_ports_use_ip_port_sets() -> None:
    sets = SetCollector(4)
    ctx = RuleContext(4, MARKS, sets, "p: ")
    rule = compile_rule({"action": "Allow", "protocol": "TCP",
                         "destination": {"selector": "app == 'a'", "ports": ["http"]}}, "x")
    text = [r.text() for r in render_rule(rule, ctx)]
    (name,) = sets.specs
    assert name.startswith("cali40n:") and len(name) == 31
    assert text[0] == f"-p tcp -m set --match-set {name} dst,dst " \
                      "-j MARK --set-xmark 0x10000/0x10000"
    # ports plus a named port: ORed in a match block
    both = rule_text({"action": "Allow", "protocol": "TCP",
                      "destination": {"ports": [80, "http"]}})
    assert "dst,dst -j MARK --set-xmark 0x80000/0x80000" in both[2]


def test_named_port_set_members() -> None:
    pods = {"x/a": {"ip": "10.244.1.1", "labels": {"app": "a"},
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
            "x/b": {"ip": "10.244.1.2"}}
    pol = np("p", {"selector": "all()", "ingress": [
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http"]}}]})
    dp, _ = snapshot_dataplane([pol], pods=pods)
    (named,) = [s for s in dp.ipsets.values() if s.kind == "hash:ip,port" and s.family == 4]
    assert named.members == {"10.244.1.1,tcp:8080"}


def test_nets_single_and_multiple() -> None:
    one = rule_text({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]},
                     "destination": {"notNets": ["10.1.0.0/16"]}})
    assert one[0] == "-s 10.0.0.0/8 ! -d 10.1.0.0/16 -j MARK --set-xmark 0x10000/0x10000"
    two = rule_text({"action": "Allow", "source": {"nets": ["10.0.0.0/8", "192.168.0.0/16"]}})
    assert two[:3] == ["-j MARK --set-xmark 0x0/0x180000",
                       "-s 10.0.0.0/8 -j MARK --set-xmark 0x80000/0x80000",
                       "-s 192.168.0.0/16 -j MARK --set-xmark 0x80000/0x80000"]
    assert two[3] == "-m mark --mark 0x80000/0x80000 -j MARK --set-xmark 0x10000/0x10000"
    negated = rule_text({"action": "Allow", "source": {"notNets": ["10.0.0.0/8", "172.16.0.0/12"]}})
    assert negated[:3] == ["-j MARK --set-xmark 0x80000/0x180000",
                           "-s 10.0.0.0/8 -j MARK --set-xmark 0x0/0x80000",
                           "-s 172.16.0.0/12 -j MARK --set-xmark 0x0/0x80000"]


def test_second_positive_block_resets_its_bit() -> None:
    text = rule_text({"action": "Allow",
                      "source": {"nets": ["10.0.0.0/8", "192.168.0.0/16"]},
                      "destination": {"nets": ["10.1.0.0/16", "10.2.0.0/16"]}})
    assert text[3] == "-j MARK --set-xmark 0x0/0x100000"
    assert text[6] == "-m mark --mark 0x0/0x100000 -j MARK --set-xmark 0x0/0x80000"


def test_selectors_become_hash_net_sets() -> None:
    sets = SetCollector(6)
    ctx = RuleContext(6, MARKS, sets, "p: ")
    rule = compile_rule({"action": "Allow", "source": {"selector": "app == 'a'"},
                         "destination": {"notSelector": "app == 'b'"}}, None)
    text = render_rule(rule, ctx)[0].text()
    src = "cali60" + parse("app == 'a'").unique_id
    assert f"-m set --match-set {src[:31]} src" in text
    assert f"-m set ! --match-set {('cali60' + parse('app == ' + repr('b')).unique_id)[:31]} dst" \
        in text


def test_network_sets_are_selector_set_members_and_slash0_is_split() -> None:
    gns = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
           "metadata": {"name": "w", "labels": {"role": "w"}},
           "spec": {"nets": ["0.0.0.0/0", "198.51.100.0/24"]}}
    pol = np("p", {"selector": "all()", "ingress": [
        {"action": "Allow",
         "source": {"namespaceSelector": "global()", "selector": "role == 'w'"}}]})
    dp, _ = snapshot_dataplane([gns, pol])
    (v4,) = [s for s in dp.ipsets.values() if s.name.startswith("cali40s:")]
    assert v4.members == {"0.0.0.0/1", "128.0.0.0/1", "198.51.100.0/24"}
    assert v4.kind == "hash:net"
    assert any(s.name.startswith("cali60s:") for s in dp.ipsets.values())


def test_icmp_type_and_code_per_family() -> None:
    v4 = rule_text({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}})
    assert v4[0].startswith("-p icmp -m icmp --icmp-type 8/0 ")
    assert rule_text({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}}, 6) == []
    v6 = rule_text({"action": "Allow", "protocol": "ICMPv6", "notICMP": {"type": 128}}, 6)
    assert v6[0].startswith("-p ipv6-icmp -m icmp6 ! --icmpv6-type 128 ")


def test_ip_version_filtering() -> None:
    assert rule_text({"action": "Allow", "ipVersion": 6}, 4) == []
    assert rule_text({"action": "Allow", "ipVersion": 6}, 6) != []
    # a CIDR list emptied for a family drops the rule there
    assert rule_text({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}}, 6) == []
    assert rule_text({"action": "Deny", "source": {"notNets": ["fd00::/8"]}}, 4) == []
    # a negated catch-all can never match
    assert rule_text({"action": "Allow", "source": {"notNets": ["0.0.0.0/0"]}}, 4) == []


def test_allow_with_services_never_opens_traffic() -> None:
    rule = {"action": "Allow", "destination": {"services": {"name": "s", "namespace": "x"}}}
    assert rule_text(rule) == []


def test_trailing_return_is_trimmed_and_owner_comment_added() -> None:
    dp, _ = snapshot_dataplane([np("p", {"selector": "all()", "ingress": [{"action": "Allow"}]})])
    rules = dp.tables[(4, "filter")].chains["cali-pi-np/x/p"].rules
    assert [r.text() for r in rules] == ["-j MARK --set-xmark 0x10000/0x10000"]
    assert rules[0].comment == "NetworkPolicy x/p ingress"


# --- fail closed ---------------------------------------------------------------------------


def test_unrenderable_policy_drops_and_is_reported() -> None:
    snap = scenario.snapshot_of(scenario.initial_state(
        {"name": "t", "pods": {"x/a": {"ip": "10.244.1.1"}}, "steps": [{}]}))
    # Validation rejects ports without a protocol, so inject the policy directly.
    snap.network_policies.append(np("bad", {"selector": "all()", "ingress": [
        {"action": "Allow", "destination": {"ports": [80]}}]}))
    result = render_with_report(PolicyIndex(snap), NODE, RenderConfig())
    assert [p.name for p in result.problems] == ["x/bad"]
    assert "ports need a protocol" in result.problems[0].reason
    for family in (4, 6):
        rules = result.dataplane.tables[(family, "filter")].chains["cali-pi-np/x/bad"].rules
        assert [r.text() for r in rules] == ["-j DROP"]


def test_missing_profile_denies() -> None:
    snap = scenario.snapshot_of(scenario.initial_state(
        {"name": "t", "pods": {"x/a": {"ip": "10.244.1.1"}}, "steps": [{}]}))
    snap.profiles[:] = [p for p in snap.profiles if not p["metadata"]["name"].startswith("kns.")]
    dp = render(PolicyIndex(snap), NODE)
    assert chain(dp, "cali-pri-kns.x") == ["-j MARK --set-xmark 0x40000/0x40000",
                                           "-m mark --mark 0x40000/0x40000 -j DROP"]

"""felix.simulate: verdicts and traces for flows, one semantics row per test (plain data)."""

from __future__ import annotations

from typing import Any

import pytest

from felix.calc import PolicyIndex
from felix.simulate import EndpointRef, Flow, Verdict, simulate
from tests.unit.test_calc import (
    K8S,
    global_netset,
    gnp,
    hep,
    index,
    knp,
    namespaces,
    netset,
    np,
    pod,
    sa_profile,
    tier,
)

A = EndpointRef("x", "a")  # 10.244.1.10, app=a, namespace x (team=x)
B = EndpointRef("y", "b")  # 10.244.1.20, app=b, namespace y (team=y)
C = EndpointRef("y", "c")  # 10.244.2.30, app=c, namespace y, node2

HTTP = {"name": "http", "protocol": "TCP", "port": 8080}


def cluster(*extra: Any) -> PolicyIndex:
    return index(
        namespaces(x={"team": "x"}, y={"team": "y"}),
        pod("x", "a", "10.244.1.10", {"app": "a"}),
        pod("y", "b", "10.244.1.20", {"app": "b"}, ports=[HTTP]),
        pod("y", "c", "10.244.2.30", {"app": "c"}, node="node2",
            ports=[{"name": "http", "protocol": "TCP", "port": 9090}]),
        *extra,
    )


def check(idx: PolicyIndex, src: EndpointRef | str | None, dst: EndpointRef | str,
          **kw: Any) -> Verdict:
    kw.setdefault("port", 80)
    return simulate(idx, Flow(src, dst, **kw))


def allowed(idx: PolicyIndex, src: EndpointRef | str | None, dst: EndpointRef | str,
            **kw: Any) -> bool:
    return check(idx, src, dst, **kw).allowed


DENY_INGRESS = knp("y", "deny-ingress", types=["Ingress"])


# --- Kubernetes basics ---------------------------------------------------------------------


def test_unselected_pods_are_default_allow() -> None:
    v = check(cluster(), A, B)
    assert v.allowed
    assert [s.action for s in v.trace if s.rule is None] == ["no policy: profile"] * 2
    assert v.reason == ("allowed by rule 0 of profile kns.x on egress of x/a (no policy applies); "
                        "allowed by rule 0 of profile kns.y on ingress of y/b "
                        "(no policy applies)")


def test_deny_all_ingress_isolates() -> None:
    idx = cluster(DENY_INGRESS)
    v = check(idx, A, B)
    assert not v.allowed
    assert v.reason == ("denied by end of tier default on ingress of y/b "
                        "(policies: knp.default.deny-ingress)")
    last = v.trace[-1]
    assert (last.direction, last.endpoint, last.tier, last.policy, last.rule, last.action) == (
        "ingress", "y/b", "default", None, None, "end-of-tier deny")
    assert allowed(idx, B, A)  # egress from an isolated pod is untouched


def test_ingress_empty_rule_allows_all() -> None:
    idx = cluster(DENY_INGRESS, knp("y", "allow-all", ingress=[{"action": "Allow"}],
                                    types=["Ingress"]))
    v = check(idx, A, B)
    assert v.allowed
    assert v.reason.endswith("allowed by rule 0 of policy knp.default.allow-all "
                             "in tier default on ingress of y/b")
    assert allowed(idx, "203.0.113.9", B)


def test_egress_and_ingress_must_both_allow() -> None:
    deny_egress = knp("x", "deny-egress", types=["Egress"])
    v = check(cluster(deny_egress), A, B)
    assert not v.allowed and "on egress of x/a" in v.reason
    assert {s.direction for s in v.trace} == {"egress"}  # stops at the first deny
    v = check(cluster(DENY_INGRESS), A, B)
    assert not v.allowed and [s.direction for s in v.trace][:2] == ["egress", "egress"]
    assert not allowed(cluster(deny_egress, DENY_INGRESS), A, B)


# --- ordering ------------------------------------------------------------------------------


def test_tiers_run_in_order() -> None:
    allow = gnp("allow", tier="first", ingress=[{"action": "Allow"}])
    deny = gnp("deny", tier="second", ingress=[{"action": "Deny"}])
    v = check(cluster(tier("first", 10), tier("second", 20), allow, deny), A, B)
    assert v.allowed and "policy allow in tier first" in v.reason
    v = check(cluster(tier("first", 30), tier("second", 20), allow, deny), A, B)
    assert not v.allowed and "policy deny in tier second" in v.reason
    # Equal orders: by name.
    assert allowed(cluster(tier("first", 10), tier("second", 10), allow, deny), A, B)


def test_security_tier_overrides_default_tier() -> None:
    block = gnp("block-a", tier="security", ingress=[
        {"action": "Deny", "source": {"selector": "app == 'a'"}}])
    idx = cluster(tier("security", 100), block,
                  knp("y", "allow", ingress=[{"action": "Allow"}], types=["Ingress"]))
    assert not allowed(idx, A, B)
    # y/c is not app=a: no rule in the security tier matches, so its end-of-tier deny applies.
    v = check(idx, C, B)
    assert not v.allowed and v.reason.startswith("denied by end of tier security")


def test_policies_within_a_tier_by_order_then_name() -> None:
    allow = {"ingress": [{"action": "Allow"}], "types": ["Ingress"]}
    deny = {"ingress": [{"action": "Deny"}], "types": ["Ingress"]}
    v = check(cluster(np("y", "z-allow", order=10, **allow), np("y", "a-deny", order=20, **deny)),
              A, B)
    assert v.allowed and "policy y/z-allow" in v.reason
    v = check(cluster(np("y", "z-allow", order=10, **allow), np("y", "a-deny", order=10, **deny)),
              A, B)
    assert not v.allowed and "policy y/a-deny" in v.reason
    # No order sorts after every order: the KNP (1000) runs first.
    v = check(cluster(np("y", "a-deny", **deny), knp("y", "allow", **allow)), A, B)
    assert v.allowed and "knp.default.allow" in v.reason


def test_pass_goes_to_the_next_tier() -> None:
    passer = gnp("pass", tier="security", ingress=[{"action": "Pass"}, {"action": "Deny"}])
    idx = cluster(tier("security", 100), passer, DENY_INGRESS)
    v = check(idx, A, B)
    assert not v.allowed and v.reason.startswith("denied by end of tier default")
    step = next(s for s in v.trace if s.action == "Pass")
    assert (step.tier, step.policy, step.rule) == ("security", "pass", 0)
    # Every tier passed: the profiles decide.
    v = check(cluster(tier("security", 100), passer), A, B)
    assert v.allowed and "profile kns.y" in v.reason and "every tier passed" in v.reason


def test_tier_default_action_pass() -> None:
    unmatched = gnp("deny-zzz", tier="security", ingress=[
        {"action": "Deny", "source": {"selector": "app == 'zzz'"}}])
    v = check(cluster(tier("security", 100, "Pass"), unmatched), A, B)
    assert v.allowed
    assert [s.action for s in v.trace if s.tier == "security"] == ["no match", "end-of-tier pass"]
    v = check(cluster(tier("security", 100), unmatched), A, B)
    assert not v.allowed and v.reason.startswith("denied by end of tier security")


def test_log_records_and_continues() -> None:
    pol = np("y", "log-then-allow", ingress=[{"action": "Log"}, {"action": "Allow"}])
    v = check(cluster(pol), A, B)
    assert v.allowed
    ingress = [(s.action, s.rule) for s in v.trace if s.direction == "ingress"]
    assert ingress == [("Log", 0), ("Allow", 1)]
    assert not allowed(cluster(np("y", "log-only", ingress=[{"action": "Log"}])), A, B)


# --- profiles ------------------------------------------------------------------------------


def test_profiles_come_last_and_in_order() -> None:
    guard = {"kind": "Profile", "apiVersion": "projectcalico.org/v3",
             "metadata": {"name": "guard"},
             "spec": {"ingress": [{"action": "Deny", "source": {"selector": "app == 'a'"}}]}}
    guarded = pod("y", "g", "10.244.1.40", {"app": "g"}, profiles=["guard", "kns.y"])
    idx = cluster(guard, guarded)
    v = check(idx, A, EndpointRef("y", "g"))
    assert not v.allowed and v.reason.startswith("denied by rule 0 of profile guard")
    assert allowed(idx, C, EndpointRef("y", "g"))  # guard did not match; kns.y allows
    # A policy that applies takes precedence over every profile.
    idx = cluster(guard, guarded, np("y", "allow", ingress=[{"action": "Allow"}]))
    assert allowed(idx, A, EndpointRef("y", "g"))


def test_no_profile_means_deny() -> None:
    v = check(cluster(pod("y", "bare", "10.244.1.41", profiles=[])), A, EndpointRef("y", "bare"))
    assert not v.allowed
    assert v.reason == "denied: no profile allowed it on ingress of y/bare (profiles: none)"


def test_missing_profile_fails_closed() -> None:
    idx = cluster(pod("y", "orphan", "10.244.1.42", profiles=["kns.ghost"]))
    v = check(idx, A, EndpointRef("y", "orphan"))
    assert not v.allowed
    assert v.reason == "denied by missing profile kns.ghost (fails closed) on ingress of y/orphan"
    assert "missing profile" in [s.action for s in v.trace]


def test_staged_policies_are_ignored() -> None:
    staged = np("y", "staged-deny", ingress=[{"action": "Deny"}])
    staged["kind"] = "StagedNetworkPolicy"
    staged_gnp = gnp("staged-global", tier="security", ingress=[{"action": "Deny"}])
    staged_gnp["kind"] = "StagedGlobalNetworkPolicy"
    v = check(cluster(staged, tier("security", 10), staged_gnp), A, B)
    assert v.allowed
    assert all(s.policy not in ("staged-deny", "staged-global") for s in v.trace)


# --- peers ---------------------------------------------------------------------------------


def _peer_cluster(*rules: dict[str, Any], policy: dict[str, Any] | None = None) -> PolicyIndex:
    """Pods in three namespaces; y/b protected by `policy` or a KNP made of `rules`."""
    if policy is None:
        policy = knp("y", "peers", selector=f"{K8S} && app == 'b'", ingress=list(rules),
                     types=["Ingress"])
    return cluster(
        pod("x", "d", "10.244.1.11", {"app": "d"}),
        pod("y", "f", "10.244.1.21", {"app": "a"}),
        namespaces("z"), pod("z", "e", "10.244.1.31", {"app": "a"}),
        policy,
    )


PEERS = {"x/a": A, "x/d": EndpointRef("x", "d"), "y/f": EndpointRef("y", "f"),
         "z/e": EndpointRef("z", "e")}


def test_namespace_and_pod_selector_in_one_peer_is_and() -> None:
    idx = _peer_cluster({"action": "Allow", "source": {
        "selector": f"{K8S} && app == 'a'", "namespaceSelector": "team == 'x'"}})
    verdicts = {name: allowed(idx, ref, B) for name, ref in PEERS.items()}
    assert verdicts == {"x/a": True, "x/d": False, "y/f": False, "z/e": False}


def test_separate_peers_are_or() -> None:
    idx = _peer_cluster(
        {"action": "Allow", "source": {"selector": K8S, "namespaceSelector": "team == 'x'"}},
        {"action": "Allow", "source": {"selector": f"{K8S} && app == 'a'"}},
    )
    verdicts = {name: allowed(idx, ref, B) for name, ref in PEERS.items()}
    assert verdicts == {"x/a": True, "x/d": True, "y/f": True, "z/e": False}


def test_empty_namespace_selector_means_every_namespace() -> None:
    idx = _peer_cluster({"action": "Allow", "source": {
        "selector": f"{K8S} && app == 'a'", "namespaceSelector": "all()"}})
    verdicts = {name: allowed(idx, ref, B) for name, ref in PEERS.items()}
    assert verdicts == {"x/a": True, "x/d": False, "y/f": True, "z/e": True}
    assert not allowed(idx, "10.244.9.9", B)  # not an endpoint: never in a selector's set


def test_converted_kubernetes_policy() -> None:
    from datastore import k8s

    policy = k8s.convert_network_policy({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "from-x-a", "namespace": "y"},
        "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"team": "x"}},
             "podSelector": {"matchLabels": {"app": "a"}}}]}]},
    })
    idx = _peer_cluster(policy=policy)
    verdicts = {name: allowed(idx, ref, B) for name, ref in PEERS.items()}
    assert verdicts == {"x/a": True, "x/d": False, "y/f": False, "z/e": False}


def test_ip_block_with_except() -> None:
    idx = cluster(knp("y", "cidr", types=["Ingress"], ingress=[{"action": "Allow", "source": {
        "nets": ["172.16.0.0/16"], "notNets": ["172.16.8.0/24"]}}]))
    assert allowed(idx, "172.16.1.1", B)
    assert not allowed(idx, "172.16.8.8", B)
    assert not allowed(idx, "10.1.1.1", B)
    assert not allowed(idx, A, B)  # pods are matched by IP too: 10.244.1.10 is outside


def test_egress_ip_block() -> None:
    idx = cluster(knp("x", "out", types=["Egress"], egress=[{"action": "Allow", "destination": {
        "nets": ["172.16.0.0/16"], "notNets": ["172.16.8.0/24"]}}]))
    assert allowed(idx, A, "172.16.1.1")
    assert not allowed(idx, A, "172.16.8.1")


# --- ports and protocols -------------------------------------------------------------------


def _ingress(*rules: dict[str, Any]) -> PolicyIndex:
    return cluster(np("y", "rules", selector="app == 'b'", ingress=list(rules)))


def test_port_ranges() -> None:
    idx = _ingress({"action": "Allow", "protocol": "TCP",
                    "destination": {"ports": [443, "8000:8080"]}})
    assert allowed(idx, A, B, port=8080)
    assert allowed(idx, A, B, port=443)
    assert not allowed(idx, A, B, port=8081)
    assert not allowed(idx, A, B, protocol="UDP", port=8000)


def test_named_ports_on_ingress() -> None:
    idx = _ingress({"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http"]}})
    assert allowed(idx, A, B, port=8080)
    assert not allowed(idx, A, B, port=80)
    assert not allowed(idx, A, B, port=8080, protocol="UDP")


def test_named_ports_on_egress_resolve_against_the_destination_selector() -> None:
    idx = cluster(np("x", "out", types=["Egress"], egress=[{
        "action": "Allow", "protocol": "TCP",
        "destination": {"namespaceSelector": "all()", "selector": "app == 'b'",
                        "ports": ["http"]}}]))
    assert allowed(idx, A, B, port=8080)
    assert not allowed(idx, A, C, port=9090)  # c names 9090 "http" but is not app=b
    assert not allowed(idx, A, C, port=8080)


def test_named_port_without_selector_means_any_endpoint_exposing_it() -> None:
    idx = cluster(np("x", "out", types=["Egress"], egress=[{
        "action": "Allow", "protocol": "TCP", "destination": {"ports": ["http"]}}]))
    assert allowed(idx, A, B, port=8080)
    assert allowed(idx, A, C, port=9090)
    assert not allowed(idx, A, C, port=8080)
    assert not allowed(idx, A, "203.0.113.1", port=8080)


def test_not_ports() -> None:
    idx = _ingress({"action": "Allow", "protocol": "TCP",
                    "destination": {"notPorts": [22, "http"]}})
    assert allowed(idx, A, B, port=80)
    assert not allowed(idx, A, B, port=22)
    assert not allowed(idx, A, B, port=8080)


def test_source_ports() -> None:
    idx = _ingress({"action": "Allow", "protocol": "UDP", "source": {"ports": [53]}})
    assert allowed(idx, A, B, protocol="UDP", src_port=53, port=40000)
    assert not allowed(idx, A, B, protocol="UDP", port=53)  # default source port is ephemeral


def test_ports_only_match_port_protocols() -> None:
    idx = _ingress({"action": "Allow", "destination": {"notPorts": [22]}})
    assert allowed(idx, A, B, protocol="TCP", port=80)
    assert not allowed(idx, A, B, protocol="ICMP", port=None, icmp_type=8)


def test_not_protocol() -> None:
    idx = _ingress({"action": "Allow", "notProtocol": "UDP"})
    assert allowed(idx, A, B, protocol="TCP")
    assert allowed(idx, A, B, protocol=132)
    assert not allowed(idx, A, B, protocol="udp", port=53)


@pytest.mark.parametrize(("icmp_type", "icmp_code", "ok"), [
    (8, 0, True), (8, 1, False), (0, 0, False), (None, None, False)])
def test_icmp_type_and_code(icmp_type: int | None, icmp_code: int | None, ok: bool) -> None:
    idx = _ingress({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}})
    assert allowed(idx, A, B, protocol="ICMP", port=None, icmp_type=icmp_type,
                   icmp_code=icmp_code) is ok


def test_not_icmp() -> None:
    idx = _ingress({"action": "Allow", "protocol": 1, "notICMP": {"type": 8}})
    assert allowed(idx, A, B, protocol="icmp", icmp_type=0, icmp_code=0)
    assert not allowed(idx, A, B, protocol="icmp", icmp_type=8, icmp_code=3)
    assert not allowed(idx, A, B, protocol="TCP")


def test_ip_version() -> None:
    dual = pod("y", "dual", "10.244.1.50", {"app": "b"})
    dual["spec"]["ipNetworks"].append("fd00::50/128")
    idx = cluster(dual, np("y", "v6-only", selector="app == 'b'",
                           ingress=[{"action": "Allow", "ipVersion": 6}]))
    target = EndpointRef("y", "dual")
    assert not allowed(idx, "10.9.9.9", target)
    assert allowed(idx, "fd00::9", target)
    assert not allowed(idx, A, target)  # both have IPv4: the flow is IPv4


def test_nets_of_the_other_family_drop_the_rule() -> None:
    idx = _ingress({"action": "Allow", "source": {"nets": ["fd00::/8"]}})
    assert not allowed(idx, "10.1.1.1", B)
    idx = _ingress({"action": "Allow", "source": {"notNets": ["0.0.0.0/0"]}})
    assert not allowed(idx, "10.1.1.1", B)


def test_unenforceable_service_match_never_opens_traffic() -> None:
    svc = {"services": {"name": "db", "namespace": "y"}}
    idx = cluster(np("y", "svc", ingress=[{"action": "Allow", "source": svc}]))
    assert not allowed(idx, A, B)
    idx = cluster(np("y", "svc", ingress=[{"action": "Deny", "source": svc},
                                          {"action": "Allow"}]))
    assert not allowed(idx, A, B)
    # HTTP is matched at L3/L4 only, as Felix's iptables rules do.
    idx = cluster(np("y", "http", ingress=[{"action": "Allow", "http": {"methods": ["GET"]}}]))
    v = check(idx, A, B)
    assert v.allowed and "(not enforced: http)" in v.trace[-1].explanation


# --- service accounts ----------------------------------------------------------------------


def test_service_account_selector_picks_policy_endpoints() -> None:
    idx = cluster(
        sa_profile("y", "db-sa", role="db"),
        pod("y", "db", "10.244.1.60", {"app": "db"}, sa="db-sa"),
        np("y", "isolate-db", serviceAccountSelector="role == 'db'", types=["Ingress"]),
    )
    v = check(idx, A, EndpointRef("y", "db"))
    assert not v.allowed and "policies: y/isolate-db" in v.reason
    assert allowed(idx, A, B)


def test_rule_service_accounts() -> None:
    idx = cluster(
        sa_profile("y", "frontend", tier="web"),
        pod("y", "fe", "10.244.1.61", {"app": "fe"}, sa="frontend"),
        pod("y", "other", "10.244.1.62", {"app": "fe"}),
        np("y", "from-frontend", selector="app == 'b'",
           ingress=[{"action": "Allow", "source": {"serviceAccounts": {"names": ["frontend"]}}}]),
        np("y", "from-web-tier", selector="app == 'c'",
           ingress=[{"action": "Allow",
                     "source": {"serviceAccounts": {"selector": "tier == 'web'"}}}]),
    )
    fe, other = EndpointRef("y", "fe"), EndpointRef("y", "other")
    assert allowed(idx, fe, B) and not allowed(idx, other, B)
    assert allowed(idx, fe, C) and not allowed(idx, other, C)


# --- network sets --------------------------------------------------------------------------


def _sets(*policies: dict[str, Any]) -> PolicyIndex:
    return cluster(netset("y", "bad-y", ["1.2.3.0/24"], kind="bad"),
                   netset("x", "bad-x", ["6.6.6.0/24"], kind="bad"),
                   global_netset("bad-global", ["7.7.7.0/24"], kind="bad"), *policies)


def test_network_set_in_same_namespace_is_a_selector_target() -> None:
    idx = _sets(np("y", "no-bad", types=["Egress"], egress=[
        {"action": "Deny", "destination": {"selector": "kind == 'bad'"}},
        {"action": "Allow"}]))
    assert not allowed(idx, B, "1.2.3.4")
    assert allowed(idx, B, "6.6.6.6")  # another namespace's set
    assert allowed(idx, B, "7.7.7.7")  # a global set is not namespaced
    assert allowed(idx, B, "5.5.5.5")


def test_global_network_set_via_global_namespace_selector() -> None:
    idx = _sets(np("y", "no-global-bad", types=["Egress"], egress=[
        {"action": "Deny",
         "destination": {"selector": "kind == 'bad'", "namespaceSelector": "global()"}},
        {"action": "Allow"}]))
    assert not allowed(idx, B, "7.7.7.7")
    assert allowed(idx, B, "1.2.3.4")
    assert allowed(idx, B, A)  # pods are never global()


def test_network_set_via_namespace_selector() -> None:
    idx = _sets(np("y", "no-x-bad", types=["Egress"], egress=[
        {"action": "Deny",
         "destination": {"selector": "kind == 'bad'", "namespaceSelector": "team == 'x'"}},
        {"action": "Allow"}]))
    assert not allowed(idx, B, "6.6.6.6")
    assert allowed(idx, B, "1.2.3.4")


def test_global_policy_selector_matches_every_set() -> None:
    idx = _sets(gnp("no-bad", selector="app == 'b'", types=["Egress"], egress=[
        {"action": "Deny", "destination": {"selector": "kind == 'bad'"}}, {"action": "Allow"}]))
    for ip in ("1.2.3.4", "6.6.6.6", "7.7.7.7"):
        assert not allowed(idx, B, ip)
    assert allowed(idx, B, "5.5.5.5")


def test_not_selector_matches_ips_outside_the_set() -> None:
    idx = _sets(gnp("not-bad", selector="app == 'b'", types=["Egress"], egress=[
        {"action": "Allow", "destination": {"notSelector": "kind == 'bad'"}}]))
    assert allowed(idx, B, "8.8.8.8")
    assert allowed(idx, B, A)
    assert not allowed(idx, B, "1.2.3.4")


def test_selector_with_not_selector_folds_into_one_set() -> None:
    # Felix builds one set for "(all()) && !(kind == 'bad')": a pod inside a "good" set's CIDR
    # is in it through the set even though the pod itself is excluded.
    idx = cluster(global_netset("good", ["10.244.0.0/16"], kind="good"),
                  gnp("g", selector="app == 'b'", ingress=[{"action": "Allow", "source": {
                      "selector": "all()", "notSelector": "app == 'a'"}}]))
    assert allowed(idx, A, B)
    assert allowed(idx, "10.244.200.1", B)
    assert not allowed(idx, "203.0.113.1", B)


# --- hosts ---------------------------------------------------------------------------------


def test_host_to_local_pod_is_always_allowed() -> None:
    idx = cluster(DENY_INGRESS, hep("node1-eth0", "node1", ["192.168.0.1"]))
    v = check(idx, "192.168.0.9", B, from_host=True)
    assert v.allowed and v.trace[0].action == "host-to-local allow"
    assert allowed(idx, None, B, from_host=True)  # the source need not be named
    with pytest.raises(ValueError, match="from_host needs a workload"):
        check(idx, None, "8.8.8.8", from_host=True)
    assert allowed(idx, "node1-eth0", B)  # a host endpoint on the pod's node is that host
    assert not allowed(idx, "192.168.0.9", B)


def test_host_endpoint_default_deny_except_failsafes() -> None:
    idx = cluster(hep("node1-eth0", "node1", ["192.168.0.1"], {"role": "node"}))
    v = check(idx, "198.51.100.1", "node1-eth0", port=80)
    assert not v.allowed and "no profile allowed" in v.reason
    v = check(idx, "198.51.100.1", "192.168.0.1", port=22)
    assert v.allowed and v.reason.startswith("allowed by failsafe port tcp:22")
    assert allowed(idx, "192.168.0.1", "198.51.100.1", protocol="UDP", port=53)
    assert not allowed(idx, "192.168.0.1", "198.51.100.1", port=443)


def test_host_endpoint_policy() -> None:
    idx = cluster(hep("node1-eth0", "node1", ["192.168.0.1"], {"role": "node"}),
                  gnp("web-on-nodes", selector="role == 'node'",
                      ingress=[{"action": "Allow", "protocol": "TCP",
                                "destination": {"ports": [80]}}]))
    assert allowed(idx, "198.51.100.1", "node1-eth0", port=80)
    assert not allowed(idx, "198.51.100.1", "node1-eth0", port=81)


def test_host_policy_the_simulation_does_not_model_is_named() -> None:
    """preDNAT / doNotTrack / applyOnForward policy on a host endpoint of a node on the path
    runs in the kernel but not here: the verdict says so instead of staying silent."""
    untracked = gnp("untracked-deny", selector="role == 'node'", doNotTrack=True,
                    applyOnForward=True, ingress=[{"action": "Deny"}])
    nat = gnp("prednat", selector="role == 'node'", preDNAT=True, applyOnForward=True,
              ingress=[{"action": "Allow"}])
    idx = cluster(hep("node1-eth0", "node1", ["192.168.0.1"], {"role": "node"}), untracked, nat)
    v = check(idx, "198.51.100.1", B)  # to a pod on node1, past node1's host endpoint
    assert v.allowed  # the filter-table model alone
    assert v.caveats == [
        "not simulated: doNotTrack/applyOnForward policy untracked-deny applies to host "
        "endpoint node1-eth0 on node node1",
        "not simulated: preDNAT/applyOnForward policy prednat applies to host endpoint "
        "node1-eth0 on node node1"]
    assert check(idx, "198.51.100.1", C).caveats == []  # node2 has no host endpoint
    assert check(cluster(), A, B).caveats == []


def test_pod_to_host_is_policed_by_pod_egress_only() -> None:
    idx = cluster(hep("node2-eth0", "node2", ["192.168.0.2"]))
    v = check(idx, A, "192.168.0.2", port=10250)
    assert v.allowed and v.trace[-1].action == "not policed"


# --- flows ---------------------------------------------------------------------------------


def test_endpoint_ips_are_treated_as_endpoints() -> None:
    idx = cluster(knp("x", "deny-egress", types=["Egress"]))
    v = check(idx, "10.244.1.10", "10.244.1.20")
    assert not v.allowed and "egress of x/a" in v.reason
    assert check(idx, "x/a", "y/b").reason == v.reason


def test_unknown_endpoint_is_an_error() -> None:
    with pytest.raises(ValueError, match="no endpoint y/nope"):
        simulate(cluster(), Flow(A, EndpointRef("y", "nope")))


def test_flow_between_outside_addresses_meets_no_policy() -> None:
    v = check(cluster(), "8.8.8.8", "1.1.1.1")
    assert v.allowed and v.trace == []


# --- GlobalNetworkPolicy namespaceSelector and the seed-003 set ----------------------------


def test_gnp_namespace_selector_applies_to_pods_in_labelled_namespaces() -> None:
    idx = cluster(gnp("deny-team-y", namespaceSelector="team == 'y'",
                      ingress=[{"action": "Deny"}]))
    assert not allowed(idx, A, B)
    assert allowed(idx, B, A)


SEED_003 = [
    gnp("global-default", order=9999, types=["Ingress", "Egress"],
        ingress=[{"action": "Allow", "source": {}, "destination": {}}],
        egress=[{"action": "Allow", "source": {}, "destination": {}}]),
    gnp("global-egress-deny", order=502, types=["Egress"],
        namespaceSelector="(! has(privileged-namespace))",
        egress=[{"action": "Deny", "source": {},
                 "destination": {"selector": "area == 'dummy'"}}]),
    gnp("global-egress-allow", order=501, types=["Egress"],
        egress=[{"action": "Allow", "destination": {"nets": ["127.0.0.1/32"]},
                 "source": {"namespaceSelector": 'name == "dummy"'}}]),
    gnp("global-privileged-namespace", order=500, types=["Ingress", "Egress"],
        namespaceSelector="has(privileged-namespace)",
        ingress=[{"action": "Allow", "source": {}, "destination": {}}],
        egress=[{"action": "Allow", "source": {}, "destination": {}}]),
]


def _seed_003() -> PolicyIndex:
    return index(
        namespaces(priv={"privileged-namespace": "true"}, normal={}, dummy={"name": "dummy"}),
        pod("priv", "p", "10.244.3.1"),
        pod("normal", "n", "10.244.3.2"),
        pod("dummy", "d", "10.244.3.3"),
        pod("normal", "target", "10.244.3.10", {"area": "dummy"}),
        pod("priv", "ptarget", "10.244.3.11", {"area": "dummy"}),
        pod("normal", "plain", "10.244.3.12"),
        SEED_003,
    )


@pytest.mark.parametrize(("src", "dst", "ok", "decider"), [
    ("priv/p", "normal/target", True, "global-privileged-namespace"),
    ("priv/p", "priv/ptarget", True, "global-privileged-namespace"),
    ("normal/n", "normal/target", False, "global-egress-deny"),
    ("normal/n", "priv/ptarget", False, "global-egress-deny"),
    ("dummy/d", "normal/target", False, "global-egress-deny"),
    ("normal/n", "normal/plain", True, "global-default"),
    ("priv/p", "normal/plain", True, "global-privileged-namespace"),
])
def test_seed_003_global_policies(src: str, dst: str, ok: bool, decider: str) -> None:
    v = check(_seed_003(), src, dst)
    assert v.allowed is ok, v.reason
    decisive = [s for s in v.trace if s.action in ("Allow", "Deny")]
    egress = next(s for s in decisive if s.direction == "egress")
    assert (egress.tier, egress.policy, egress.rule) == ("default", decider, 0)
    if ok:
        ingress = next(s for s in decisive if s.direction == "ingress")
        assert ingress.policy in ("global-default", "global-privileged-namespace")


def test_seed_003_loopback_allowed_from_dummy_namespace_only() -> None:
    idx = _seed_003()
    v = check(idx, "dummy/d", "127.0.0.1")
    assert v.allowed and "global-egress-allow" in v.reason
    v = check(idx, "normal/n", "127.0.0.1")
    assert v.allowed and "global-default" in v.reason  # falls through to order 9999


def test_seed_003_privileged_ingress() -> None:
    v = check(_seed_003(), "normal/n", "priv/p")
    assert v.allowed
    assert v.reason.endswith("allowed by rule 0 of policy global-privileged-namespace "
                             "in tier default on ingress of priv/p")


# --- trace ---------------------------------------------------------------------------------


def test_trace_names_every_policy_consulted() -> None:
    idx = cluster(
        np("y", "first", order=1, ingress=[{"action": "Deny",
                                            "source": {"selector": "app == 'zzz'"}}]),
        np("y", "second", order=2, ingress=[
            {"action": "Log"},
            {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]),
    )
    v = check(idx, A, B)
    steps = [(s.tier, s.policy, s.rule, s.action) for s in v.trace if s.direction == "ingress"]
    assert steps == [("default", "y/first", None, "no match"),
                     ("default", "y/second", 0, "Log"),
                     ("default", "y/second", 1, "Allow")]
    assert v.trace[-1].explanation == "Allow TCP to ports 80"
    assert v.trace[-1].endpoint == "y/b"

"""felix.calc: compiling policies like Calico's update processors, endpoint labels, ordering,
IP set members. Plain data only; the builders here are shared with test_simulate."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from datastore.selector import parse
from datastore.snapshot import Snapshot
from felix.calc import (
    DEFAULT_TIER,
    EndpointRef,
    PolicyId,
    PolicyIndex,
    compile_policy,
    compile_profile,
)
from felix.rules import compile_rule, entity_selector

API = "projectcalico.org/v3"
K8S = "projectcalico.org/orchestrator == 'k8s'"

# --- builders (Calico v3 objects as the datastore holds them) ------------------------------


def ns_profile(ns: str, **labels: str) -> dict[str, Any]:
    to_apply = {f"pcns.{k}": v for k, v in labels.items()}
    to_apply["pcns.projectcalico.org/name"] = ns
    return {"kind": "Profile", "apiVersion": API, "metadata": {"name": f"kns.{ns}"},
            "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                     "labelsToApply": to_apply}}


def sa_profile(ns: str, sa: str, **labels: str) -> dict[str, Any]:
    to_apply = {f"pcsa.{k}": v for k, v in labels.items()}
    to_apply["pcsa.projectcalico.org/name"] = sa
    return {"kind": "Profile", "apiVersion": API, "metadata": {"name": f"ksa.{ns}.{sa}"},
            "spec": {"labelsToApply": to_apply}}


def pod(ns: str, name: str, ip: str, labels: dict[str, str] | None = None, *,
        sa: str = "default", node: str = "node1", ports: list[dict[str, Any]] | None = None,
        profiles: list[str] | None = None) -> dict[str, Any]:
    all_labels = {"projectcalico.org/namespace": ns, "projectcalico.org/orchestrator": "k8s",
                  "projectcalico.org/serviceaccount": sa, **(labels or {})}
    nets = [f"{ip}/128" if ":" in ip else f"{ip}/32"]
    return {"kind": "WorkloadEndpoint", "apiVersion": API,
            "metadata": {"name": f"{node}-k8s-{name}-eth0", "namespace": ns,
                         "labels": all_labels},
            "spec": {"orchestrator": "k8s", "node": node, "pod": name, "endpoint": "eth0",
                     "interfaceName": f"cali{name[:11]}", "ipNetworks": nets,
                     "serviceAccountName": sa,
                     "profiles": profiles if profiles is not None else [f"kns.{ns}",
                                                                        f"ksa.{ns}.{sa}"],
                     "ports": ports or []}}


def np(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("tier", DEFAULT_TIER)
    return {"kind": "NetworkPolicy", "apiVersion": API,
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def knp(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    """A Kubernetes NetworkPolicy as converted: `knp.default.<name>`, order 1000."""
    spec.setdefault("order", 1000)
    spec.setdefault("selector", K8S)
    return np(ns, f"knp.default.{name}", **spec)


def gnp(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("tier", DEFAULT_TIER)
    return {"kind": "GlobalNetworkPolicy", "apiVersion": API, "metadata": {"name": name},
            "spec": spec}


def tier(name: str, order: float | None, default_action: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if order is not None:
        spec["order"] = order
    if default_action:
        spec["defaultAction"] = default_action
    return {"kind": "Tier", "apiVersion": API, "metadata": {"name": name}, "spec": spec}


def netset(ns: str, name: str, nets: list[str], **labels: str) -> dict[str, Any]:
    return {"kind": "NetworkSet", "apiVersion": API,
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nets": nets}}


def global_netset(name: str, nets: list[str], **labels: str) -> dict[str, Any]:
    return {"kind": "GlobalNetworkSet", "apiVersion": API,
            "metadata": {"name": name, "labels": labels}, "spec": {"nets": nets}}


def hep(name: str, node: str, ips: list[str], labels: dict[str, str] | None = None,
        profiles: list[str] | None = None) -> dict[str, Any]:
    return {"kind": "HostEndpoint", "apiVersion": API,
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"node": node, "interfaceName": "eth0", "expectedIPs": ips,
                     "profiles": profiles or []}}


def namespaces(*names: str, **labels_by_ns: dict[str, str]) -> list[dict[str, Any]]:
    """kns.* and ksa.<ns>.default profiles for each namespace."""
    out = []
    for ns in [*names, *labels_by_ns]:
        out += [ns_profile(ns, **labels_by_ns.get(ns, {})), sa_profile(ns, "default")]
    return out


def snapshot(*objs: dict[str, Any] | list[dict[str, Any]]) -> Snapshot:
    snap = Snapshot()
    for obj in objs:
        for item in obj if isinstance(obj, list) else [obj]:
            snap.add(item)
    return snap


def index(*objs: dict[str, Any] | list[dict[str, Any]]) -> PolicyIndex:
    return PolicyIndex(snapshot(*objs))


def sel(text: str) -> Any:
    return parse(text)


# --- policy selectors ----------------------------------------------------------------------


def test_network_policy_selector_is_namespaced() -> None:
    pol = compile_policy(np("web", "p", selector="app == 'a'"))
    assert pol.selector == sel("(app == 'a') && projectcalico.org/namespace == 'web'")
    assert pol.id == PolicyId("NetworkPolicy", "web", "p")


def test_empty_network_policy_selector_is_just_the_namespace() -> None:
    assert compile_policy(np("web", "p")).selector == sel("projectcalico.org/namespace == 'web'")


def test_service_account_selector_is_prefixed_and_anded() -> None:
    pol = compile_policy(np("web", "p", selector="app == 'a'",
                            serviceAccountSelector="role == 'x'"))
    want = "((app == 'a') && projectcalico.org/namespace == 'web') && pcsa.role == 'x'"
    assert pol.selector == sel(want)


def test_gnp_namespace_selector_is_prefixed_and_all_means_namespaced() -> None:
    pol = compile_policy(gnp("g", selector="all()", namespaceSelector="! has(privileged)"))
    assert pol.selector == sel("has(projectcalico.org/namespace) && !has(pcns.privileged)")
    assert compile_policy(gnp("g", namespaceSelector="all()")).selector == sel(
        "has(projectcalico.org/namespace)")
    assert compile_policy(gnp("g")).selector.is_all


def test_gnp_service_account_selector() -> None:
    pol = compile_policy(gnp("g", selector="a == 'b'", serviceAccountSelector="all()"))
    assert pol.selector == sel("(a == 'b') && has(projectcalico.org/serviceaccount)")


def test_kubernetes_policy_identity_and_flags() -> None:
    pol = compile_policy(knp("web", "deny", types=["Ingress"]))
    assert pol.id.kind == "KubernetesNetworkPolicy"
    assert pol.id.chain_id == "knp/web/knp.default.deny"
    assert str(pol.id) == "knp.default.deny"
    assert pol.order == 1000 and pol.tier == "default" and pol.types == {"ingress"}
    assert not pol.staged
    assert str(compile_policy(np("web", "p")).id) == "web/p"
    assert compile_policy(gnp("g")).id.chain_id == "gnp/g"


@pytest.mark.parametrize(("spec", "types"), [
    ({}, {"ingress"}),
    ({"ingress": [{"action": "Allow"}]}, {"ingress"}),
    ({"egress": [{"action": "Allow"}]}, {"egress"}),
    ({"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}, {"ingress", "egress"}),
    ({"types": ["Egress"]}, {"egress"}),
])
def test_types_default_like_calico(spec: dict[str, Any], types: set[str]) -> None:
    assert compile_policy(np("ns", "p", **spec)).types == types


def test_staged_and_special_flags() -> None:
    staged = np("ns", "s")
    staged["kind"] = "StagedNetworkPolicy"
    assert compile_policy(staged).staged
    assert compile_policy(np("ns", "s", stagedAction="Set")).staged
    pol = compile_policy(gnp("g", preDNAT=True, applyOnForward=True))
    assert pol.pre_dnat and pol.apply_on_forward and not pol.do_not_track


# --- entity rule selectors (anchor §4.3) ---------------------------------------------------


@pytest.mark.parametrize(("entity", "namespace", "want"), [
    ({"selector": "app == 'a'"}, "n",
     "projectcalico.org/namespace == 'n' && app == 'a'"),
    ({"selector": "app == 'a'"}, None, "app == 'a'"),
    ({"namespaceSelector": "team == 'x'"}, "n", "pcns.team == 'x'"),
    ({"namespaceSelector": "team == 'x'", "selector": "app == 'a'"}, "n",
     "pcns.team == 'x' && app == 'a'"),
    ({"namespaceSelector": "all()", "selector": "app == 'a'"}, "n",
     "has(projectcalico.org/namespace) && app == 'a'"),
    ({"namespaceSelector": "global()"}, "n", "!has(projectcalico.org/namespace)"),
    ({"namespaceSelector": "global()"}, None, "!has(projectcalico.org/namespace)"),
    ({"notSelector": "app == 'a'"}, "n", "projectcalico.org/namespace == 'n'"),
    ({"serviceAccounts": {"names": ["a", "b"]}}, "n",
     "projectcalico.org/namespace == 'n' && projectcalico.org/serviceaccount in {'a', 'b'}"),
    ({"serviceAccounts": {"selector": "role == 'x'", "names": ["a"]}, "selector": "app == 'y'"},
     None, "(pcsa.role == 'x' && projectcalico.org/serviceaccount in {'a'}) && app == 'y'"),
])
def test_entity_selector_namespacing(entity: dict[str, Any], namespace: str | None,
                                     want: str) -> None:
    assert sel(entity_selector(entity, namespace)) == sel(want)


def test_nets_only_rule_is_not_namespace_restricted() -> None:
    assert entity_selector({"nets": ["10.0.0.0/8"]}, "n") == ""
    rule = compile_rule({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}}, "n")
    assert rule.source.selector is None
    assert rule.source.nets == (ipaddress.ip_network("10.0.0.0/8"),)


def test_not_selector_is_passed_through_unnamespaced() -> None:
    rule = compile_rule({"action": "Deny", "source": {"notSelector": "app == 'a'"}}, "n")
    assert rule.source.not_selector == sel("app == 'a'")
    assert rule.source.selector == sel("projectcalico.org/namespace == 'n'")


def test_rule_fields_are_normalised() -> None:
    rule = compile_rule({"action": "Allow", "protocol": "tcp", "notProtocol": 17,
                         "ipVersion": 4, "icmp": None,
                         "destination": {"ports": [80, "8000:8080", "http"],
                                         "notPorts": ["9000"]}}, "n")
    assert (rule.protocol, rule.not_protocol, rule.ip_version) == (6, 17, 4)
    assert [str(r) for r in rule.destination.ports.ranges] == ["80", "8000:8080"]
    assert rule.destination.ports.names == ("http",)
    assert rule.destination.not_ports.numeric_match(9000)


def test_http_and_services_are_flagged_unenforced() -> None:
    rule = compile_rule({"action": "Allow", "http": {"methods": ["GET"]},
                         "destination": {"services": {"name": "s", "namespace": "n"}}}, "n")
    assert rule.unenforced == ("http", "destination.services")


def test_profile_compiles_without_namespacing() -> None:
    prof = compile_profile({"kind": "Profile", "metadata": {"name": "p"}, "spec": {
        "ingress": [{"action": "Allow", "source": {"selector": "a == 'b'"}}],
        "labelsToApply": {"x": "y"}}})
    assert prof.ingress[0].source.selector == sel("a == 'b'")
    assert prof.labels_to_apply == {"x": "y"} and prof.egress == ()


# --- endpoints and labels ------------------------------------------------------------------


def test_endpoint_inherits_profile_labels_and_own_labels_win() -> None:
    prof = ns_profile("web", team="blue")
    prof["spec"]["labelsToApply"]["app"] = "from-profile"
    idx = index(prof, sa_profile("web", "default", role="x"),
                pod("web", "a", "10.244.1.10", {"app": "mine"}))
    (ep,) = idx.endpoints
    assert ep.labels["app"] == "mine"
    assert ep.labels["pcns.team"] == "blue"
    assert ep.labels["pcns.projectcalico.org/name"] == "web"
    assert ep.labels["pcsa.role"] == "x"
    assert ep.display == "web/a" and ep.workload == "a"


def test_pod_cannot_claim_namespace_labels() -> None:
    idx = index(namespaces("web"), pod("web", "a", "10.244.1.10", {"pcns.team": "red"}))
    assert "pcns.team" not in idx.endpoints[0].labels


def test_network_sets_get_namespace_labels_global_sets_do_not() -> None:
    idx = index(ns_profile("web", team="blue"), netset("web", "ext", ["1.2.3.0/24"], kind="x"),
                global_netset("g", ["5.6.7.0/24"], kind="x"))
    local, glob = idx.network_sets
    assert local.labels["projectcalico.org/namespace"] == "web"
    assert local.labels["pcns.team"] == "blue"
    assert "projectcalico.org/namespace" not in glob.labels


def test_find_endpoint_by_ref_name_and_ip() -> None:
    idx = index(namespaces("web"), pod("web", "a", "10.244.1.10"),
                hep("node1-eth0", "node1", ["192.168.0.1"]))
    assert idx.find_endpoint(EndpointRef("web", "a")) is idx.endpoints[0]
    assert idx.find_endpoint(EndpointRef("web", "node1-k8s-a-eth0")) is idx.endpoints[0]
    assert idx.find_endpoint(EndpointRef.parse("node1-eth0")) is idx.endpoints[1]
    assert idx.find_endpoint(EndpointRef("web", "nope")) is None
    assert idx.endpoint_for_ip(ipaddress.ip_address("192.168.0.1")) is idx.endpoints[1]
    assert idx.endpoint_for_ip(ipaddress.ip_address("10.244.1.10")) is idx.endpoints[0]
    assert idx.endpoint_for_ip(ipaddress.ip_address("8.8.8.8")) is None


# --- tiers and ordering --------------------------------------------------------------------


def _names(idx: PolicyIndex, direction: str = "ingress") -> list[tuple[str, list[str]]]:
    ep = idx.endpoints[0]
    return [(t.tier.name, [p.name for p in t.policies])
            for t in idx.tiers_for(ep, direction)]  # type: ignore[arg-type]


def test_default_tier_exists_implicitly() -> None:
    idx = index(namespaces("n"), pod("n", "a", "10.0.0.1"), np("n", "p"))
    default = next(t for t in idx.tiers if t.name == "default")
    assert default.order == 1_000_000 and default.default_action == "Deny" and default.valid
    assert _names(idx) == [("default", ["p"])]


def test_tiers_sorted_by_order_then_name_nil_last_unknown_last() -> None:
    idx = index(
        namespaces("n"), pod("n", "a", "10.0.0.1"),
        tier("zeta", 10), tier("alpha", 10), tier("late", None), tier("kube-admin", None),
        tier("kube-baseline", None, "Pass"),
        *(np("n", f"p-{t}", tier=t) for t in
          ("default", "zeta", "alpha", "late", "ghost", "kube-admin", "kube-baseline")),
    )
    assert [name for name, _ in _names(idx)] == [
        "alpha", "zeta", "kube-admin", "default", "kube-baseline", "late", "ghost"]
    ghost = next(t for t in idx.tiers if t.name == "ghost")
    assert not ghost.valid and ghost.default_action == "Deny"


def test_policies_sorted_by_order_then_name_namespace_kind() -> None:
    idx = index(namespaces("n"), pod("n", "a", "10.0.0.1"),
                np("n", "b", order=10), np("n", "a", order=10), np("n", "c", order=5),
                np("n", "unordered"), gnp("a", order=10), knp("n", "k"))
    assert _names(idx) == [("default", ["c", "a", "a", "b", "knp.default.k", "unordered"])]
    first_a = idx.tiers_for(idx.endpoints[0], "ingress")[0].policies[1]
    assert first_a.id.kind == "GlobalNetworkPolicy"  # "a//Global..." < "a/n/Network..."


def test_policy_filtering_by_selector_types_staged_and_special() -> None:
    staged = np("n", "staged")
    staged["kind"] = "StagedNetworkPolicy"
    idx = index(namespaces("n", "other"), pod("n", "a", "10.0.0.1", {"app": "a"}),
                np("n", "match", selector="app == 'a'"),
                np("n", "miss", selector="app == 'b'"),
                np("other", "other-ns"),
                np("n", "egress-only", types=["Egress"]),
                staged,
                gnp("prednat", preDNAT=True, applyOnForward=True),
                gnp("notrack", doNotTrack=True, applyOnForward=True),
                gnp("forward", applyOnForward=True))
    assert _names(idx) == [("default", ["forward", "match"])]
    assert _names(idx, "egress") == [("default", ["egress-only"])]


def test_profiles_for_missing_profile_is_deny_all() -> None:
    idx = index(ns_profile("n"), pod("n", "a", "10.0.0.1"))
    kns, ksa = idx.profiles_for(idx.endpoints[0])
    assert kns.name == "kns.n" and not kns.missing
    assert ksa.name == "ksa.n.default" and ksa.missing
    assert [r.action for r in ksa.ingress] == ["Deny"] == [r.action for r in ksa.egress]


# --- IP sets -------------------------------------------------------------------------------


def test_selector_members_cover_weps_heps_and_network_sets() -> None:
    idx = index(namespaces("n"),
                pod("n", "a", "10.0.0.1", {"role": "db"}),
                pod("n", "b", "10.0.0.2", {"role": "web"}),
                hep("h", "node1", ["192.168.0.1"], {"role": "db"}),
                netset("n", "ext", ["1.2.3.0/24"], role="db"),
                global_netset("g", ["5.6.0.0/16", "5.6.7.0/24"], role="db"))
    nets = {str(n) for n in idx.selector_members(sel("role == 'db'"))}
    assert nets == {"10.0.0.1/32", "192.168.0.1/32", "1.2.3.0/24", "5.6.0.0/16", "5.6.7.0/24"}
    namespaced = idx.selector_members(sel("has(projectcalico.org/namespace) && role == 'db'"))
    assert {str(n) for n in namespaced} == {"10.0.0.1/32", "1.2.3.0/24"}


def test_named_port_members() -> None:
    http = {"name": "http", "protocol": "TCP", "port": 8080}
    dns = {"name": "dns", "protocol": "UDP", "port": 53}
    idx = index(namespaces("n"),
                pod("n", "a", "10.0.0.1", {"app": "a"}, ports=[http, dns]),
                pod("n", "b", "10.0.0.2", {"app": "b"},
                    ports=[{"name": "http", "protocol": "TCP", "port": 9090}]))
    a, b = (ipaddress.ip_address(x) for x in ("10.0.0.1", "10.0.0.2"))
    assert idx.named_port_members(sel("all()"), "http", 6) == {(a, 6, 8080), (b, 6, 9090)}
    assert idx.named_port_members(sel("app == 'a'"), "http", None) == {(a, 6, 8080)}
    assert idx.named_port_members(sel("all()"), "dns", 6) == frozenset()
    assert idx.named_port_members(sel("all()"), "dns", None) == {(a, 17, 53)}

"""Kubernetes validation and the Calico objects derived from K8s objects (datastore.k8s).

Expected values are what Calico's kube-controllers / CNI plugin store in etcd mode.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from datastore.errors import ValidationError
from datastore.k8s import (
    convert_network_policy,
    derived_objects,
    namespace_profile,
    parse_workload_endpoint_name,
    refresh_workload_endpoint,
    serviceaccount_profile,
    validate_k8s,
    veth_name,
    workload_endpoint_for_pod,
    workload_endpoint_name,
)

ORCH = "projectcalico.org/orchestrator == 'k8s'"


def knp(spec: dict[str, Any], name: str = "p", namespace: str | None = "default") -> dict:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta,
            "spec": spec}


def calico(spec: dict[str, Any], **kw: Any) -> dict:
    return convert_network_policy(knp(spec, **kw))["spec"]


def ingress_rules(rule: dict[str, Any]) -> list[dict]:
    return calico({"podSelector": {}, "ingress": [rule]})["ingress"]


def egress_rules(rule: dict[str, Any]) -> list[dict]:
    return calico({"podSelector": {}, "egress": [rule], "policyTypes": ["Egress"]})["egress"]


def problems(obj: dict[str, Any], **kw: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        validate_k8s(obj, **kw)
    return info.value.problems


def paths(obj: dict[str, Any], **kw: Any) -> list[str]:
    return [p for p, _ in problems(obj, **kw)]


# --- seed examples (user notes 001 and 004) ------------------------------------------------


def test_seed_deny_all_ingress_in_namespace_given_by_caller():
    # `kubectl apply -f ingress.yaml -n dev-linuxea` with no namespace in the file.
    obj = validate_k8s(knp({"podSelector": {}, "policyTypes": ["Ingress"]}, "deny-ingress",
                           namespace=None), default_namespace="dev-linuxea")
    assert obj["metadata"]["namespace"] == "dev-linuxea"
    assert convert_network_policy(obj) == {
        "kind": "NetworkPolicy",
        "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": "knp.default.deny-ingress", "namespace": "dev-linuxea",
                     "labels": {"projectcalico.org/tier": "default"}},
        "spec": {"tier": "default", "order": 1000, "selector": ORCH, "types": ["Ingress"]},
    }


def test_seed_allow_all_ingress():
    spec = calico({"podSelector": {}, "ingress": [{}], "policyTypes": ["Ingress"]})
    assert spec["ingress"] == [{"action": "Allow"}]
    assert spec["types"] == ["Ingress"]


def test_seed_ipblock_with_except_on_two_tcp_ports():
    spec = calico({
        "podSelector": {"matchLabels": {"app": "linuxea.com"}},
        "ingress": [{
            "from": [{"ipBlock": {"cidr": "172.16.0.0/16", "except": ["172.16.8.0/24"]}}],
            "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": 81}],
        }],
    })
    assert spec["selector"] == f"{ORCH} && app == 'linuxea.com'"
    assert spec["ingress"] == [{
        "action": "Allow",
        "protocol": "TCP",
        "source": {"nets": ["172.16.0.0/16"], "notNets": ["172.16.8.0/24"]},
        "destination": {"ports": ["80:81"]},  # adjacent ports merge into a range
    }]
    assert spec["types"] == ["Ingress"]


def test_seed_deny_all_egress():
    spec = calico({"podSelector": {}, "policyTypes": ["Egress"]})
    assert spec == {"tier": "default", "order": 1000, "selector": ORCH, "types": ["Egress"]}


def test_seed_allow_all_egress():
    spec = calico({"podSelector": {}, "egress": [{}], "policyTypes": ["Egress"]})
    assert spec["egress"] == [{"action": "Allow"}]
    assert "ingress" not in spec
    assert spec["types"] == ["Egress"]


def test_seed_test_network_policy_three_ored_peers():
    spec = calico({
        "podSelector": {"matchLabels": {"role": "db"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{
            "from": [
                {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
                {"podSelector": {"matchLabels": {"role": "frontend"}}},
            ],
            "ports": [{"protocol": "TCP", "port": 6379}],
        }],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
                    "ports": [{"protocol": "TCP", "port": 5978}]}],
    }, name="test-network-policy")
    dst = {"ports": [6379]}
    assert spec == {
        "tier": "default",
        "order": 1000,
        "ingress": [
            {"action": "Allow", "protocol": "TCP",
             "source": {"nets": ["172.17.0.0/16"], "notNets": ["172.17.1.0/24"]},
             "destination": dst},
            # a namespace-only peer still carries the pod clause: pods in those namespaces
            {"action": "Allow", "protocol": "TCP",
             "source": {"selector": ORCH, "namespaceSelector": "project == 'myproject'"},
             "destination": dst},
            # a pod-only peer has no namespaceSelector: the syncer scopes it to the namespace
            {"action": "Allow", "protocol": "TCP",
             "source": {"selector": f"{ORCH} && role == 'frontend'"},
             "destination": dst},
        ],
        "egress": [{"action": "Allow", "protocol": "TCP",
                    "destination": {"nets": ["10.0.0.0/24"], "ports": [5978]}}],
        "selector": f"{ORCH} && role == 'db'",
        "types": ["Ingress", "Egress"],
    }


def test_seed_and_form_namespace_and_pod_selector_in_one_peer():
    rules = ingress_rules({"from": [{
        "namespaceSelector": {"matchLabels": {"user": "alice"}},
        "podSelector": {"matchLabels": {"role": "client"}},
    }]})
    assert rules == [{"action": "Allow", "source": {
        "selector": f"{ORCH} && role == 'client'", "namespaceSelector": "user == 'alice'"}}]


def test_seed_or_form_gives_two_rules():
    rules = ingress_rules({"from": [
        {"namespaceSelector": {"matchLabels": {"user": "alice"}}},
        {"podSelector": {"matchLabels": {"role": "client"}}},
    ]})
    assert [r["source"] for r in rules] == [
        {"selector": ORCH, "namespaceSelector": "user == 'alice'"},
        {"selector": f"{ORCH} && role == 'client'"},
    ]


def test_seed_legacy_api_and_lower_case_protocol_are_normalised():
    obj = knp({"podSelector": {"matchLabels": {"role": "db"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}],
                            "ports": [{"protocol": "tcp", "port": 6379}]}]})
    obj["apiVersion"] = "extensions/v1beta1"
    out = validate_k8s(obj)
    assert out["apiVersion"] == "networking.k8s.io/v1"
    assert out["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert convert_network_policy(obj)["spec"]["ingress"][0]["protocol"] == "TCP"


# --- conversion table ---------------------------------------------------------------------


def test_name_namespace_tier_order():
    out = convert_network_policy(knp({"podSelector": {}}, "web", "prod"))
    assert out["metadata"] == {"name": "knp.default.web", "namespace": "prod",
                               "labels": {"projectcalico.org/tier": "default"}}
    assert (out["spec"]["tier"], out["spec"]["order"]) == ("default", 1000)


def test_does_not_mutate_input():
    obj = knp({"podSelector": {"matchLabels": {"a": "b"}},
               "ingress": [{"ports": [{"port": 80, "protocol": "udp"}]}]})
    before = copy.deepcopy(obj)
    convert_network_policy(obj)
    validate_k8s(obj)
    assert obj == before


def test_match_labels_sorted_by_key():
    spec = calico({"podSelector": {"matchLabels": {"zeta": "1", "alpha": "2", "mid": "3"}}})
    assert spec["selector"] == f"{ORCH} && alpha == '2' && mid == '3' && zeta == '1'"


@pytest.mark.parametrize(("expr", "text"), [
    ({"key": "toast", "operator": "In", "values": ["butter", "jam"]},
     "toast in { 'butter', 'jam' }"),
    ({"key": "toast", "operator": "NotIn", "values": ["marmite", "milk"]},
     "toast not in { 'marmite', 'milk' }"),
    ({"key": "toast", "operator": "Exists"}, "has(toast)"),
    ({"key": "toast", "operator": "DoesNotExist"}, "! has(toast)"),
    ({"key": "k", "operator": "In", "values": ["v1"]}, "k in { 'v1' }"),
])
def test_match_expressions(expr, text):
    assert calico({"podSelector": {"matchExpressions": [expr]}})["selector"] == f"{ORCH} && {text}"
    ns_sel = ingress_rules({"from": [{"namespaceSelector": {"matchExpressions": [expr]}}]})
    assert ns_sel[0]["source"]["namespaceSelector"] == text


def test_match_labels_before_expressions_and_expressions_in_given_order():
    spec = calico({"podSelector": {
        "matchExpressions": [{"key": "z", "operator": "Exists"},
                             {"key": "a", "operator": "DoesNotExist"}],
        "matchLabels": {"role": "db"},
    }})
    assert spec["selector"] == f"{ORCH} && role == 'db' && has(z) && ! has(a)"


def test_operator_case_is_normalised():
    out = validate_k8s(knp({"podSelector": {"matchExpressions": [
        {"key": "a", "operator": "notin", "values": ["x"]}]}}))
    assert out["spec"]["podSelector"]["matchExpressions"][0]["operator"] == "NotIn"


def test_empty_namespace_selector_is_all():
    rules = ingress_rules({"from": [{"namespaceSelector": {}}]})
    assert rules[0]["source"] == {"selector": ORCH, "namespaceSelector": "all()"}


def test_empty_namespace_selector_with_pod_selector():
    rules = egress_rules({"to": [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"k8s-app": "kube-dns"}}}], "ports": [{"protocol": "UDP", "port": 53}]})
    assert rules == [{"action": "Allow", "protocol": "UDP", "destination": {
        "selector": f"{ORCH} && k8s-app == 'kube-dns'", "namespaceSelector": "all()",
        "ports": [53]}}]


def test_empty_pod_selector_peer_is_every_pod_of_the_namespace():
    rules = ingress_rules({"from": [{"podSelector": {}}]})
    assert rules[0]["source"] == {"selector": ORCH}


def test_ipblock_is_nets_only_and_normalised_to_network_address():
    rules = egress_rules({"to": [{"ipBlock": {"cidr": "10.1.2.3/16",
                                               "except": ["10.1.7.9/24", "10.1.8.0/24"]}}]})
    assert rules == [{"action": "Allow", "destination": {
        "nets": ["10.1.0.0/16"], "notNets": ["10.1.7.0/24", "10.1.8.0/24"]}}]


def test_ipv6_ipblock():
    rules = ingress_rules({"from": [{"ipBlock": {"cidr": "2001:DB8::/32",
                                                  "except": ["2001:db8:1::/48"]}}]})
    assert rules[0]["source"] == {"nets": ["2001:db8::/32"], "notNets": ["2001:db8:1::/48"]}


def test_port_without_protocol_is_tcp():
    rules = ingress_rules({"ports": [{"port": 443}]})
    assert rules == [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [443]}}]


def test_port_and_end_port_is_a_range():
    rules = egress_rules({"ports": [{"protocol": "TCP", "port": 32000, "endPort": 32768}]})
    assert rules[0]["destination"] == {"ports": ["32000:32768"]}


def test_end_port_equal_to_port_is_a_single_port():
    rules = egress_rules({"ports": [{"port": 80, "endPort": 80}]})
    assert rules[0]["destination"] == {"ports": [80]}


def test_named_port_kept_by_name():
    rules = ingress_rules({"ports": [{"port": "http"}]})
    assert rules == [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http"]}}]


def test_named_and_numeric_port_keep_order_when_only_one_number():
    rules = ingress_rules({"ports": [{"port": 80}, {"port": "foo"}]})
    assert rules[0]["destination"] == {"ports": [80, "foo"]}


def test_protocol_without_port_matches_every_port():
    rules = ingress_rules({"ports": [{"protocol": "UDP"}]})
    assert rules == [{"action": "Allow", "protocol": "UDP"}]


def test_all_ports_wins_over_listed_ports_of_same_protocol():
    for ports in ([{"port": 80}, {"protocol": "TCP"}], [{"protocol": "TCP"}, {"port": 80}]):
        assert ingress_rules({"ports": ports}) == [{"action": "Allow", "protocol": "TCP"}]


def test_rule_without_ports_has_no_protocol():
    rules = ingress_rules({"from": [{"podSelector": {"matchLabels": {"a": "b"}}}]})
    assert rules == [{"action": "Allow", "source": {"selector": f"{ORCH} && a == 'b'"}}]


def test_rule_without_peers_has_no_entity_constraint():
    rules = egress_rules({"ports": [{"port": 53, "protocol": "UDP"}]})
    assert rules == [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [53]}}]


def test_empty_from_list_means_anywhere():
    assert ingress_rules({"from": [], "ports": []}) == [{"action": "Allow"}]


def test_sctp_udp_tcp_one_rule_per_protocol_sorted():
    rules = ingress_rules({"ports": [
        {"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53},
        {"protocol": "sctp", "port": 9000},
    ]})
    assert [(r["protocol"], r["destination"]["ports"]) for r in rules] == [
        ("SCTP", [9000]), ("TCP", [53]), ("UDP", [53])]


def test_protocols_times_peers():
    rules = ingress_rules({
        "from": [{"podSelector": {"matchLabels": {"a": "1"}}},
                 {"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"port": 53}],
    })
    # outer loop protocol, inner loop peer
    assert [(r["protocol"], next(iter(r["source"]))) for r in rules] == [
        ("TCP", "selector"), ("TCP", "nets"), ("UDP", "selector"), ("UDP", "nets")]


@pytest.mark.parametrize(("given", "merged"), [
    ([1, 2], ["1:2"]),
    ([2, 1], ["1:2"]),
    ([1, 2, 4], ["1:2", 4]),
    ([1, 2, 3, 4, (80, 81), (81, 90), 9090], ["1:4", "80:90", 9090]),
    ([(81, 90), 4, 2, (80, 81), 3, 1, 9090], ["1:4", "80:90", 9090]),
    ([(81, 90), 4, 2, "foo", (80, 81), 3, 1, 9090, "http"],
     ["foo", "http", "1:4", "80:90", 9090]),
    (["foo"], ["foo"]),
    ([8080, 8080], [8080]),
])
def test_multiple_ports_merged_per_protocol(given, merged):
    def k8s_port(p):
        if isinstance(p, tuple):
            return {"port": p[0], "endPort": p[1]}
        return {"port": p}
    rules = ingress_rules({"ports": [k8s_port(p) for p in given]})
    assert rules == [{"action": "Allow", "protocol": "TCP", "destination": {"ports": merged}}]


def test_egress_destination_field_order():
    rules = egress_rules({"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                          "ports": [{"port": 443}]})
    assert list(rules[0]["destination"]) == ["nets", "ports", "notNets"]


def test_policy_types_default_ingress_only_without_egress_rules():
    assert calico({"podSelector": {}, "ingress": [{}]})["types"] == ["Ingress"]
    assert calico({"podSelector": {}})["types"] == ["Ingress"]
    assert calico({"podSelector": {}, "egress": []})["types"] == ["Ingress"]


def test_policy_types_absent_with_egress_rules_gets_egress_like_the_api_server():
    spec = calico({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]})
    assert spec["types"] == ["Ingress", "Egress"]
    assert "ingress" not in spec


def test_policy_types_output_order_is_ingress_then_egress():
    assert calico({"podSelector": {}, "policyTypes": ["egress", "Ingress"]})["types"] == [
        "Ingress", "Egress"]


def test_ingress_rules_kept_even_when_only_egress_type():
    spec = calico({"podSelector": {}, "ingress": [{}], "policyTypes": ["Egress"]})
    assert spec["ingress"] == [{"action": "Allow"}]
    assert spec["types"] == ["Egress"]


def test_missing_pod_selector_is_the_empty_selector():
    assert calico({"policyTypes": ["Ingress"]})["selector"] == ORCH


def test_no_namespace_clause_is_added():
    spec = calico({"podSelector": {"matchLabels": {"a": "b"}},
                   "ingress": [{"from": [{"podSelector": {}}]}]}, namespace="prod")
    assert "projectcalico.org/namespace" not in str(spec)


def test_emitted_selectors_parse():
    from datastore import selector

    spec = calico({
        "podSelector": {"matchLabels": {"app": "web"}, "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b"]},
            {"key": "x", "operator": "NotIn", "values": ["c"]},
            {"key": "y", "operator": "Exists"}, {"key": "z", "operator": "DoesNotExist"}]},
        "ingress": [{"from": [{"namespaceSelector": {}}, {"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "dev"}}}]}],
    })
    sel = selector.parse(spec["selector"])
    assert sel.matches({"projectcalico.org/orchestrator": "k8s", "app": "web", "tier": "b",
                        "y": ""})
    assert not sel.matches({"projectcalico.org/orchestrator": "k8s", "app": "web", "tier": "b",
                            "y": "", "z": "1"})
    assert not sel.matches({"app": "web", "tier": "b", "y": ""})
    for rule in spec["ingress"]:
        for text in rule["source"].values():
            selector.parse(text)


# --- validation ---------------------------------------------------------------------------


def test_validate_fills_namespace_protocol_and_policy_types():
    out = validate_k8s(knp({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]},
                           namespace=None))
    assert out["metadata"]["namespace"] == "default"
    assert out["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 80}]
    assert out["spec"]["policyTypes"] == ["Ingress"]


def test_explicit_namespace_wins_over_default_namespace():
    out = validate_k8s(knp({"podSelector": {}}, namespace="prod"), default_namespace="dev")
    assert out["metadata"]["namespace"] == "prod"


def test_validation_error_names_subject_and_path():
    with pytest.raises(ValidationError) as info:
        validate_k8s(knp({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]},
                         "web", "prod"))
    assert str(info.value).startswith(
        "NetworkPolicy.networking.k8s.io prod/web: spec.ingress[0].ports[0].port: 70000")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "a" * 254, ""])
def test_bad_policy_name(name):
    assert "metadata.name" in paths(knp({"podSelector": {}}, name))


def test_dotted_policy_name_is_fine():
    validate_k8s(knp({"podSelector": {}}, "allow.dns"))


@pytest.mark.parametrize("ns", ["Dev", "dev.linuxea", "a" * 64])
def test_bad_namespace(ns):
    assert paths(knp({"podSelector": {}}, namespace=ns)) == ["metadata.namespace"]


@pytest.mark.parametrize(("labels", "reason"), [
    ({"app": "a b"}, "label value"),
    ({"app": "x" * 64}, "longer than 63"),
    ({"-app": "x"}, "label key"),
    ({"Example.com/app": "x"}, "prefix"),
    ({"example.com/": "x"}, "empty name"),
    ({"/app": "x"}, "empty prefix"),
    ({"app": 1}, "must be a string"),
    ({"app": True}, "must be a string"),
])
def test_bad_labels(labels, reason):
    found = problems(knp({"podSelector": {"matchLabels": labels}}))
    assert len(found) == 1
    path, why = found[0]
    assert path.startswith("spec.podSelector.matchLabels[")
    assert reason in why


def test_good_label_forms():
    validate_k8s(knp({"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "web", "a": "", "x_y.z-1": "V_1.2-b"}}}))


@pytest.mark.parametrize(("block", "path", "reason"), [
    ({"cidr": "10.0.0.0/33"}, "cidr", "not a valid CIDR"),
    ({"cidr": "300.0.0.0/8"}, "cidr", "not a valid CIDR"),
    ({"cidr": "10.0.0.1"}, "cidr", "not a valid CIDR"),
    ({}, "cidr", "required"),
    ({"cidr": "10.0.0.0/24", "except": ["192.168.0.0/24"]}, "except[0]", "strict subset"),
    ({"cidr": "10.0.0.0/24", "except": ["10.0.0.0/24"]}, "except[0]", "strict subset"),
    ({"cidr": "10.0.0.0/24", "except": ["10.0.0.0/16"]}, "except[0]", "strict subset"),
    ({"cidr": "10.0.0.0/8", "except": ["2001:db8::/64"]}, "except[0]", "strict subset"),
    ({"cidr": "10.0.0.0/8", "except": ["nope"]}, "except[0]", "not a valid CIDR"),
    ({"cidr": "10.0.0.0/8", "exclude": ["10.1.0.0/16"]}, "exclude", "unknown field"),
])
def test_bad_ipblock(block, path, reason):
    found = problems(knp({"podSelector": {}, "ingress": [{"from": [{"ipBlock": block}]}]}))
    assert found[0][0] == f"spec.ingress[0].from[0].ipBlock.{path}"
    assert reason in found[0][1]


@pytest.mark.parametrize(("port", "path", "reason"), [
    ({"port": 0}, "port", "out of range"),
    ({"port": 65536}, "port", "out of range"),
    ({"port": 80, "endPort": 79}, "endPort", "greater than or equal"),
    ({"port": 80, "endPort": 70000}, "endPort", "out of range"),
    ({"port": "http", "endPort": 90}, "endPort", "named port"),
    ({"endPort": 90}, "endPort", "port is not specified"),
    ({"port": "80"}, "port", "at least one letter"),
    ({"port": "HTTP"}, "port", "lower-case"),
    ({"port": "a-very-long-port-name"}, "port", "1-15"),
    ({"port": "my--port"}, "port", "consecutive"),
    ({"port": 80.5}, "port", "port number or a port name"),
    ({"port": True}, "port", "port number or a port name"),
    ({"port": 80, "protocol": "ICMP"}, "protocol", "not supported"),
    ({"port": 80, "protocol": "http"}, "protocol", "not supported"),
    ({"port": 80, "proto": "TCP"}, "proto", "unknown field"),
])
def test_bad_ports(port, path, reason):
    found = problems(knp({"podSelector": {}, "egress": [{"ports": [port]}]}))
    assert found[0][0] == f"spec.egress[0].ports[0].{path}", found
    assert reason in found[0][1]


def test_unknown_policy_types():
    found = problems(knp({"podSelector": {}, "policyTypes": ["Ingress", "Both"]}))
    assert found == [("spec.policyTypes[1]", "'Both' is not supported; use Ingress and/or Egress")]
    # the seed's `- Ingress:` typo makes a mapping, not a string
    assert paths(knp({"podSelector": {}, "policyTypes": [{"Ingress": None}]})) == [
        "spec.policyTypes[0]"]
    assert paths(knp({"podSelector": {}, "policyTypes": ["Ingress", "ingress"]})) == [
        "spec.policyTypes[1]"]


@pytest.mark.parametrize(("expr", "path", "reason"), [
    ({"key": "a", "operator": "Equals", "values": ["x"]}, "operator", "not a valid operator"),
    ({"key": "a", "values": ["x"]}, "operator", "required"),
    ({"key": "a", "operator": "In"}, "values", "non-empty"),
    ({"key": "a", "operator": "NotIn", "values": []}, "values", "non-empty"),
    ({"key": "a", "operator": "Exists", "values": ["x"]}, "values", "must be empty"),
    ({"key": "a", "operator": "DoesNotExist", "values": ["x"]}, "values", "must be empty"),
    ({"operator": "Exists"}, "key", "required"),
    ({"key": "bad key", "operator": "Exists"}, "key", "label key"),
    ({"key": "a", "operator": "In", "values": ["bad value"]}, "values[0]", "label value"),
])
def test_bad_match_expressions(expr, path, reason):
    found = problems(knp({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchExpressions": [expr]}}]}]}))
    assert found[0][0] == f"spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].{path}"
    assert reason in found[0][1]


def test_peer_rules():
    assert problems(knp({"podSelector": {}, "ingress": [{"from": [{}]}]})) == [
        ("spec.ingress[0].from[0]",
         "must specify a peer: podSelector, namespaceSelector or ipBlock")]
    found = problems(knp({"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}))
    assert found == [("spec.ingress[0].from[0]", "may not specify both ipBlock and another peer")]


def test_typos_are_reported_not_ignored():
    assert paths(knp({"podSelector": {}, "ingres": [{}]})) == ["spec.ingres"]
    assert paths(knp({"podSelector": {"matchLabel": {"a": "b"}}})) == [
        "spec.podSelector.matchLabel"]
    found = problems(knp({"podSelector": {}, "egress": [{"from": [{"podSelector": {}}]}]}))
    assert found[0][0] == "spec.egress[0].from"
    assert "egress rules use 'to'" in found[0][1]


def test_wrong_shapes():
    assert paths(knp({"podSelector": {}, "ingress": {}})) == ["spec.ingress"]
    assert paths(knp({"podSelector": [], "ingress": [{}]})) == ["spec.podSelector"]


def test_all_problems_reported_together():
    found = paths(knp({"podSelector": {"matchLabels": {"a": "b c"}},
                       "ingress": [{"ports": [{"port": 0}, {"protocol": "GRE"}]}]}, "Bad"))
    assert found == ["metadata.name", "spec.podSelector.matchLabels[\"a\"]",
                     "spec.ingress[0].ports[0].port", "spec.ingress[0].ports[1].protocol"]


def test_wrong_kind_or_api_version():
    assert paths({"kind": "Deployment", "metadata": {"name": "x"}}) == ["kind"]
    bad_api = knp({"podSelector": {}})
    bad_api["apiVersion"] = "projectcalico.org/v3"
    assert paths(bad_api) == ["apiVersion"]
    assert paths({"kind": "Pod", "apiVersion": "apps/v1", "metadata": {"name": "x"}}) == [
        "apiVersion"]


# --- Namespace / ServiceAccount / Pod validation ------------------------------------------


def namespace(name: str = "dev", labels: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": name}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def serviceaccount(name: str = "api", ns: str | None = "dev", labels: dict | None = None):
    meta: dict[str, Any] = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def pod(name: str = "web-7d9f", ns: str | None = "dev", labels: dict | None = None,
        spec: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    if labels is not None:
        meta["labels"] = labels
    spec = spec if spec is not None else {"containers": [{"name": "app", "image": "nginx"}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def test_namespace_gets_metadata_name_label_and_no_namespace():
    out = validate_k8s({**namespace("dev", {"team": "a"}),
                        "metadata": {"name": "dev", "namespace": "x", "labels": {"team": "a"}}})
    assert out["metadata"] == {"name": "dev",
                               "labels": {"team": "a", "kubernetes.io/metadata.name": "dev"}}


@pytest.mark.parametrize("name", ["dev.linuxea", "Dev", "a" * 64, ""])
def test_bad_namespace_name(name):
    assert paths(namespace(name)) == ["metadata.name"]


def test_serviceaccount_defaults_namespace():
    assert validate_k8s(serviceaccount(ns=None), default_namespace="prod")["metadata"] == {
        "name": "api", "namespace": "prod"}
    assert paths(serviceaccount("API")) == ["metadata.name"]


def test_secret_as_the_api_server_stores_it():
    out = validate_k8s({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "bgp-secrets", "namespace": "calico-system"},
                        "data": {"a": "eHl6", "rr-password": "b2xk"},
                        "stringData": {"rr-password": "very-secret"}})
    assert out == {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                   "metadata": {"name": "bgp-secrets", "namespace": "calico-system"},
                   "data": {"a": "eHl6", "rr-password": "dmVyeS1zZWNyZXQ="}}  # stringData wins
    bad = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
           "data": {"x": "not base64!", "a b": "eHl6", "n": None}, "stringData": {"k": 5}}
    assert sorted(paths(bad)) == ["data.a b", "data.n", "data.x", "stringData.k"]


def test_pod_defaults():
    out = validate_k8s(pod(ns=None, spec={"containers": [{
        "name": "linuxeaapp", "image": "marksugar/nginx:1.14.a",
        "ports": [{"name": "http", "containerPort": 80}, {"containerPort": 53,
                                                          "protocol": "udp"}]}]}))
    assert out["metadata"]["namespace"] == "default"
    assert out["spec"]["serviceAccountName"] == "default"
    assert out["spec"]["containers"][0]["ports"] == [
        {"name": "http", "containerPort": 80, "protocol": "TCP"},
        {"containerPort": 53, "protocol": "UDP"}]
    assert out["spec"]["containers"][0]["image"] == "marksugar/nginx:1.14.a"


@pytest.mark.parametrize(("port", "path", "reason"), [
    ({"name": "http"}, "containerPort", "required"),
    ({"containerPort": 0}, "containerPort", "out of range"),
    ({"containerPort": 80, "hostPort": 70000}, "hostPort", "out of range"),
    ({"containerPort": 80, "protocol": "ICMP"}, "protocol", "not supported"),
    ({"containerPort": 80, "name": "Http"}, "name", "lower-case"),
    ({"containerPort": 80, "hostIP": "1.2.3"}, "hostIP", "not a valid IP"),
])
def test_bad_container_ports(port, path, reason):
    found = problems(pod(spec={"containers": [{"name": "app", "ports": [port]}]}))
    assert found[0][0] == f"spec.containers[0].ports[0].{path}"
    assert reason in found[0][1]


def test_pod_problems():
    assert paths(pod(spec={"containers": []})) == ["spec.containers"]
    assert paths(pod(spec={"containers": [{"name": "a"}], "initContainers": [{"name": "a"}]})) \
        == ["spec.initContainers[0].name"]
    assert paths(pod(spec={"containers": [{"name": "app", "ports": [
        {"name": "http", "containerPort": 80}, {"name": "http", "containerPort": 81}]}]})) == [
        "spec.containers[0].ports[1].name"]
    bad_ip = pod()
    bad_ip["status"] = {"podIP": "10.0.0.300"}
    assert paths(bad_ip) == ["status.podIPs[0].ip"]
    assert paths(pod(labels={"app": "a b"})) == ['metadata.labels["app"]']


# --- profiles -----------------------------------------------------------------------------


def test_namespace_profile():
    assert namespace_profile(namespace("dev", {"team": "a", "env": "prod"})) == {
        "kind": "Profile",
        "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": "kns.dev"},
        "spec": {
            "ingress": [{"action": "Allow"}],
            "egress": [{"action": "Allow"}],
            "labelsToApply": {
                "pcns.env": "prod",
                "pcns.kubernetes.io/metadata.name": "dev",
                "pcns.projectcalico.org/name": "dev",
                "pcns.team": "a",
            },
        },
    }


def test_serviceaccount_profile():
    assert serviceaccount_profile(serviceaccount("api", "dev", {"role": "x"})) == {
        "kind": "Profile",
        "apiVersion": "projectcalico.org/v3",
        "metadata": {"name": "ksa.dev.api"},
        "spec": {"labelsToApply": {"pcsa.projectcalico.org/name": "api", "pcsa.role": "x"}},
    }
    default_ns = serviceaccount_profile(serviceaccount("default", None))
    assert default_ns["metadata"]["name"] == "ksa.default.default"
    assert default_ns["spec"] == {"labelsToApply": {"pcsa.projectcalico.org/name": "default"}}


def test_derived_objects():
    assert derived_objects(namespace("dev")) == [namespace_profile(namespace("dev"))]
    assert derived_objects(serviceaccount()) == [serviceaccount_profile(serviceaccount())]
    policy = knp({"podSelector": {}})
    assert derived_objects(policy) == [convert_network_policy(policy)]
    assert derived_objects(pod()) == []
    assert derived_objects({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                            "metadata": {"name": "x"}}) == []
    with pytest.raises(ValidationError):
        derived_objects(knp({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}))


# --- names --------------------------------------------------------------------------------


def test_veth_name():
    expected = "cali" + hashlib.sha1(b"dev.web-7d9f").hexdigest()[:11]
    assert veth_name("dev", "web-7d9f") == expected
    assert len(expected) == 15
    assert veth_name("dev", "web-7d9f", prefix="tap").startswith("tap")
    assert veth_name("default", "nginx") != veth_name("default", "nginx2")


def test_workload_endpoint_name_doubles_dashes():
    assert workload_endpoint_name("node-1", "k8s", "web-7d9f", "eth0") == \
        "node--1-k8s-web--7d9f-eth0"
    assert workload_endpoint_name("node1", "k8s", "frontend-5c-xz", "eth0") == \
        "node1-k8s-frontend--5c--xz-eth0"
    assert workload_endpoint_name("n", "cni", "abc123", "eth0") == "n-cni-abc123-eth0"
    assert workload_endpoint_name("n", "libnetwork", "ignored", "ep") == \
        "n-libnetwork-libnetwork-ep"


@pytest.mark.parametrize(("args", "field"), [
    (("", "k8s", "web", "eth0"), "node"),
    (("n", "k8s", "", "eth0"), "pod"),
    (("n", "cni", "", "eth0"), "containerID"),
    (("n", "k8s", "web-", "eth0"), "pod"),
    (("-n", "k8s", "web", "eth0"), "node"),
])
def test_workload_endpoint_name_rejects(args, field):
    with pytest.raises(ValidationError) as info:
        workload_endpoint_name(*args)
    assert info.value.problems[0][0] == field


def test_parse_workload_endpoint_name_round_trips():
    for parts in (["node-1", "k8s", "web-7d9f", "eth0"], ["a", "k8s", "b--c", "eth0"],
                  ["ip-10-0-0-1.ec2.internal", "k8s", "x", "eth0"]):
        assert parse_workload_endpoint_name(workload_endpoint_name(*parts)) == parts


# --- workload endpoints -------------------------------------------------------------------


def test_workload_endpoint_for_pod():
    p = pod("web-7d9f", "dev", {"app": "web"}, {
        "serviceAccountName": "api",
        "containers": [{"name": "app", "ports": [
            {"name": "http", "containerPort": 8080},
            {"containerPort": 9090},  # neither named nor host port: not listed
            {"containerPort": 53, "protocol": "UDP", "hostPort": 5353, "hostIP": "10.0.0.1"},
        ]}],
        "initContainers": [{"name": "init", "ports": [
            {"name": "probe", "containerPort": 7000, "protocol": "SCTP"}]}],
    })
    wep = workload_endpoint_for_pod(p, "node-1", ["10.65.12.5"], container_id="abc123",
                                    mac="EE:EE:EE:00:11:22")
    assert wep == {
        "kind": "WorkloadEndpoint",
        "apiVersion": "projectcalico.org/v3",
        "metadata": {
            "name": "node--1-k8s-web--7d9f-eth0",
            "namespace": "dev",
            "labels": {
                "app": "web",
                "projectcalico.org/namespace": "dev",
                "projectcalico.org/orchestrator": "k8s",
                "projectcalico.org/serviceaccount": "api",
            },
        },
        "spec": {
            "orchestrator": "k8s",
            "node": "node-1",
            "containerID": "abc123",
            "pod": "web-7d9f",
            "endpoint": "eth0",
            "serviceAccountName": "api",
            "ipNetworks": ["10.65.12.5/32"],
            "profiles": ["kns.dev", "ksa.dev.api"],
            "interfaceName": veth_name("dev", "web-7d9f"),
            "mac": "ee:ee:ee:00:11:22",
            "ports": [
                {"name": "http", "protocol": "tcp", "port": 8080, "hostPort": 0, "hostIP": ""},
                {"name": "", "protocol": "udp", "port": 53, "hostPort": 5353,
                 "hostIP": "10.0.0.1"},
                {"name": "probe", "protocol": "sctp", "port": 7000, "hostPort": 0, "hostIP": ""},
            ],
        },
    }


def test_workload_endpoint_defaults_and_omissions():
    wep = workload_endpoint_for_pod(pod("nginx", None, spec={"containers": [{"name": "c"}]}),
                                    "node1", ["10.0.0.7/26", "fd00::7"])
    assert wep["metadata"]["labels"] == {
        "projectcalico.org/namespace": "default",
        "projectcalico.org/orchestrator": "k8s",
        "projectcalico.org/serviceaccount": "default",
    }
    assert wep["spec"] == {
        "orchestrator": "k8s", "node": "node1", "pod": "nginx", "endpoint": "eth0",
        "serviceAccountName": "default", "ipNetworks": ["10.0.0.7/32", "fd00::7/128"],
        "profiles": ["kns.default", "ksa.default.default"],
        "interfaceName": veth_name("default", "nginx"),
    }


def test_workload_endpoint_long_serviceaccount_gets_no_label():
    sa = "s" * 63
    wep = workload_endpoint_for_pod(pod(spec={"serviceAccountName": sa}), "n", ["10.0.0.1"])
    assert "projectcalico.org/serviceaccount" not in wep["metadata"]["labels"]
    assert wep["spec"]["serviceAccountName"] == sa
    assert wep["spec"]["profiles"][1] == f"ksa.dev.{sa}"


def test_workload_endpoint_pod_labels_cannot_override_calico_labels():
    wep = workload_endpoint_for_pod(
        pod(labels={"projectcalico.org/namespace": "spoof"}), "n", ["10.0.0.1"])
    assert wep["metadata"]["labels"]["projectcalico.org/namespace"] == "dev"


def test_workload_endpoint_options():
    wep = workload_endpoint_for_pod(pod(), "n", [], interface_name="tap0", endpoint="net1")
    assert wep["metadata"]["name"] == "n-k8s-web--7d9f-net1"
    assert wep["spec"]["interfaceName"] == "tap0"
    assert wep["spec"]["endpoint"] == "net1"
    assert "ipNetworks" not in wep["spec"]


def test_workload_endpoint_uses_status_ips_when_none_given():
    p = pod()
    p["status"] = {"podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.9"}, {"ip": "fd00::9"}]}
    assert workload_endpoint_for_pod(p, "n", [])["spec"]["ipNetworks"] == [
        "10.0.0.9/32", "fd00::9/128"]


def test_workload_endpoint_rejects_bad_input():
    with pytest.raises(ValidationError):
        workload_endpoint_for_pod(pod(), "n", ["not-an-ip"])
    with pytest.raises(ValidationError):
        workload_endpoint_for_pod(pod(), "n", ["10.0.0.1"], mac="zz")
    with pytest.raises(ValidationError):
        workload_endpoint_for_pod(pod(spec={"hostNetwork": True, "containers": []}), "n", [])
    with pytest.raises(ValidationError):
        workload_endpoint_for_pod(pod(), "", ["10.0.0.1"])


def test_refresh_workload_endpoint_updates_labels_only():
    wep = workload_endpoint_for_pod(pod(labels={"app": "v1"}), "n", ["10.0.0.1"],
                                    container_id="c1")
    fresh = refresh_workload_endpoint(wep, pod(labels={"app": "v2", "new": "x"}))
    assert fresh["metadata"]["labels"]["app"] == "v2"
    assert fresh["metadata"]["labels"]["new"] == "x"
    assert fresh["metadata"]["labels"]["projectcalico.org/orchestrator"] == "k8s"
    assert fresh["spec"] == wep["spec"]
    assert wep["metadata"]["labels"]["app"] == "v1"

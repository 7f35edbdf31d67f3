"""Validation and defaulting of projectcalico.org/v3 resources (datastore.validation)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datastore.errors import Problems
from datastore.validation import (
    ValidationError,
    default_policy_types,
    validate,
    validate_entity_rule,
    validate_rule,
    workload_endpoint_name,
)

API = "projectcalico.org/v3"


def obj(kind: str, spec: Any = None, name: str | None = "x", **meta: Any) -> dict[str, Any]:
    m: dict[str, Any] = dict(meta)
    if name is not None:
        m["name"] = name
    o: dict[str, Any] = {"apiVersion": API, "kind": kind, "metadata": m}
    if spec is not None:
        o["spec"] = spec
    return o


def np(spec: dict[str, Any], name: str = "web", **meta: Any) -> dict[str, Any]:
    return obj("NetworkPolicy", spec, name, **meta)


def gnp(spec: dict[str, Any], name: str = "g") -> dict[str, Any]:
    return obj("GlobalNetworkPolicy", spec, name)


def ingress(*rules: dict[str, Any]) -> dict[str, Any]:
    return np({"ingress": list(rules)})


def pool(**spec: Any) -> dict[str, Any]:
    return obj("IPPool", {"cidr": "10.65.0.0/16", **spec}, "p")


def problems(o: Any, **kw: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as e:
        validate(o, **kw)
    return e.value.problems


def assert_problem(o: Any, path: str, fragment: str, **kw: Any) -> None:
    found = problems(o, **kw)
    assert any(p == path and fragment in r for p, r in found), found


def checked(o: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """validate() and also prove the input was not touched."""
    before = copy.deepcopy(o)
    out = validate(o, **kw)
    assert o == before
    return out


# ---- top level and metadata -----------------------------------------------------------------


def test_not_a_mapping() -> None:
    assert problems(["kind"])[0][1].startswith("a resource must be a mapping")


def test_api_version_must_be_calico() -> None:
    o = pool()
    o["apiVersion"] = "crd.projectcalico.org/v1"
    assert_problem(o, "apiVersion", "must be projectcalico.org/v3")


def test_unknown_kind_is_named_with_suggestion() -> None:
    assert_problem(obj("IPpool", {}), "kind", "did you mean 'IPPool'?")


def test_unknown_top_level_field() -> None:
    o = pool()
    o["sepc"] = {}
    assert_problem(o, "sepc", "unknown field 'sepc'")


def test_unknown_spec_field_typo_names_the_field() -> None:
    assert_problem(np({"ingres": []}), "spec.ingres", "did you mean 'ingress'?")


def test_spec_must_be_a_mapping() -> None:
    assert_problem(np([]), "spec", "must be a mapping")  # type: ignore[arg-type]


def test_name_required() -> None:
    assert_problem(obj("Tier", {}, name=None), "metadata.name", "required")


@pytest.mark.parametrize("kind, name", [
    ("IPPool", "Pool"), ("IPPool", "-p"), ("Profile", "a_b"), ("Tier", "a.b"),
    ("NetworkPolicy", "a.b.c"), ("GlobalNetworkPolicy", "a.b.c"), ("Node", "x" * 254),
    ("ClusterInformation", "other"), ("Profile", "projectcalico-default-allow"),
])
def test_bad_names(kind: str, name: str) -> None:
    assert any(p == "metadata.name" for p, _ in problems(obj(kind, {}, name)))


@pytest.mark.parametrize("kind, name", [
    ("NetworkPolicy", "allow.web"), ("NetworkPolicy", "knp.default.a.b.c"),
    ("GlobalNetworkPolicy", "security.deny"), ("Node", "node-1.example.com"),
    ("Profile", "ksa.default.default"), ("FelixConfiguration", "node.node-1"),
])
def test_good_names(kind: str, name: str) -> None:
    assert checked(obj(kind, {}, name))["metadata"]["name"] == name


def test_namespace_defaults_for_namespaced_kinds() -> None:
    assert checked(np({}))["metadata"]["namespace"] == "default"
    out = checked(np({}), default_namespace="prod")
    assert out["metadata"]["namespace"] == "prod"


def test_namespace_forbidden_on_cluster_scoped_kinds() -> None:
    assert_problem(obj("Tier", {}, namespace="prod"), "metadata.namespace", "cluster-scoped")


def test_bad_namespace() -> None:
    assert_problem(np({}, namespace="Prod_1"), "metadata.namespace", "lower-case")


@pytest.mark.parametrize("labels, fragment", [
    ({"bad key!": "x"}, "invalid label key"),
    ({"a/b/c": "x"}, "at most one '/'"),
    ({"ok": "-bad-"}, "invalid label value"),
    ({"ok": True}, "must be strings"),
    ({"ok": "v" * 64}, "limit is 63"),
])
def test_label_syntax(labels: dict[str, Any], fragment: str) -> None:
    found = problems(obj("Tier", {}, labels=labels))
    assert any(p.startswith("metadata.labels[") and fragment in r for p, r in found), found


def test_annotation_syntax() -> None:
    o = obj("Tier", {}, annotations={"Example.com/Owner": "me", "bad key": "x"})
    assert problems(o) == [('metadata.annotations["bad key"]',
                            "invalid annotation key: 'bad key': the name part must be letters,"
                            " digits, '-', '_' and '.', starting and ending alphanumeric")]


def test_metadata_bookkeeping_kept_and_unknown_rejected() -> None:
    meta = {"uid": "u-1", "creationTimestamp": "2026-01-01T00:00:00Z", "resourceVersion": "7",
            "generation": 2, "finalizers": ["f"], "ownerReferences": []}
    out = checked(obj("Tier", {}, **meta))
    assert {k: out["metadata"][k] for k in meta} == meta
    assert_problem(obj("Tier", {}, selfLinks="x"), "metadata.selfLinks", "unknown field")


def test_every_problem_is_reported_with_subject() -> None:
    o = np({"ingress": [{"action": "Nope"}], "order": "first"}, labels={"a": 1})
    with pytest.raises(ValidationError) as e:
        validate(o)
    assert e.value.subject == "NetworkPolicy default/web"
    assert {p for p, _ in e.value.problems} == {
        "spec.ingress[0].action", "spec.order", 'metadata.labels["a"]'}
    assert str(e.value).startswith("NetworkPolicy default/web: ")


def test_nulls_are_dropped_like_go() -> None:
    out = checked(np({"selector": None, "ingress": [{"action": "Allow", "source": None}]}))
    assert "selector" not in out["spec"] and out["spec"]["ingress"] == [{"action": "Allow"}]


# ---- IPPool -------------------------------------------------------------------------------------


def test_ippool_defaults_v4() -> None:
    assert checked(pool())["spec"] == {
        "cidr": "10.65.0.0/16", "blockSize": 26, "ipipMode": "Never", "vxlanMode": "Never",
        "nodeSelector": "all()", "allowedUses": ["Workload", "Tunnel"],
        "assignmentMode": "Automatic"}


def test_ippool_defaults_v6_and_cidr_normalised() -> None:
    spec = checked(pool(cidr="FD00:0:0::/48"))["spec"]
    assert spec["cidr"] == "fd00::/48" and spec["blockSize"] == 122


def test_ippool_explicit_values_kept() -> None:
    spec = checked(pool(blockSize=28, ipipMode="CrossSubnet", natOutgoing=True,
                        nodeSelector="zone == 'a'", assignmentMode="Manual"))["spec"]
    assert (spec["blockSize"], spec["ipipMode"], spec["nodeSelector"], spec["assignmentMode"]) \
        == (28, "CrossSubnet", "zone == 'a'", "Manual")


@pytest.mark.parametrize("spec, path, fragment", [
    ({"cidr": "10.65.0.1/16"}, "spec.cidr", "not strictly masked (did you mean 10.65.0.0/16?)"),
    ({"cidr": "10.65.0.0/33"}, "spec.cidr", "not a valid CIDR"),
    ({"cidr": "10.65.0.0"}, "spec.cidr", "not a valid CIDR"),
    ({"cidr": "10.0.0.0/255.0.0.0"}, "spec.cidr", "not a valid CIDR"),
    ({"cidr": "169.254.0.0/24"}, "spec.cidr", "link-local"),
    ({"cidr": ""}, "spec.cidr", "required"),
    ({"blockSize": 19}, "spec.blockSize", "out of range 20..32"),
    ({"blockSize": 33}, "spec.blockSize", "out of range 20..32"),
    ({"cidr": "fd00::/48", "blockSize": 115}, "spec.blockSize", "out of range 116..128"),
    ({"cidr": "10.65.0.0/28"}, "spec.blockSize", "smaller than one /26 block"),
    ({"blockSize": "26"}, "spec.blockSize", "must be an integer"),
    ({"ipipMode": "always"}, "spec.ipipMode", "did you mean 'Always'?"),
    ({"ipipMode": "Always", "vxlanMode": "CrossSubnet"}, "spec.vxlanMode", "cannot both"),
    ({"cidr": "fd00::/48", "ipipMode": "Always"}, "spec.ipipMode", "not supported on IPv6"),
    ({"natOutgoing": "yes"}, "spec.natOutgoing", "true or false"),
    ({"allowedUses": ["Workloads"]}, "spec.allowedUses[0]", "not one of"),
    ({"allowedUses": ["LoadBalancer", "Workload"]}, "spec.allowedUses", "cannot be combined"),
    ({"allowedUses": ["LoadBalancer"], "vxlanMode": "Always"}, "spec.allowedUses", "VXLAN"),
    ({"assignmentMode": "Auto"}, "spec.assignmentMode", "not one of Automatic, Manual"),
    ({"nodeSelector": "zone == "}, "spec.nodeSelector", "at position 8"),
    ({"nodeSelector": "global()"}, "spec.nodeSelector", "not valid in an IPPool selector"),
])
def test_ippool_problems(spec: dict[str, Any], path: str, fragment: str) -> None:
    assert_problem(pool(**spec), path, fragment)


def test_disabled_pool_may_be_smaller_than_a_block() -> None:
    assert checked(pool(cidr="10.65.0.0/28", disabled=True))["spec"]["blockSize"] == 26


def test_ipreservation() -> None:
    o = obj("IPReservation", {"reservedCIDRs": ["10.65.0.0/30", "10.65.1.7/24"]})
    assert checked(o)["spec"]["reservedCIDRs"] == ["10.65.0.0/30", "10.65.1.7/24"]
    assert_problem(obj("IPReservation", {"reservedCIDRs": ["nope"]}),
                   "spec.reservedCIDRs[0]", "not a valid CIDR")


# ---- rules --------------------------------------------------------------------------------------


def rule_problem(rule: dict[str, Any], path: str, fragment: str) -> None:
    assert_problem(ingress(rule), f"spec.ingress[0]{path}", fragment)


def first_rule(rule: dict[str, Any]) -> dict[str, Any]:
    return checked(ingress(rule))["spec"]["ingress"][0]


def test_action_required_and_known() -> None:
    rule_problem({}, ".action", "required")
    rule_problem({"action": "allow"}, ".action", "did you mean 'Allow'?")
    for action in ("Allow", "Deny", "Log", "Pass"):
        assert first_rule({"action": action}) == {"action": action}


@pytest.mark.parametrize("proto", ["TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite", 1, 255])
def test_protocols_accepted(proto: Any) -> None:
    assert first_rule({"action": "Allow", "protocol": proto})["protocol"] == proto


def test_numeric_protocol_string_is_stored_as_number() -> None:
    assert first_rule({"action": "Allow", "protocol": "17"})["protocol"] == 17


@pytest.mark.parametrize("proto, fragment", [
    ("tcp", "case-sensitive: 'TCP'"), ("GRE", "unknown protocol 'GRE'"),
    (0, "out of range 1..255"), (256, "out of range 1..255"), (True, "protocol name or number"),
])
def test_protocols_rejected(proto: Any, fragment: str) -> None:
    rule_problem({"action": "Allow", "protocol": proto}, ".protocol", fragment)
    rule_problem({"action": "Allow", "notProtocol": proto}, ".notProtocol", fragment)


def tcp_to(*ports: Any, proto: Any = "TCP") -> dict[str, Any]:
    return {"action": "Allow", "protocol": proto, "destination": {"ports": list(ports)}}


def test_ports_normalised() -> None:
    rule = first_rule(tcp_to(80, "443", "8000:9000", "53:53", "http-alt"))
    assert rule["destination"]["ports"] == [80, 443, "8000:9000", 53, "http-alt"]


@pytest.mark.parametrize("port, fragment", [
    (0, "out of range 1..65535"), (65536, "out of range 1..65535"),
    ("0", "out of range"), ("70000:70001", "out of range"),
    ("9000:8000", "ends before it starts"), ("Http_Port", "not a valid port name"),
    ("a" * 16, "not a valid port name"), ("8o:90", "not a port number"), (8.5, "port number"),
])
def test_bad_ports(port: Any, fragment: str) -> None:
    rule_problem(tcp_to(80, port), ".destination.ports[1]", fragment)


def test_numeric_ports_need_a_protocol() -> None:
    rule = {"action": "Allow", "destination": {"ports": [80]}}
    rule_problem(rule, ".destination.ports", "need protocol TCP, UDP or SCTP")


def test_named_ports_without_protocol_are_allowed() -> None:
    assert first_rule({"action": "Allow", "source": {"notPorts": ["metrics"]}})


@pytest.mark.parametrize("proto", ["ICMP", "UDPLite", 1])
def test_ports_need_a_port_protocol(proto: Any) -> None:
    rule_problem(tcp_to(80, proto=proto), ".destination.ports", "need protocol TCP, UDP or SCTP")


@pytest.mark.parametrize("proto", [6, 17, 132, "SCTP"])
def test_ports_with_port_protocol_numbers(proto: Any) -> None:
    assert first_rule(tcp_to(80, proto=proto))


def test_icmp_fields() -> None:
    ok = first_rule({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}})
    assert ok["icmp"] == {"type": 8, "code": 0}
    rule_problem({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 255}},
                 ".icmp.type", "out of range 0..254")
    rule_problem({"action": "Allow", "protocol": "ICMP", "notICMP": {"type": 3, "code": 256}},
                 ".notICMP.code", "out of range 0..255")


def test_icmp_code_without_type() -> None:
    rule_problem({"action": "Allow", "protocol": "ICMP", "icmp": {"code": 1}},
                 ".icmp.code", "needs an ICMP type")


def test_icmp_needs_icmp_protocol() -> None:
    rule_problem({"action": "Allow", "protocol": "TCP", "icmp": {"type": 8}},
                 ".icmp", "needs protocol ICMP or ICMPv6 (protocol is 'TCP')")
    rule_problem({"action": "Allow", "icmp": {"type": 8}}, ".icmp", "no protocol is set")


def test_icmp_family_matches_ip_version() -> None:
    rule_problem({"action": "Allow", "protocol": "ICMP", "ipVersion": 6}, ".protocol",
                 "needs ipVersion 4")
    rule_problem({"action": "Allow", "protocol": 58, "ipVersion": 4}, ".protocol",
                 "needs ipVersion 6")
    rule_problem({"action": "Allow", "notProtocol": "ICMPv6", "ipVersion": 4}, ".notProtocol",
                 "needs ipVersion 6")


def test_ip_version_values() -> None:
    rule_problem({"action": "Allow", "ipVersion": 5}, ".ipVersion", "must be 4 or 6")
    rule_problem({"action": "Allow", "ipVersion": "4"}, ".ipVersion", "must be 4 or 6")


def test_nets_match_ip_version_and_each_other() -> None:
    rule_problem({"action": "Allow", "ipVersion": 4, "source": {"nets": ["fd00::/64"]}},
                 ".source.nets", "IPv6 CIDRs but ipVersion is 4")
    rule_problem({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]},
                  "destination": {"notNets": ["fd00::/64"]}},
                 ".destination.notNets", "cannot mix IPv4 and IPv6")


@pytest.mark.parametrize("net, fragment", [
    ("10.0.0.0/33", "not a valid CIDR"), ("garbage", "not a valid CIDR"),
    ("10.1.2.3/8", "host bits set (did you mean 10.0.0.0/8?)"),
    ("10.1.2.3", "write 10.1.2.3/32"),  # Calico's rule validator wants the mask
])
def test_bad_nets(net: str, fragment: str) -> None:
    rule_problem({"action": "Allow", "source": {"nets": [net]}}, ".source.nets[0]", fragment)


def test_catch_all_in_not_nets() -> None:
    rule_problem({"action": "Deny", "source": {"notNets": ["0.0.0.0/0"]}},
                 ".source.notNets[0]", "matches everything")


def test_selectors_in_rules() -> None:
    rule_problem({"action": "Allow", "source": {"selector": "app == 'a' &&"}},
                 ".source.selector", "at position 13")
    rule_problem({"action": "Allow", "source": {"notSelector": "has("}},
                 ".source.notSelector", "invalid selector")
    rule_problem({"action": "Allow", "source": {"namespaceSelector": "x in {'a'"}},
                 ".source.namespaceSelector", "invalid selector")


def test_global_only_alone_in_entity_namespace_selector() -> None:
    assert first_rule({"action": "Allow", "source": {"namespaceSelector": "global()"}})
    rule_problem({"action": "Allow", "source": {"namespaceSelector": "global() && has(a)"}},
                 ".source.namespaceSelector", "cannot be combined")
    rule_problem({"action": "Allow", "source": {"selector": "global()"}},
                 ".source.selector", "only be used in an EntityRule namespaceSelector")
    assert_problem(np({"selector": "global()"}), "spec.selector", "namespaceSelector")


def test_service_accounts() -> None:
    sa = {"names": ["api", "web"], "selector": "team == 'x'"}
    assert first_rule({"action": "Allow", "source": {"serviceAccounts": sa}})
    rule_problem({"action": "Allow", "source": {"serviceAccounts": {"selector": "=="}}},
                 ".source.serviceAccounts.selector", "invalid selector")
    rule_problem({"action": "Allow", "source": {"serviceAccounts": {"name": ["a"]}}},
                 ".source.serviceAccounts.name", "did you mean 'names'?")


def test_services_match_rules() -> None:
    rule_problem({"action": "Allow", "destination": {"services": {"name": "db"}}},
                 ".destination.services", "not allowed in ingress rule destination")
    rule_problem({"action": "Allow", "source": {"services": {"name": "db"}, "selector": "a"}},
                 ".source.selector", "cannot be combined with services")
    egress = {"action": "Allow", "destination": {"services": {"name": "db"}}}
    assert_problem(gnp({"egress": [egress]}), "spec.egress[0].destination.services.namespace",
                   "required in a GlobalNetworkPolicy")


def test_http_rules_are_accepted_as_data() -> None:
    http = {"methods": ["GET"], "paths": [{"exact": "/healthz"}, {"prefix": "/api"}]}
    assert first_rule({"action": "Allow", "http": http})["http"] == http
    rule_problem({"action": "Deny", "http": http}, ".http", "only valid on Allow rules")
    rule_problem({"action": "Allow", "http": {"paths": [{"exact": "x"}]}},
                 ".http.paths[0]", "must start with '/'")
    assert_problem(np({"egress": [{"action": "Allow", "http": http}]}), "spec.egress[0].http",
                   "not allowed in egress rules")


def test_rule_metadata_annotations() -> None:
    rule_problem({"action": "Allow", "metadata": {"annotations": {"bad key": "v"}}},
                 '.metadata.annotations["bad key"]', "invalid annotation key")


def test_validate_rule_and_entity_rule_directly() -> None:
    p = Problems()
    out = validate_rule({"action": "Allow", "protocol": "6", "destination": {"ports": ["80"]}},
                        "r", p)
    assert not p and out == {"action": "Allow", "protocol": 6, "destination": {"ports": [80]}}
    assert validate_entity_rule({"nets": ["bad"]}, "e", p) == {"nets": ["bad"]}
    assert p.items == [("e.nets[0]", "'bad' is not a valid CIDR")]


# ---- policies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, types", [
    ({}, ["Ingress"]),
    ({"ingress": [{"action": "Allow"}]}, ["Ingress"]),
    ({"egress": [{"action": "Allow"}]}, ["Egress"]),
    ({"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}, ["Ingress", "Egress"]),
    ({"egress": [{"action": "Allow"}], "types": ["Ingress"]}, ["Ingress"]),
    ({"types": []}, ["Ingress"]),
])
def test_types_default(spec: dict[str, Any], types: list[str]) -> None:
    assert default_policy_types(spec) == types
    assert checked(np(spec))["spec"]["types"] == types
    assert checked(gnp(spec))["spec"]["types"] == types


def test_types_rejects_unknown_and_duplicates() -> None:
    assert_problem(np({"types": ["ingress"]}), "spec.types[0]", "did you mean 'Ingress'?")
    assert_problem(np({"types": ["Egress", "Egress"]}), "spec.types[1]", "duplicate")


def test_tier_default_and_label() -> None:
    out = checked(np({}, labels={"app": "web"}))
    assert out["spec"]["tier"] == "default"
    assert out["metadata"]["labels"] == {"app": "web", "projectcalico.org/tier": "default"}


def test_policy_in_custom_tier() -> None:
    out = checked(gnp({"tier": "security", "order": 10.5}, name="security.block"))
    assert out["spec"]["tier"] == "security"
    assert out["metadata"]["labels"]["projectcalico.org/tier"] == "security"
    assert_problem(np({"tier": "sec.urity"}), "spec.tier", "lower-case letters")


def test_order_must_be_a_number() -> None:
    assert_problem(np({"order": "100"}), "spec.order", "must be a number")
    assert_problem(np({"order": True}), "spec.order", "must be a number")


def test_policy_selectors() -> None:
    assert_problem(np({"selector": "app = 'x'"}), "spec.selector", "invalid selector")
    assert_problem(np({"serviceAccountSelector": "!"}), "spec.serviceAccountSelector", "invalid")
    assert_problem(gnp({"namespaceSelector": "global()"}), "spec.namespaceSelector",
                   "EntityRule namespaceSelector")


@pytest.mark.parametrize("field", ["namespaceSelector", "preDNAT", "doNotTrack",
                                   "applyOnForward"])
def test_gnp_only_fields_on_network_policy(field: str) -> None:
    assert_problem(np({field: True}), f"spec.{field}", "only a GlobalNetworkPolicy has it")


def test_performance_hints_passthrough() -> None:
    hints = ["AssumeNeededOnEveryNode"]
    assert checked(np({"performanceHints": hints}))["spec"]["performanceHints"] == hints
    assert_problem(np({"performanceHints": ["Fast"]}), "spec.performanceHints[0]", "not one of")


def test_pre_dnat_and_do_not_track_rules() -> None:
    ok = {"preDNAT": True, "applyOnForward": True, "ingress": [{"action": "Deny"}]}
    assert checked(gnp(ok))["spec"]["types"] == ["Ingress"]
    assert_problem(gnp({"preDNAT": True}), "spec.applyOnForward", "must be true when preDNAT")
    assert_problem(gnp({"doNotTrack": True}), "spec.applyOnForward", "when doNotTrack")
    assert_problem(gnp({**ok, "doNotTrack": True}), "spec.preDNAT", "cannot both be true")
    assert_problem(gnp({**ok, "egress": [{"action": "Allow"}]}), "spec.egress",
                   "cannot have egress rules")
    assert_problem(gnp({**ok, "types": ["Ingress", "Egress"]}), "spec.types", "type Egress")


def test_rule_errors_carry_full_path() -> None:
    o = gnp({"egress": [{"action": "Allow"},
                        {"action": "Allow", "protocol": "UDP",
                         "destination": {"ports": [53, 99999]}}]})
    assert_problem(o, "spec.egress[1].destination.ports[1]", "out of range")


SEED_003 = [
    gnp({"egress": [{"action": "Allow", "destination": {}, "source": {}}],
         "ingress": [{"action": "Allow", "destination": {}, "source": {}}],
         "order": 9999, "types": ["Ingress", "Egress"]}, name="global-default"),
    gnp({"egress": [{"action": "Deny", "destination": {"selector": "area == 'dummy'"},
                     "source": {}}],
         "namespaceSelector": "(! has(privileged-namespace))", "order": 502,
         "types": ["Egress"]}, name="global-egress-deny"),
    gnp({"egress": [{"action": "Allow", "destination": {"nets": ["127.0.0.1/32"]},
                     "source": {"namespaceSelector": 'name == "dummy"'}}],
         "order": 501, "types": ["Egress"]}, name="global-egress-allow"),
    gnp({"egress": [{"action": "Allow", "destination": {}, "source": {}}],
         "ingress": [{"action": "Allow", "destination": {}, "source": {}}],
         "namespaceSelector": "has(privileged-namespace)", "order": 500,
         "types": ["Ingress", "Egress"]}, name="global-privileged-namespace"),
]


@pytest.mark.parametrize("policy", SEED_003, ids=lambda p: p["metadata"]["name"])
def test_seed_003_global_policies_validate_unchanged(policy: dict[str, Any]) -> None:
    out = checked(policy)
    expected = copy.deepcopy(policy)
    expected["spec"]["tier"] = "default"
    expected["metadata"]["labels"] = {"projectcalico.org/tier": "default"}
    assert out == expected


# ---- Tier, sets, profiles -----------------------------------------------------------------------


def test_tier_defaults_and_values() -> None:
    assert checked(obj("Tier", {}, "security"))["spec"] == {"order": 1_000_000,
                                                           "defaultAction": "Deny"}
    out = checked(obj("Tier", {"order": 100, "defaultAction": "Pass"}, "platform"))
    assert out["spec"] == {"order": 100, "defaultAction": "Pass"}
    assert_problem(obj("Tier", {"defaultAction": "Allow"}), "spec.defaultAction", "not one of")
    assert_problem(obj("Tier", {"order": "1"}), "spec.order", "must be a number")


def test_builtin_tiers_keep_their_place() -> None:
    assert checked(obj("Tier", {}, "default"))["spec"]["order"] == 1_000_000
    assert_problem(obj("Tier", {"order": 5}, "default"), "spec.order", "must be 1000000")
    assert_problem(obj("Tier", {"order": 1000}, "kube-admin"), "spec.defaultAction", "Pass")


@pytest.mark.parametrize("kind, ns", [("NetworkSet", "default"), ("GlobalNetworkSet", None)])
def test_network_sets(kind: str, ns: str | None) -> None:
    nets = ["10.0.0.1", "11.0.0.0/8", "10.1.2.3/16", "dead:beef::/96"]
    out = checked(obj(kind, {"nets": nets}, "ext"))
    assert out["spec"]["nets"] == nets and out["metadata"].get("namespace") == ns
    assert_problem(obj(kind, {"nets": ["garbage"]}), "spec.nets[0]", "not a valid CIDR")
    assert_problem(obj(kind, {}, labels={"projectcalico.org/namespace": "a"}),
                   'metadata.labels["projectcalico.org/namespace"]', "reserved")


def test_profile() -> None:
    o = obj("Profile", {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                        "labelsToApply": {"pcns.projectcalico.org/name": "default"}},
            "kns.default")
    assert checked(o)["spec"]["labelsToApply"] == {"pcns.projectcalico.org/name": "default"}
    bad = obj("Profile", {"egress": [{"action": "Allow", "protocol": "ICMP",
                                      "destination": {"ports": [1]}}],
                          "labelsToApply": {"bad key": "x"}})
    found = {p for p, _ in problems(bad)}
    assert found == {"spec.egress[0].destination.ports", 'spec.labelsToApply["bad key"]'}


# ---- endpoints ----------------------------------------------------------------------------------


def hep(**spec: Any) -> dict[str, Any]:
    return obj("HostEndpoint", {"node": "node-1", "interfaceName": "eth0", **spec}, "node-1-eth0")


def test_host_endpoint() -> None:
    ports = [{"name": "ssh", "protocol": "tcp", "port": 22}]
    out = checked(hep(expectedIPs=["10.0.0.5", "fd00::5"], profiles=["edge"], ports=ports))
    assert out["spec"]["ports"] == [{"name": "ssh", "protocol": "TCP", "port": 22}]
    assert checked(hep(interfaceName="*"))


@pytest.mark.parametrize("spec, path, fragment", [
    ({"node": ""}, "spec.node", "required"),
    ({"interfaceName": ""}, "spec", "interfaceName or expectedIPs"),
    ({"interfaceName": "a-very-long-interface"}, "spec.interfaceName", "interface name"),
    ({"expectedIPs": ["10.0.0.300"]}, "spec.expectedIPs[0]", "not a valid IP"),
    ({"ports": [{"name": "ssh", "protocol": "ICMP", "port": 22}]}, "spec.ports[0].protocol",
     "has no ports"),
    ({"ports": [{"name": "ssh", "protocol": "TCP", "port": 0}]}, "spec.ports[0].port",
     "out of range 1..65535"),
    ({"ports": [{"protocol": "TCP", "port": 22}]}, "spec.ports[0].name", "required"),
    ({"ports": [{"name": "SSH", "protocol": "TCP", "port": 22}]}, "spec.ports[0].name",
     "not a valid port name"),
])
def test_host_endpoint_problems(spec: dict[str, Any], path: str, fragment: str) -> None:
    assert_problem(hep(**spec), path, fragment)


def wep_spec(**spec: Any) -> dict[str, Any]:
    return {"orchestrator": "k8s", "node": "node-1", "pod": "web-7d9f", "endpoint": "eth0",
            "containerID": "abc123", "interfaceName": "cali0123456789a",
            "mac": "0a:58:0a:41:0c:05", "ipNetworks": ["10.65.12.5/32", "fd00::5"],
            "profiles": ["kns.default", "ksa.default.default"], "serviceAccountName": "default",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080, "hostPort": 0},
                      {"name": "", "protocol": "udp", "port": 53, "hostPort": 5353,
                       "hostIP": "10.0.0.5"}],
            **spec}


def wep(name: str | None = "node--1-k8s-web--7d9f-eth0", **spec: Any) -> dict[str, Any]:
    return obj("WorkloadEndpoint", wep_spec(**spec), name, namespace="default",
               labels={"app": "web"})


def test_workload_endpoint_as_the_cni_writes_it() -> None:
    out = checked(wep())
    assert out["metadata"]["labels"] == {"app": "web", "projectcalico.org/namespace": "default",
                                         "projectcalico.org/orchestrator": "k8s"}
    assert out["spec"]["ports"][1]["protocol"] == "UDP"


def test_workload_endpoint_name_is_derived_or_checked() -> None:
    assert checked(wep(name=None))["metadata"]["name"] == "node--1-k8s-web--7d9f-eth0"
    assert_problem(wep(name="node-1-k8s-web-eth0"), "metadata.name",
                   "expected 'node--1-k8s-web--7d9f-eth0'")
    assert workload_endpoint_name({"node": "n", "orchestrator": "cni", "containerID": "c1",
                                   "endpoint": "eth0"}) == ("n-cni-c1-eth0", [])


@pytest.mark.parametrize("spec, path, fragment", [
    ({"pod": None}, "spec.pod", "required to name"),
    ({"endpoint": "-eth0"}, "spec.endpoint", "must be lower-case"),
    ({"endpoint": ""}, "spec.endpoint", "required to name"),
    ({"mac": "0a:58:0a:41:0c"}, "spec.mac", "not a MAC address"),
    ({"ipNetworks": ["10.65.12.0/24"]}, "spec.ipNetworks[0]", "single /32 or /128"),
    ({"ipv4Gateway": "fd00::1"}, "spec.ipv4Gateway", "not an IPv4 address"),
    ({"interfaceName": None}, "spec.interfaceName", "required"),
    ({"ports": [{"name": "", "protocol": "TCP", "port": 80}]}, "spec.ports[0].name",
     "required unless hostPort"),
    ({"ipNATs": [{"internalIP": "10.9.9.9", "externalIP": "1.2.3.4"}]},
     "spec.ipNATs[0].internalIP", "not in the ipNetworks"),
    ({"containerID": "-abc"}, "spec.containerID", "container ID"),
])
def test_workload_endpoint_problems(spec: dict[str, Any], path: str, fragment: str) -> None:
    name = None if path in ("spec.pod", "spec.endpoint") else "node--1-k8s-web--7d9f-eth0"
    assert_problem(wep(name=name, **spec), path, fragment)


# ---- Node and BGP -------------------------------------------------------------------------------


def node(**bgp: Any) -> dict[str, Any]:
    return obj("Node", {"bgp": {"ipv4Address": "10.0.0.5/24", **bgp}}, "node-1")


def test_node() -> None:
    out = checked(node(asNumber="64512", ipv4IPIPTunnelAddr="10.65.12.1",
                       routeReflectorClusterID="224.0.0.1"))
    assert out["spec"]["bgp"]["asNumber"] == 64512
    assert checked(node(asNumber="1.10"))["spec"]["bgp"]["asNumber"] == 65546
    assert checked(node(ipv4Address="10.0.0.5"))  # Calico takes a bare address too


@pytest.mark.parametrize("bgp, path, fragment", [
    ({"ipv4Address": "fd00::5/64"}, "spec.bgp.ipv4Address", "not an IPv4"),
    ({"ipv4Address": "10.0.0.5/40"}, "spec.bgp.ipv4Address", "not a valid CIDR"),
    ({"ipv6Address": "10.0.0.5/24"}, "spec.bgp.ipv6Address", "not an IPv6"),
    ({"asNumber": 0}, "spec.bgp.asNumber", "out of range 1..4294967295"),
    ({"asNumber": 4294967296}, "spec.bgp.asNumber", "out of range"),
    ({"asNumber": "65536.1"}, "spec.bgp.asNumber", "not an AS number"),
    ({"ipv4IPIPTunnelAddr": "10.65.12.1/32"}, "spec.bgp.ipv4IPIPTunnelAddr", "not a valid IP"),
    ({"ipv4address": "10.0.0.5/24"}, "spec.bgp.ipv4address", "did you mean 'ipv4Address'?"),
])
def test_node_problems(bgp: dict[str, Any], path: str, fragment: str) -> None:
    assert_problem(node(**bgp), path, fragment)


def test_node_tunnel_addresses_and_empty_bgp() -> None:
    spec = {"ipv4VXLANTunnelAddr": "10.65.12.0", "vxlanTunnelMACAddr": "66:d1:1e:aa:bb:cc"}
    assert checked(obj("Node", spec, "node-1"))
    assert_problem(obj("Node", {"ipv4VXLANTunnelAddr": "x"}), "spec.ipv4VXLANTunnelAddr",
                   "not a valid IP")
    assert_problem(obj("Node", {"bgp": {}}), "spec.bgp", "must not be empty")


def bgpconfig(name: str = "default", **spec: Any) -> dict[str, Any]:
    return obj("BGPConfiguration", spec, name)


def test_bgp_configuration() -> None:
    out = checked(bgpconfig(asNumber=64513, nodeToNodeMeshEnabled=False, listenPort=1179,
                            serviceClusterIPs=[{"cidr": "10.96.0.0/12"}]))
    assert out["spec"]["logSeverityScreen"] == "Info"
    assert out["spec"]["serviceLoadBalancerAggregation"] == "Enabled"
    assert checked(bgpconfig(logSeverityScreen="debug"))["spec"]["logSeverityScreen"] == "debug"


@pytest.mark.parametrize("name, spec, path, fragment", [
    ("default", {"asNumber": 0}, "spec.asNumber", "out of range 1..4294967295"),
    ("default", {"asNumber": -1}, "spec.asNumber", "out of range"),
    ("default", {"asNumber": "64512.1.1"}, "spec.asNumber", "not an AS number"),
    ("default", {"nodeToNodeMeshEnabled": "true"}, "spec.nodeToNodeMeshEnabled", "true or false"),
    ("default", {"logSeverityScreen": "Verbose"}, "spec.logSeverityScreen", "not one of"),
    ("default", {"listenPort": 0}, "spec.listenPort", "out of range 1..65535"),
    ("default", {"listenPort": 65536}, "spec.listenPort", "out of range 1..65535"),
    ("default", {"serviceClusterIPs": [{"cidr": "10.96.0.1/12"}]}, "spec.serviceClusterIPs[0].cidr",
     "host bits"),
    ("node.node-1", {"asNumber": 64513}, "spec.asNumber", "named 'default'"),
    ("default", {"nodeToNodeMeshEnabled": False, "nodeMeshMaxRestartTime": "120s"},
     "spec.nodeMeshMaxRestartTime", "nodeToNodeMeshEnabled is false"),
    ("default", {"communities": [{"name": "c", "value": "65536:1"}],
                 "prefixAdvertisements": [{"cidr": "10.0.0.0/8", "communities": ["c"]}]},
     "spec.communities[0].value", "16 bits"),
    ("default", {"communities": [{"name": "c", "value": "65001:1"}]}, "spec.communities",
     "not used"),
])
def test_bgp_configuration_problems(name: str, spec: dict[str, Any], path: str,
                                    fragment: str) -> None:
    assert_problem(bgpconfig(name, **spec), path, fragment)


def peer(**spec: Any) -> dict[str, Any]:
    return obj("BGPPeer", spec, "rack1-tor")


@pytest.mark.parametrize("peer_ip", ["10.0.0.1", "10.0.0.1:1179", "fd00::1", "[fd00::1]:179"])
def test_bgp_peer_addresses(peer_ip: str) -> None:
    out = checked(peer(peerIP=peer_ip, asNumber="64600", node="node-1"))
    assert out["spec"]["asNumber"] == 64600


@pytest.mark.parametrize("spec, path, fragment", [
    ({"peerIP": "10.0.0.300"}, "spec.peerIP", "not an IP"),
    ({"peerIP": "10.0.0.1:0"}, "spec.peerIP", "not an IP"),
    ({"peerIP": "fd00::1:179:x"}, "spec.peerIP", "not an IP"),
    ({"node": "n", "nodeSelector": "all()"}, "spec.nodeSelector", "cannot both be set"),
    ({"peerIP": "10.0.0.1", "peerSelector": "rr == 'true'"}, "spec.peerSelector",
     "cannot both be set"),
    ({"peerSelector": "rr == 'true'", "asNumber": 1}, "spec.asNumber", "must be empty"),
    ({"nodeSelector": "rr ==="}, "spec.nodeSelector", "invalid selector"),
    ({"peerIP": "10.0.0.1", "asNumber": "x"}, "spec.asNumber", "not an AS number"),
    ({"peerIP": "10.0.0.1", "reachableBy": "fd00::1"}, "spec.reachableBy", "same IP version"),
    ({"sourceAddress": "NodeIP"}, "spec.sourceAddress", "not one of"),
])
def test_bgp_peer_problems(spec: dict[str, Any], path: str, fragment: str) -> None:
    assert_problem(peer(**spec), path, fragment)


# ---- FelixConfiguration and ClusterInformation --------------------------------------------------


def felix(**spec: Any) -> dict[str, Any]:
    return obj("FelixConfiguration", spec, "default")


def test_felix_configuration_fields_and_defaults() -> None:
    ports = [{"protocol": "TCP", "port": 22}, {"protocol": "UDP", "port": 68, "net": "0.0.0.0/0"}]
    out = checked(felix(failsafeInboundHostPorts=ports, failsafeOutboundHostPorts=[],
                        defaultEndpointToHostAction="ACCEPT", logPrefix="calico-packet",
                        iptablesBackend="nft", chainInsertMode="Append", ipipEnabled=True,
                        routeRefreshInterval="90s", vxlanVNI=4096))
    spec = out["spec"]
    assert spec["failsafeInboundHostPorts"] == ports
    assert spec["defaultEndpointToHostAction"] == "ACCEPT"  # Calico's pattern is case-insensitive
    assert (spec["floatingIPs"], spec["nftablesMode"], spec["bpfConnectTimeLoadBalancing"]) == (
        "Disabled", "Auto", "TCP")


@pytest.mark.parametrize("spec, path, fragment", [
    ({"failsafeInboundHostPorts": [{"protocol": "ICMP", "port": 1}]},
     "spec.failsafeInboundHostPorts[0].protocol", "not one of TCP, UDP, SCTP"),
    ({"failsafeOutboundHostPorts": [{"port": 53}]}, "spec.failsafeOutboundHostPorts[0].protocol",
     "required"),
    ({"failsafeOutboundHostPorts": [{"protocol": "UDP", "port": 70000}]},
     "spec.failsafeOutboundHostPorts[0].port", "out of range"),
    ({"defaultEndpointToHostAction": "Allow"}, "spec.defaultEndpointToHostAction", "not one of"),
    ({"iptablesBackend": "iptables"}, "spec.iptablesBackend", "not one of"),
    ({"chainInsertMode": "Prepend"}, "spec.chainInsertMode", "not one of"),
    ({"logPrefix": "bad;prefix"}, "spec.logPrefix", "log prefix"),
    ({"ipipEnabled": "yes"}, "spec.ipipEnabled", "true or false"),
    ({"routeRefreshInterval": "10 seconds"}, "spec.routeRefreshInterval", "duration"),
    ({"vxlanVNI": "4096"}, "spec.vxlanVNI", "must be an integer"),
    ({"logSeverityScren": "Info"}, "spec.logSeverityScren", "did you mean 'logSeverityScreen'?"),
    ({"kubeNodePortRanges": ["http"]}, "spec.kubeNodePortRanges[0]", "not a name"),
    ({"routeTableRange": {"min": 10, "max": 5}}, "spec.routeTableRange", "min <= max"),
])
def test_felix_configuration_problems(spec: dict[str, Any], path: str, fragment: str) -> None:
    assert_problem(felix(**spec), path, fragment)


def test_cluster_information() -> None:
    spec = {"datastoreReady": True, "calicoVersion": "", "clusterGUID": "abc",
            "clusterType": "k8s,bgp,tabby"}
    assert checked(obj("ClusterInformation", spec, "default"))["spec"] == spec
    assert_problem(obj("ClusterInformation", {"datastoreReady": "true"}, "default"),
                   "spec.datastoreReady", "true or false")


# ---- robustness ---------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True)
    | st.sampled_from(["", "TCP", "10.0.0.0/8", "all()", "global()", "Allow", "80:90", "a", "-"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["action", "protocol", "ports", "nets", "selector", "source",
                         "destination", "ingress", "egress", "icmp", "type", "code", "cidr",
                         "blockSize", "services", "name", "allowedUses", "types", "preDNAT",
                         "bgp", "asNumber", "peerIP", "port", "labels", "communities"]),
        inner, max_size=4),
    max_leaves=12)


@given(kind=st.sampled_from(sorted({
    "IPPool", "IPReservation", "NetworkPolicy", "GlobalNetworkPolicy", "NetworkSet",
    "GlobalNetworkSet", "HostEndpoint", "WorkloadEndpoint", "Profile", "Tier", "Node",
    "BGPConfiguration", "BGPPeer", "FelixConfiguration", "ClusterInformation"})),
    spec=_json, meta=_json)
@settings(max_examples=400, deadline=None)
def test_junk_only_ever_raises_validation_error(kind: str, spec: Any, meta: Any) -> None:
    o = {"apiVersion": API, "kind": kind, "metadata": meta, "spec": spec}
    before = copy.deepcopy(o)
    try:
        validate(o)
    except ValidationError as e:
        assert e.problems
    assert repr(o) == repr(before)  # repr: NaN is not equal to itself


def test_workload_endpoint_ports_as_calico_writes_them() -> None:
    # Calico's JSON always carries hostPort 0 and hostIP "" on every port.
    wep = {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": "node1-k8s-web-eth0", "namespace": "default"},
        "spec": {"orchestrator": "k8s", "node": "node1", "pod": "web", "endpoint": "eth0",
                 "interfaceName": "cali0123456789a", "ipNetworks": ["10.244.1.5/32"],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "hostPort": 0,
                            "hostIP": ""}]},
    }
    assert validate(wep)["spec"]["ports"][0]["hostIP"] == ""
    wep["spec"]["ports"][0]["hostIP"] = "not-an-ip"
    with pytest.raises(ValidationError, match=r"spec.ports\[0\].hostIP"):
        validate(wep)

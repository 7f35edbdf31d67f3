"""`tabbyctl lab run`: the pure parts (pools, placement, store diffs, probe plans, reports)."""

from __future__ import annotations

import copy
import struct
from typing import Any

import pytest

from felix import scenario as sc
from lab import LabError, probe
from lab import scenario_run as sr

SCENARIO: dict[str, Any] = {
    "name": "unit",
    "namespaces": {"a": {"team": "a"}, "b": {}},
    "serviceAccounts": {"a/api": {"role": "api"}},
    "pods": {
        "a/web": {"ip": "10.244.1.10", "labels": {"app": "web"}, "serviceAccount": "api",
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                            {"name": "sig", "port": 3868, "protocol": "SCTP"}]},
        "a/client": {"ip": "10.244.1.11", "labels": {"app": "client"}},
        "b/other": {"ip": "172.16.4.8", "labels": {"app": "other"}, "node": "node2"},
    },
    "externals": {"net/office": {"ip": "192.0.2.10"}},
    "steps": [
        {"probes": [{"port": 80, "protocol": "TCP", "hosts": True,
                     "expect": {"a/client": {"a/web": "allow"}, "host": {"a/web": "allow"}}},
                    {"port": 3868, "protocol": "SCTP",
                     "expect": {"a/client": {"a/web": "allow"}}}]},
        {"apply": [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "deny", "namespace": "a"},
                    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}],
         "relabel": {"pods": {"a/client": {"app": "client2"}}, "namespaces": {"b": {"x": "1"}}},
         "probes": {"port": 53, "protocol": "UDP", "expect": {"b/other": {"a/web": "deny"}}}},
        {"delete": [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "namespace": "a", "name": "deny"}],
         "probes": {"protocol": "ICMP", "icmp": {"type": 8, "code": 0},
                    "expect": {"b/other": {"a/web": "allow"}}}},
    ],
}


def walk() -> list[tuple[sc.State, list[sc.Probe]]]:
    return [(copy.deepcopy(s), p) for s, p in sc.steps_of(copy.deepcopy(SCENARIO))]


# ---- pools --------------------------------------------------------------------------------------

def test_pools_cover_every_pod_ip_outside_the_existing_pools() -> None:
    assert sr.pools_for(["10.244.0.0/16"], ["10.244.1.10", "172.16.4.8", "172.16.5.11",
                                            "10.0.0.20", "10.0.1.20", "172.17.2.5"]) == [
        "172.16.0.0/16", "10.0.0.0/16", "172.17.0.0/16"]


def test_pools_shrink_around_an_overlapping_pool() -> None:
    # the /16 around 10.1.200.1 would overlap 10.1.0.0/20; the /20 around it does not
    assert sr.pools_for(["10.1.0.0/20"], ["10.1.200.1"]) == ["10.1.192.0/20"]
    assert sr.pools_for(["10.1.0.0/24", "10.1.1.0/24"], ["10.1.0.5"]) == []
    with pytest.raises(LabError):
        sr.pools_for(["10.1.0.0/27", "10.1.0.64/26"], ["10.1.0.40"])  # the /26 overlaps


def test_pools_ipv6_and_pool_objects() -> None:
    assert sr.pools_for([], ["fd00:1::5"]) == ["fd00:1::/64"]
    obj = sr.pool_object("172.16.0.0/16")
    assert obj["metadata"]["name"] == "tabby-lab-run-172-16-0-0-16"
    assert obj["spec"] == {"cidr": "172.16.0.0/16", "blockSize": 26, "ipipMode": "Never",
                           "vxlanMode": "Never", "natOutgoing": False, "nodeSelector": "all()"}
    assert sr.pool_object("fd00:1::/64")["spec"]["blockSize"] == 122


# ---- placement and responders -------------------------------------------------------------------

def test_pods_go_to_their_node_or_the_nodes_in_turn() -> None:
    assert sr.place({"a/1": "sim-node", "a/2": "node2", "a/3": "sim-node", "a/4": "sim-node",
                     "a/5": "nowhere"}, ["node1", "node2", "node3"]) == {
        "a/1": "node1", "a/2": "node2", "a/3": "node2", "a/4": "node3", "a/5": "node1"}


def test_responders_serve_every_probed_tcp_udp_port_and_the_pods_ports() -> None:
    probes = [p for _, ps in walk() for p in ps]
    initial = sc.initial_state(SCENARIO)
    assert sr.listen_ports(probes, initial.pods.values()) == ([80], [53])


# ---- store writes per step ----------------------------------------------------------------------

def test_step_ops_write_only_what_changed() -> None:
    initial = sc.initial_state(SCENARIO)
    placement = {"a/web": "node1", "a/client": "node2", "b/other": "node2"}
    steps = walk()
    assert sr.step_ops(initial, steps[0][0], placement) == []  # a probe-only step writes nothing

    ops = sr.step_ops(steps[0][0], steps[1][0], placement)
    assert [o["op"] for o in ops] == ["apply"]
    objs = ops[0]["objects"]
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [
        ("Namespace", "b"), ("NetworkPolicy", "deny"), ("Pod", "client")]
    assert objs[0]["metadata"]["labels"] == {"x": "1"}
    pod = objs[2]
    assert pod["metadata"]["labels"] == {"app": "client2"}
    assert pod["spec"]["nodeName"] == "node2"
    assert pod["spec"]["serviceAccountName"] == "default"
    assert pod["status"]["podIP"] == "10.244.1.11"

    ops = sr.step_ops(steps[1][0], steps[2][0], placement)
    assert ops == [{"op": "delete", "kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
                    "name": "deny", "namespace": "a"}]


def test_pod_manifest_carries_service_account_and_ports() -> None:
    pod = sc.initial_state(SCENARIO).pods["a/web"]
    m = sr.lab_pod_manifest(pod, "node1")
    assert m["spec"]["serviceAccountName"] == "api"
    assert m["spec"]["containers"][0]["ports"][0] == {"name": "http", "containerPort": 80,
                                                      "protocol": "TCP"}
    assert sr.accounts_of(sc.initial_state(SCENARIO)) == {
        "a/api": {"role": "api"}, "a/default": {}, "b/default": {}}


# ---- probe plans --------------------------------------------------------------------------------

def where() -> sr.Where:
    return sr.Where(ns={"a/web": "ns-web", "a/client": "ns-client", "b/other": "ns-other",
                        "net/office": "ns-ext0"},
                    node_ns={"a/web": "ns-node1", "a/client": "ns-node2", "b/other": "ns-node2"},
                    ip={"a/web": "10.244.1.10", "a/client": "10.244.1.11",
                        "b/other": "172.16.4.8", "net/office": "192.0.2.10"})


def test_plan_covers_every_pair_host_from_the_destination_node_sctp_skipped() -> None:
    state, probes = walk()[0]
    tasks = sr.plan(probes, state, where())
    tcp = [t for t in tasks if t.index == 0]
    assert len(tcp) == len(sc.pairs(state, probes[0])) == 3 + 3 * 3 + 3  # host, pods, the external
    host = [t for t in tcp if t.src == sc.HOST]
    assert {(t.dst, t.src_ns) for t in host} == {("a/web", "ns-node1"), ("a/client", "ns-node2"),
                                                 ("b/other", "ns-node2")}
    t = next(t for t in tcp if (t.src, t.dst) == ("net/office", "a/web"))
    assert (t.src_ns, t.dst_ns, t.dst_ip, t.port, t.skip) == ("ns-ext0", "ns-web", "10.244.1.10",
                                                              80, None)
    sctp = [t for t in tasks if t.index == 1]
    assert sctp and all(t.skip == probe.NOT_PROBED_SCTP for t in sctp)
    assert sr.run_task(sctp[0]) == probe.Outcome(False, probe.NOT_PROBED_SCTP)


# ---- reports ------------------------------------------------------------------------------------

def lab_report(simulate: bool = False) -> sr.LabReport:
    """Step 1 of SCENARIO with a made-up kernel: host -> a/web denied, everything else allowed."""
    state, probes = walk()[0]
    tasks = sr.plan(probes, state, where())
    outcomes = [probe.Outcome((t.src, t.dst) != (sc.HOST, "a/web"), "made up") for t in tasks]
    results, skipped = sr.assemble(probes, tasks, outcomes)
    result = sc.ScenarioResult("unit", [sc.HOST, *state.pods, *state.externals], results)
    sim = [sc.evaluate(state, p) for p in probes] if simulate else None
    return sr.LabReport(result, skipped, [{"step": 1, "rounds": 2, "stable": True}], sim)


def test_assemble_matrix_and_not_probed() -> None:
    report = lab_report()
    tcp, sctp = report.result.results
    assert tcp.matrix["a/client"]["a/web"] == "allow"
    assert tcp.matrix[sc.HOST]["a/web"] == "deny"
    assert tcp.verdicts[(sc.HOST, "a/web")].reason == "made up"
    assert sctp.matrix == {}
    assert len(report.not_probed) == 12
    assert report.not_probed[0] == {"step": 1, "protocol": "SCTP", "port": 3868,
                                    "source": "a/web", "destination": "a/client",
                                    "reason": probe.NOT_PROBED_SCTP}


def test_json_is_the_simulators_plus_not_probed() -> None:
    report = lab_report()
    out = sr.to_json(report)
    assert {k: v for k, v in out.items() if k not in ("notProbed", "convergence")} == \
        sc.to_json(report.result)
    assert out["steps"][0]["matrix"]["a/client"]["a/web"] == "allow"
    assert len(out["notProbed"]) == 12 and "disagreements" not in out
    assert "disagreements" in sr.to_json(lab_report(simulate=True))


def test_check_counts_not_probed_apart() -> None:
    c = sr.check(lab_report())
    assert (c.report.passed, c.report.failed) == (1, 1)
    assert c.report.mismatches == ["step 1 TCP/80: host -> a/web: expected allow, got deny "
                                   "(made up)"]
    assert c.not_probed == ["step 1 SCTP/3868: a/client -> a/web: expected allow, "
                            f"{probe.NOT_PROBED_SCTP}"]
    assert sr.format_check(c).splitlines()[-1] == "1 passed, 1 failed, 1 not probed"


def test_check_without_not_probed_prints_like_the_simulator() -> None:
    report = lab_report()
    report.not_probed = []
    report.result.results = report.result.results[:1]
    c = sr.check(report)
    assert sr.format_check(c) == sc.format_check(sc.check(report.result))


def test_disagreements_list_kernel_and_simulator() -> None:
    found = sr.disagreements(lab_report(simulate=True))
    assert [(d["source"], d["destination"], d["kernel"], d["simulator"]) for d in found] == [
        (sc.HOST, "a/web", "deny", "allow")]
    assert found[0]["kernelReason"] == "made up"
    text = sr.format_disagreements(found)
    assert text.startswith("1 disagreement(s)") and "host -> a/web: kernel deny" in text
    assert "agree" in sr.format_disagreements([])


def test_text_has_matrices_and_a_not_probed_summary() -> None:
    text = sr.format_text(lab_report())
    assert text.startswith("scenario unit: rows are sources, columns destinations")
    assert "step 1 SCTP/3868: 12 pair(s), " + probe.NOT_PROBED_SCTP in text


# ---- convergence --------------------------------------------------------------------------------

def test_agents_caught_up_needs_every_node_in_sync_at_the_revision() -> None:
    text = ("# HELP felix_in_sync x\n# TYPE felix_in_sync gauge\nfelix_in_sync 1\n"
            "felix_datastore_revision 42\n")
    m = sr.parse_metrics(text)
    assert m == {"felix_in_sync": 1.0, "felix_datastore_revision": 42.0}
    assert sr.agents_caught_up([m, m], 42)
    assert not sr.agents_caught_up([m, m], 43)
    assert not sr.agents_caught_up([m, {**m, "felix_in_sync": 0.0}], 40)
    assert not sr.agents_caught_up([m, None], 40)


# ---- packets ------------------------------------------------------------------------------------

def test_icmp_packet_checksum_and_parse() -> None:
    pkt = probe.icmp_packet(8, 0, 0x1234, 1, b"tabby")
    assert probe.checksum(pkt) == 0  # a packet with its checksum sums to zero
    ip_header = bytes([0x45]) + bytes(19)
    assert probe._icmp_of(ip_header + pkt) == (8, 0, 0x1234, 1, b"tabby")
    assert struct.unpack("!BB", pkt[:2]) == (8, 0)

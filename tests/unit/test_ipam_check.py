"""`ipam check` and the GC decision on plain data: Calico's JSON values, v3 objects (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ipam import check as chk
from ipam.block import Block
from ipam.records import Affinity, Handle, IPAMConfig
from ipam.state import IPAMState

NOW = 1_777_777_777.0
SEQ = 1_777_000_000_000_000_000


def block(cidr: str, host: str | None, allocs: Mapping[int, tuple[str | None, dict[str, str]]],
          size: int = 4) -> Block:
    """A block as Calico stores it: ordinal -> (handle, secondary attributes)."""
    attributes: list[dict[str, Any]] = []
    allocations: list[int | None] = [None] * size
    for ordinal, (handle, secondary) in sorted(allocs.items()):
        attr: dict[str, Any] = {"secondary": secondary}
        if handle is not None:
            attr["handle_id"] = handle
        if attr not in attributes:
            attributes.append(attr)
        allocations[ordinal] = attributes.index(attr)
    return Block.from_json({
        "cidr": cidr, "affinity": f"host:{host}" if host else None,
        "allocations": allocations,
        "unallocated": [o for o in range(size) if allocations[o] is None],
        "attributes": attributes, "sequenceNumber": SEQ + 10,
        "sequenceNumberForAllocation": {str(o): SEQ + o for o in allocs}, "deleted": False})


def state(blocks: list[Block], affinities: list[tuple[str, str, str]] | None = None,
          handles: Mapping[str, Mapping[str, int]] | None = None) -> IPAMState:
    if affinities is None:  # by default every affine block has its confirmed affinity
        affinities = [(b.host, b.cidr, "confirmed") for b in blocks if b.host]
    if handles is None:  # by default handles agree with the blocks
        counts: dict[str, dict[str, int]] = {}
        for b in blocks:
            for _, attr in b.allocated():
                if attr.handle:
                    per = counts.setdefault(attr.handle, {})
                    per[b.cidr] = per.get(b.cidr, 0) + 1
        handles = counts
    return IPAMState(
        blocks={b.cidr: (b, 100 + i) for i, b in enumerate(blocks)},
        affinities={(h, c): (Affinity.from_json({"state": s}), 200) for h, c, s in affinities},
        handles={h: (Handle.from_json({"block": dict(c)}), 300) for h, c in handles.items()},
        config=IPAMConfig(), revision=999)


def wep(ns: str, pod: str, ips: list[str], container: str = "", node: str = "node-a") -> dict:
    spec: dict[str, Any] = {"orchestrator": "k8s", "node": node, "pod": pod, "endpoint": "eth0",
                            "interfaceName": "cali0", "ipNetworks": ips}
    if container:
        spec["containerID"] = container
    return {"kind": "WorkloadEndpoint",
            "metadata": {"name": f"{node}-k8s-{pod}-eth0", "namespace": ns}, "spec": spec}


def node(name: str, **spec: Any) -> dict:
    return {"kind": "Node", "metadata": {"name": name}, "spec": spec}


def pod_attrs(ns: str, pod: str, node_name: str = "node-a") -> dict[str, str]:
    return {"namespace": ns, "pod": pod, "node": node_name, "timestamp": "2026-05-01T10:00:00Z"}


NODES = [node("node-a"), node("node-b")]


def by_ip(report: chk.CheckReport) -> dict[str, chk.Allocation]:
    return {a.ip: a for a in report.allocations}


def kinds(report: chk.CheckReport) -> list[str]:
    return [p.kind for p in report.problems]


# ---- who owns an allocation -----------------------------------------------------------------

def test_owners_by_address_container_and_pod() -> None:
    b = block("10.244.1.0/30", "node-a", {
        0: ("k8s-pod-network.aaa", pod_attrs("prod", "by-ip")),
        1: ("k8s-pod-network.bbb", {"node": "node-a"}),          # container only
        2: ("k8s-pod-network.ccc", pod_attrs("prod", "by-pod")),  # WEP without containerID
        3: ("prod.legacy", {"node": "node-a"}),                   # Calico v2 handle
    })
    weps = [wep("prod", "by-ip", ["10.244.1.0/32"]),
            wep("prod", "by-container", ["10.9.9.9/32"], container="bbb"),
            wep("prod", "by-pod", []),
            wep("prod", "legacy", [])]
    report = chk.check(state([b]), weps, NODES, NOW)
    allocs = by_ip(report)
    assert all(a.status == chk.IN_USE for a in allocs.values())
    assert allocs["10.244.1.0"].owners == ["Workload(prod/node-a-k8s-by-ip-eth0)"]
    assert allocs["10.244.1.1"].owners == ["Workload(prod/node-a-k8s-by-container-eth0)"]
    assert allocs["10.244.1.3"].owners == ["Workload(prod/node-a-k8s-legacy-eth0)"]
    assert report.problems == []
    assert report.leaked == [] and report.leaked_handles == []


def test_leaked_pod_allocation_names_ip_handle_block_host() -> None:
    b = block("10.244.1.0/30", "node-a", {1: ("k8s-pod-network.dead", pod_attrs("prod", "gone"))})
    report = chk.check(state([b]), [], NODES, NOW)
    [problem] = report.problems
    assert problem == chk.Problem("leaked-allocation", "no WorkloadEndpoint for pod prod/gone",
                                  ip="10.244.1.1", handle="k8s-pod-network.dead",
                                  block="10.244.1.0/30", host="node-a")
    assert [a.ip for a in report.leaked] == ["10.244.1.1"]


def test_a_newer_sandbox_of_the_same_pod_does_not_own_the_old_address() -> None:
    b = block("10.244.1.0/30", "node-a", {
        0: ("k8s-pod-network.old", pod_attrs("prod", "web")),
        1: ("k8s-pod-network.new", pod_attrs("prod", "web")),
    })
    weps = [wep("prod", "web", ["10.244.1.1/32"], container="new")]
    allocs = by_ip(chk.check(state([b]), weps, NODES, NOW))
    assert allocs["10.244.1.1"].status == chk.IN_USE
    assert allocs["10.244.1.0"].status == chk.LEAKED
    assert "belongs to container new" in allocs["10.244.1.0"].reason


def test_without_pod_attributes_an_orphan_is_unverified_and_never_a_gc_candidate() -> None:
    b = block("10.244.1.0/30", "node-a", {
        0: ("k8s-pod-network.nobody", {"node": "node-a"}),
        1: ("lb-0123abcd", {"service": "prod/lb"}),
    })
    report = chk.check(state([b]), [], NODES, NOW)
    assert {a.status for a in report.allocations} == {chk.UNVERIFIED}
    assert kinds(report) == ["allocation-without-owner"] * 2
    assert "no WorkloadEndpoint for container nobody" in report.problems[0].reason
    assert chk.candidates(report) == []


def test_tunnel_addresses_are_valid_while_their_node_exists() -> None:
    b = block("10.244.1.0/30", "node-a", {
        0: ("ipip-tunnel-addr-node-a", {"node": "node-a", "type": "ipipTunnelAddress"}),
        1: ("vxlan-tunnel-addr-node-gone", {"node": "node-gone", "type": "vxlanTunnelAddress"}),
        2: ("wireguard-tunnel-addr-node-c", {}),  # no attributes: node from the handle
        3: (None, {"node": "node-b"}),            # listed in node-b's spec
    })
    nodes = [node("node-a"), node("node-b", ipv4VXLANTunnelAddr="10.244.1.3")]
    report = chk.check(state([b]), [], nodes, NOW)
    allocs = by_ip(report)
    assert allocs["10.244.1.0"].owners == ["Node(node-a)"]
    assert allocs["10.244.1.3"].owners == ["Node(node-b)"]
    assert allocs["10.244.1.1"].status == chk.LEAKED
    assert allocs["10.244.1.2"].status == chk.LEAKED
    missing = [p for p in report.problems if p.kind == "tunnel-address-of-missing-node"]
    assert [(p.ip, p.host) for p in missing] == [("10.244.1.1", "node-gone"),
                                                 ("10.244.1.2", "node-c")]
    assert "node-gone, which has no Node resource" in missing[0].reason


def test_windows_reserved_addresses_are_in_use() -> None:
    b = block("10.244.1.0/30", "node-a", {0: ("windows-reserved-ipam-handle", {})})
    report = chk.check(state([b], handles={"windows-reserved-ipam-handle": {b.cidr: 1}}),
                       [], NODES, NOW)
    assert report.allocations[0].owners == ["Reserved for Windows"]
    assert report.problems == []


# ---- handles --------------------------------------------------------------------------------

def test_handle_problems() -> None:
    b = block("10.244.1.0/30", "node-a", {
        0: ("k8s-pod-network.a", pod_attrs("prod", "a")),
        1: ("k8s-pod-network.a", pod_attrs("prod", "a")),
        2: ("k8s-pod-network.norecord", pod_attrs("prod", "b")),
        3: (None, pod_attrs("prod", "c")),
    })
    handles = {"k8s-pod-network.a": {b.cidr: 1, "10.244.9.0/30": 2},
               "k8s-pod-network.empty": {b.cidr: 1}}
    weps = [wep("prod", p, []) for p in "abc"]
    report = chk.check(state([b], handles=handles), weps, NODES, NOW)
    problems = {(p.kind, p.handle, p.block, p.ip): p.reason for p in report.problems}
    assert problems == {
        ("handle-count-mismatch", "k8s-pod-network.a", "10.244.1.0/30", None):
            "the handle records 1 in block 10.244.1.0/30, the block holds 2",
        ("handle-count-mismatch", "k8s-pod-network.a", "10.244.9.0/30", None):
            "the handle records 2 in block 10.244.9.0/30, the block holds 0",
        ("handle-without-allocations", "k8s-pod-network.empty", None, None):
            "the handle lists 10.244.1.0/30 but no block allocation carries it",
        ("allocation-without-handle", "k8s-pod-network.norecord", "10.244.1.0/30", "10.244.1.2"):
            "no handle record k8s-pod-network.norecord exists",
        ("allocation-without-handle", None, "10.244.1.0/30", "10.244.1.3"):
            "the allocation has no handle ID",
    }
    assert report.leaked_handles == [chk.LeakedHandle("k8s-pod-network.empty", 300)]


# ---- blocks, affinities, hosts --------------------------------------------------------------

def test_block_and_affinity_problems() -> None:
    no_record = block("10.244.1.0/30", "node-a", {})
    pending = block("10.244.1.4/30", "node-a", {})
    unaffine = block("10.244.1.8/30", None, {})
    affinities = [("node-a", "10.244.1.4/30", "pending"),
                  ("node-a", "10.244.1.8/30", "confirmed"),     # the block is unaffine
                  ("node-b", "10.244.2.0/30", "pending"),       # a claim that never finished
                  ("node-b", "10.244.2.4/30", "confirmed")]
    report = chk.check(state([no_record, pending, unaffine], affinities), [], NODES, NOW)
    got = [(p.kind, p.block, p.host, p.reason) for p in report.problems]
    assert got == [
        ("block-without-affinity", "10.244.1.0/30", "node-a",
         "the block is affine to host:node-a but no affinity record exists"),
        ("block-without-affinity", "10.244.1.4/30", "node-a",
         "the block is affine to host:node-a but its affinity record is pending"),
        ("affinity-without-block", "10.244.1.8/30", "node-a",
         "confirmed affinity, but the block is affine to no host"),
        ("affinity-without-block", "10.244.2.0/30", "node-b",
         "pending affinity for a block that does not exist (a claim in progress or interrupted)"),
        ("affinity-without-block", "10.244.2.4/30", "node-b",
         "confirmed affinity for a block that does not exist"),
    ]


def test_hosts_without_a_node() -> None:
    b = block("10.244.1.0/30", "node-gone", {})
    report = chk.check(state([b], [("node-gone", b.cidr, "confirmed"),
                                   ("node-gone", "10.244.1.4/30", "confirmed")]), [], NODES, NOW)
    [host] = [p for p in report.problems if p.kind == "host-without-node"]
    assert host.host == "node-gone"
    assert "10.244.1.0/30, 10.244.1.4/30" in host.reason
    assert "tabbyctl ipam release --node node-gone" in host.reason


def test_invalid_block_is_reported_and_still_read() -> None:
    b = block("10.244.1.0/30", "node-a", {0: ("h", pod_attrs("prod", "a"))})
    b.allocations[1] = 7          # points at no attribute
    b.unallocated = [2, 2, 3]     # and a duplicate
    report = chk.check(state([b], handles={"h": {b.cidr: 2}}), [wep("prod", "a", [])], NODES,
                       NOW)
    [invalid] = [p for p in report.problems if p.kind == "invalid-block"]
    assert invalid.reason == "ordinal 1 refers to attribute 7, which does not exist"
    assert [a.ip for a in report.allocations] == ["10.244.1.0", "10.244.1.1"]


def test_validate_block_catches_each_inconsistency() -> None:
    def broken(change: Any) -> str | None:
        b = block("10.244.1.0/30", "node-a", {0: ("h", {})})
        change(b)
        return chk.validate_block(b)

    assert broken(lambda b: None) is None
    assert broken(lambda b: b.attributes.append(b.attributes[0])) == \
        "attribute 1 is not referred to by any allocation"
    assert broken(lambda b: b.unallocated.append(0)) == \
        "ordinal 0 is allocated and also listed as unallocated"
    assert broken(lambda b: b.unallocated.append(9)) == "unallocated ordinal 9 is outside the block"
    assert broken(lambda b: b.unallocated.pop()) == \
        "1 allocated + 2 unallocated ordinals for 4 addresses"


def test_workload_address_in_a_pool_without_allocation() -> None:
    pools = [{"metadata": {"name": "p"}, "spec": {"cidr": "10.244.0.0/16"}},
             {"metadata": {"name": "off"}, "spec": {"cidr": "10.9.0.0/16", "disabled": True}}]
    weps = [wep("prod", "a", ["10.244.3.3/32"]), wep("prod", "b", ["10.9.0.1/32"]),
            wep("prod", "c", ["192.168.0.1/32"])]
    report = chk.check(state([]), weps, NODES, NOW, pools=pools)
    assert [(p.kind, p.ip) for p in report.problems] == \
        [("workload-address-not-allocated", "10.244.3.3")]


# ---- the report -----------------------------------------------------------------------------

def test_report_json_keeps_calicoctl_shape() -> None:
    b = block("10.244.1.0/30", "node-a", {
        0: ("k8s-pod-network.live", pod_attrs("prod", "live")),
        1: ("k8s-pod-network.dead", pod_attrs("prod", "dead", node_name="node-b")),
    })
    report = chk.check(state([b], handles={"k8s-pod-network.live": {b.cidr: 1},
                                           "k8s-pod-network.dead": {b.cidr: 1},
                                           "k8s-pod-network.gone": {b.cidr: 1}}),
                       [wep("prod", "live", ["10.244.1.0/32"])], NODES, NOW, version="tabby 1")
    doc = json.loads(json.dumps(report.to_json()))
    assert set(doc) == {"version", "generatedAt", "revision", "summary", "allocations",
                        "leakedHandles", "problems"}
    assert doc["version"] == "tabby 1" and doc["revision"] == 999
    assert doc["generatedAt"] == "2026-05-03T03:09:37.000000Z"
    assert doc["summary"] == {"blocks": 1, "allocations": 2, "inUse": 1, "leaked": 1,
                              "unverified": 0, "handles": 3, "problems": 2}
    dead = doc["allocations"]["10.244.1.1"][0]
    assert dead == {"ip": "10.244.1.1", "block": "10.244.1.0/30", "ordinal": 1,
                    "handle": "k8s-pod-network.dead", "sequenceNumber": SEQ + 1, "pod": "dead",
                    "namespace": "prod", "node": "node-b", "type": "",
                    "creationTimestamp": "2026-05-01T10:00:00Z", "inUse": False,
                    "borrowed": True, "owners": [], "status": "leaked",
                    "reason": "no WorkloadEndpoint for pod prod/dead"}
    assert doc["allocations"]["10.244.1.0"][0]["inUse"] is True
    assert doc["leakedHandles"] == [{"ID": "k8s-pod-network.gone", "Revision": "300"}]
    assert {p["kind"] for p in doc["problems"]} == {"leaked-allocation",
                                                    "handle-without-allocations"}


def test_text_summary_lists_problems_on_request() -> None:
    b = block("10.244.1.0/30", "node-a", {1: ("k8s-pod-network.dead", pod_attrs("prod", "x"))})
    report = chk.check(state([b]), [], NODES, NOW)
    short = chk.format_text(report)
    assert "Found 0 IPs in use, 1 leaked" in short
    assert "Found 1 leaked-allocation" in short
    assert "10.244.1.1" not in short
    assert short.endswith("Check complete; found 1 problems.")
    detailed = chk.format_text(report, show_problem_ips=True)
    assert "  leaked-allocation: 10.244.1.1: no WorkloadEndpoint for pod prod/x" in detailed
    every = chk.format_text(report, show_all_ips=True)
    assert "  10.244.1.1 leaked; handle k8s-pod-network.dead" in every


# ---- GC decision ----------------------------------------------------------------------------

def leak(seq: int = SEQ + 1) -> chk.Candidate:
    return chk.Candidate("10.244.1.1", {"ip": "10.244.1.1", "block": "10.244.1.0/30",
                                        "handle": "k8s-pod-network.dead",
                                        "sequenceNumber": seq}, "no WorkloadEndpoint")


def test_first_sighting_is_recorded_never_released_even_with_zero_grace() -> None:
    plan = chk.plan_gc([leak()], {}, NOW, grace=0)
    assert plan.release == [] and plan.waiting == []
    assert plan.record == [chk.Sighting("10.244.1.1", dict(leak().identity), NOW,
                                        "no WorkloadEndpoint")]
    again = chk.plan_gc([leak()], {s.key: s for s in plan.record}, NOW, grace=0)
    assert again.release == [leak()] and again.record == []


def test_release_only_after_the_grace_period() -> None:
    seen = {"10.244.1.1": chk.Sighting("10.244.1.1", dict(leak().identity), NOW - 600)}
    early = chk.plan_gc([leak()], seen, NOW, grace=900)
    assert early.release == [] and early.waiting == [(leak(), 300)]
    assert chk.plan_gc([leak()], seen, NOW + 300, grace=900).release == [leak()]


def test_a_changed_allocation_starts_the_clock_again() -> None:
    seen = {"10.244.1.1": chk.Sighting("10.244.1.1", dict(leak().identity), NOW - 3600)}
    reallocated = leak(seq=SEQ + 99)
    plan = chk.plan_gc([reallocated], seen, NOW, grace=900)
    assert plan.release == [] and [s.identity for s in plan.record] == [reallocated.identity]
    # a clock that went backwards also starts again rather than releasing early
    future = {"10.244.1.1": chk.Sighting("10.244.1.1", dict(leak().identity), NOW + 3600)}
    assert chk.plan_gc([leak()], future, NOW, grace=0).release == []


def test_sightings_no_longer_leaked_are_forgotten() -> None:
    seen = {"10.244.1.1": chk.Sighting("10.244.1.1", dict(leak().identity), NOW),
            "handle/h": chk.Sighting("handle/h", {"handle": "h", "revision": 3}, NOW)}
    assert chk.plan_gc([], seen, NOW, grace=0).forget == ["10.244.1.1", "handle/h"]


def test_sighting_json_round_trip() -> None:
    s = chk.Sighting("10.244.1.1", dict(leak().identity), NOW + 0.25, "why")
    doc = json.loads(json.dumps(s.to_json()))
    assert doc["firstSeen"] == "2026-05-03T03:09:37.250000Z"
    assert chk.Sighting.from_json("10.244.1.1", doc) == s


def test_candidates_are_leaked_allocations_and_handles_only() -> None:
    b = block("10.244.1.0/30", "node-a", {
        0: ("k8s-pod-network.dead", pod_attrs("prod", "dead")),
        1: ("k8s-pod-network.unknown", {"node": "node-a"}),
    })
    report = chk.check(state([b], handles={"k8s-pod-network.dead": {b.cidr: 1},
                                           "k8s-pod-network.unknown": {b.cidr: 1},
                                           "k8s-pod-network.empty": {}}), [], NODES, NOW)
    assert [(c.key, dict(c.identity)) for c in chk.candidates(report)] == [
        ("10.244.1.0", {"ip": "10.244.1.0", "block": "10.244.1.0/30",
                        "handle": "k8s-pod-network.dead", "sequenceNumber": SEQ}),
        ("handle/k8s-pod-network.empty", {"handle": "k8s-pod-network.empty", "revision": 300}),
    ]


def test_recheck_keeps_anything_that_changed_or_gained_an_owner() -> None:
    identity = dict(leak().identity)
    dead = block("10.244.1.0/30", "node-a",
                 {1: ("k8s-pod-network.dead", pod_attrs("prod", "dead"))})
    no_one = chk.index_owners([], NODES)
    assert chk.recheck_allocation(identity, dead, no_one) is None
    owned = chk.index_owners([wep("prod", "dead", ["10.244.1.1/32"])], NODES)
    assert chk.recheck_allocation(identity, dead, owned) == \
        "owned by Workload(prod/node-a-k8s-dead-eth0)"
    freed = block("10.244.1.0/30", "node-a", {})
    assert chk.recheck_allocation(identity, freed, no_one) == "it is no longer allocated"
    again = block("10.244.1.0/30", "node-a",
                  {1: ("k8s-pod-network.new", pod_attrs("prod", "new"))})
    assert chk.recheck_allocation(identity, again, no_one) == \
        "it was re-allocated (handle k8s-pod-network.new)"
    assert chk.recheck_allocation(identity, None, no_one) == \
        "block 10.244.1.0/30 no longer holds it"


def test_recheck_handle() -> None:
    b = block("10.244.1.0/30", "node-a", {0: ("k8s-pod-network.h", pod_attrs("prod", "a"))})
    st = state([b], handles={"k8s-pod-network.h": {b.cidr: 1}, "k8s-pod-network.e": {}})
    assert chk.recheck_handle({"handle": "k8s-pod-network.e", "revision": 300}, st) is None
    assert chk.recheck_handle({"handle": "k8s-pod-network.e", "revision": 299}, st) == \
        "it changed since it was seen"
    assert chk.recheck_handle({"handle": "k8s-pod-network.h", "revision": 300}, st) == \
        "block 10.244.1.0/30 now carries it"
    assert chk.recheck_handle({"handle": "nope", "revision": 1}, st) == "it no longer exists"


def test_ipv6_addresses_match_in_canonical_form() -> None:
    b = block("fd00:10:244::/126", "node-a", {
        1: ("k8s-pod-network.v6", pod_attrs("prod", "web")),
        2: ("k8s-pod-network.gone", pod_attrs("prod", "gone")),
    })
    weps = [wep("prod", "web", ["fd00:10:244:0:0:0:0:1/128"], container="v6")]
    allocs = by_ip(chk.check(state([b]), weps, NODES, NOW))
    assert allocs["fd00:10:244::1"].owners == ["Workload(prod/node-a-k8s-web-eth0)"]
    assert allocs["fd00:10:244::2"].status == chk.LEAKED

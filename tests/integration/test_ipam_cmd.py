"""`tabbyctl ipam` as operators run it (the console script) against a real etcd, with state made
by the real allocator and WorkloadEndpoints applied with `tabbyctl apply`."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from datastore.etcd import Datastore
from ipam.allocator import IPAM, AssignRequest
from tests.etcd_server import EtcdServer
from tests.integration.test_tabbyctl import tabbyctl

pytestmark = pytest.mark.etcd
T = TypeVar("T")

SETUP = """\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/24, blockSize: 28}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node-a}
spec: {}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node-b}
spec: {}
"""


@pytest.fixture
def env(etcd_server: EtcdServer) -> Iterator[dict[str, str]]:
    """A wiped store holding one pool and two nodes."""
    etcd_server.etcdctl("del", "--prefix", "/")
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "TABBY_"))}
    e["ETCD_ENDPOINTS"] = etcd_server.endpoint
    tabbyctl(e, "apply", "-f", "-", stdin=SETUP)
    yield e


def run(server: EtcdServer, fn: Callable[[Datastore], Awaitable[T]]) -> T:
    async def go() -> T:
        async with Datastore(server.config()) as ds:
            return await asyncio.wait_for(fn(ds), 60)
    return asyncio.run(go())


def allocate(server: EtcdServer, container: str, pod: str, node: str = "node-a",
             ns: str = "prod") -> str:
    """An address for a pod, as the CNI plugin asks for it."""
    req = AssignRequest(handle_id=f"k8s-pod-network.{container}", hostname=node,
                        attrs={"node": node, "namespace": ns, "pod": pod,
                               "timestamp": "2026-05-01T10:00:00Z"}, namespace=ns)
    result = run(server, lambda ds: IPAM(ds).auto_assign(req))
    return str(result.ipv4[0].ip)


def add_wep(env: dict[str, str], ip: str, container: str, pod: str, node: str = "node-a",
            ns: str = "prod") -> None:
    wep = {"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
           "metadata": {"namespace": ns},
           "spec": {"orchestrator": "k8s", "node": node, "pod": pod, "endpoint": "eth0",
                    "containerID": container, "interfaceName": f"cali{container[:11]}",
                    "ipNetworks": [f"{ip}/32"]}}
    tabbyctl(env, "apply", "-f", "-", stdin=json.dumps(wep))


def dump(server: EtcdServer) -> dict[str, str]:
    out = server.etcdctl("get", "--prefix", "/", "-w", "json")
    kvs = json.loads(out).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode()
            for kv in kvs}


def allocated(server: EtcdServer) -> dict[str, str]:
    """ip -> handle of every allocation in etcd (read straight from the block JSON)."""
    out = {}
    for key, value in dump(server).items():
        if not key.startswith("/calico/ipam/v2/assignment/"):
            continue
        block = json.loads(value)
        net = ipaddress.ip_network(block["cidr"])
        for ordinal, index in enumerate(block["allocations"]):
            if index is not None:
                out[str(net[ordinal])] = block["attributes"][index].get("handle_id")
    return out


def fails(env: dict[str, str], server: EtcdServer, *args: str, code: int = 1) -> str:
    """The command fails with one line on stderr and leaves etcd exactly as it was."""
    before = dump(server)
    proc = tabbyctl(env, *args, ok=False)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert dump(server) == before
    if code == 1:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


# ---- show -----------------------------------------------------------------------------------

def test_show_tables_and_one_address(env: dict[str, str], etcd_server: EtcdServer) -> None:
    web = allocate(etcd_server, "c1", "web")
    allocate(etcd_server, "c2", "db")
    allocate(etcd_server, "c3", "api", node="node-b")
    add_wep(env, web, "c1", "web")

    lines = tabbyctl(env, "ipam", "show").stdout.splitlines()
    assert lines[0].split() == ["GROUPING", "CIDR", "IPS", "TOTAL", "IPS", "IN", "USE", "IPS",
                                "RESERVED", "IPS", "FREE"]
    assert lines[1].split() == ["IP", "Pool", "10.244.0.0/24", "256", "3", "(1%)", "0", "(0%)",
                                "253", "(99%)"]
    rows = [line.split() for line in
            tabbyctl(env, "ipam", "show", "--show-blocks").stdout.splitlines()[2:]]
    # GROUPING CIDR TOTAL IN-USE (%) RESERVED (%) FREE (%) HOST BORROWED, one block per node
    assert sorted((r[-2], r[0], r[2], r[3], r[-1]) for r in rows) == [
        ("node-a", "Block", "16", "2", "0"), ("node-b", "Block", "16", "1", "0")]

    about = tabbyctl(env, "ipam", "show", "--ip", web).stdout
    assert f"IP {web} is in use" in about and "Handle ID: k8s-pod-network.c1" in about
    assert "Pool: pods (10.244.0.0/24)" in about and "  pod: web" in about
    free = tabbyctl(env, "ipam", "show", "--ip", "10.244.0.250").stdout
    assert free.startswith("10.244.0.250 is not assigned")
    assert fails(env, etcd_server, "ipam", "show", "--ip", "10.244.0.999") == \
        "error: '10.244.0.999' is not an IP address"


# ---- check ----------------------------------------------------------------------------------

def test_check_finds_leaks_and_orphan_handles(env: dict[str, str], etcd_server: EtcdServer,
                                              tmp_path: Path) -> None:
    live = allocate(etcd_server, "live", "web")
    leaked = allocate(etcd_server, "dead", "gone")
    add_wep(env, live, "live", "web")
    etcd_server.etcdctl("put", "/calico/ipam/v2/handle/k8s-pod-network.orphan",
                        '{"block":{"10.244.0.0/28":1},"deleted":false}')
    report_file = tmp_path / "report.json"

    out = tabbyctl(env, "ipam", "check", "-o", str(report_file), "--show-problem-ips").stdout
    assert "Found 1 IPs in use, 1 leaked" in out
    assert f"  leaked-allocation: {leaked}: no WorkloadEndpoint for pod prod/gone" in out
    assert "  handle-without-allocations: k8s-pod-network.orphan: " in out
    assert f"Report written to {report_file}: 1 leaked address, 1 leaked handle" in out

    report = json.loads(report_file.read_text())
    assert report["summary"]["leaked"] == 1 and report["summary"]["inUse"] == 1
    [entry] = report["allocations"][leaked]
    assert (entry["status"], entry["inUse"], entry["handle"], entry["pod"]) == \
        ("leaked", False, "k8s-pod-network.dead", "gone")
    assert report["allocations"][live][0]["owners"] == ["Workload(prod/node--a-k8s-web-eth0)"]
    assert [h["ID"] for h in report["leakedHandles"]] == ["k8s-pod-network.orphan"]
    assert report["revision"] > 0


# ---- release --------------------------------------------------------------------------------

def test_release_ip_refuses_addresses_in_use(env: dict[str, str],
                                             etcd_server: EtcdServer) -> None:
    live = allocate(etcd_server, "live", "web")
    leaked = allocate(etcd_server, "dead", "gone")
    add_wep(env, live, "live", "web")

    err = fails(env, etcd_server, "ipam", "release", "--ip", leaked, "--ip", live)
    assert err == (f"error: nothing released: {live} is in use by "
                   "Workload(prod/node--a-k8s-web-eth0) (--force releases addresses in use)")
    assert fails(env, etcd_server, "ipam", "release", "--ip", "10.244.0.200") == \
        "error: nothing released: 10.244.0.200 is not assigned"
    assert fails(env, etcd_server, "ipam", "release", "--ip", "nonsense") == \
        "error: 'nonsense' is not an IP address"
    assert "give one of --ip" in fails(env, etcd_server, "ipam", "release", code=2)

    assert tabbyctl(env, "ipam", "release", "--ip", leaked).stdout.strip() == \
        f"released {leaked}"
    assert allocated(etcd_server) == {live: "k8s-pod-network.live"}
    # the handle went with its only address
    assert "/calico/ipam/v2/handle/k8s-pod-network.dead" not in dump(etcd_server)


def test_release_from_report_releases_only_what_still_leaks(
        env: dict[str, str], etcd_server: EtcdServer, tmp_path: Path) -> None:
    gone = allocate(etcd_server, "gone", "gone")
    late = allocate(etcd_server, "late", "late")        # its WEP appears after the report
    reused = allocate(etcd_server, "old", "old")        # freed and handed out again
    etcd_server.etcdctl("put", "/calico/ipam/v2/handle/k8s-pod-network.orphan",
                        '{"block":{"10.244.0.0/28":1},"deleted":false}')
    report = tmp_path / "report.json"
    tabbyctl(env, "ipam", "check", "-o", str(report))

    add_wep(env, late, "late", "late")
    tabbyctl(env, "ipam", "release", "--ip", reused)
    run(etcd_server, lambda ds: IPAM(ds).assign_ip(
        reused, "k8s-pod-network.new", "node-a",
        {"node": "node-a", "namespace": "prod", "pod": "new"}))

    out = tabbyctl(env, "ipam", "release", "--from-report", str(report)).stdout
    assert f"released {gone}" in out
    assert f"skipped {late}: owned by Workload(prod/node--a-k8s-late-eth0)" in out
    assert f"skipped {reused}: it was re-allocated (handle k8s-pod-network.new)" in out
    assert "deleted handle k8s-pod-network.orphan" in out
    assert allocated(etcd_server) == {late: "k8s-pod-network.late",
                                      reused: "k8s-pod-network.new"}
    assert "/calico/ipam/v2/handle/k8s-pod-network.orphan" not in dump(etcd_server)


def test_release_from_a_bad_report_changes_nothing(env: dict[str, str],
                                                   etcd_server: EtcdServer,
                                                   tmp_path: Path) -> None:
    allocate(etcd_server, "gone", "gone")
    bad = tmp_path / "bad.json"
    bad.write_text('{"allocations": {"10.244.0.1": [{"ip": "x", "inUse": false}]}}')
    assert "is malformed" in fails(env, etcd_server, "ipam", "release", "--from-report",
                                   str(bad))
    bad.write_text("[1, 2]")
    assert fails(env, etcd_server, "ipam", "release", "--from-report", str(bad)) == \
        f"error: {bad} is not an `ipam check -o` report (no allocations map)"
    assert "cannot read" in fails(env, etcd_server, "ipam", "release", "--from-report",
                                  str(tmp_path / "missing.json"))


# ---- configure ------------------------------------------------------------------------------

def test_configure_writes_calicos_config(env: dict[str, str], etcd_server: EtcdServer) -> None:
    out = tabbyctl(env, "ipam", "configure", "--strictaffinity=true",
                   "--max-blocks-per-host", "4").stdout
    assert out.splitlines() == ["Successfully set StrictAffinity to: true",
                                "Successfully set MaxBlocksPerHost to: 4"]
    stored = etcd_server.etcdctl("get", "/calico/ipam/v2/config", "--print-value-only").strip()
    assert json.loads(stored) == {"strict_affinity": True, "auto_allocate_blocks": True,
                                  "maxBlocksPerHost": 4}
    shown = tabbyctl(env, "ipam", "show", "--show-configuration").stdout
    assert [line.split() for line in shown.splitlines()] == [
        ["PROPERTY", "VALUE"], ["StrictAffinity", "true"], ["AutoAllocateBlocks", "true"],
        ["MaxBlocksPerHost", "4"]]

    err = fails(env, etcd_server, "ipam", "configure", "--strictaffinity", "false")
    assert err.startswith("error: maxBlocksPerHost needs strict affinity")
    assert "--strictaffinity" in fails(env, etcd_server, "ipam", "configure", code=2)
    assert "'maybe' is not one of" in fails(env, etcd_server, "ipam", "configure",
                                            "--strictaffinity", "maybe", code=2)
    assert "-1 is not in the range" in fails(env, etcd_server, "ipam", "configure",
                                             "--max-blocks-per-host", "-1", code=2)
    tabbyctl(env, "ipam", "configure", "--strictaffinity", "false", "--max-blocks-per-host", "0")
    stored = etcd_server.etcdctl("get", "/calico/ipam/v2/config", "--print-value-only").strip()
    assert json.loads(stored) == {"auto_allocate_blocks": True}


# ---- gc -------------------------------------------------------------------------------------

def test_gc_releases_only_on_a_second_scan_after_the_grace(
        env: dict[str, str], etcd_server: EtcdServer) -> None:
    owned = allocate(etcd_server, "owned", "web")
    leaked = allocate(etcd_server, "dead", "gone")
    slow = allocate(etcd_server, "slow", "slow")   # its CNI ADD writes the WEP late
    add_wep(env, owned, "owned", "web")

    dry = tabbyctl(env, "ipam", "gc", "--grace", "2s", "--dry-run").stdout
    assert "dry run: nothing written" in dry
    assert "/tabby/ipam/gc/" not in "".join(dump(etcd_server))

    first = tabbyctl(env, "ipam", "gc", "--grace", "2s").stdout
    assert f"seen     {leaked}: no WorkloadEndpoint for pod prod/gone" in first
    assert f"seen     {slow}:" in first and "released 0" in first
    sighting = json.loads(etcd_server.etcdctl("get", f"/tabby/ipam/gc/{leaked}",
                                              "--print-value-only"))
    assert sighting["handle"] == "k8s-pod-network.dead" and "firstSeen" in sighting

    second = tabbyctl(env, "ipam", "gc", "--grace", "2s").stdout
    assert f"waiting  {leaked}:" in second and "released 0" in second
    add_wep(env, slow, "slow", "slow")
    time.sleep(2.2)

    third = tabbyctl(env, "ipam", "gc", "--grace", "2s").stdout
    assert f"released {leaked}: no WorkloadEndpoint for pod prod/gone" in third
    assert "released 1," in third
    assert allocated(etcd_server) == {owned: "k8s-pod-network.owned",
                                      slow: "k8s-pod-network.slow"}
    assert not [k for k in dump(etcd_server) if k.startswith("/tabby/ipam/gc/")]
    assert "--grace" in fails(env, etcd_server, "ipam", "gc", "--grace", "soon", code=2)


def test_gc_rechecks_just_before_release(env: dict[str, str], etcd_server: EtcdServer) -> None:
    """An owner that appears after the scan, or a re-allocation, keeps the address."""
    from ipam.gc import release_allocation

    ip = allocate(etcd_server, "c1", "web")
    block = next(json.loads(v) for k, v in dump(etcd_server).items()
                 if k.startswith("/calico/ipam/v2/assignment/"))
    seq = next(n for o, n in block["sequenceNumberForAllocation"].items()
               if block["allocations"][int(o)] is not None)
    identity: dict[str, Any] = {"ip": ip, "block": block["cidr"],
                                "handle": "k8s-pod-network.c1", "sequenceNumber": seq}
    add_wep(env, ip, "c1", "web")
    why = run(etcd_server, lambda ds: release_allocation(ds, identity))
    assert why == "owned by Workload(prod/node--a-k8s-web-eth0)"
    stale = {**identity, "sequenceNumber": seq - 1}
    why = run(etcd_server, lambda ds: release_allocation(ds, stale, check_owner=False))
    assert why is not None and "re-allocated" in why
    assert allocated(etcd_server) == {ip: "k8s-pod-network.c1"}


# ---- node removal ---------------------------------------------------------------------------

def test_delete_node_releases_its_blocks_and_affinities(env: dict[str, str],
                                                        etcd_server: EtcdServer) -> None:
    keep = allocate(etcd_server, "a1", "web", node="node-a")
    add_wep(env, keep, "a1", "web")
    allocate(etcd_server, "b1", "db", node="node-b")
    allocate(etcd_server, "b2", "api", node="node-b")
    req = AssignRequest(handle_id="ipip-tunnel-addr-node-b", hostname="node-b",
                        attrs={"node": "node-b", "type": "ipipTunnelAddress"},
                        intended_use="Tunnel")
    run(etcd_server, lambda ds: IPAM(ds).auto_assign(req))
    assert any(k.startswith("/calico/ipam/v2/host/node-b/") for k in dump(etcd_server))

    out = tabbyctl(env, "delete", "node", "node-b").stdout.splitlines()
    assert out == ["deleted Node node-b",
                   "released IPAM of node node-b: 3 addresses, its block affinities and "
                   "empty blocks"]
    keys = dump(etcd_server)
    assert not [k for k in keys if k.startswith("/calico/ipam/v2/host/node-b")]
    assert not [v for k, v in keys.items() if k.startswith("/calico/ipam/v2/assignment/")
                and json.loads(v)["affinity"] == "host:node-b"]
    assert allocated(etcd_server) == {keep: "k8s-pod-network.a1"}
    check = tabbyctl(env, "ipam", "check").stdout
    assert "Check complete; found 0 problems." in check

    # a node already gone: its IPAM can be released by name; an existing node is refused
    assert "node node-a still exists" in fails(env, etcd_server, "ipam", "release",
                                               "--node", "node-a")

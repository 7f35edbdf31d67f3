"""The IPAM allocator against a real etcd: concurrency across processes, exhaustion, strict
affinity and borrowing, Calico's key layout, dual stack, specific addresses, reservations,
sequence numbers, node removal and reclaiming empty blocks."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from datastore.etcd import Datastore, Put
from datastore.kinds import kind_for
from datastore.validation import validate
from ipam import keys
from ipam.allocator import IPAM, AssignRequest
from ipam.errors import (
    AddressInUse,
    InvalidRequest,
    NoMatchingPool,
    NotInPool,
    PoolExhausted,
    StaleSequenceNumber,
)
from ipam.records import IPAMConfig
from ipam.state import IPAMState, read_state
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.etcd
T = TypeVar("T")
WORKER = Path(__file__).resolve().parents[1] / "ipam_worker.py"
STRICT = IPAMConfig(strict_affinity=True)


@pytest.fixture
def server(etcd_server: EtcdServer) -> Iterator[EtcdServer]:
    """The module's etcd, emptied of everything Calico before each test."""
    async def wipe(ds: Datastore) -> None:
        kvs, _ = await ds.list("/calico/")
        await asyncio.gather(*(ds.delete(kv.key) for kv in kvs))
    run(etcd_server, wipe)
    yield etcd_server


def run(server: EtcdServer, fn: Callable[[Datastore], Awaitable[T]]) -> T:
    async def go() -> T:
        async with Datastore(server.config()) as ds:
            return await asyncio.wait_for(fn(ds), 60)  # a hang is a failure, not a stuck suite
    return asyncio.run(go())


async def put(ds: Datastore, kind: str, name: str, spec: dict[str, Any],
              labels: dict[str, str] | None = None) -> None:
    meta: dict[str, Any] = {"name": name, **({"labels": labels} if labels else {})}
    obj = validate({"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": meta,
                    "spec": spec})
    await ds.commit([Put(kind_for(kind).key(name), json.dumps(obj).encode())])


async def add_pool(ds: Datastore, name: str, cidr: str, block_size: int, **spec: Any) -> None:
    await put(ds, "IPPool", name, {"cidr": cidr, "blockSize": block_size, **spec})


def req(handle: str, node: str = "node-a", **kw: Any) -> AssignRequest:
    return AssignRequest(handle_id=handle, hostname=node, attrs={"node": node}, **kw)


def check_consistent(state: IPAMState) -> None:
    """Every block covers its ordinals exactly once and every handle matches the blocks."""
    held: dict[str, dict[str, int]] = {}
    for cidr, (block, _) in state.blocks.items():
        used = [o for o, a in enumerate(block.allocations) if a is not None]
        assert sorted(used + block.unallocated) == list(range(len(block.allocations))), cidr
        for _, attr in block.allocated():
            if attr.handle:
                held.setdefault(attr.handle, {}).setdefault(cidr, 0)
                held[attr.handle][cidr] += 1
    assert {h: handle.block for h, (handle, _) in state.handles.items()} == held


# -- 1. three nodes in three processes ---------------------------------------------------------


def test_three_processes_never_hand_out_an_address_twice(server: EtcdServer) -> None:
    run(server, lambda ds: add_pool(ds, "pool", "10.244.0.0/20", 26))
    per_node = 110
    procs = [subprocess.Popen([sys.executable, str(WORKER), server.endpoint, f"node-{n}",
                               str(per_node), "3"], stdout=subprocess.PIPE, text=True)
             for n in range(3)]
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        outs.append(json.loads(out))
    handed = [ip for out in outs for ip in out["ips"].values()]
    assert len(handed) == 3 * per_node
    assert len(set(handed)) == len(handed), "an address was handed out twice"

    state = run(server, read_state)
    check_consistent(state)
    by_handle = {h: ip for out in outs for h, ip in out["ips"].items()}
    assert set(state.handles) == set(by_handle)
    for handle, ip in by_handle.items():
        (cidr, count), = state.handles[handle][0].block.items()
        block = state.blocks[cidr][0]
        assert count == 1 and block.attribute_of(ip).handle == handle
        assert block.host == handle.split(".")[1].rsplit("-", 1)[0]  # from its own node's block

    async def release_all(ds: Datastore) -> list[list[str]]:
        ipam = IPAM(ds)
        return await asyncio.gather(*(ipam.release_by_handle(h) for h in by_handle))
    released = run(server, release_all)
    assert sorted(ip for r in released for ip in r) == sorted(handed)
    state = run(server, read_state)
    assert state.handles == {}
    assert all(b.in_use() == 0 for b, _ in state.blocks.values())
    check_consistent(state)


# -- 2. exhaustion ----------------------------------------------------------------------------


def test_a_pool_too_small_gives_the_exhaustion_error_and_leaves_nothing(
        server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "small", "10.9.0.0/28", 28)
        ipam = IPAM(ds)
        with pytest.raises(PoolExhausted) as e:
            await ipam.auto_assign(req("greedy", num_v4=20))
        assert "pool small (10.9.0.0/28): 0 of 16 addresses in use" in str(e.value)
        for i in range(16):
            await ipam.auto_assign(req(f"h{i}"))
        with pytest.raises(PoolExhausted, match="16 of 16 addresses in use"):
            await ipam.auto_assign(req("one-too-many"))
    run(server, go)
    state = run(server, read_state)
    assert "greedy" not in state.handles and "one-too-many" not in state.handles
    assert sum(b.in_use() for b, _ in state.blocks.values()) == 16
    check_consistent(state)


def test_block_limit_per_host(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "pool", "10.9.0.0/27", 28)
        ipam = IPAM(ds)
        await ipam.set_config(IPAMConfig(strict_affinity=True, max_blocks_per_host=1))
        await ipam.auto_assign(req("first", num_v4=16))
        with pytest.raises(PoolExhausted, match=r"limit \(maxBlocksPerHost 1\)"):
            await ipam.auto_assign(req("second"))
        with pytest.raises(InvalidRequest, match="needs strict affinity"):
            await ipam.set_config(IPAMConfig(max_blocks_per_host=2))
    run(server, go)


# -- 3. strict affinity and borrowing ---------------------------------------------------------


def test_borrowing_happens_only_without_strict_affinity(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "pool", "10.9.0.0/27", 28)  # two blocks of 16
        ipam = IPAM(ds)
        await ipam.set_config(STRICT)
        await ipam.auto_assign(req("a-full", num_v4=16))
        await ipam.auto_assign(req("b-one", node="node-b"))  # node-b claims the other block
        with pytest.raises(PoolExhausted, match="strict affinity is on"):
            await ipam.auto_assign(req("a-17"))
        b_address = ipaddress.ip_address((await ipam.ips_by_handle("b-one"))[0])
        with pytest.raises(InvalidRequest, match="strict affinity is on"):
            await ipam.assign_ip(str(b_address + 1), "a-x", "node-a")
        assert ipam.stats["borrowed"] == 0

        await ipam.set_config(IPAMConfig())
        got = await ipam.auto_assign(req("a-17"))
        assert ipam.stats["borrowed"] == 1
        state = await read_state(ds)
        owner = next(b for b, _ in state.blocks.values() if got.ipv4[0].ip in b.network)
        assert owner.host == "node-b"
        assert owner.attribute_of(got.ipv4[0].ip).secondary == {"node": "node-a"}
        check_consistent(state)
    run(server, go)


# -- 4. Calico's layout as etcdctl shows it ----------------------------------------------------


def test_etcdctl_shows_calicos_layout(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "pool", "10.244.0.0/16", 26)
        ipam = IPAM(ds)
        await ipam.set_config(STRICT)
        await ipam.auto_assign(AssignRequest(
            handle_id="k8s-pod-network.4f1c", hostname="node-a",
            attrs={"node": "node-a", "namespace": "default", "pod": "web-1",
                   "timestamp": "2026-05-01 10:00:00 +0000 UTC"}))
    run(server, go)
    lines = server.etcdctl("get", "/calico/ipam/v2/", "--prefix").splitlines()
    stored = dict(zip(lines[::2], (json.loads(v) for v in lines[1::2]), strict=True))
    block_key = next(k for k in stored if k.startswith("/calico/ipam/v2/assignment/ipv4/block/"))
    cidr = keys.parse_block_key(block_key)
    assert cidr is not None and cidr.endswith("/26")
    affinity_key = f"/calico/ipam/v2/host/node-a/ipv4/block/{cidr.replace('/', '-')}"
    assert set(stored) == {block_key, affinity_key, "/calico/ipam/v2/config",
                           "/calico/ipam/v2/handle/k8s-pod-network.4f1c"}
    block = stored[block_key]
    assert list(block) == ["cidr", "affinity", "affinity_claim_time", "allocations",
                           "unallocated", "attributes", "sequenceNumber",
                           "sequenceNumberForAllocation", "deleted"]
    assert block["affinity"] == "host:node-a" and len(block["allocations"]) == 64
    assert block["attributes"] == [{"handle_id": "k8s-pod-network.4f1c", "secondary": {
        "namespace": "default", "node": "node-a", "pod": "web-1",
        "timestamp": "2026-05-01 10:00:00 +0000 UTC"}}]
    ordinal = block["allocations"].index(0)
    assert block["sequenceNumberForAllocation"] == {str(ordinal): block["sequenceNumber"] - 1}
    assert stored[affinity_key] == {"state": "confirmed", "deleted": False}
    assert stored["/calico/ipam/v2/handle/k8s-pod-network.4f1c"] == {
        "block": {cidr: 1}, "deleted": False}
    assert stored["/calico/ipam/v2/config"] == {"strict_affinity": True,
                                                "auto_allocate_blocks": True}


# -- 5. dual stack ----------------------------------------------------------------------------


def test_dual_stack_in_one_request_all_or_nothing(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "v4", "10.244.0.0/16", 26)
        await add_pool(ds, "v6", "fd00:10:244::/126", 126)  # four addresses
        ipam = IPAM(ds)
        got = await ipam.auto_assign(req("dual", num_v6=1))
        assert str(got.ipv4[0].network.prefixlen) == "26" and got.ipv4[0].ip.version == 4
        assert got.ipv6[0].network.prefixlen == 126 and got.ipv6[0].ip.version == 6
        handle = (await read_state(ds)).handles["dual"][0]
        assert len(handle.block) == 2
        await ipam.auto_assign(req("v6-rest", num_v4=0, num_v6=3))
        with pytest.raises(PoolExhausted, match="no free IPv6 address"):
            await ipam.auto_assign(req("half", num_v6=1))
        state = await read_state(ds)
        assert "half" not in state.handles  # its IPv4 address went back
        assert sum(b.in_use() for c, (b, _) in state.blocks.items() if "." in c) == 1
        check_consistent(state)
    run(server, go)


def test_with_last_ops_commit_with_the_last_address_only(server: EtcdServer) -> None:
    """What the CNI uses to write the WorkloadEndpoint in the allocation's transaction: the ops
    see every address of the request and land at the revision of its last block write."""
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "v4", "10.244.0.0/16", 26)
        await add_pool(ds, "v6", "fd00:10:244::/122", 122)
        seen: list[list[str]] = []

        def extra(addresses: list[Any]) -> list[Put]:
            seen.append([str(a) for a in addresses])
            return [Put("/test/extra", ",".join(map(str, addresses)).encode())]

        got = await IPAM(ds).auto_assign(req("dual", num_v6=1, with_last=extra))
        assert got.with_last_committed and len(seen) == 1  # once: at the IPv6 (last) write
        assert seen[0] == [str(got.ipv4[0]), str(got.ipv6[0])]
        kv = await ds.get("/test/extra")
        assert kv is not None and kv.value.decode() == ",".join(seen[0])
        state = await read_state(ds)
        [(_, v6_rev)] = [v for c, v in state.blocks.items() if ":" in c]
        assert kv.mod_revision == v6_rev
        plain = await IPAM(ds).auto_assign(req("plain"))
        assert not plain.with_last_committed
    run(server, go)


# -- 6. a specific address, reservations, pools by name ----------------------------------------


def test_assign_ip_in_use_and_outside_pools(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "pool", "10.244.0.0/16", 26)
        ipam = IPAM(ds)
        got = await ipam.assign_ip("10.244.7.9", "k8s-pod-network.fixed", "node-a",
                                   {"node": "node-a"})
        assert str(got) == "10.244.7.9/26"
        state = await read_state(ds)
        assert state.blocks["10.244.7.0/26"][0].host == "node-a"  # claimed for the node
        with pytest.raises(AddressInUse, match=r"10\.244\.7\.9 is already in use"):
            await ipam.assign_ip("10.244.7.9", "other", "node-b")
        with pytest.raises(NotInPool, match=r"10\.99\.0\.1 is not in any enabled IP pool"):
            await ipam.assign_ip("10.99.0.1", "other", "node-a")
        # another node may take an address in node-a's block while strict affinity is off
        await ipam.assign_ip("10.244.7.10", "borrower", "node-b", {"node": "node-b"})
        assert await ipam.ips_by_handle("borrower") == ["10.244.7.10"]
        check_consistent(await read_state(ds))
    run(server, go)


def test_reservations_are_never_auto_assigned(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "pool", "10.244.0.0/25", 27)  # four blocks of 32
        await put(ds, "IPReservation", "keep", {"reservedCIDRs": [
            "10.244.0.0/27", "10.244.0.32/28", "10.244.0.64/32"]})
        ipam = IPAM(ds)
        got = await ipam.auto_assign(req("many", num_v4=16 + 31 + 32))
        handed = {i.ip for i in got.ipv4}
        reserved = [ipaddress.ip_network(c) for c in
                    ("10.244.0.0/27", "10.244.0.32/28", "10.244.0.64/32")]
        assert not any(a in n for a in handed for n in reserved)
        state = await read_state(ds)
        assert "10.244.0.0/27" not in state.blocks  # wholly reserved: never claimed
        with pytest.raises(PoolExhausted, match="reserved"):
            await ipam.auto_assign(req("more"))
        # asked for by name, a reserved address is handed out (that is what it is kept for)
        await ipam.assign_ip("10.244.0.64", "router", "node-a")
    run(server, go)


def test_pools_by_name_and_selectors(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "rack-b", "10.20.0.0/24", 26, nodeSelector="rack == 'b'")
        await add_pool(ds, "manual", "10.30.0.0/24", 26, assignmentMode="Manual")
        await put(ds, "Node", "node-b", {}, labels={"rack": "b"})
        ipam = IPAM(ds)
        with pytest.raises(NoMatchingPool, match="nodeSelector"):
            await ipam.auto_assign(req("a"))
        got = await ipam.auto_assign(req("b", node="node-b"))
        assert got.ipv4[0].ip in ipaddress.ip_network("10.20.0.0/24")
        got = await ipam.auto_assign(req("m", ipv4_pools=["manual"]))
        assert got.ipv4[0].ip in ipaddress.ip_network("10.30.0.0/24")
        got = await ipam.auto_assign(req("c", ipv4_pools=["10.30.0.0/24"]))
        assert got.ipv4[0].ip in ipaddress.ip_network("10.30.0.0/24")
    run(server, go)


# -- 7. release by address with sequence numbers -----------------------------------------------


def test_release_with_a_stale_sequence_number_is_refused(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "pool", "10.244.0.0/16", 26)
        ipam = IPAM(ds)
        ip = str((await ipam.auto_assign(req("h1"))).ipv4[0].ip)
        block = next(b for b, _ in (await read_state(ds)).blocks.values())
        seq = block.sequence_number_for_allocation[str(block.ordinal(ip))]
        with pytest.raises(StaleSequenceNumber, match="changed hands"):
            await ipam.release_ips([ip], sequence_numbers={ip: seq - 1})
        assert await ipam.ips_by_handle("h1") == [ip]
        assert await ipam.release_ips([ip, "10.244.99.99"], sequence_numbers={ip: seq}) == [
            "10.244.99.99"]
        assert await ipam.ips_by_handle("h1") == []
        assert await ipam.release_ips([ip]) == [ip]
        assert await ipam.release_by_handle("h1") == []
        state = await read_state(ds)
        assert state.handles == {}
        check_consistent(state)
    run(server, go)


def test_release_by_handle_tolerates_a_missing_block(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "pool", "10.244.0.0/16", 26)
        ipam = IPAM(ds)
        got = await ipam.auto_assign(req("h1"))
        cidr = str(got.ipv4[0].network)
        await ds.delete(keys.block_key(cidr))
        assert await ipam.release_by_handle("h1") == []
        assert (await read_state(ds)).handles == {}
        assert await ipam.release_by_handle("never-existed") == []
    run(server, go)


# -- 8. node removal --------------------------------------------------------------------------


def test_release_host_frees_a_removed_nodes_addresses_affinities_and_blocks(
        server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "pool", "10.244.0.0/16", 26)
        await ds.put(keys.ipam_host_key("node-a"), b"{}")
        ipam = IPAM(ds)
        a = await ipam.auto_assign(req("pod-a", num_v4=3))
        a_block = str(a.ipv4[0].network)
        tunnel = await ipam.auto_assign(AssignRequest("ipip-tunnel-addr-node-a", "node-a",
                                                      attrs={"type": "ipipTunnelAddress"}))
        borrowed = str(ipaddress.ip_network(a_block)[40])
        await ipam.assign_ip(borrowed, "pod-b1", "node-b", {"node": "node-b"})
        b = await ipam.auto_assign(req("pod-b2", node="node-b"))
        await ipam.assign_ip("10.244.200.1", "stray-a", "node-a", {"node": "node-a"})
        released = await ipam.release_host("node-a")
        expected = [str(i.ip) for i in a.ipv4 + tunnel.ipv4] + ["10.244.200.1"]
        assert sorted(released) == sorted(expected)

        state = await read_state(ds)
        assert not [k for k in state.affinities if k[0] == "node-a"]
        assert state.blocks[a_block][0].host is None  # kept for node-b's pod, unaffine
        assert state.blocks[a_block][0].in_use() == 1
        assert "10.244.200.0/26" not in state.blocks  # emptied: deleted
        assert set(state.handles) == {"pod-b1", "pod-b2"}
        assert await ipam.ips_by_handle("pod-b2") == [str(b.ipv4[0].ip)]
        assert await ds.get(keys.ipam_host_key("node-a")) is None
        check_consistent(state)
    run(server, go)


# -- 9. reclaiming another host's empty block --------------------------------------------------


def test_an_empty_block_of_another_host_is_reclaimed_after_a_minute(server: EtcdServer) -> None:
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "one-block", "10.9.0.0/26", 26)
        await IPAM(ds).set_config(STRICT)
        a = IPAM(ds)
        await a.auto_assign(req("a1"))
        await a.release_by_handle("a1")  # empty, still affine to node-a
        with pytest.raises(PoolExhausted):
            await IPAM(ds).auto_assign(req("b1", node="node-b"))
        later = IPAM(ds, clock=lambda: a._clock() + 61)
        got = await later.auto_assign(req("b1", node="node-b"))
        assert got.ipv4[0].ip in ipaddress.ip_network("10.9.0.0/26")
        state = await read_state(ds)
        assert state.blocks["10.9.0.0/26"][0].host == "node-b"
        assert set(state.affinities) == {("node-b", "10.9.0.0/26")}
        check_consistent(state)
    run(server, go)


# -- reads made in one request (datastore.reads) and handed to auto_assign -----------------


def test_read_batch_gets_and_lists_at_one_revision(server: EtcdServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from datastore import etcd as etcd_module
    from datastore.reads import ReadBatch

    monkeypatch.setattr(etcd_module, "LIST_PAGE", 2)  # a listing longer than a page is finished

    async def go(ds: Datastore) -> None:
        for i in range(5):
            await ds.commit([Put(f"/calico/test/list/{i}", str(i).encode())])
        await ds.commit([Put("/calico/test/one", b"1")])
        result = await ReadBatch(gets=["/calico/test/one", "/calico/test/none"],
                                       lists=["/calico/test/list/", "/calico/test/empty/"]).run(ds)
        kv = result.get("/calico/test/one")
        assert kv is not None and kv.value == b"1"
        assert result.get("/calico/test/none") is None
        assert [kv.value for kv in result.list("/calico/test/list/")] == [
            str(i).encode() for i in range(5)]
        assert result.list("/calico/test/empty/") == []
        assert result.revision == await ds.revision()
    run(server, go)


def test_prefetched_block_that_changed_meanwhile_is_read_again(server: EtcdServer) -> None:
    """auto_assign with reads made earlier: a block written since fails the CAS, is read again
    and the addresses stay distinct."""
    from datastore.reads import ReadBatch

    async def go(ds: Datastore) -> None:
        await add_pool(ds, "p", "10.244.0.0/24", 26)
        ipam = IPAM(ds)
        first = await ipam.auto_assign(req("h1"))  # claims the block, remembered as the hint
        batch = ReadBatch()
        ipam.queue_assign_reads(batch, "node-a", "h3")
        prefetched = ipam.assign_reads(await batch.run(ds), "node-a", "h3")
        assert list(prefetched.blocks) == [str(first.ipv4[0].network)]
        second = await IPAM(ds).auto_assign(req("h2"))  # another writer moves the block on
        third = await ipam.auto_assign(req("h3"), prefetched=prefetched)
        got = {first.ipv4[0].ip, second.ipv4[0].ip, third.ipv4[0].ip}
        assert len(got) == 3
        assert ipam.stats["cas_conflicts"] == 1
        check_consistent(await read_state(ds))
    run(server, go)


def test_one_allocator_queues_a_hosts_requests_instead_of_racing_them(
        server: EtcdServer) -> None:
    """tabby-node's case: many ADDs of one node at once through one allocator. Each waits for
    the one before it on the node's block (assignments of a host, and every write of a block,
    one at a time), so etcd refuses none of them and none reads again; the same for the DELs.
    A block prefetched before the wait is taken as this allocator wrote it since."""
    from datastore.reads import ReadBatch

    async def go(ds: Datastore) -> None:
        await add_pool(ds, "p", "10.244.0.0/24", 26)
        ipam = IPAM(ds)
        await ipam.auto_assign(req("first"))  # the block exists and is the read hint
        batch = ReadBatch()
        ipam.queue_assign_reads(batch, "node-a", "late")
        prefetched = ipam.assign_reads(await batch.run(ds), "node-a", "late")
        handles = [f"h{i}" for i in range(70)]  # more than one /26: a second block is claimed
        got = await asyncio.gather(*(ipam.auto_assign(req(h)) for h in handles),
                                   ipam.auto_assign(req("late"), prefetched=prefetched))
        addresses = [g.ipv4[0].ip for g in got]
        assert len(set(addresses)) == len(addresses) == 71
        assert len({a.network for g in got for a in g.ipv4}) == 2
        assert ipam.stats["cas_conflicts"] == 0
        released = await asyncio.gather(*(ipam.release_by_handle(h) for h in handles))
        assert sorted(ip for r in released for ip in r) == sorted(
            str(a) for a in addresses[:-1])
        assert ipam.stats["cas_conflicts"] == 0
        state = await read_state(ds)
        check_consistent(state)
        assert set(state.handles) == {"first", "late"}
    run(server, go)


def test_while_last_commits_sees_the_addresses_in_flight_and_again_after_a_refusal(
        server: EtcdServer) -> None:
    """The CNI plumbs the pod while etcd commits: the hook runs once the last transaction is
    sent, with every address; a refused transaction's retry calls it again with what the
    retry took, which is what is returned."""
    from datastore.reads import ReadBatch

    async def go(ds: Datastore) -> None:
        await add_pool(ds, "p", "10.244.0.0/24", 26)
        ipam = IPAM(ds)
        first = await ipam.auto_assign(req("h1"))
        calls: list[list[str]] = []

        def extra(addresses: list[Any]) -> list[Put]:
            return [Put("/test/endpoint", ",".join(map(str, addresses)).encode())]

        def meanwhile(addresses: list[Any]) -> None:
            calls.append([str(a) for a in addresses])

        batch = ReadBatch()
        ipam.queue_assign_reads(batch, "node-a", "h3")
        prefetched = ipam.assign_reads(await batch.run(ds), "node-a", "h3")
        await IPAM(ds).auto_assign(req("h2"))  # moves the prefetched block on: one refusal
        got = await ipam.auto_assign(req("h3", with_last=extra, while_last_commits=meanwhile),
                                     prefetched=prefetched)
        assert ipam.stats["cas_conflicts"] == 1
        assert len(calls) == 2 and calls[0] != calls[1]
        assert calls[1] == [str(got.ipv4[0])] and got.with_last_committed
        assert first.ipv4[0].ip != got.ipv4[0].ip
        kv = await ds.get("/test/endpoint")
        assert kv is not None and kv.value.decode() == str(got.ipv4[0])
        check_consistent(await read_state(ds))
    run(server, go)


def test_remembered_inputs_are_not_retried_but_reported(server: EtcdServer) -> None:
    """Prefetched.remembered (tabby-node's watched copies): a refused write raises
    InputsChanged, with everything the request took given back, instead of a retry."""
    from dataclasses import replace

    from datastore.reads import ReadBatch
    from ipam.errors import InputsChanged

    async def go(ds: Datastore) -> None:
        await add_pool(ds, "p", "10.244.0.0/24", 26)
        ipam = IPAM(ds)
        await ipam.auto_assign(req("h1"))
        batch = ReadBatch()
        ipam.queue_assign_reads(batch, "node-a", "h3")
        prefetched = ipam.assign_reads(await batch.run(ds), "node-a", "h3")
        await IPAM(ds).auto_assign(req("h2"))  # the remembered block is out of date now
        with pytest.raises(InputsChanged):
            await ipam.auto_assign(req("h3"), prefetched=replace(prefetched, remembered=True))
        state = await read_state(ds)
        assert "h3" not in state.handles
        check_consistent(state)
        got = await ipam.auto_assign(req("h3"))  # read for real: fine
        assert got.ipv4
    run(server, go)


def test_a_pool_added_is_used_by_the_next_assignment(server: EtcdServer) -> None:
    """Nothing of the pools is kept between requests: a new pool (and a disabled old one) is
    seen by the very next auto_assign of the same allocator."""
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "a", "10.244.0.0/24", 26)
        ipam = IPAM(ds)
        got = await ipam.auto_assign(req("h1"))
        assert got.ipv4[0].ip in ipaddress.ip_network("10.244.0.0/24")
        await add_pool(ds, "a", "10.244.0.0/24", 26, disabled=True)
        await add_pool(ds, "b", "10.245.0.0/24", 26)
        got = await ipam.auto_assign(req("h2"))
        assert got.ipv4[0].ip in ipaddress.ip_network("10.245.0.0/24")
    run(server, go)


def test_deleted_pool_releases_its_empty_blocks_only(server: EtcdServer) -> None:
    """Calico's IPPool delete gives up the pool's empty blocks; a block with a live address
    keeps its affinity (its pod still needs the route), and other pools are untouched."""
    async def go(ds: Datastore) -> None:
        await add_pool(ds, "gone", "10.9.0.0/24", 28)
        await add_pool(ds, "kept", "10.8.0.0/24", 28)
        ipam = IPAM(ds)
        a = await ipam.auto_assign(req("a", "node-a", ipv4_pools=["10.9.0.0/24"]))
        await ipam.auto_assign(req("b", "node-b", ipv4_pools=["10.9.0.0/24"]))
        await ipam.auto_assign(req("c", "node-a", ipv4_pools=["10.8.0.0/24"]))
        await ipam.release_by_handle("a")
        released = await ipam.release_pool_affinities("10.9.0.0/24")
        assert released == [("node-a", str(a.ipv4[0].network))]
        state = await read_state(ds)
        hosts = {cidr: block.host for cidr, (block, _) in state.blocks.items()}
        assert str(a.ipv4[0].network) not in hosts  # empty: the block itself is gone
        assert sorted(hosts.values()) == ["node-a", "node-b"]  # b's block and the other pool
        assert await ipam.release_pool_affinities("10.9.0.0/24") == []
    run(server, go)

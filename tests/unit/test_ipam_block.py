"""The pure IPAM values: block math, affinity/handle/config records, keys and Go-style JSON."""

from __future__ import annotations

import ipaddress
import json

import pytest

from datastore.etcd import KV
from ipam import keys
from ipam.block import WINDOWS_RESERVED_HANDLE, Attribute, Block
from ipam.errors import AddressInUse, AddressNotAllocated, InvalidRequest, StaleSequenceNumber
from ipam.records import Affinity, Handle, IPAMConfig, decode, encode
from ipam.state import parse_state

NOW = 1_777_777_777_000_000_000
NODE = {"node": "node-a"}


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def block(cidr: str = "10.65.12.0/29") -> Block:
    return Block.new(cidr, "node-a", NOW)


def roundtrip(b: Block) -> Block:
    return Block.from_json(json.loads(encode(b.to_json())))


# -- a new block --------------------------------------------------------------------------------


def test_new_block_is_empty_and_affine() -> None:
    b = block("10.65.12.0/26")
    assert b.allocations == [None] * 64
    assert b.unallocated == list(range(64))
    assert b.sequence_number == NOW
    assert b.affinity == "host:node-a" and b.host == "node-a"
    assert b.affinity_claim_time == "2026-05-03T03:09:37Z"
    assert b.is_empty() and b.free_count() == 64 and b.in_use() == 0


def test_new_block_json_is_what_calico_writes() -> None:
    b = Block.new("10.65.12.0/30", "node-a", NOW)
    assert encode(b.to_json()) == (
        b'{"cidr":"10.65.12.0/30","affinity":"host:node-a",'
        b'"affinity_claim_time":"2026-05-03T03:09:37Z","allocations":[null,null,null,null],'
        b'"unallocated":[0,1,2,3],"attributes":null,"sequenceNumber":1777777777000000000,'
        b'"sequenceNumberForAllocation":{},"deleted":false}')


def test_unaffine_block_has_null_affinity_and_no_claim_time() -> None:
    data = Block.new("10.65.12.0/30", None, NOW).to_json()
    assert data["affinity"] is None and "affinity_claim_time" not in data


# -- assigning --------------------------------------------------------------------------------


def test_assign_pops_the_free_list_and_stamps_sequence_numbers() -> None:
    b = block()
    got = b.assign(2, "h1", NODE)
    assert got == [ip("10.65.12.0"), ip("10.65.12.1")]  # the network address is handed out too
    assert b.unallocated == [2, 3, 4, 5, 6, 7]
    assert b.allocations[:3] == [0, 0, None]
    assert b.sequence_number_for_allocation == {"0": NOW, "1": NOW}
    assert b.attributes == [Attribute("h1", NODE)]


def test_equal_attributes_are_shared_and_different_ones_added() -> None:
    b = block()
    b.assign(1, "h1", NODE)
    b.assign(1, "h1", NODE)
    b.assign(1, "h2", NODE)
    b.assign(1, "h1", {"node": "node-b"})
    assert b.allocations[:4] == [0, 0, 1, 2]
    assert len(b.attributes) == 3


def test_assign_takes_what_there_is_when_short() -> None:
    b = block("10.65.12.0/30")
    assert len(b.assign(10, "h", NODE)) == 4
    assert b.unallocated == [] and b.free_count() == 0
    assert b.assign(1, "h", NODE) == []


def test_reserved_addresses_are_skipped_and_keep_their_place() -> None:
    b = block()
    reserved = [ipaddress.ip_network("10.65.12.0/31"), ipaddress.ip_network("10.65.12.5/32")]
    assert b.free_count(reserved) == 5
    got = b.assign(4, "h", NODE, reserved)
    assert got == [ip("10.65.12.2"), ip("10.65.12.3"), ip("10.65.12.4"), ip("10.65.12.6")]
    assert b.unallocated == [0, 1, 5, 7]
    assert b.free_count(reserved) == 1
    # reservations of the other family or elsewhere do not matter
    assert b.free_count([ipaddress.ip_network("fd00::/120"),
                         ipaddress.ip_network("10.0.0.0/24")]) == 4


def test_assign_ip_takes_that_address_or_says_who_holds_it() -> None:
    b = block()
    b.assign_ip("10.65.12.5", "h1", NODE)
    assert b.allocations[5] == 0 and 5 not in b.unallocated
    assert b.sequence_number_for_allocation == {"5": NOW}
    with pytest.raises(AddressInUse, match=r"10\.65\.12\.5 is already in use \(handle h1\)"):
        b.assign_ip("10.65.12.5", "h2", NODE)
    with pytest.raises(InvalidRequest, match="not in block"):
        b.assign_ip("10.65.13.1", "h2", NODE)


# -- releasing --------------------------------------------------------------------------------


def test_release_returns_ordinals_to_the_tail_and_counts_per_handle() -> None:
    b = block()
    b.assign(2, "h1", NODE)
    b.assign(1, "h2", NODE)
    counts = b.release(["10.65.12.1", "10.65.12.0", "10.65.12.2", "10.65.12.7"])
    assert counts == {"h1": 2, "h2": 1}  # .7 was free: passed over
    assert b.unallocated == [3, 4, 5, 6, 7, 0, 1, 2]  # longest free first
    assert b.attributes == [] and b.sequence_number_for_allocation == {}
    assert b.assign(1, "h3", NODE) == [ip("10.65.12.3")]


def test_release_prunes_attributes_and_renumbers_allocations() -> None:
    b = block()
    b.assign(1, "h1", NODE)
    b.assign(1, "h2", NODE)
    b.assign(1, "h3", NODE)
    b.release(["10.65.12.0"])
    assert [a.handle_id for a in b.attributes] == ["h2", "h3"]
    assert b.allocations[:3] == [None, 0, 1]


def test_release_with_a_stale_sequence_number_changes_nothing() -> None:
    b = block()
    b.assign(1, "h1", NODE)
    b.sequence_number += 1  # the write that stored the allocation
    b.release(["10.65.12.0"])
    b.sequence_number += 1
    b.assign(1, "h2", NODE)  # .1 now; then .0 again later is someone else's
    before = b.to_json()
    with pytest.raises(StaleSequenceNumber, match=r"10\.65\.12\.1 was not released"):
        b.release(["10.65.12.1"], {"10.65.12.1": NOW})
    assert b.to_json() == before
    assert b.release(["10.65.12.1"], {"10.65.12.1": NOW + 2}) == {"h2": 1}


def test_release_and_list_by_handle() -> None:
    b = block()
    b.assign(2, "k8s-pod-network.c1", NODE)
    b.assign(1, "other", NODE)
    b.assign_ip("10.65.12.6", "k8s-pod-network.c1\r\n", NODE)  # a malformed stored handle
    assert b.ips_for_handle("k8s-pod-network.c1") == [ip("10.65.12.0"), ip("10.65.12.1"),
                                                      ip("10.65.12.6")]
    assert b.release_handle("k8s-pod-network.c1") == 3
    assert b.ips_for_handle("k8s-pod-network.c1") == []
    assert b.in_use() == 1 and not b.is_empty()
    assert b.release_handle("nobody") == 0


def test_windows_reserved_addresses_do_not_make_a_block_busy() -> None:
    b = block()
    b.assign(3, WINDOWS_RESERVED_HANDLE, {"note": "windows"})
    assert b.is_empty() and b.in_use() == 3


def test_attribute_of_and_allocated() -> None:
    b = block()
    b.assign(1, "h1", NODE)
    assert b.attribute_of("10.65.12.0") == Attribute("h1", NODE)
    assert b.allocated() == [(ip("10.65.12.0"), Attribute("h1", NODE))]
    with pytest.raises(AddressNotAllocated):
        b.attribute_of("10.65.12.1")


def test_ipv6_block_ordinals() -> None:
    b = Block.new("fd00:10:244::/122", "node-a", NOW)
    assert len(b.allocations) == 64
    assert b.ordinal("fd00:10:244::3f") == 63
    assert b.address(63) == ip("fd00:10:244::3f")
    assert str(b.interface(1)) == "fd00:10:244::1/122"
    with pytest.raises(InvalidRequest):
        b.ordinal("10.65.12.1")
    assert keys.block_key(b.cidr) == "/calico/ipam/v2/assignment/ipv6/block/fd00:10:244::-122"


# -- JSON -------------------------------------------------------------------------------------


CALICO_BLOCK = {
    "cidr": "10.65.12.0/30", "affinity": "host:node-a",
    "affinity_claim_time": "2026-05-01T10:00:00Z",
    "allocations": [0, None, 1, None], "unallocated": [3, 1],
    "attributes": [
        {"handle_id": "k8s-pod-network.4f1c", "secondary": {"node": "node-a", "pod": "web-1"}},
        {"handle_id": "ipip-tunnel-addr-node-a",
         "secondary": {"node": "node-a", "type": "ipipTunnelAddress"},
         "alternateOwnerAttrs": {"pod": "web-0"}}],
    "sequenceNumber": 1777777777000000002,
    "sequenceNumberForAllocation": {"0": 1777777777000000000, "2": 1777777777000000001},
    "deleted": False,
    "hostAffinity": "node-a",
    "someFutureField": {"x": 1},
}


def test_calico_block_round_trips_with_unknown_fields() -> None:
    b = Block.from_json(CALICO_BLOCK)
    assert b.to_json() == CALICO_BLOCK
    assert list(b.to_json()) == list(CALICO_BLOCK)
    assert b.attributes[1].extra == {"alternateOwnerAttrs": {"pod": "web-0"}}
    assert b.claim_time() == 1777629600.0


def test_emptied_block_writes_attributes_as_an_empty_list() -> None:
    b = block()
    b.assign(1, "h", NODE)
    b.release(["10.65.12.0"])
    assert roundtrip(b).to_json()["attributes"] == []
    assert Block.from_json({**block().to_json(), "attributes": None}).to_json()[
        "attributes"] is None


def test_sequence_map_and_secondary_keys_are_sorted_as_go_does() -> None:
    b = Block.new("10.65.12.0/28", "n", NOW)
    b.assign(12, "h", {"pod": "p", "node": "n", "namespace": "ns"})
    text = encode(b.to_json()).decode()
    assert '"secondary":{"namespace":"ns","node":"n","pod":"p"}' in text
    assert '"sequenceNumberForAllocation":{"0":' in text
    order = list(json.loads(text)["sequenceNumberForAllocation"])
    assert order == sorted(order) and order[2] == "10"


def test_encode_escapes_like_go() -> None:
    assert encode({"a": "<b>&\u2028é"}) == b'{"a":"\\u003cb\\u003e\\u0026\\u2028\xc3\xa9"}'


# -- records ----------------------------------------------------------------------------------


def test_affinity_states_and_old_empty_values() -> None:
    assert Affinity.from_json(decode(b"")) == Affinity("confirmed")
    assert Affinity.from_json({"state": "pending", "deleted": False}).confirmed is False
    assert encode(Affinity("pendingDeletion").to_json()) == (
        b'{"state":"pendingDeletion","deleted":false}')
    with pytest.raises(ValueError):
        Affinity.from_json({"state": "bogus"})


def test_handle_counts() -> None:
    h = Handle.from_json({"block": {"10.65.12.0/26": 1}, "deleted": False})
    h = h.adjusted("10.65.0.0/26", 2).adjusted("10.65.12.0/26", -1)
    assert encode(h.to_json()) == b'{"block":{"10.65.0.0/26":2},"deleted":false}'
    assert h.total() == 2 and not h.is_empty()
    assert h.without("10.65.0.0/26").is_empty()
    assert Handle.from_json({"block": None}).is_empty()


def test_config_json_follows_go_omitempty() -> None:
    assert encode(IPAMConfig().to_json()) == b'{"auto_allocate_blocks":true}'
    strict = IPAMConfig(strict_affinity=True, max_blocks_per_host=4)
    assert encode(strict.to_json()) == (
        b'{"strict_affinity":true,"auto_allocate_blocks":true,"maxBlocksPerHost":4}')
    # a stored object that leaves a field out means Go's zero value
    assert IPAMConfig.from_json({"strict_affinity": True}) == IPAMConfig(True, False, 0)
    kept = IPAMConfig.from_json({"auto_allocate_blocks": True, "ipCooldownSeconds": 30})
    assert kept.to_json() == {"auto_allocate_blocks": True, "ipCooldownSeconds": 30}
    assert IPAMConfig().effective_max_blocks == 20 and strict.effective_max_blocks == 4


@pytest.mark.parametrize(("config", "message"), [
    (IPAMConfig(False, False), "cannot both be off"),
    (IPAMConfig(False, True, 3), "needs strict affinity"),
    (IPAMConfig(True, True, -1), "must be 0"),
])
def test_config_rules(config: IPAMConfig, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        config.check()
    IPAMConfig(True, True, 3).check()


# -- keys -------------------------------------------------------------------------------------


def test_keys_follow_calicos_layout() -> None:
    assert keys.block_key("10.244.1.0/26") == "/calico/ipam/v2/assignment/ipv4/block/10.244.1.0-26"
    assert keys.affinity_key("node-a", "10.244.1.0/26") == (
        "/calico/ipam/v2/host/node-a/ipv4/block/10.244.1.0-26")
    assert keys.handle_key("k8s-pod-network.abc") == "/calico/ipam/v2/handle/k8s-pod-network.abc"
    assert keys.parse_block_key("/calico/ipam/v2/assignment/ipv6/block/fd00::-122") == (
        "fd00::/122")
    assert keys.parse_affinity_key("/calico/ipam/v2/host/node-a/ipv4/block/10.244.1.0-26") == (
        "node-a", "10.244.1.0/26")
    assert keys.parse_affinity_key("/calico/ipam/v2/host/node-a") is None
    assert keys.parse_handle_key("/calico/ipam/v2/handle/h.1") == "h.1"
    assert keys.parse_block_key("/calico/ipam/v2/config") is None


def test_state_groups_ipam_keys_and_skips_deleted_and_unreadable() -> None:
    b = block()
    rows = [
        KV(keys.block_key(b.cidr), encode(b.to_json()), 5, 5, 1),
        KV(keys.block_key("10.65.13.0/29"), encode({**b.to_json(), "cidr": "10.65.13.0/29",
                                                    "deleted": True}), 6, 6, 1),
        KV(keys.affinity_key("node-a", b.cidr), b"", 7, 7, 1),
        KV(keys.ipam_host_key("node-a"), b"{}", 8, 8, 1),
        KV(keys.handle_key("h"), b'{"block":{"10.65.12.0/29":1},"deleted":false}', 9, 9, 1),
        KV(keys.handle_key("bad"), b"not json", 10, 10, 1),
        KV(keys.CONFIG_KEY, b'{"strict_affinity":true,"auto_allocate_blocks":true}', 11, 11, 1),
    ]
    state = parse_state(rows, 12)
    assert list(state.blocks) == ["10.65.12.0/29"] and state.blocks["10.65.12.0/29"][1] == 5
    assert state.affinities == {("node-a", "10.65.12.0/29"): (Affinity("confirmed"), 7)}
    assert list(state.handles) == ["h"]
    assert state.config.strict_affinity and state.revision == 12

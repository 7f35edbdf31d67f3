"""Pool selection, the per-host block walk, reservations and the block search (pure)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ipam.block import Block
from ipam.errors import InvalidRequest, NoMatchingPool
from ipam.pools import (
    Pool,
    Reservations,
    block_walk,
    describe_usage,
    find_usable_block,
    fnv32,
    in_walk_order,
    select_pools,
    walk_start,
)

NOW = 1_777_777_777.0


def pool(name: str, cidr: str, **spec: Any) -> Pool:
    return Pool.from_resource({"metadata": {"name": name}, "spec": {"cidr": cidr, **spec}})


def net(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr)


def names(pools: list[Pool]) -> list[str]:
    return [p.name for p in pools]


POOLS = [
    pool("b-default", "10.244.0.0/16"),
    pool("a-rack1", "10.10.0.0/24", nodeSelector="rack == 'one'"),
    pool("c-off", "10.11.0.0/24", disabled=True),
    pool("d-manual", "10.12.0.0/24", assignmentMode="Manual"),
    pool("e-prod", "10.13.0.0/24", namespaceSelector="env == 'prod'"),
    pool("f-lb", "10.14.0.0/24", allowedUses=["LoadBalancer"]),
    pool("g-tunnel", "10.15.0.0/24", allowedUses=["Tunnel"]),
    pool("v6", "fd00:10:244::/48"),
]


def test_pool_defaults_follow_calico() -> None:
    p = pool("x", "10.0.0.0/16")
    assert (p.block_size, p.disabled, p.allowed_uses, p.assignment_mode) == (
        26, False, ("Workload", "Tunnel"), "Automatic")
    assert pool("y", "fd00::/48").block_size == 122
    assert p.num_blocks == 1024
    assert p.block_at(1) == net("10.0.0.64/26")
    assert p.block_of(ipaddress.ip_address("10.0.3.77")) == net("10.0.3.64/26")
    assert p.index_of(net("10.0.3.64/26")) == 13
    assert p.contains(net("10.0.3.64/26")) and not p.contains(net("fd00::/122"))


def test_automatic_selection_by_labels_mode_and_use() -> None:
    plain = select_pools(POOLS, 4, [], "node-a", {}, {})
    assert names(plain) == ["b-default"]
    rack = select_pools(POOLS, 4, [], "node-a", {"rack": "one"}, {"env": "prod"})
    assert names(rack) == ["a-rack1", "b-default", "e-prod"]  # by name, as Calico sorts them
    assert names(select_pools(POOLS, 4, [], "n", {}, {}, "Tunnel")) == ["b-default", "g-tunnel"]
    assert names(select_pools(POOLS, 4, [], "n", {}, {}, "LoadBalancer")) == ["f-lb"]
    assert names(select_pools(POOLS, 6, [], "n", {}, {})) == ["v6"]


def test_requested_pools_by_name_or_cidr_ignore_selectors_and_mode() -> None:
    got = select_pools(POOLS, 4, ["d-manual", "10.10.0.0/24", "d-manual"], "n", {}, {})
    assert names(got) == ["d-manual", "a-rack1"]


@pytest.mark.parametrize(("requested", "error", "message"), [
    (["nope"], NoMatchingPool, "requested pool 'nope' does not exist"),
    (["10.99.0.0/16"], NoMatchingPool, "does not exist"),
    (["c-off"], NoMatchingPool, r"c-off \(10.11.0.0/24\) is disabled"),
    (["v6"], InvalidRequest, "is IPv6, but was given as an IPv4 pool"),
    (["f-lb"], NoMatchingPool, "exclude Workload"),
])
def test_bad_requested_pools(requested: list[str], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        select_pools(POOLS, 4, requested, "node-a", {}, {})


def test_no_matching_pool_says_why_for_each_pool() -> None:
    only_selective = [POOLS[1], POOLS[2], POOLS[4]]
    with pytest.raises(NoMatchingPool) as e:
        select_pools(only_selective, 4, [], "node-a", {"rack": "two"}, {})
    text = str(e.value)
    assert text.startswith("no IPv4 pool can be used for Workload on node node-a: ")
    assert "a-rack1 (10.10.0.0/24): nodeSelector \"rack == 'one'\" does not match" in text
    assert "c-off (10.11.0.0/24): disabled" in text
    assert "namespaceSelector" in text
    with pytest.raises(NoMatchingPool, match="no IPv6 pool exists for node node-a"):
        select_pools(only_selective, 6, [], "node-a", {}, {})


# -- the walk ---------------------------------------------------------------------------------


def test_fnv32_is_go_fnv1() -> None:
    assert fnv32(b"") == 0x811C9DC5
    assert fnv32(b"a") == 0x050C5D7E
    assert fnv32(b"foobar") == 0x31F0B262


def test_walk_visits_every_block_once_from_a_per_host_start() -> None:
    p = pool("p", "10.244.0.0/20")
    walk = list(block_walk(p, "node-a"))
    assert len(walk) == 64 and len(set(walk)) == 64
    assert walk == list(block_walk(p, "node-a"))  # deterministic per host
    start = walk_start(p, "node-a")
    assert walk[0] == p.block_at(start) and walk[64 - start] == p.block_at(0)  # wraps once
    starts = {walk_start(p, f"node-{i}") for i in range(10)}
    assert len(starts) > 5  # hosts start in different places


def test_in_walk_order_sorts_existing_blocks_as_the_walk_meets_them() -> None:
    p = pool("p", "10.244.0.0/20")
    walk = list(block_walk(p, "node-b"))
    some = [walk[40], walk[3], walk[17]]
    assert in_walk_order(p, "node-b", some) == [walk[3], walk[17], walk[40]]


# -- reservations -----------------------------------------------------------------------------


def test_reservations_cover_whole_blocks_or_parts() -> None:
    r = Reservations.from_resources([
        {"spec": {"reservedCIDRs": ["10.0.0.0/25", "10.0.1.0/27", "10.0.1.32/27",
                                    "10.0.1.0/28", "10.0.2.5/32"]}},
        {"spec": {}},
    ])
    assert r.covers(net("10.0.0.64/26"))  # inside one bigger reservation
    assert r.covers(net("10.0.1.0/26"))  # two halves (and a duplicate inside one)
    assert not r.covers(net("10.0.2.0/26"))  # one address only
    assert not r.covers(net("fd00::/122"))
    assert r.matches(ipaddress.ip_address("10.0.2.5"))
    assert not r.matches(ipaddress.ip_address("10.0.2.6"))


# -- finding a block --------------------------------------------------------------------------


def _blocks(*items: Block) -> dict[str, Block]:
    return {b.cidr: b for b in items}


def test_search_prefers_a_free_cidr_on_the_hosts_walk() -> None:
    p = pool("p", "10.244.0.0/24")
    first = next(block_walk(p, "node-a"))
    found = find_usable_block([p], "node-a", {}, Reservations(), NOW)
    assert found.cidr == str(first)
    taken = Block.new(first, "node-b", int(NOW * 1e9))
    taken.assign(1, "h", {})
    second = list(block_walk(p, "node-a"))[1]
    assert find_usable_block([p], "node-a", _blocks(taken), Reservations(), NOW).cidr == str(
        second)
    reserved = Reservations([first])
    assert find_usable_block([p], "node-a", {}, reserved, NOW).cidr == str(second)


def test_search_returns_our_block_with_room() -> None:
    p = pool("p", "10.244.0.0/26")
    ours = Block.new("10.244.0.0/26", "node-a", int(NOW * 1e9))
    ours.assign(3, "h", {})
    assert find_usable_block([p], "node-a", _blocks(ours), Reservations(), NOW).cidr == (
        "10.244.0.0/26")


def test_empty_blocks_of_other_hosts_are_reclaimable_after_a_minute() -> None:
    p = pool("p", "10.244.0.0/25")
    empty = Block.new("10.244.0.0/26", "node-b", int(NOW * 1e9))
    busy = Block.new("10.244.0.64/26", "node-c", int((NOW - 3600) * 1e9))
    busy.assign(1, "h", {})
    blocks = _blocks(empty, busy)
    assert find_usable_block([p], "node-a", blocks, Reservations(), NOW + 30).reclaimable == ()
    found = find_usable_block([p], "node-a", blocks, Reservations(), NOW + 61)
    assert found.cidr is None
    assert [(r.cidr, r.host, r.sequence_number) for r in found.reclaimable] == [
        ("10.244.0.0/26", "node-b", empty.sequence_number)]


def test_usage_line_for_exhaustion_errors() -> None:
    p = pool("small", "10.9.0.0/28", blockSize=28)
    b = Block.new("10.9.0.0/28", "node-a", int(NOW * 1e9))
    b.assign(16, "h", {})
    text = describe_usage([p], _blocks(b), Reservations([net("10.9.0.8/30")]))
    assert text == ("pool small (10.9.0.0/28): 16 of 16 addresses in use, 1 of 1 /28 blocks "
                    "exist, 4 reserved")

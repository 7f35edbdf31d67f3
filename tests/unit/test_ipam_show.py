"""`ipam show` tables on plain data (pure)."""

from __future__ import annotations

import re

from ipam import show
from ipam.records import IPAMConfig
from ipam.state import IPAMState
from tests.unit.test_ipam_check import block, pod_attrs, state

POOL = {"metadata": {"name": "default-ipv4-ippool"},
        "spec": {"cidr": "10.244.1.0/28", "blockSize": 30}}
RESERVATION = {"metadata": {"name": "r"}, "spec": {"reservedCIDRs": ["10.244.1.2/31",
                                                                    "10.244.1.3/32"]}}


def sample() -> IPAMState:
    a = block("10.244.1.0/30", "node-a", {
        0: ("k8s-pod-network.a", pod_attrs("prod", "a")),
        2: ("k8s-pod-network.b", pod_attrs("prod", "b", node_name="node-b")),  # borrowed
    })
    b = block("10.244.1.4/30", "node-b", {0: ("k8s-pod-network.c", pod_attrs("prod", "c",
                                                                           "node-b"))})
    orphan = block("10.99.0.0/30", None, {1: ("k8s-pod-network.d", pod_attrs("x", "d"))})
    return state([a, b, orphan])


def test_pool_and_block_numbers() -> None:
    [pool, orphans] = show.utilization(sample(), [POOL], [RESERVATION])
    # 16 addresses; 3 in use; 10.244.1.2-3 reserved, one of them (.2) also in use
    assert (pool.grouping, pool.cidr, pool.total, pool.in_use, pool.reserved, pool.free) == \
        ("IP Pool", "10.244.1.0/28", 16, 3, 2, 12)
    first = pool.blocks[0]
    assert (first.cidr, first.host, first.in_use, first.reserved, first.free, first.borrowed) == \
        ("10.244.1.0/30", "node-a", 2, 2, 1, 1)
    assert [u.cidr for u in orphans.blocks] == ["10.99.0.0/30"] and orphans.grouping == ""


def test_table_like_calicoctl() -> None:
    uses = show.utilization(sample(), [POOL], [])
    lines = show.format_utilization(uses, show_blocks=False).splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE",
                                            "IPS RESERVED", "IPS FREE"]
    assert lines[1].split() == ["IP", "Pool", "10.244.1.0/28", "16", "3", "(19%)", "0", "(0%)",
                                "13", "(81%)"]
    assert len(lines) == 2  # orphaned blocks appear only with --show-blocks
    wide = show.format_utilization(uses, show_blocks=True).splitlines()
    assert wide[0].split()[-2:] == ["HOST", "BORROWED"]
    assert wide[2].split() == ["Block", "10.244.1.0/30", "4", "2", "(50%)", "0", "(0%)", "2",
                               "(50%)", "node-a", "1"]
    assert wide[-1].split() == ["Block", "10.99.0.0/30", "4", "1", "(25%)", "0", "(0%)", "3",
                                "(75%)", "<none>", "1"]


def test_huge_ipv6_pool_uses_calicoctl_number_format() -> None:
    v6 = {"metadata": {"name": "v6"}, "spec": {"cidr": "fd00::/64"}}
    [use] = show.utilization(state([]), [v6], [])
    line = show.format_utilization([use], show_blocks=False).splitlines()[1]
    assert line.split() == ["IP", "Pool", "fd00::/64", "1.8447e+19", "0", "(0%)", "0", "(0%)",
                            "1.8447e+19", "(100%)"]


def test_describe_ip() -> None:
    st = sample()
    text = show.describe_ip(st, [POOL], "10.244.1.2")
    assert text.splitlines() == [
        "IP 10.244.1.2 is in use",
        "Pool: default-ipv4-ippool (10.244.1.0/28)",
        "Block: 10.244.1.0/30 (affinity host:node-a)",
        "Handle ID: k8s-pod-network.b",
        f"Sequence number: {st.blocks['10.244.1.0/30'][0].sequence_number_for_allocation['2']}",
        "Active Owner Attributes:",
        "  namespace: prod", "  node: node-b", "  pod: b", "  timestamp: 2026-05-01T10:00:00Z"]
    assert show.describe_ip(st, [POOL], "10.244.1.1").splitlines() == [
        "10.244.1.1 is not assigned", "Pool: default-ipv4-ippool (10.244.1.0/28)",
        "Block: 10.244.1.0/30 (affinity host:node-a)"]
    assert show.describe_ip(st, [POOL], "192.168.7.7").splitlines() == [
        "192.168.7.7 is not assigned", "(not in any IP pool)"]


def test_borrowed_and_configuration() -> None:
    lines = show.format_borrowed(sample()).splitlines()
    assert lines[0].split() == ["IP", "BORROWING-NODE", "BLOCK", "BLOCK", "OWNER", "TYPE",
                                "ALLOCATED-TO"]
    # an unaffine block's allocations are borrowed too (BLOCK OWNER is empty)
    assert [line.split() for line in lines[1:]] == [
        ["10.99.0.1", "node-a", "10.99.0.0/30", "pod", "x/d"],
        ["10.244.1.2", "node-b", "10.244.1.0/30", "node-a", "pod", "prod/b"]]
    cfg = show.format_config(IPAMConfig(strict_affinity=True, max_blocks_per_host=4))
    assert [line.split() for line in cfg.splitlines()] == [
        ["PROPERTY", "VALUE"], ["StrictAffinity", "true"], ["AutoAllocateBlocks", "true"],
        ["MaxBlocksPerHost", "4"]]
    assert show.format_config(IPAMConfig()).splitlines()[-1].split() == \
        ["MaxBlocksPerHost", "0", "(20)"]

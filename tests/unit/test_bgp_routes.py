"""bgp.routes.plan: Calico's route rules, node by node, without a kernel."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from bgp.model import BlockRecord, NodeRecord, PoolRecord
from bgp.routes import (
    IPIP_DEVICE,
    VXLAN_DEVICE,
    VXLAN_PORT,
    VXLAN_VNI,
    Route,
    RoutingPlan,
    Vtep,
    VxlanDevice,
    plan,
)

net = ipaddress.IPv4Network
ip = ipaddress.IPv4Address


def node(name: str, addr: str | None, vxlan: str | None = None, mac: str | None = None
         ) -> NodeRecord:
    iface = ipaddress.IPv4Interface(addr) if addr else None
    return NodeRecord(name, ip=iface.ip if iface else None,
                      subnet=iface.network if iface else None,
                      vxlan_ip=ip(vxlan) if vxlan else None, vxlan_mac=mac)


# a, b share 198.18.0.0/24; c is in another subnet
A = node("a", "198.18.0.1/24", "10.244.1.1", "66:00:00:00:00:0A")
B = node("b", "198.18.0.2/24", "10.244.2.1", "66:00:00:00:00:0b")
C = node("c", "198.19.0.3/24", "10.244.3.1", "66:00:00:00:00:0c")
NODES = {"a": A, "b": B, "c": C}
BLOCKS = [BlockRecord(net("10.244.1.0/26"), "a"),
          BlockRecord(net("10.244.1.64/26"), "a", confirmed=False),
          BlockRecord(net("10.244.2.0/26"), "b"),
          BlockRecord(net("10.244.3.0/26"), "c")]
LOCAL_HOLES = {Route("10.244.1.0/26", type="blackhole"),
               Route("10.244.1.64/26", type="blackhole")}


def pool(cidr: str = "10.244.0.0/16", ipip: str = "Never", vxlan: str = "Never",
         disabled: bool = False) -> PoolRecord:
    return PoolRecord(net(cidr), ipip_mode=ipip, vxlan_mode=vxlan, disabled=disabled)


def plan_a(pools: Sequence[PoolRecord], learned: Mapping[str, str] | None = None,
           blocks: Sequence[BlockRecord] = BLOCKS, nodes: Mapping[str, NodeRecord] = NODES,
           **kw: int) -> RoutingPlan:
    return plan("a", nodes, pools, blocks, learned or {}, **kw)


def via(dst: str, gw: str) -> Route:
    return Route(dst, gateway=gw)


def vx(dst: str, gw: str) -> Route:
    return Route(dst, gateway=gw, dev=VXLAN_DEVICE, onlink=True)


def tunl(dst: str, gw: str) -> Route:
    return Route(dst, gateway=gw, dev=IPIP_DEVICE, onlink=True)


# -- blackholes and learned routes -------------------------------------------------------------


def test_local_blocks_are_blackholed_confirmed_or_not() -> None:
    result = plan_a([pool()])
    assert result.routes == LOCAL_HOLES
    assert (result.vxlan, result.vteps, result.ipip) == (None, frozenset(), False)


def test_learned_no_encap_and_foreign_prefixes_go_plainly_via_the_next_hop() -> None:
    learned = {"10.244.2.0/26": "198.18.0.2",  # a no-encap pool
               "10.244.3.0/26": "198.19.0.3",  # another subnet: still plain, no encap asked
               "192.168.50.0/24": "198.18.0.254",  # outside every pool: a ToR's route
               "10.244.9.7/32": "198.18.0.2"}  # a borrowed address announced by b
    assert plan_a([pool()], learned).routes == LOCAL_HOLES | {
        via("10.244.2.0/26", "198.18.0.2"), via("10.244.3.0/26", "198.19.0.3"),
        via("192.168.50.0/24", "198.18.0.254"), via("10.244.9.7/32", "198.18.0.2")}


def test_learned_routes_via_ourselves_or_malformed_are_skipped() -> None:
    learned = {"10.244.1.0/26": "198.18.0.1",  # our own block reflected back
               "10.244.8.0/26": "198.18.0.1",
               "fd00::/64": "198.18.0.2", "10.244.7.0/26": "fe80::1", "junk": "198.18.0.2",
               "10.244.6.0/26": "not-an-ip"}
    assert plan_a([pool()], learned).routes == LOCAL_HOLES


def test_a_local_blackhole_wins_over_a_learned_route_for_the_same_block() -> None:
    routes = plan_a([pool()], {"10.244.1.0/26": "198.18.0.2"}).routes
    assert routes == LOCAL_HOLES


def test_learned_host_bits_are_normalised() -> None:
    assert via("10.244.2.0/26", "198.18.0.2") in plan_a(
        [pool()], {"10.244.2.5/26": "198.18.0.2"}).routes


def test_ipip_always_tunnels_every_learned_pool_route() -> None:
    learned = {"10.244.2.0/26": "198.18.0.2", "10.244.3.0/26": "198.19.0.3",
               "192.168.50.0/24": "198.18.0.254"}
    result = plan_a([pool(ipip="Always")], learned)
    assert result.ipip
    assert result.routes == LOCAL_HOLES | {
        tunl("10.244.2.0/26", "198.18.0.2"), tunl("10.244.3.0/26", "198.19.0.3"),
        via("192.168.50.0/24", "198.18.0.254")}  # outside the pool: never tunnelled
    assert result.vxlan is None


def test_ipip_cross_subnet_tunnels_only_to_other_subnets() -> None:
    learned = {"10.244.2.0/26": "198.18.0.2", "10.244.3.0/26": "198.19.0.3"}
    result = plan_a([pool(ipip="CrossSubnet")], learned)
    assert result.ipip
    assert result.routes == LOCAL_HOLES | {via("10.244.2.0/26", "198.18.0.2"),
                                           tunl("10.244.3.0/26", "198.19.0.3")}


def test_ipip_cross_subnet_without_a_known_local_subnet_tunnels() -> None:
    nodes = {**NODES, "a": NodeRecord("a", ip=ip("198.18.0.1"))}
    routes = plan_a([pool(ipip="CrossSubnet")], {"10.244.2.0/26": "198.18.0.2"},
                    nodes=nodes).routes
    assert tunl("10.244.2.0/26", "198.18.0.2") in routes


def test_each_learned_prefix_follows_its_own_pool() -> None:
    pools = [pool("10.244.0.0/16", ipip="Always"), pool("10.50.0.0/16")]
    learned = {"10.244.2.0/26": "198.18.0.2", "10.50.2.0/26": "198.18.0.2"}
    assert plan_a(pools, learned).routes == LOCAL_HOLES | {
        tunl("10.244.2.0/26", "198.18.0.2"), via("10.50.2.0/26", "198.18.0.2")}


def test_disabled_pools_count_as_no_pool() -> None:
    pools = [pool(ipip="Always", disabled=True), pool("10.50.0.0/16", vxlan="Always",
                                                      disabled=True)]
    learned = {"10.244.2.0/26": "198.18.0.2", "10.50.2.0/26": "198.18.0.2"}
    result = plan_a(pools, learned)
    assert not result.ipip and result.vxlan is None
    assert result.routes == LOCAL_HOLES | {via("10.244.2.0/26", "198.18.0.2"),
                                           via("10.50.2.0/26", "198.18.0.2")}


# -- VXLAN ------------------------------------------------------------------------------------


def test_vxlan_always_device_vteps_and_block_routes_without_bgp() -> None:
    result = plan_a([pool(vxlan="Always")], uplink_mtu=1450)
    assert result.vxlan == VxlanDevice(VXLAN_DEVICE, VXLAN_VNI, VXLAN_PORT, "198.18.0.1",
                                       "66:00:00:00:00:0a", "10.244.1.1", 1400)
    assert result.vteps == {Vtep("b", "198.18.0.2", "10.244.2.1", "66:00:00:00:00:0b"),
                            Vtep("c", "198.19.0.3", "10.244.3.1", "66:00:00:00:00:0c")}
    assert result.routes == LOCAL_HOLES | {vx("10.244.2.0/26", "10.244.2.1"),
                                           vx("10.244.3.0/26", "10.244.3.1")}
    assert not result.ipip


def test_vxlan_default_mtu_is_the_uplink_minus_50() -> None:
    device = plan_a([pool(vxlan="Always")]).vxlan
    assert device is not None and device.mtu == 1450


def test_vxlan_cross_subnet_routes_same_subnet_nodes_natively() -> None:
    result = plan_a([pool(vxlan="CrossSubnet")])
    assert result.vxlan is not None and len(result.vteps) == 2
    assert result.routes == LOCAL_HOLES | {via("10.244.2.0/26", "198.18.0.2"),
                                           vx("10.244.3.0/26", "10.244.3.1")}


def test_learned_prefixes_inside_a_vxlan_pool_are_left_to_vxlan() -> None:
    learned = {"10.244.2.0/26": "198.18.0.2", "10.244.9.0/26": "198.18.0.2",
               "192.168.50.0/24": "198.18.0.254"}
    assert plan_a([pool(vxlan="Always")], learned).routes == LOCAL_HOLES | {
        vx("10.244.2.0/26", "10.244.2.1"), vx("10.244.3.0/26", "10.244.3.1"),
        via("192.168.50.0/24", "198.18.0.254")}


def test_vxlan_borrowed_addresses() -> None:
    blocks = [
        # b holds .9 of our block: a /32 to b, more specific than our blackhole
        BlockRecord(net("10.244.1.0/26"), "a", borrowed=((ip("10.244.1.9"), "b"),)),
        # we hold .20 of b's block: nothing (the CNI's /32 covers it); c holds .21
        BlockRecord(net("10.244.2.0/26"), "b",
                    borrowed=((ip("10.244.2.20"), "a"), (ip("10.244.2.21"), "c"))),
        # a block with no affinity: no block route, only its holders' /32s
        BlockRecord(net("10.244.4.0/26"), None, confirmed=False,
                    borrowed=((ip("10.244.4.1"), "c"), (ip("10.244.4.2"), "a"))),
    ]
    assert plan_a([pool(vxlan="Always")], blocks=blocks).routes == {
        Route("10.244.1.0/26", type="blackhole"),
        vx("10.244.1.9/32", "10.244.2.1"),
        vx("10.244.2.0/26", "10.244.2.1"), vx("10.244.2.21/32", "10.244.3.1"),
        vx("10.244.4.1/32", "10.244.3.1")}


def test_vxlan_cross_subnet_borrowed_address_of_a_same_subnet_node_is_native() -> None:
    blocks = [BlockRecord(net("10.244.3.0/26"), "c", borrowed=((ip("10.244.3.9"), "b"),))]
    assert plan_a([pool(vxlan="CrossSubnet")], blocks=blocks).routes == {
        vx("10.244.3.0/26", "10.244.3.1"), via("10.244.3.9/32", "198.18.0.2")}


def test_vxlan_remote_nodes_without_vtep_data_get_no_route_nor_vtep() -> None:
    nodes = {"a": A, "b": node("b", "198.18.0.2/24"),  # no tunnel address yet
             "c": node("c", "198.19.0.3/24", "10.244.3.1")}  # no MAC
    blocks = [*BLOCKS, BlockRecord(net("10.244.5.0/26"), "ghost")]  # not a node at all
    result = plan_a([pool(vxlan="Always")], nodes=nodes, blocks=blocks)
    assert result.vxlan is not None and result.vteps == frozenset()
    assert result.routes == LOCAL_HOLES


def test_no_vxlan_device_while_the_local_node_lacks_vtep_data() -> None:
    for me in (node("a", "198.18.0.1/24"), node("a", None, "10.244.1.1", "66:00:00:00:00:0a"),
               node("a", "198.18.0.1/24", "10.244.1.1")):
        result = plan_a([pool(vxlan="Always")], {"10.244.2.0/26": "198.18.0.2"},
                        nodes={**NODES, "a": me})
        assert (result.vxlan, result.vteps) == (None, frozenset())
        assert result.routes == LOCAL_HOLES  # and learned VXLAN prefixes still skipped
    assert plan("z", NODES, [pool(vxlan="Always")], BLOCKS, {}).vxlan is None  # unknown node


def test_vxlan_routes_only_for_blocks_inside_vxlan_pools() -> None:
    pools = [pool("10.244.0.0/16", vxlan="Always"), pool("10.50.0.0/16")]
    blocks = [*BLOCKS, BlockRecord(net("10.50.2.0/26"), "b", borrowed=(
        (ip("10.50.2.9"), "c"),))]
    learned = {"10.50.2.0/26": "198.18.0.2", "10.50.2.9/32": "198.19.0.3"}
    assert plan_a(pools, learned, blocks=blocks).routes == LOCAL_HOLES | {
        vx("10.244.2.0/26", "10.244.2.1"), vx("10.244.3.0/26", "10.244.3.1"),
        via("10.50.2.0/26", "198.18.0.2"), via("10.50.2.9/32", "198.19.0.3")}


def test_vxlan_and_ipip_pools_side_by_side() -> None:
    pools = [pool("10.244.0.0/16", vxlan="Always"), pool("10.50.0.0/16", ipip="CrossSubnet")]
    learned = {"10.50.2.0/26": "198.18.0.2", "10.50.3.0/26": "198.19.0.3"}
    result = plan_a(pools, learned)
    assert result.ipip and result.vxlan is not None
    assert result.routes == LOCAL_HOLES | {
        vx("10.244.2.0/26", "10.244.2.1"), vx("10.244.3.0/26", "10.244.3.1"),
        via("10.50.2.0/26", "198.18.0.2"), tunl("10.50.3.0/26", "198.19.0.3")}


def test_route_text_reads_like_ip_route() -> None:
    assert str(Route("10.244.1.0/26", type="blackhole")) == "blackhole 10.244.1.0/26"
    assert str(vx("10.244.2.0/26", "10.244.2.1")) == \
        "10.244.2.0/26 via 10.244.2.1 dev vxlan.calico onlink"
    assert str(via("10.9.0.0/16", "198.18.0.9")) == "10.9.0.0/16 via 198.18.0.9"

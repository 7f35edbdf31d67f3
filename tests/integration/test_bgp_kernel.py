"""bgp.kernel_routes and bgp.vxlan against the kernel, in network namespaces made here.

Every "node" and "pod" is a namespace from `make_ns`; the modules run inside them through
`cni.netns.run_in_netns`, and what they did is read back independently with `ip -j` and
`bridge -j`. The end-to-end tests join two node namespaces with a veth underlay
(198.18.0.0/24), plumb pods behind each with `cni.plumbing.setup`, program each node from
`bgp.routes.plan` and open real TCP connections between the pods. IPIP has no kernel test:
this kernel has no ipip module (the plan's tunl0 routes are covered by the unit tests).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from bgp import kernel_routes, vxlan
from bgp.kernel_routes import RouteStats
from bgp.model import BlockRecord, NodeRecord, PoolRecord
from bgp.routes import VXLAN_DEVICE, Route, RoutingPlan, Vtep, VxlanDevice, plan
from cni import netns as nslib
from cni import plumbing
from cni.plumbing import PodInterface
from tests.conftest import require_binary

pytestmark = pytest.mark.netns

NODE_IP = {"a": "198.18.0.1", "b": "198.18.0.2"}
TUNNEL = {"a": ("10.244.1.1", "66:00:00:00:00:0a"), "b": ("10.244.2.1", "66:00:00:00:00:0b")}
BLOCK = {"a": "10.244.1.0/26", "b": "10.244.2.0/26"}
POD_A, POD_B, POD_BORROWED = "10.244.1.5", "10.244.2.5", "10.244.1.9"  # the last lives on b
POD_MTU = 1400


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True,
                          text=True).stdout


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(ip(ns, "-j", *args) or "[]")


def kernel_view(ns: str, proto: str = "81") -> set[str]:
    """`ip route show proto N`, one normalised line per route."""
    lines = set()
    for r in ip_json(ns, "route", "show", "proto", proto):
        dst = r["dst"] if "/" in r["dst"] else f"{r['dst']}/32"  # ip prints /32s bare
        text = (f"{r['type']} " if r.get("type") else "") + dst
        text += f" via {r['gateway']}" if r.get("gateway") else ""
        text += f" dev {r['dev']}" if r.get("dev") else ""
        text += " onlink" if "onlink" in r.get("flags", ()) else ""
        lines.add(text)
    return lines


def reconcile(ns: str, routes: set[Route]) -> RouteStats:
    return nslib.run_in_netns(ns, kernel_routes.reconcile_routes, routes)


def counts(stats: Any) -> tuple[int, int, int, int]:
    return stats.added, stats.replaced, stats.removed, stats.unchanged


@pytest.fixture
def node(make_ns: Callable[[], str]) -> str:
    """One node: uplink veth up0 198.18.0.1/24 (its peer up1 stays here, down is fine)."""
    ns = make_ns()
    ip(ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    for dev in ("up0", "up1"):
        ip(ns, "link", "set", dev, "up")
    ip(ns, "addr", "add", "198.18.0.1/24", "dev", "up0")
    return ns


# -- reconcile_routes -------------------------------------------------------------------------


ROUTES = {Route("10.244.1.0/26", type="blackhole"),
          Route("10.244.2.0/26", gateway="198.18.0.2"),  # the kernel picks up0
          Route("10.244.3.0/26", gateway="10.244.3.1", dev="up0", onlink=True),
          Route("10.244.4.0/26", dev="up0")}
ROUTES_TEXT = {"blackhole 10.244.1.0/26", "10.244.2.0/26 via 198.18.0.2 dev up0",
               "10.244.3.0/26 via 10.244.3.1 dev up0 onlink", "10.244.4.0/26 dev up0"}


def test_reconcile_adds_and_is_idempotent(node: str) -> None:
    stats = reconcile(node, ROUTES)
    assert (counts(stats), stats.errors) == ((4, 0, 0, 0), [])
    assert kernel_view(node) == ROUTES_TEXT
    stats = reconcile(node, ROUTES)
    assert (counts(stats), stats.errors) == ((0, 0, 0, 4), [])
    assert kernel_view(node) == ROUTES_TEXT
    read = nslib.run_in_netns(node, kernel_routes.read_routes, 81)
    assert read == {Route("10.244.1.0/26", type="blackhole"),
                    Route("10.244.2.0/26", gateway="198.18.0.2", dev="up0"),
                    Route("10.244.3.0/26", gateway="10.244.3.1", dev="up0", onlink=True),
                    Route("10.244.4.0/26", dev="up0")}


def test_reconcile_removes_stale_and_replaces_changed_routes(node: str) -> None:
    reconcile(node, ROUTES)
    ip(node, "route", "add", "10.244.9.0/26", "via", "198.18.0.9", "proto", "81",
       "metric", "100")  # ours by protocol, but not a route we make: stale
    changed = {Route("10.244.1.0/26", type="blackhole"),
               Route("10.244.2.0/26", gateway="198.18.0.3"),  # new gateway
               Route("10.244.3.0/26", type="blackhole"),  # unicast -> blackhole
               Route("10.244.5.0/26", gateway="198.18.0.5")}  # new; 10.244.4.0/26 gone
    stats = reconcile(node, changed)
    assert (counts(stats), stats.errors) == ((1, 2, 2, 1), [])
    assert kernel_view(node) == {"blackhole 10.244.1.0/26", "blackhole 10.244.3.0/26",
                                 "10.244.2.0/26 via 198.18.0.3 dev up0",
                                 "10.244.5.0/26 via 198.18.0.5 dev up0"}
    assert counts(reconcile(node, changed)) == (0, 0, 0, 4)
    assert counts(reconcile(node, set())) == (0, 0, 4, 0)
    assert kernel_view(node) == set()


def test_reconcile_leaves_other_protocols_alone(node: str) -> None:
    ip(node, "route", "add", "10.244.1.5/32", "dev", "up0", "proto", "80", "scope", "link")
    ip(node, "route", "add", "10.77.0.0/16", "via", "198.18.0.77")  # static (proto boot)
    others = {"10.244.1.5", "10.77.0.0/16", "198.18.0.0/24"}  # ip prints /32s bare
    before = ip_json(node, "route", "show")
    assert {r["dst"] for r in before} == others
    # the same destinations asked of us: reported, not taken over by a replace
    stats = reconcile(node, {*ROUTES, Route("10.77.0.0/16", gateway="198.18.0.2"),
                             Route("10.244.1.5/32", type="blackhole")})
    assert counts(stats) == (4, 0, 0, 0)
    assert sorted(stats.errors) == [
        "10.77.0.0/16 via 198.18.0.2: the destination holds a route of protocol 3; "
        "left alone",
        "blackhole 10.244.1.5/32: the destination holds a route of protocol 80; left alone"]
    assert counts(reconcile(node, set())) == (0, 0, 4, 0)
    assert ip_json(node, "route", "show") == before


def test_reconcile_reports_routes_it_cannot_program_and_does_the_rest(node: str) -> None:
    bad = {Route("10.244.7.0/26", gateway="10.244.7.1", dev="tunl0", onlink=True),
           Route("10.244.8.0/26", gateway="203.0.113.1")}  # no route to that gateway
    stats = reconcile(node, ROUTES | bad)
    assert counts(stats) == (4, 0, 0, 0)
    assert sorted(stats.errors) == [
        "10.244.7.0/26 via 10.244.7.1 dev tunl0 onlink: device tunl0 does not exist",
        "10.244.8.0/26 via 203.0.113.1: Network is unreachable"]
    assert kernel_view(node) == ROUTES_TEXT
    again = reconcile(node, ROUTES | bad)
    assert counts(again) == (0, 0, 0, 4) and len(again.errors) == 2


def test_reconcile_many_routes_over_several_batches(node: str) -> None:
    # more requests than one sendmsg carries, a quarter of them refused by the kernel (whose
    # error answers, larger than acks, must still all come back)
    good = {Route(f"10.{100 + i // 250}.{i % 250}.0/24", type="blackhole") for i in range(600)}
    bad = {Route(f"10.200.{i}.0/24", gateway="203.0.113.1") for i in range(200)}
    stats = reconcile(node, good | bad)
    assert counts(stats) == (600, 0, 0, 0) and len(stats.errors) == 200
    assert len(kernel_view(node)) == 600
    assert counts(reconcile(node, good)) == (0, 0, 0, 600)
    assert counts(reconcile(node, set())) == (0, 0, 600, 0)
    assert kernel_view(node) == set()


# -- the VXLAN device and VTEPs ---------------------------------------------------------------


DEVICE = VxlanDevice(VXLAN_DEVICE, 4096, 4789, "198.18.0.1", "66:00:00:00:00:0a",
                     "10.244.1.1", 1450)


def fdb(ns: str) -> set[tuple[str, str, str]]:
    require_binary("bridge")
    out = subprocess.run(["bridge", "-n", ns, "-j", "fdb", "show", "dev", VXLAN_DEVICE],
                         check=True, capture_output=True, text=True).stdout
    return {(e["mac"], e["dst"], e["state"]) for e in json.loads(out or "[]") if "dst" in e}


def neighbours(ns: str) -> set[tuple[str, str, str]]:
    return {(n["dst"], n["lladdr"], *n["state"])
            for n in ip_json(ns, "neigh", "show", "dev", VXLAN_DEVICE)}


def test_vxlan_device_is_created_fixed_and_removed(node: str) -> None:
    done = nslib.run_in_netns(node, vxlan.ensure_vxlan, DEVICE)
    assert done[0].startswith("created vxlan.calico") and len(done) == 3
    (link,) = ip_json(node, "-d", "addr", "show", "dev", VXLAN_DEVICE)
    data = link["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["local"], data["link"], data["learning"]) == (
        4096, 4789, "198.18.0.1", "up0", False)
    assert (link["address"], link["mtu"], "UP" in link["flags"]) == (DEVICE.mac, 1450, True)
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
            if a["family"] == "inet"] == [("10.244.1.1", 32)]
    assert nslib.run_in_netns(node, vxlan.ensure_vxlan, DEVICE) == []

    # drifted: fixed in place
    ip(node, "link", "set", VXLAN_DEVICE, "mtu", "1300")
    ip(node, "addr", "add", "10.244.1.2/32", "dev", VXLAN_DEVICE)
    ip(node, "link", "set", VXLAN_DEVICE, "down")
    done = nslib.run_in_netns(node, vxlan.ensure_vxlan, DEVICE)
    assert done == ["set the MTU of vxlan.calico to 1450",
                    "removed 10.244.1.2/32 from vxlan.calico", "set vxlan.calico up"]
    # a new MAC in place; a new VNI means a new device; too large an MTU is lowered
    moved = VxlanDevice(VXLAN_DEVICE, 4097, 4789, "198.18.0.1", "66:00:00:00:00:1a",
                        "10.244.1.1", 1500)
    done = nslib.run_in_netns(node, vxlan.ensure_vxlan, moved)
    assert done[0] == "MTU 1500 is more than up0 (MTU 1500) allows; using 1450"
    assert done[1] == "removed vxlan.calico (vni 4096 instead of 4097)"
    (link,) = ip_json(node, "-d", "link", "show", "dev", VXLAN_DEVICE)
    assert (link["linkinfo"]["info_data"]["id"], link["address"], link["mtu"]) == (
        4097, "66:00:00:00:00:1a", 1450)

    assert nslib.run_in_netns(node, vxlan.ensure_vxlan, None) == ["removed vxlan.calico"]
    assert VXLAN_DEVICE not in {link["ifname"] for link in ip_json(node, "link", "show")}
    assert nslib.run_in_netns(node, vxlan.ensure_vxlan, None) == []


def test_vxlan_device_needs_an_interface_holding_the_node_ip(node: str) -> None:
    elsewhere = VxlanDevice(VXLAN_DEVICE, 4096, 4789, "198.18.0.99", "66:00:00:00:00:0a",
                            "10.244.1.1", 1450)
    with pytest.raises(vxlan.VxlanError, match=r"no interface holds the node IP 198\.18\.0\.99"):
        nslib.run_in_netns(node, vxlan.ensure_vxlan, elsewhere)


def test_vteps_are_reconciled(node: str) -> None:
    assert nslib.run_in_netns(node, vxlan.reconcile_vteps, []).errors == []
    missing = nslib.run_in_netns(node, vxlan.reconcile_vteps,
                                 [Vtep("b", "198.18.0.2", "10.244.2.1", "66:00:00:00:00:0b")])
    assert missing.errors == ["vxlan.calico does not exist"]
    nslib.run_in_netns(node, vxlan.ensure_vxlan, DEVICE)
    vteps = [Vtep("b", "198.18.0.2", "10.244.2.1", "66:00:00:00:00:0B"),
             Vtep("c", "198.18.0.3", "10.244.3.1", "66:00:00:00:00:0c")]
    stats = nslib.run_in_netns(node, vxlan.reconcile_vteps, vteps)
    assert (counts(stats), stats.errors) == ((4, 0, 0, 0), [])
    assert neighbours(node) == {("10.244.2.1", "66:00:00:00:00:0b", "PERMANENT"),
                                ("10.244.3.1", "66:00:00:00:00:0c", "PERMANENT")}
    assert fdb(node) == {("66:00:00:00:00:0b", "198.18.0.2", "permanent"),
                         ("66:00:00:00:00:0c", "198.18.0.3", "permanent")}
    assert counts(nslib.run_in_netns(node, vxlan.reconcile_vteps, vteps)) == (0, 0, 0, 4)

    # b moved to another node IP, c left, d joined; plus a leftover entry nobody wants
    ip(node, "neigh", "add", "10.244.9.1", "lladdr", "66:00:00:00:00:99", "dev", VXLAN_DEVICE)
    vteps = [Vtep("b", "198.18.0.5", "10.244.2.1", "66:00:00:00:00:0b"),
             Vtep("d", "198.18.0.4", "10.244.4.1", "66:00:00:00:00:0d")]
    stats = nslib.run_in_netns(node, vxlan.reconcile_vteps, vteps)
    # added: d's two; replaced: b's FDB entry; removed: c's two and the leftover
    assert (counts(stats), stats.errors) == ((2, 1, 3, 1), [])
    assert neighbours(node) == {("10.244.2.1", "66:00:00:00:00:0b", "PERMANENT"),
                                ("10.244.4.1", "66:00:00:00:00:0d", "PERMANENT")}
    assert fdb(node) == {("66:00:00:00:00:0b", "198.18.0.5", "permanent"),
                         ("66:00:00:00:00:0d", "198.18.0.4", "permanent")}
    assert counts(nslib.run_in_netns(node, vxlan.reconcile_vteps, [])) == (0, 0, 4, 0)
    assert neighbours(node) == set() and fdb(node) == set()


# -- two nodes, pods, real traffic ------------------------------------------------------------


@dataclass
class Cluster:
    nodes: dict[str, str]  # node name -> its namespace
    pods: dict[str, str]  # pod IP -> its namespace


def _pod(make_ns: Callable[[], str], host: str, addr: str, n: int) -> str:
    ns = make_ns()
    plumbing.setup(PodInterface(netns=f"/run/netns/{ns}", container_ifname="eth0",
                                host_ifname=f"calitest{n}",
                                addresses=(ipaddress.ip_interface(f"{addr}/32"),),
                                mtu=POD_MTU), host_netns=host)
    return ns


@pytest.fixture
def cluster(make_ns: Callable[[], str]) -> Cluster:
    """Nodes a and b on one veth underlay, forwarding on; pod 10.244.1.5 on a, pods 10.244.2.5
    and 10.244.1.9 (borrowed from a's block) on b."""
    a, b = make_ns(), make_ns()
    ip(a, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", b)
    for ns, me, other in ((a, "a", "b"), (b, "b", "a")):
        ip(ns, "addr", "add", f"{NODE_IP[me]}/24", "dev", "up0")
        ip(ns, "link", "set", "up0", "up")
        # proxy ARP answers the pods' 169.254.1.1 only for what is routed elsewhere
        ip(ns, "route", "add", "default", "via", NODE_IP[other])
        nslib.run_in_netns(ns, nslib.write_sysctl, "net/ipv4/ip_forward", 1)
    pods = {POD_A: _pod(make_ns, a, POD_A, 1), POD_B: _pod(make_ns, b, POD_B, 2),
            POD_BORROWED: _pod(make_ns, b, POD_BORROWED, 3)}
    return Cluster({"a": a, "b": b}, pods)


def records(vxlan_mode: str) -> tuple[dict[str, NodeRecord], list[PoolRecord],
                                      list[BlockRecord]]:
    nodes = {}
    for name, addr in NODE_IP.items():
        iface = ipaddress.IPv4Interface(f"{addr}/24")
        tunnel, mac = TUNNEL[name]
        nodes[name] = NodeRecord(name, ip=iface.ip, subnet=iface.network,
                                 vxlan_ip=ipaddress.IPv4Address(tunnel), vxlan_mac=mac)
    pools = [PoolRecord(ipaddress.IPv4Network("10.244.0.0/16"), vxlan_mode=vxlan_mode)]
    blocks = [BlockRecord(ipaddress.IPv4Network(BLOCK["a"]), "a",
                          borrowed=((ipaddress.IPv4Address(POD_BORROWED), "b"),)),
              BlockRecord(ipaddress.IPv4Network(BLOCK["b"]), "b")]
    return nodes, pools, blocks


def apply(ns: str, routing: RoutingPlan) -> None:
    """Device, VTEPs, routes: the order the modules document."""
    def run() -> list[str]:
        vxlan.ensure_vxlan(routing.vxlan)
        return (vxlan.reconcile_vteps(routing.vteps).errors
                + kernel_routes.reconcile_routes(routing.routes).errors)
    assert nslib.run_in_netns(ns, run) == []


def program(cluster: Cluster, vxlan_mode: str,
            learned: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, RoutingPlan]:
    nodes, pools, blocks = records(vxlan_mode)
    plans = {}
    for name, ns in cluster.nodes.items():
        plans[name] = plan(name, nodes, pools, blocks, (learned or {}).get(name, {}))
        apply(ns, plans[name])
    return plans


def tcp(cluster: Cluster, src: str, dst: str) -> None:
    """A connection from pod `src` to pod `dst`: data both ways, addresses not translated."""
    server = nslib.run_in_netns(cluster.pods[dst], socket.create_server, (dst, 0))
    with server:
        server.settimeout(10)
        port = server.getsockname()[1]
        client = nslib.run_in_netns(cluster.pods[src], socket.create_connection, (dst, port),
                                    10)
        with client:
            conn, peer = server.accept()
            with conn:
                conn.settimeout(10)
                client.settimeout(10)
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert client.recv(4) == b"pong"
    assert peer[0] == src


def vxlan_tx_packets(ns: str) -> int:
    (link,) = ip_json(ns, "-s", "link", "show", "dev", VXLAN_DEVICE)
    return int(link["stats64"]["tx"]["packets"])


def test_vxlan_end_to_end(cluster: Cluster) -> None:
    plans = program(cluster, "Always")
    assert kernel_view(cluster.nodes["a"]) == {
        "blackhole 10.244.1.0/26", "10.244.2.0/26 via 10.244.2.1 dev vxlan.calico onlink",
        "10.244.1.9/32 via 10.244.2.1 dev vxlan.calico onlink"}
    assert kernel_view(cluster.nodes["b"]) == {
        "blackhole 10.244.2.0/26", "10.244.1.0/26 via 10.244.1.1 dev vxlan.calico onlink"}
    assert {ns: vxlan_tx_packets(ns) for ns in cluster.nodes.values()} == {
        ns: 0 for ns in cluster.nodes.values()}
    for src, dst in ((POD_A, POD_B), (POD_B, POD_A), (POD_A, POD_BORROWED),
                     (POD_BORROWED, POD_A)):
        tcp(cluster, src, dst)
    assert all(vxlan_tx_packets(ns) > 0 for ns in cluster.nodes.values())  # encapsulated
    # applying the same plans again changes nothing
    for name, ns in cluster.nodes.items():
        stats = nslib.run_in_netns(ns, kernel_routes.reconcile_routes, plans[name].routes)
        assert counts(stats) == (0, 0, 0, 3 if name == "a" else 2)
        assert counts(nslib.run_in_netns(ns, vxlan.reconcile_vteps, plans[name].vteps)) == (
            0, 0, 0, 2)
        assert nslib.run_in_netns(ns, vxlan.ensure_vxlan, plans[name].vxlan) == []


def test_no_encapsulation_end_to_end_from_learned_routes(cluster: Cluster) -> None:
    # what each node's BGP peer announced: the other's block, and b's borrowed /32
    learned = {"a": {BLOCK["b"]: NODE_IP["b"], f"{POD_BORROWED}/32": NODE_IP["b"]},
               "b": {BLOCK["a"]: NODE_IP["a"]}}
    plans = program(cluster, "Never", learned)
    assert all(p.vxlan is None and not p.vteps for p in plans.values())
    assert kernel_view(cluster.nodes["a"]) == {
        "blackhole 10.244.1.0/26", "10.244.2.0/26 via 198.18.0.2 dev up0",
        "10.244.1.9/32 via 198.18.0.2 dev up0"}
    for src, dst in ((POD_A, POD_B), (POD_B, POD_A), (POD_A, POD_BORROWED),
                     (POD_BORROWED, POD_A)):
        tcp(cluster, src, dst)
    assert not any(link["ifname"] == VXLAN_DEVICE for ns in cluster.nodes.values()
                   for link in ip_json(ns, "link", "show"))


def test_switching_vxlan_off_removes_device_and_routes(cluster: Cluster) -> None:
    program(cluster, "Always")
    learned = {"a": {BLOCK["b"]: NODE_IP["b"], f"{POD_BORROWED}/32": NODE_IP["b"]},
               "b": {BLOCK["a"]: NODE_IP["a"]}}
    program(cluster, "Never", learned)
    assert kernel_view(cluster.nodes["b"]) == {"blackhole 10.244.2.0/26",
                                               "10.244.1.0/26 via 198.18.0.1 dev up0"}
    tcp(cluster, POD_A, POD_B)
    tcp(cluster, POD_BORROWED, POD_A)

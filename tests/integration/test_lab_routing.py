"""Routing between lab nodes, end to end: exabgp full mesh (encap none), VXLAN from the store,
and BIRD 2 as the nodes' route reflector.

Each lab has its own name and state dir. Everything (underlay, nodes, BIRD, pods) lives in the
lab's namespaces; traffic only goes between them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import bird, netns, procs
from lab.cluster import etcd_endpoint
from lab.tools import store
from tests.conftest import require_binary
from tests.integration.test_lab import LabCli, connect, listen, pod_ip

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

WAIT = 60.0


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError, KeyError, AssertionError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def routes(cli: LabCli, node: str, *match: str) -> list[str]:
    out = netns.ip(cli.state()["nodes"][node]["ns"], "route", "show", *match).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def bgp_status(cli: LabCli, node: str) -> dict[str, Any]:
    path = Path(cli.state()["nodes"][node]["dir"]) / "run" / "bgp-status.json"
    return json.loads(path.read_text())


def learned_routes(cli: LabCli, node: str) -> set[str]:
    """The other nodes' blocks as this node's kernel routes them (ours, with a next hop)."""
    return {r for r in routes(cli, node, "proto", "81") if " via " in r}


def all_peers_up(cli: LabCli, node: str, count: int) -> bool:
    peers = bgp_status(cli, node)["peers"]
    return len(peers) == count and all(p["state"] == "up" for p in peers)


def block_op(cli: LabCli, op: str, node: str, cidr: str) -> None:
    state = cli.state()
    store(state["etcd"]["ns"], etcd_endpoint(state), [{"op": op, "node": node, "cidr": cidr}])


def up(name: str, tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[LabCli]:
    require_binary("nsenter")
    require_binary("/usr/lib/cni/portmap")
    cli = LabCli(f"{name}{os.getpid()}", tmp_path_factory.mktemp(name))
    try:
        cli.run("up", *args)
        yield cli
    finally:
        cli.run("down", check=False)
        assert not netns.names_with_prefix(cli.lab.prefix)


# ---- full mesh, no encapsulation ---------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCli]:
    yield from up("m", tmp_path_factory, "--nodes", "3")


def test_mesh_sessions_and_node_status(mesh: LabCli) -> None:
    for node in ("node1", "node2", "node3"):
        wait_for(f"{node}'s two mesh peers up", lambda n=node: all_peers_up(mesh, n, 2))
    st = bgp_status(mesh, "node1")
    assert {p["address"] for p in st["peers"]} == {"198.18.0.12", "198.18.0.13"}
    assert {p["kind"] for p in st["peers"]} == {"mesh"}
    text = mesh.run("bgp", "node1").stdout
    assert "Tabby process is running." in text
    assert "| 198.18.0.12  | node-to-node mesh | up    |" in text
    # the Node carries the autodetected BGP address (eth0 holds the default route)
    state = mesh.state()
    nodes = store(state["etcd"]["ns"], etcd_endpoint(state), [{"op": "list", "kind": "Node"}])[0]
    assert {n["metadata"]["name"]: n["spec"]["bgp"]["ipv4Address"] for n in nodes} == {
        "node1": "198.18.0.11/24", "node2": "198.18.0.12/24", "node3": "198.18.0.13/24"}


def test_cross_node_pod_traffic(mesh: LabCli) -> None:
    for k in (1, 2, 3):
        mesh.run("pod", "add", f"web/p{k}", "--node", f"node{k}")
    p1, p2, p3 = (pod_ip(mesh, f"web/p{k}") for k in (1, 2, 3))
    block2 = wait_for("node1 to route node2's block", lambda: [
        r for r in routes(mesh, "node1", "proto", "81") if "via 198.18.0.12" in r])
    assert block2[0].startswith("10.244.") and "dev eth0" in block2[0]
    # its own block (the agent may announce it before its kernel pass has run)
    wait_for("node2's blackhole for its block", lambda: routes(
        mesh, "node2", "proto", "81", "type", "blackhole"))
    for src, dst, dst_ip, src_ip in (("web/p1", "web/p2", p2, p1), ("web/p3", "web/p1", p1, p3)):
        server = listen(mesh.exec(dst), 8080)
        # the source address survives: routed, not NATed
        assert connect(mesh, src, dst_ip, 8080) == f"pong ping from {src_ip}"
        server.wait(10)


def test_new_block_is_routed_and_withdrawn_everywhere(mesh: LabCli) -> None:
    cidr = "10.244.250.0/26"
    block_op(mesh, "claim_block", "node1", cidr)
    for node in ("node2", "node3"):
        wait_for(f"{cidr} on {node}", lambda n=node: routes(mesh, n, cidr) == [
            f"{cidr} via 198.18.0.11 dev eth0 proto 81"])
    wait_for(f"{cidr} blackholed on node1", lambda: routes(mesh, "node1", cidr) == [
        f"blackhole {cidr} proto 81"])
    block_op(mesh, "release_block", "node1", cidr)
    for node in ("node1", "node2", "node3"):
        wait_for(f"{cidr} gone from {node}", lambda n=node: routes(mesh, n, cidr) == [])


def test_speaker_restart_restores_routes_without_duplicates(mesh: LabCli) -> None:
    if "web/p2" not in mesh.state()["pods"]:
        mesh.run("pod", "add", "web/p2", "--node", "node2")
    old = bgp_status(mesh, "node2")["speaker"]["pid"]
    assert old
    os.kill(old, signal.SIGKILL)  # exabgp of node2, started (indirectly) by this lab
    wait_for("node2's speaker to be started again", lambda: (
        bgp_status(mesh, "node2")["speaker"]["pid"] not in (None, old)
        and all_peers_up(mesh, "node2", 2)))
    own = [r.split()[1] for r in routes(mesh, "node2", "type", "blackhole", "proto", "81")]
    assert own, "node2 has a block"
    for node in ("node1", "node3"):
        for cidr in own:
            wait_for(f"{cidr} back on {node}", lambda n=node, c=cidr: routes(mesh, n, c) == [
                f"{c} via 198.18.0.12 dev eth0 proto 81"])
    p1, p2 = pod_ip(mesh, "web/p1"), pod_ip(mesh, "web/p2")
    server = listen(mesh.exec("web/p2"), 8081)
    assert connect(mesh, "web/p1", p2, 8081) == f"pong ping from {p1}"
    server.wait(10)
    assert procs.alive(mesh.state()["processes"]["node2"])  # tabby-node itself never flinched


# ---- VXLAN -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vxlan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCli]:
    yield from up("x", tmp_path_factory, "--nodes", "2", "--encap", "vxlan")


def test_vxlan_cross_node_traffic(vxlan: LabCli) -> None:
    vxlan.run("pod", "add", "web/a", "--node", "node1")
    vxlan.run("pod", "add", "web/b", "--node", "node2")
    a, b = pod_ip(vxlan, "web/a"), pod_ip(vxlan, "web/b")
    state = vxlan.state()
    n1 = state["nodes"]["node1"]["ns"]
    wait_for("node1's route over vxlan.calico", lambda: [
        r for r in routes(vxlan, "node1", "proto", "81") if "dev vxlan.calico" in r
        and "onlink" in r])
    link = netns.ip(n1, "-d", "link", "show", "vxlan.calico").stdout
    assert "vxlan id 4096" in link and "local 198.18.0.11" in link and "mtu 1450" in link
    fdb = subprocess.run(netns.nsenter(n1, ["bridge", "fdb", "show", "dev", "vxlan.calico"]),
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "dst 198.18.0.12 self permanent" in fdb
    # the pod MTU leaves room for the encapsulation
    mtu = netns.ip(state["pods"]["web/a"]["netns"], "link", "show", "eth0").stdout
    assert "mtu 1450" in mtu
    # each Node got its VTEP from IPAM (Calico's handle) and a MAC
    nodes = store(state["etcd"]["ns"], etcd_endpoint(state), [{"op": "list", "kind": "Node"}])[0]
    for n in nodes:
        assert n["spec"]["ipv4VXLANTunnelAddr"].startswith("10.244.")
        assert len(n["spec"]["vxlanTunnelMACAddr"].split(":")) == 6
    handles = subprocess.run(
        netns.nsenter(state["etcd"]["ns"], [
            "etcdctl", "--endpoints=http://198.18.0.2:2379", "get", "--prefix", "--keys-only",
            "/calico/ipam/v2/handle/vxlan-tunnel-addr-"]),
        capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
    assert sorted(k for k in handles.stdout.split() if k) == [
        "/calico/ipam/v2/handle/vxlan-tunnel-addr-node1",
        "/calico/ipam/v2/handle/vxlan-tunnel-addr-node2"]
    server = listen(vxlan.exec("web/b"), 8080)
    assert connect(vxlan, "web/a", b, 8080) == f"pong ping from {a}"
    server.wait(10)
    tx = json.loads(netns.ip(n1, "-j", "-s", "link", "show", "vxlan.calico").stdout)
    assert tx[0]["stats64"]["tx"]["packets"] > 0  # it went through the tunnel


# ---- BIRD as route reflector -----------------------------------------------------------------

@pytest.fixture(scope="module")
def rr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCli]:
    require_binary("bird")
    require_binary("birdc")
    yield from up("b", tmp_path_factory, "--nodes", "2", "--bird")


def test_bird_learns_every_block_and_its_route_reaches_the_nodes(rr: LabCli) -> None:
    rr.run("pod", "add", "web/a", "--node", "node1")
    rr.run("pod", "add", "web/b", "--node", "node2")
    state = rr.state()
    blocks = {n: [r.split()[1] for r in routes(rr, n, "type", "blackhole", "proto", "81")]
              for n in ("node1", "node2")}
    assert all(blocks.values())

    def bird_has_all() -> bool:
        table = bird.birdc(state, "show", "route")
        return all(f"{cidr}" in table for cidrs in blocks.values() for cidr in cidrs)

    wait_for("BIRD to learn both nodes' blocks", bird_has_all)
    detail = bird.birdc(state, "show", "route", "all", blocks["node2"][0])
    assert "via 198.18.0.12" in detail  # the node's own address as next hop
    assert "Established" in bird.birdc(state, "show", "protocols")
    # reflected between the nodes with the originator's next hop; BIRD's own route arrives
    for node, other, ip in (("node1", "node2", "198.18.0.12"), ("node2", "node1", "198.18.0.11")):
        for cidr in blocks[other]:
            wait_for(f"{cidr} on {node}", lambda n=node, c=cidr, i=ip: routes(rr, n, c) == [
                f"{c} via {i} dev eth0 proto 81"])
        wait_for(f"BIRD's {bird.EXTERNAL_PREFIX} on {node}", lambda n=node: routes(
            rr, n, bird.EXTERNAL_PREFIX) == [f"{bird.EXTERNAL_PREFIX} via {bird.BIRD_IP} "
                                             "dev eth0 proto 81"])
    st = bgp_status(rr, "node1")
    assert [(p["address"], p["kind"]) for p in st["peers"]] == [(bird.BIRD_IP, "global")]
    a, b = pod_ip(rr, "web/a"), pod_ip(rr, "web/b")
    server = listen(rr.exec("web/b"), 8080)
    assert connect(rr, "web/a", b, 8080) == f"pong ping from {a}"
    server.wait(10)


def test_mesh_password_from_a_secret(mesh: LabCli) -> None:
    """As Calico: BGPConfiguration nodeMeshPassword names a Secret in calico-node's namespace
    (calico-system); every node's sessions come back up with TCP MD5, and without it again."""
    state = mesh.state()
    etcd = (state["etcd"]["ns"], etcd_endpoint(state))
    password = {"secretKeyRef": {"name": "bgp-secrets", "key": "mesh-password"}}
    store(*etcd, [{"op": "apply", "objects": [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "bgp-secrets", "namespace": "calico-system"},
         "stringData": {"mesh-password": "very-secret"}},
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration",
         "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": True, "nodeMeshPassword": password}}]}])

    def exabgp_conf(node: str) -> str:
        return (Path(state["nodes"][node]["dir"]) / "run" / "exabgp" / "exabgp.conf").read_text()

    before = {node: learned_routes(mesh, node) for node in ("node1", "node2", "node3")}

    try:
        for node in ("node1", "node2", "node3"):
            wait_for(f"{node}'s sessions up with the password", lambda n=node: (
                exabgp_conf(n).count("md5-password") == 2 and all_peers_up(mesh, n, 2)))
    finally:
        store(*etcd, [{"op": "delete", "kind": "BGPConfiguration",
                       "apiVersion": "projectcalico.org/v3", "name": "default"}])
    for node in ("node1", "node2", "node3"):
        wait_for(f"{node}'s sessions up without it", lambda n=node: (
            "md5-password" not in exabgp_conf(n) and all_peers_up(mesh, n, 2)))
    # sessions that went down took their routes along; they come back with the new sessions
    # (and the next test starts from the mesh as it was)
    for node, learned in before.items():
        wait_for(f"{node}'s learned routes back", lambda n=node, r=learned: (
            learned_routes(mesh, n) >= r))


def test_agent_restart_reconciles_its_routes_and_keeps_learned_ones(mesh: LabCli) -> None:
    ns = mesh.state()["nodes"]["node3"]["ns"]
    # the other nodes' pod blocks (test_cross_node_pod_traffic made a pod on each)
    def next_hops(found: set[str]) -> set[str]:
        return {r.split(" via ")[1].split()[0] for r in found}

    learned = wait_for("node3 routing node1's and node2's blocks", lambda: (
        found if next_hops(found := learned_routes(mesh, "node3")) == {
            "198.18.0.11", "198.18.0.12"} else None))
    # a route of ours the store does not explain (left by a crashed run): it must go
    netns.ip(ns, "route", "add", "blackhole", "10.244.252.0/26", "proto", "81")
    old = bgp_status(mesh, "node3")["agent_pid"]
    os.kill(old, signal.SIGKILL)  # the routing agent; tabby-node starts it again
    wait_for("a new routing agent on node3", lambda: bgp_status(mesh, "node3")["agent_pid"]
             not in (None, old) and all_peers_up(mesh, "node3", 2))
    wait_for("the stray blackhole removed", lambda: routes(mesh, "node3",
                                                            "10.244.252.0/26") == [])
    after = routes(mesh, "node3", "proto", "81")
    assert learned <= set(after)  # the other nodes' blocks never went away
    assert len(after) == len(set(after))


# ---- a Tabby node as route reflector ------------------------------------------------------

@pytest.fixture(scope="module")
def reflector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCli]:
    yield from up("r", tmp_path_factory, "--nodes", "3")


def test_a_node_reflects_routes_between_its_clients(reflector: LabCli) -> None:
    """Calico's in-cluster route reflector: node1 gets routeReflectorClusterID and a label, the
    mesh goes off, every node peers with the labelled ones. node2 and node3 then only talk to
    node1, which passes each one's blocks to the other, next hop kept."""
    state = reflector.state()
    etcd = (state["etcd"]["ns"], etcd_endpoint(state))
    [node1] = [n for n in store(*etcd, [{"op": "list", "kind": "Node"}])[0]
               if n["metadata"]["name"] == "node1"]
    node1["metadata"].setdefault("labels", {})["route-reflector"] = "true"
    node1["spec"]["bgp"]["routeReflectorClusterID"] = "224.0.0.1"
    node1["metadata"].pop("resourceVersion", None)
    store(*etcd, [{"op": "apply", "objects": [
        node1,
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration",
         "metadata": {"name": "default"}, "spec": {"nodeToNodeMeshEnabled": False}},
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer",
         "metadata": {"name": "peer-with-route-reflectors"},
         "spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}}]}])
    wait_for("node1 peering with both clients", lambda: all_peers_up(reflector, "node1", 2))
    for node in ("node2", "node3"):
        wait_for(f"{node} peering with node1 only", lambda n=node: all_peers_up(
            reflector, n, 1) and bgp_status(reflector, n)["peers"][0]["address"] == "198.18.0.11")
    blocks = {"node2": "10.244.241.0/26", "node3": "10.244.242.0/26"}
    for node, cidr in blocks.items():
        block_op(reflector, "claim_block", node, cidr)
    # each client learns the other's block through node1, with the owner as next hop
    for node, other, ip in (("node2", "node3", "198.18.0.13"), ("node3", "node2", "198.18.0.12")):
        wait_for(f"{blocks[other]} on {node}", lambda n=node, c=blocks[other], i=ip: routes(
            reflector, n, c) == [f"{c} via {i} dev eth0 proto 81"])
    for node, ip in (("node2", "198.18.0.12"), ("node3", "198.18.0.13")):
        wait_for(f"{blocks[node]} on node1", lambda c=blocks[node], i=ip: routes(
            reflector, "node1", c) == [f"{c} via {i} dev eth0 proto 81"])
    # a withdrawal is reflected too
    block_op(reflector, "release_block", "node2", blocks["node2"])
    wait_for("node2's block gone from node3", lambda: routes(reflector, "node3",
                                                             blocks["node2"]) == [])

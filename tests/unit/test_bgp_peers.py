"""bgp.peers: Calico's peering rules (mesh, BGPPeers, reverse peerings, RR clients)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bgp.model import NodeRecord, node_record
from bgp.peers import BgpSettings, Peer, bgp_settings, local_as, peers_for

DEFAULT = BgpSettings()


def node(name: str, ip: str | None, asn: Any = None, rr: str | None = None,
         **labels: str) -> NodeRecord:
    bgp: dict[str, Any] = {}
    if ip:
        bgp["ipv4Address"] = f"{ip}/24"
    if asn is not None:
        bgp["asNumber"] = asn
    if rr:
        bgp["routeReflectorClusterID"] = rr
    return node_record({"metadata": {"name": name, "labels": labels},
                        "spec": {"bgp": bgp} if bgp else {}})


def cluster(*records: NodeRecord) -> dict[str, NodeRecord]:
    return {n.name: n for n in records}


def bgp_peer(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer",
            "metadata": {"name": name}, "spec": spec}


def summary(peers: list[Peer]) -> list[tuple[str, str, str]]:
    return [(p.address, p.kind, p.name) for p in peers]


# --- settings ------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    assert bgp_settings(None) == BgpSettings(True, 64512, 179, None)
    assert bgp_settings({"metadata": {"name": "default"}, "spec": {}}) == DEFAULT


def test_settings_from_bgp_configuration() -> None:
    config = {"metadata": {"name": "default"}, "spec": {
        "nodeToNodeMeshEnabled": False, "asNumber": "1.10", "listenPort": 1790,
        "nodeMeshPassword": {"secretKeyRef": {"name": "bgp-secrets", "key": "mesh"}}}}
    assert bgp_settings(config, {("bgp-secrets", "mesh"): "pw"}) == \
        BgpSettings(False, 65546, 1790, "pw")
    # The password is a secret reference: unresolved, there is none.
    assert bgp_settings(config).mesh_password is None


@pytest.mark.parametrize("spec", [
    {"nodeToNodeMeshEnabled": None, "asNumber": "x", "listenPort": 0},
    {"asNumber": True, "listenPort": "1790"},
    {"listenPort": 70000, "nodeMeshPassword": "plain text is not a secretKeyRef"},
])
def test_settings_malformed_fields_read_as_defaults(spec: dict[str, Any]) -> None:
    assert bgp_settings({"spec": spec}) == DEFAULT


def test_local_as_node_first_then_cluster() -> None:
    assert local_as(node("a", "10.0.0.1"), BgpSettings(asn=65001)) == 65001
    assert local_as(node("a", "10.0.0.1", asn=65002), BgpSettings(asn=65001)) == 65002
    assert local_as(node("a", "10.0.0.1", asn="0.65535"), DEFAULT) == 65535


# --- mesh ----------------------------------------------------------------------------------


def test_full_mesh_with_calico_names_ports_and_passive_by_string_order() -> None:
    nodes = cluster(node("n9", "198.18.0.9"), node("n12", "198.18.0.12", asn=65012),
                    node("n2", "198.18.0.2"), node("noip", None))
    settings = BgpSettings(listen_port=1790, mesh_password="pw")
    peers = peers_for(nodes["n9"], nodes, settings, [])
    assert peers == [
        Peer("198.18.0.2", 64512, 64512, "Mesh_198_18_0_2", "mesh", passive=False, port=1790,
             password="pw"),
        # "198.18.0.12" < "198.18.0.9" as strings, so n9 dials n12 even though 12 > 9.
        Peer("198.18.0.12", 65012, 64512, "Mesh_198_18_0_12", "mesh", passive=False,
             port=1790, password="pw"),
    ]
    from_12 = peers_for(nodes["n12"], nodes, settings, [])
    assert [(p.address, p.passive, p.local_as) for p in from_12] == [
        ("198.18.0.2", True, 65012), ("198.18.0.9", True, 65012)]


def test_mesh_off_no_address_and_route_reflectors() -> None:
    nodes = cluster(node("a", "10.0.0.1"), node("b", "10.0.0.2"),
                    node("rr", "10.0.0.3", rr="1.0.0.1"))
    assert peers_for(nodes["a"], nodes, BgpSettings(mesh=False), []) == []
    assert peers_for(node("x", None), nodes, DEFAULT, []) == []
    # Nobody meshes with a route reflector, and a route reflector ignores the mesh.
    assert summary(peers_for(nodes["a"], nodes, DEFAULT, [])) == [
        ("10.0.0.2", "mesh", "Mesh_10_0_0_2")]
    assert peers_for(nodes["rr"], nodes, DEFAULT, []) == []


def test_never_peers_with_itself_even_under_another_name() -> None:
    nodes = cluster(node("a", "10.0.0.1"), node("a-old", "10.0.0.1"))
    assert peers_for(nodes["a"], nodes, DEFAULT, [bgp_peer("p", peerIP="10.0.0.1")]) == []


# --- BGPPeer scopes and targets ------------------------------------------------------------


NODES = cluster(node("a", "10.0.0.1", rack="r1"), node("b", "10.0.0.2", rack="r2"))


def test_global_node_and_node_selector_scopes() -> None:
    peers = [bgp_peer("everyone", peerIP="192.0.2.1", asNumber=65000),
             bgp_peer("only-b", node="b", peerIP="192.0.2.2", asNumber=65000),
             bgp_peer("rack1", nodeSelector="rack == 'r1'", peerIP="192.0.2.3", asNumber=65000)]
    off = BgpSettings(mesh=False)
    assert summary(peers_for(NODES["a"], NODES, off, peers)) == [
        ("192.0.2.1", "global", "Global_192_0_2_1"), ("192.0.2.3", "node", "Node_192_0_2_3")]
    assert summary(peers_for(NODES["b"], NODES, off, peers)) == [
        ("192.0.2.1", "global", "Global_192_0_2_1"), ("192.0.2.2", "node", "Node_192_0_2_2")]


def test_peer_ip_with_port_as_number_forms_and_options() -> None:
    spec = {"peerIP": "192.0.2.1:1179", "asNumber": "1.10", "keepaliveTime": "1m30s",
            "localASNumber": 65100, "password": {"secretKeyRef": {"name": "s", "key": "k"}}}
    [peer] = peers_for(NODES["a"], NODES, BgpSettings(mesh=False), [bgp_peer("tor", **spec)],
                       secrets={("s", "k"): "tor-pw"})
    assert peer == Peer("192.0.2.1", 65546, 65100, "Global_192_0_2_1_port_1179", "global",
                        port=1179, password="tor-pw", keepalive=90)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("1m30s", 90), ("1h", 3600), ("2.5s", 2), ("1500ms", 2), ("100ms", 1),
    ("0s", None), ("", None), ("30", None), ("s", None), ("1x", None), ("5s junk", None),
    (30, None)])
def test_keepalive_time_is_a_go_duration(text: Any, seconds: int | None) -> None:
    [peer] = peers_for(NODES["a"], NODES, BgpSettings(mesh=False),
                       [bgp_peer("p", peerIP="192.0.2.1", asNumber=65000, keepaliveTime=text)])
    assert peer.keepalive == seconds


def test_peer_selector_uses_node_addresses_and_as_and_skips_self() -> None:
    nodes = cluster(node("a", "10.0.0.1", role="edge"), node("b", "10.0.0.2", asn=65002,
                                                             role="edge"),
                    node("c", "10.0.0.3"), node("d", None, role="edge"))
    settings = BgpSettings(mesh=False, listen_port=1790)
    edges = [bgp_peer("edges", peerSelector="role == 'edge'")]
    # A Calico node is dialled on the cluster's listen port, and the session is one-way.
    # Every node peers with the edges, so an edge also peers back with every node (c).
    assert peers_for(nodes["a"], nodes, settings, edges) == [
        Peer("10.0.0.2", 65002, 64512, "Global_10_0_0_2_port_1790", "global", passive=True,
             port=1790),
        Peer("10.0.0.3", 64512, 64512, "Node_10_0_0_3_port_1790", "node", passive=True,
             port=1790)]
    assert summary(peers_for(nodes["c"], nodes, settings, edges)) == [
        ("10.0.0.1", "global", "Global_10_0_0_1_port_1790"),
        ("10.0.0.2", "global", "Global_10_0_0_2_port_1790")]


def test_peer_ip_of_a_calico_node_is_one_way_and_uses_the_listen_port() -> None:
    settings = BgpSettings(mesh=False, listen_port=1790)
    [peer] = peers_for(NODES["b"], NODES, settings, [bgp_peer("p", peerIP="10.0.0.1")])
    assert (peer.port, peer.passive, peer.peer_as) == (1790, False, 64512)
    [outside] = peers_for(NODES["b"], NODES, settings,
                          [bgp_peer("p", peerIP="192.0.2.1", asNumber=65000)])
    assert (outside.port, outside.passive) == (179, False)
    [upper] = peers_for(NODES["a"], NODES, settings, [bgp_peer("p", peerIP="10.0.0.2")])
    assert upper.passive  # "10.0.0.2" > "10.0.0.1": the other side dials


@pytest.mark.parametrize("spec", [
    {"peerIP": "2001:db8::1", "asNumber": 65000},  # IPv6: this speaker is IPv4 only
    {"peerIP": "[2001:db8::1]:179", "asNumber": 65000},
    {"peerIP": "192.0.2.1:0", "asNumber": 65000},
    {"peerIP": "192.0.2.1:x", "asNumber": 65000},
    {"peerIP": "", "asNumber": 65000},
    {"asNumber": 65000},  # no address at all
    {"peerSelector": "role ==", "nodeSelector": "all()"},  # selectors that do not parse
    {"peerIP": "192.0.2.1", "nodeSelector": "&&"},
    {"localWorkloadSelector": "all()", "asNumber": 65000},  # not supported
    {"peerSelector": "role == 'none'"},
])
def test_peers_without_a_usable_address_are_skipped(spec: dict[str, Any]) -> None:
    assert peers_for(NODES["a"], NODES, BgpSettings(mesh=False), [bgp_peer("p", **spec)]) == []


# --- route reflectors ----------------------------------------------------------------------


RR_NODES = cluster(
    node("rr1", "10.0.0.10", rr="1.0.0.1", **{"route-reflector": "true"}),
    node("rr2", "10.0.0.11", rr="1.0.0.1", **{"route-reflector": "true"}),
    node("rr3", "10.0.0.12", rr="2.0.0.1", **{"route-reflector": "true"}),
    node("c1", "10.0.0.5"), node("c2", "10.0.0.6"), node("ext", "10.0.0.7", asn=65007))
RR_SETUP = [bgp_peer("peer-with-rrs", nodeSelector="all()",
                     peerSelector="route-reflector == 'true'")]
NO_MESH = BgpSettings(mesh=False)


def test_clients_peer_with_the_reflectors_as_plain_sessions() -> None:
    peers = peers_for(RR_NODES["c1"], RR_NODES, NO_MESH, RR_SETUP)
    assert [(p.address, p.kind, p.rr_client, p.passive) for p in peers] == [
        # "10.0.0.1x" < "10.0.0.5" as strings: the client dials the reflectors.
        ("10.0.0.10", "node", False, False), ("10.0.0.11", "node", False, False),
        ("10.0.0.12", "node", False, False)]


def test_reflectors_get_reverse_peerings_to_their_clients() -> None:
    peers = peers_for(RR_NODES["rr1"], RR_NODES, NO_MESH, RR_SETUP)
    assert [(p.address, p.name, p.rr_client, p.rr_cluster_id) for p in peers] == [
        ("10.0.0.5", "Node_10_0_0_5", True, "1.0.0.1"),
        ("10.0.0.6", "Node_10_0_0_6", True, "1.0.0.1"),
        ("10.0.0.7", "Node_10_0_0_7", False, None),  # another AS: never a client
        ("10.0.0.11", "Node_10_0_0_11", False, None),  # same cluster: not a client
        ("10.0.0.12", "Node_10_0_0_12", True, "1.0.0.1"),  # other cluster: a client
    ]
    manual = [bgp_peer("peer-with-rrs", nodeSelector="all()", reversePeering="Manual",
                       peerSelector="route-reflector == 'true'")]
    assert [p.address for p in peers_for(RR_NODES["rr1"], RR_NODES, NO_MESH, manual)] == [
        "10.0.0.11", "10.0.0.12"]


def test_reverse_peering_for_a_peer_ip_that_is_a_calico_node() -> None:
    nodes = cluster(node("a", "10.0.0.1", rack="r1"), node("b", "10.0.0.2", rack="r1"),
                    node("rr", "10.0.0.9", rr="1.0.0.1"))
    to_rr = [bgp_peer("to-rr", nodeSelector="rack == 'r1'", peerIP="10.0.0.9",
                      asNumber=64512, password={"secretKeyRef": {"name": "s", "key": "k"}})]
    peers = peers_for(nodes["rr"], nodes, NO_MESH, to_rr, {("s", "k"): "pw"})
    assert [(p.address, p.kind, p.rr_client, p.password) for p in peers] == [
        ("10.0.0.1", "node", True, "pw"), ("10.0.0.2", "node", True, "pw")]
    # A different AS in the BGPPeer means it is not about this node.
    other_as = [bgp_peer("to-rr", nodeSelector="rack == 'r1'", peerIP="10.0.0.9",
                         asNumber=65000)]
    assert peers_for(nodes["rr"], nodes, NO_MESH, other_as) == []


def test_local_as_number_is_ours_forward_and_the_far_ends_in_reverse() -> None:
    peers = [bgp_peer("to-rrs", nodeSelector="!has(route-reflector)", localASNumber=65100,
                      peerSelector="route-reflector == 'true'")]
    [to_rr, *_] = peers_for(RR_NODES["c1"], RR_NODES, NO_MESH, peers)
    assert (to_rr.address, to_rr.local_as, to_rr.peer_as) == ("10.0.0.10", 65100, 64512)
    back = {p.address: p for p in peers_for(RR_NODES["rr1"], RR_NODES, NO_MESH, peers)}
    assert (back["10.0.0.5"].local_as, back["10.0.0.5"].peer_as) == (64512, 65100)
    assert not back["10.0.0.5"].rr_client  # different AS on the session


# --- one peer per address ------------------------------------------------------------------


def test_precedence_global_then_node_then_reverse_then_mesh() -> None:
    nodes = cluster(node("a", "10.0.0.1", rack="r1"), node("b", "10.0.0.2"),
                    node("c", "10.0.0.3"))
    bgp_peers = [
        bgp_peer("z-node", node="a", peerIP="192.0.2.1", asNumber=65001),
        bgp_peer("y-global", peerIP="192.0.2.1", asNumber=65002),
        bgp_peer("b-global", peerIP="192.0.2.1", asNumber=65003),  # first by name wins
        bgp_peer("node-over-mesh", node="a", peerIP="10.0.0.2", keepaliveTime="10s"),
        bgp_peer("reverse-over-mesh", node="c", peerIP="10.0.0.1"),
    ]
    peers = peers_for(nodes["a"], nodes, DEFAULT, bgp_peers)
    assert [(p.address, p.kind, p.peer_as, p.keepalive) for p in peers] == [
        ("10.0.0.2", "node", 64512, 10), ("10.0.0.3", "node", 64512, None),
        ("192.0.2.1", "global", 65003, None)]
    # Input order does not matter.
    assert peers_for(nodes["a"], nodes, DEFAULT, bgp_peers[::-1]) == peers


# --- whole-cluster properties --------------------------------------------------------------


@st.composite
def clusters(draw: st.DrawFn) -> tuple[dict[str, NodeRecord], BgpSettings, list[Any]]:
    hosts = draw(st.lists(st.integers(1, 254), min_size=2, max_size=7, unique=True))
    records = [node(f"n{i}", f"10.0.0.{h}", rr=draw(st.sampled_from([None, "1.0.0.1",
                                                                     "2.0.0.1"])),
                    role=draw(st.sampled_from(["rr", "worker"])))
               for i, h in enumerate(hosts)]
    mesh = draw(st.booleans())
    bgp_peers = draw(st.sampled_from([
        [], [bgp_peer("rr", nodeSelector="all()", peerSelector="role == 'rr'")],
        [bgp_peer("rr", peerSelector="role == 'rr'")],
        [bgp_peer("w", nodeSelector="role == 'worker'", peerSelector="role == 'rr'")],
        [bgp_peer("w", nodeSelector="role == 'worker'", peerSelector="role == 'rr'",
                  localASNumber=65100, password={"secretKeyRef": {"name": "s", "key": "k"}})],
    ]))
    return cluster(*records), BgpSettings(mesh=mesh), bgp_peers


@settings(max_examples=200, deadline=None)
@given(clusters())
def test_sessions_are_symmetric_and_exactly_one_side_dials(
        case: tuple[dict[str, NodeRecord], BgpSettings, list[Any]]) -> None:
    nodes, settings_, bgp_peers = case
    table = {name: {p.address: p for p in peers_for(n, nodes, settings_, bgp_peers,
                                                     {("s", "k"): "pw"})}
             for name, n in nodes.items()}
    for a_name, a in nodes.items():
        for b_name, b in nodes.items():
            if a_name == b_name:
                continue
            ab = table[a_name].get(str(b.ip))
            ba = table[b_name].get(str(a.ip))
            assert (ab is None) == (ba is None), (a_name, b_name)
            if ab is not None and ba is not None:
                assert ab.passive != ba.passive
                assert ab.password == ba.password and ab.port == ba.port
                assert ab.peer_as == ba.local_as and ba.peer_as == ab.local_as

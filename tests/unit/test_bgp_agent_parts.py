"""The routing agent's pure parts: store view -> records, announcements, RIB, tunnel decisions,
Node registration with a BGP address, and the node-status table."""

from __future__ import annotations

import base64
import ipaddress
import json

from bgp import announce, rib, status, tunnels, view
from bgp.model import BlockRecord, NodeRecord, PoolRecord, block_record, node_record
from node.registration import desired_node

POOL = PoolRecord(ipaddress.IPv4Network("10.244.0.0/16"))
NET = ipaddress.IPv4Network


def _block(cidr: str, node: str | None, allocated: dict[int, str] | None = None) -> dict:
    allocated = allocated or {}
    size = NET(cidr).num_addresses
    attrs, allocations = [], [None] * size
    for ordinal, holder in allocated.items():
        allocations[ordinal] = len(attrs)
        attrs.append({"handle_id": f"h{ordinal}", "secondary": {"node": holder}})
    return {"cidr": cidr, "affinity": f"host:{node}" if node else None,
            "allocations": allocations, "unallocated": [], "attributes": attrs}


def test_node_record_reads_calico_fields() -> None:
    rec = node_record({"metadata": {"name": "n1", "labels": {"rr": "yes"}}, "spec": {
        "bgp": {"ipv4Address": "198.18.0.11/24", "asNumber": "1.10",
                "routeReflectorClusterID": "1.0.0.1", "ipv4IPIPTunnelAddr": "10.244.0.1"},
        "ipv4VXLANTunnelAddr": "10.244.0.2", "vxlanTunnelMACAddr": "66:aa:bb:cc:dd:ee"}})
    assert str(rec.ip) == "198.18.0.11" and str(rec.subnet) == "198.18.0.0/24"
    assert rec.asn == 65546 and rec.rr_cluster_id == "1.0.0.1"
    assert str(rec.ipip_ip) == "10.244.0.1" and str(rec.vxlan_ip) == "10.244.0.2"
    assert node_record({"metadata": {"name": "bare"}}).ip is None


def test_block_record_confirmation_and_borrowed() -> None:
    raw = _block("10.244.1.0/26", "n1", {0: "n1", 5: "n2"})
    rec = block_record(raw, {("n1", "10.244.1.0/26")})
    assert rec is not None and rec.node == "n1" and rec.confirmed
    assert rec.borrowed == ((ipaddress.IPv4Address("10.244.1.5"), "n2"),)
    assert not block_record(raw, set()).confirmed  # type: ignore[union-attr]


def test_announcements_blocks_and_borrowed_addresses() -> None:
    blocks = [BlockRecord(NET("10.244.1.0/26"), "n1"),
              BlockRecord(NET("10.244.1.64/26"), "n1", confirmed=False),
              BlockRecord(NET("10.244.2.0/26"), "n2",
                          borrowed=((ipaddress.IPv4Address("10.244.2.9"), "n1"),))]
    assert announce.announcements("n1", blocks, [POOL]) == {"10.244.1.0/26", "10.244.2.9/32"}
    assert announce.announcements("n2", blocks, [POOL]) == {"10.244.2.0/26"}
    quiet = PoolRecord(NET("10.244.0.0/16"), disable_bgp_export=True)
    assert announce.announcements("n1", blocks, [quiet]) == frozenset()


def test_rib_merges_peers_deterministically() -> None:
    r = rib.Rib()
    assert r.announce("198.18.0.12", {"10.244.2.0/26": "198.18.0.12"})
    assert r.announce("198.18.0.3", {"10.244.2.0/26": "198.18.0.12", "203.0.113.0/24":
                                     "198.18.0.3"})
    assert not r.announce("198.18.0.3", {"203.0.113.0/24": "198.18.0.3"})  # no change
    r.announce("198.18.0.13", {"10.244.9.0/26": "198.18.0.13", "10.244.2.0/26": "198.18.0.2"})
    assert r.learned()["10.244.2.0/26"] == "198.18.0.2"  # lowest next hop wins
    assert r.withdraw("198.18.0.13", ["10.244.2.0/26"])
    assert r.learned()["10.244.2.0/26"] == "198.18.0.12"
    assert r.drop_peer("198.18.0.3") and "203.0.113.0/24" not in r.learned()
    assert not r.drop_peer("198.18.0.3")


def test_tunnel_changes() -> None:
    vx = PoolRecord(NET("10.244.0.0/16"), vxlan_mode="Always")
    bare = NodeRecord("n1", ip=ipaddress.IPv4Address("198.18.0.11"))
    assert tunnels.tunnel_changes(bare, [vx]) == {"vxlan": True}
    done = NodeRecord("n1", vxlan_ip=ipaddress.IPv4Address("10.244.0.1"),
                      vxlan_mac="66:00:00:00:00:01")
    assert tunnels.tunnel_changes(done, [vx]) == {}
    assert tunnels.tunnel_changes(done, [POOL]) == {"vxlan": False}  # no VXLAN pool left
    moved = NodeRecord("n1", vxlan_ip=ipaddress.IPv4Address("10.99.0.1"), vxlan_mac="x")
    assert tunnels.tunnel_changes(moved, [vx]) == {"vxlan": True}  # outside every VXLAN pool
    ipip = PoolRecord(NET("10.244.0.0/16"), ipip_mode="CrossSubnet")
    assert tunnels.tunnel_changes(bare, [ipip]) == {"ipip": True}
    assert tunnels.tunnel_changes(bare, [PoolRecord(NET("10.244.0.0/16"), vxlan_mode="Always",
                                                    disabled=True)]) == {}


def test_store_view_inputs() -> None:
    v = view.StoreView()
    assert not v.complete
    node = {"kind": "Node", "metadata": {"name": "n1"},
            "spec": {"bgp": {"ipv4Address": "198.18.0.11/24"}}}
    v.replace(view.NODES, [(f"{view.NODES}n1", json.dumps(node).encode()),
                           (f"{view.NODES}bad", b"{nope")])
    v.replace(view.POOLS, [(f"{view.POOLS}p", json.dumps(
        {"spec": {"cidr": "10.244.0.0/16", "vxlanMode": "Always"}}).encode())])
    v.replace(view.BLOCKS, [(f"{view.BLOCKS}10.244.1.0-26",
                             json.dumps(_block("10.244.1.0/26", "n1")).encode())])
    v.replace(view.AFFINITIES, [("/calico/ipam/v2/host/n1/ipv4/block/10.244.1.0-26",
                                 b'{"state":"confirmed","deleted":false}')])
    v.replace(view.BGP_CONFIGS, [(f"{view.BGP_CONFIGS}default", json.dumps(
        {"metadata": {"name": "default"}, "spec": {"nodeToNodeMeshEnabled": False}}).encode())])
    v.replace(view.BGP_PEERS, [])
    assert v.complete
    got = v.inputs()
    assert list(got.nodes) == ["n1"] and got.pools[0].vxlan_mode == "Always"
    assert got.blocks[0].confirmed and got.bgp_config is not None
    assert any("bad" in p for p in got.problems)
    v.put(view.AFFINITIES, "/calico/ipam/v2/host/n1/ipv4/block/10.244.1.0-26", None)
    assert not v.inputs().blocks[0].confirmed


def test_registration_records_bgp_address_and_keeps_the_rest() -> None:
    existing = {"apiVersion": "projectcalico.org/v3", "kind": "Node",
                "metadata": {"name": "n1"},
                "spec": {"bgp": {"routeReflectorClusterID": "1.0.0.1"},
                         "ipv4VXLANTunnelAddr": "10.244.0.1"}}
    node = desired_node("n1", existing, "198.18.0.11/24", 64600)
    assert node["spec"]["bgp"] == {"routeReflectorClusterID": "1.0.0.1",
                                   "ipv4Address": "198.18.0.11/24", "asNumber": 64600}
    assert node["spec"]["ipv4VXLANTunnelAddr"] == "10.244.0.1"
    assert "bgp" not in desired_node("n2", None)["spec"]


def test_status_table_like_calicoctl() -> None:
    import os

    text = status.render_table({
        "backend": "bird", "agent_pid": os.getpid(), "speaker": {"pid": os.getpid()},
        "peers": [{"address": "198.18.0.12", "kind": "mesh", "state": "up", "since": 0.0,
                   "info": "Established"},
                  {"address": "198.18.0.3", "kind": "global", "state": "idle",
                   "info": "Connect"}]})
    assert text.startswith("Tabby process is running.")
    assert "| 198.18.0.12  | node-to-node mesh | up    |" in text
    assert "| 198.18.0.3   | global            | start |" in text
    dead = status.render_table({"backend": "bird", "agent_pid": 2 ** 22 + 7, "peers": []})
    assert "not running" in dead and "No IPv4 peers found." in dead


def test_store_view_reads_bgp_passwords_from_its_namespaces_secrets() -> None:
    v = view.StoreView("calico-system")
    prefix = "/tabby/k8s/secrets/calico-system/"
    assert v.prefixes[-1] == prefix and len(v.prefixes) == len(view.PREFIXES) + 1
    for p in view.PREFIXES:
        v.replace(p, [])
    assert not v.complete  # the Secrets are not listed yet
    long = base64.b64encode(b"x" * 81).decode()
    v.replace(prefix, [
        (f"{prefix}bgp-secrets", json.dumps({"metadata": {"name": "bgp-secrets"}, "data": {
            "rr-password": base64.b64encode(b"very-secret").decode(), "long": long}}).encode()),
        (f"{prefix}broken", json.dumps({"metadata": {"name": "broken"},
                                         "data": {"k": "!!"}}).encode())])
    assert v.complete
    got = v.inputs()
    assert got.secrets[("bgp-secrets", "rr-password")] == "very-secret"
    assert ("broken", "k") not in got.secrets
    assert any("broken" in p for p in got.problems)
    assert any("longer than 80" in p for p in got.problems)
    assert view.StoreView().prefixes == view.PREFIXES  # no namespace: no Secrets read

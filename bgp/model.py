"""What routing needs from the store, as plain records (pure).

The routing agent reads Nodes, IPPools, IPAM blocks and affinities, BGPConfiguration and
BGPPeers (Calico's v3 JSON and IPAM JSON, as in etcd) and turns them into these records; every
calculation in `bgp/` (peers, exabgp config, announcements, kernel routes, VXLAN) works on
them, so it can be tested without etcd.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IPv4Net = ipaddress.IPv4Network
IPv4 = ipaddress.IPv4Address

DEFAULT_AS = 64512  # Calico's default when neither BGPConfiguration nor the Node sets one
AFFINITY_HOST = "host:"
CONFIRMED = "confirmed"


@dataclass(frozen=True)
class NodeRecord:
    """One Calico Node: its BGP identity and tunnel endpoints (None where unset)."""

    name: str
    ip: IPv4 | None = None  # spec.bgp.ipv4Address without the prefix length
    subnet: IPv4Net | None = None  # spec.bgp.ipv4Address's network (CrossSubnet decisions)
    asn: int | None = None  # spec.bgp.asNumber
    rr_cluster_id: str | None = None  # spec.bgp.routeReflectorClusterID
    ipip_ip: IPv4 | None = None  # spec.bgp.ipv4IPIPTunnelAddr
    vxlan_ip: IPv4 | None = None  # spec.ipv4VXLANTunnelAddr
    vxlan_mac: str | None = None  # spec.vxlanTunnelMACAddr
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolRecord:
    cidr: IPv4Net
    ipip_mode: str = "Never"  # Never | Always | CrossSubnet
    vxlan_mode: str = "Never"
    disabled: bool = False
    disable_bgp_export: bool = False


@dataclass(frozen=True)
class BlockRecord:
    """An IPAM block: the node it is affine to (None: none), whether that affinity is
    confirmed, and addresses in it held by other nodes (borrowed: (ip, node))."""

    cidr: IPv4Net
    node: str | None
    confirmed: bool = True
    borrowed: tuple[tuple[IPv4, str], ...] = ()


def node_record(obj: Mapping[str, Any]) -> NodeRecord:
    """A NodeRecord from a Calico v3 Node object (tolerant: bad fields read as unset)."""
    spec = obj.get("spec") or {}
    bgp = spec.get("bgp") or {}
    iface = _iface(bgp.get("ipv4Address"))
    asn = bgp.get("asNumber")
    return NodeRecord(
        name=obj["metadata"]["name"],
        ip=iface.ip if iface else None,
        subnet=iface.network if iface else None,
        asn=_asn(asn),
        rr_cluster_id=bgp.get("routeReflectorClusterID") or None,
        ipip_ip=_ip(bgp.get("ipv4IPIPTunnelAddr")),
        vxlan_ip=_ip(spec.get("ipv4VXLANTunnelAddr")),
        vxlan_mac=(spec.get("vxlanTunnelMACAddr") or None),
        labels=dict((obj.get("metadata") or {}).get("labels") or {}),
    )


def pool_record(obj: Mapping[str, Any]) -> PoolRecord | None:
    """A PoolRecord from a v3 IPPool (None for IPv6 pools: routing here is IPv4)."""
    spec = obj.get("spec") or {}
    try:
        net = ipaddress.ip_network(spec.get("cidr", ""), strict=False)
    except ValueError:
        return None
    if not isinstance(net, IPv4Net):
        return None
    return PoolRecord(net, spec.get("ipipMode") or "Never", spec.get("vxlanMode") or "Never",
                      bool(spec.get("disabled")), bool(spec.get("disableBGPExport")))


def block_record(block: Mapping[str, Any], confirmed_affinities: Iterable[tuple[str, str]] = ()
                 ) -> BlockRecord | None:
    """A BlockRecord from Calico's IPAM block JSON. `confirmed_affinities` holds (node, cidr)
    of every affinity whose state is confirmed; a block whose affinity node has no confirmed
    affinity for it is not confirmed (Calico announces only confirmed blocks)."""
    try:
        net = ipaddress.ip_network(block["cidr"], strict=False)
    except (KeyError, ValueError):
        return None
    if not isinstance(net, IPv4Net):
        return None
    affinity = block.get("affinity") or ""
    node = affinity[len(AFFINITY_HOST):] if affinity.startswith(AFFINITY_HOST) else None
    confirmed = node is not None and (node, str(net)) in set(confirmed_affinities)
    attributes = block.get("attributes") or []
    borrowed = []
    for ordinal, index in enumerate(block.get("allocations") or []):
        if index is None or not 0 <= index < len(attributes):
            continue
        holder = ((attributes[index] or {}).get("secondary") or {}).get("node")
        if holder and holder != node:
            borrowed.append((net.network_address + ordinal, holder))
    return BlockRecord(net, node, confirmed, tuple(borrowed))


def _iface(text: Any) -> ipaddress.IPv4Interface | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        iface = ipaddress.ip_interface(text if "/" in text else f"{text}/32")
    except ValueError:
        return None
    return iface if isinstance(iface, ipaddress.IPv4Interface) else None


def _ip(text: Any) -> IPv4 | None:
    iface = _iface(text)
    return iface.ip if iface else None


def _asn(value: Any) -> int | None:
    """Calico writes AS numbers as integers or as strings ("64512", "1.10" asdot)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value:
        if "." in value:
            high, _, low = value.partition(".")
            if high.isdigit() and low.isdigit():
                return int(high) * 65536 + int(low)
            return None
        return int(value) if value.isdigit() else None
    return None

"""Which kernel routes, VXLAN device and VTEPs a node needs (pure), Calico's rules.

Inputs are the store's records (`bgp.model`) and `learned`, the BGP RIB (prefix -> next hop).

- Every block affine to this node gets a blackhole route, confirmed or not: the block is ours
  to hold, and the CNI's /32 routes to local pods are more specific.
- Learned prefixes: skipped when the next hop is this node or the prefix is inside an enabled
  VXLAN pool (the store-driven VXLAN part below owns those); inside an IPIP pool `via NH dev
  tunl0 onlink` (CrossSubnet: only when NH is outside this node's subnet); otherwise (no-encap
  pool, or no pool at all, e.g. a ToR's route) plain `via NH`.
- VXLAN needs no BGP: with an enabled VXLAN pool and this node's IP, tunnel IP and tunnel MAC
  known, the device, one VTEP per remote node with all three, and per remote block (or address
  borrowed by a remote node) inside a VXLAN pool a route `via <its VTEP> dev vxlan.calico
  onlink` (CrossSubnet: plain `via <node IP>` when that node shares this node's subnet).
  A remote node without VTEP data gets no route. Addresses this node borrowed need nothing:
  the CNI's /32 route to the pod covers them.

Disabled pools count as no pool. Every destination appears once; precedence: this node's
blackholes, then VXLAN routes, then learned routes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bgp.model import BlockRecord, IPv4Net, NodeRecord, PoolRecord

ROUTE_PROTO = 81  # routes the routing agent owns (CNI pod routes use 80; never touch those)
VXLAN_DEVICE, VXLAN_VNI, VXLAN_PORT, VXLAN_OVERHEAD = "vxlan.calico", 4096, 4789, 50
IPIP_DEVICE, IPIP_OVERHEAD = "tunl0", 20

ALWAYS, CROSS_SUBNET = "Always", "CrossSubnet"
_ENCAP = (ALWAYS, CROSS_SUBNET)


@dataclass(frozen=True, order=True)
class Route:
    dst: str  # "10.244.1.0/26"
    type: str = "unicast"  # or "blackhole"
    gateway: str | None = None
    dev: str | None = None  # None: the kernel picks the device for the gateway
    onlink: bool = False

    def __str__(self) -> str:
        """The route as `ip route` writes it, for logs and error messages."""
        if self.type != "unicast":
            return f"{self.type} {self.dst}"
        text = self.dst
        if self.gateway:
            text += f" via {self.gateway}"
        if self.dev:
            text += f" dev {self.dev}"
        return text + (" onlink" if self.onlink else "")


@dataclass(frozen=True, order=True)
class Vtep:
    node: str
    node_ip: str
    tunnel_ip: str
    mac: str


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    vni: int
    port: int
    local_ip: str
    mac: str
    address: str
    mtu: int


@dataclass(frozen=True)
class RoutingPlan:
    routes: frozenset[Route]
    vxlan: VxlanDevice | None
    vteps: frozenset[Vtep]
    ipip: bool


def plan(local: str, nodes: Mapping[str, NodeRecord], pools: Sequence[PoolRecord],
         blocks: Sequence[BlockRecord], learned: Mapping[str, str], uplink_mtu: int = 1500
         ) -> RoutingPlan:
    """Everything this node (`local`) should program; see the module docstring."""
    me = nodes.get(local)
    enabled = [p for p in pools if not p.disabled]
    routes: dict[str, Route] = {}  # by destination: the first rule to claim one keeps it

    for block in blocks:
        if block.node == local:
            routes.setdefault(str(block.cidr), Route(str(block.cidr), type="blackhole"))

    device, vteps = _vxlan(me, nodes, enabled, blocks, uplink_mtu, routes)

    for prefix, next_hop in sorted(learned.items()):
        route = _learned_route(me, enabled, prefix, next_hop)
        if route is not None:
            routes.setdefault(route.dst, route)

    return RoutingPlan(routes=frozenset(routes.values()), vxlan=device, vteps=vteps,
                       ipip=any(p.ipip_mode in _ENCAP for p in enabled))


def _pool_of(net: IPv4Net, pools: Sequence[PoolRecord]) -> PoolRecord | None:
    """The most specific pool holding `net` (pools should not overlap, but be deterministic)."""
    holding = [p for p in pools if net.subnet_of(p.cidr)]
    return max(holding, key=lambda p: p.cidr.prefixlen) if holding else None


def _same_subnet(me: NodeRecord | None, ip: ipaddress.IPv4Address) -> bool:
    return bool(me and me.subnet is not None and ip in me.subnet)


def _learned_route(me: NodeRecord | None, pools: Sequence[PoolRecord], prefix: str,
                   next_hop: str) -> Route | None:
    try:
        net = ipaddress.ip_network(prefix, strict=False)
        hop = ipaddress.ip_address(next_hop)
    except ValueError:
        return None
    if not isinstance(net, IPv4Net) or not isinstance(hop, ipaddress.IPv4Address):
        return None
    if me is not None and hop == me.ip:
        return None  # our own announcement reflected back
    pool = _pool_of(net, pools)
    if pool is not None and pool.vxlan_mode in _ENCAP:
        return None
    tunnel = pool is not None and (
        pool.ipip_mode == ALWAYS
        or (pool.ipip_mode == CROSS_SUBNET and not _same_subnet(me, hop)))
    if tunnel:
        return Route(str(net), gateway=str(hop), dev=IPIP_DEVICE, onlink=True)
    return Route(str(net), gateway=str(hop))


def _has_vtep(node: NodeRecord | None) -> bool:
    return bool(node and node.ip and node.vxlan_ip and node.vxlan_mac)


def _vxlan(me: NodeRecord | None, nodes: Mapping[str, NodeRecord],
           pools: Sequence[PoolRecord], blocks: Sequence[BlockRecord], uplink_mtu: int,
           routes: dict[str, Route]) -> tuple[VxlanDevice | None, frozenset[Vtep]]:
    """The VXLAN device and VTEPs; adds the VXLAN routes to `routes`."""
    if not any(p.vxlan_mode in _ENCAP for p in pools) or me is None or not _has_vtep(me):
        return None, frozenset()
    assert me.ip and me.vxlan_ip and me.vxlan_mac  # _has_vtep
    device = VxlanDevice(name=VXLAN_DEVICE, vni=VXLAN_VNI, port=VXLAN_PORT,
                         local_ip=str(me.ip), mac=me.vxlan_mac.lower(),
                         address=str(me.vxlan_ip), mtu=uplink_mtu - VXLAN_OVERHEAD)
    remote = {name: n for name, n in nodes.items() if name != me.name and _has_vtep(n)}
    vteps = frozenset(Vtep(name, str(n.ip), str(n.vxlan_ip), (n.vxlan_mac or "").lower())
                      for name, n in remote.items())

    def route_to(dst: IPv4Net, holder: str | None) -> None:
        node = remote.get(holder or "")
        pool = _pool_of(dst, pools)
        if node is None or pool is None or pool.vxlan_mode not in _ENCAP:
            return  # not VXLAN's to route, or no VTEP for that node
        assert node.ip is not None
        if pool.vxlan_mode == CROSS_SUBNET and _same_subnet(me, node.ip):
            route = Route(str(dst), gateway=str(node.ip))
        else:
            route = Route(str(dst), gateway=str(node.vxlan_ip), dev=VXLAN_DEVICE, onlink=True)
        routes.setdefault(route.dst, route)

    for block in blocks:
        if block.node != me.name:
            route_to(block.cidr, block.node)
        for ip, holder in block.borrowed:
            if holder != me.name:
                route_to(ipaddress.IPv4Network(f"{ip}/32"), holder)
    return device, vteps

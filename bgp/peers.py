"""Which BGP sessions a node should have, following Calico's rules (pure, no I/O).

Sources, in the order they claim an address (one Peer per address; the first claim wins):

1. Global BGPPeers (neither ``node`` nor ``nodeSelector``), by BGPPeer name.
2. BGPPeers that select this node (``node`` / ``nodeSelector``), by BGPPeer name.
3. Reverse peerings: a BGPPeer whose remote side (``peerSelector``, or a ``peerIP`` + AS that
   is a Calico node) is this node makes it peer back with the nodes on the BGPPeer's local
   side. Calico adds these so that a route reflector selected by ``peerSelector`` also gets
   sessions to its clients. ``reversePeering: Manual`` turns them off.
4. The node-to-node mesh (lowest: an explicit BGPPeer carries settings such as a password).

Steps 1-3 are Calico's own precedence (confd ``updatePeersV1``: global first, a node-specific
or reverse peering never replaces an existing one). Calico keys peerings by (IP, port) and
renders mesh sessions separately; exabgp keys a neighbor by address, so here a later source
for the same address is dropped instead.

Passive: Calico makes sessions between two Calico nodes unidirectional to avoid connection
collisions: the side whose address *string* sorts lower waits ("10.0.0.5" > "10.0.0.10").
This applies to the mesh and to every BGPPeer session whose address is a Calico node, so both
ends always agree on who connects. Sessions to non-Calico peers are never passive.

BGPPeer ``password`` and BGPConfiguration ``nodeMeshPassword`` are Secret references; the
caller passes their values as ``secrets`` ((Secret name, key) -> value). ``localASNumber`` is
the AS of the BGPPeer's local side (ours forward, the far end's on a reverse peering).

Not modelled (ignored): ``localWorkloadSelector`` BGPPeers, ``sourceAddress``, ``ttlSecurity``,
``nextHopMode``/``keepOriginalNextHop``, ``maxRestartTime``, ``numAllowedLocalASNumbers``,
``reachableBy``, ``filters``, IPv6 peers, and per-node ``listenPort`` overrides.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bgp.model import DEFAULT_AS, NodeRecord
from bgp.model import _asn as parse_asn
from datastore.selector import SelectorError, parse

__all__ = ["BGP_PORT", "BgpSettings", "Peer", "Secrets", "bgp_settings", "local_as", "peers_for"]

BGP_PORT = 179

# Secret values by (Secret name, key): Calico passwords are secretKeyRefs, which the caller
# resolves (it knows where Secrets live); a missing entry means "no password".
Secrets = Mapping[tuple[str, str], str]


@dataclass(frozen=True, order=True)
class Peer:
    address: str  # IPv4
    peer_as: int
    local_as: int
    name: str  # Calico's protocol name: Mesh_10_0_0_2, Global_10_0_0_9, Node_10_0_0_9_port_1790
    kind: str  # "mesh" | "global" | "node"
    passive: bool = False  # wait for the peer to connect (see the module docstring)
    rr_client: bool = False  # this node reflects routes to the peer
    rr_cluster_id: str | None = None  # this node's cluster ID, when rr_client
    port: int = BGP_PORT  # the peer's port
    password: str | None = None  # TCP MD5
    keepalive: int | None = None  # seconds (BGPPeer keepaliveTime)


@dataclass(frozen=True)
class BgpSettings:
    mesh: bool = True
    asn: int = DEFAULT_AS
    listen_port: int = BGP_PORT
    mesh_password: str | None = None


def bgp_settings(config: Mapping[str, Any] | None, secrets: Secrets | None = None
                 ) -> BgpSettings:
    """Settings from the BGPConfiguration named "default" (a v3 object), or Calico's defaults
    for None. Tolerant: a malformed field reads as its default."""
    spec = (config or {}).get("spec") or {}
    port = spec.get("listenPort")
    return BgpSettings(
        mesh=spec.get("nodeToNodeMeshEnabled") is not False,
        asn=parse_asn(spec.get("asNumber")) or DEFAULT_AS,
        listen_port=port if _is_port(port) else BGP_PORT,
        mesh_password=_secret(spec.get("nodeMeshPassword"), secrets),
    )


def local_as(node: NodeRecord, settings: BgpSettings) -> int:
    """The node's own AS, else the cluster's."""
    return node.asn if node.asn is not None else settings.asn


def peers_for(local: NodeRecord, nodes: Mapping[str, NodeRecord], settings: BgpSettings,
              bgp_peers: Sequence[Mapping[str, Any]], secrets: Secrets | None = None
              ) -> list[Peer]:
    """Every BGP session `local` should have, sorted by address. `nodes` maps node name to
    record (it may include `local`); `bgp_peers` are v3 BGPPeer objects. A node without an
    IPv4 address has no sessions (it has no address to speak BGP from)."""
    if local.ip is None:
        return []
    ctx = _Context(local, str(local.ip), nodes, settings, secrets or {})
    chosen: dict[str, Peer] = {}
    ordered = sorted(bgp_peers, key=_peer_name)
    sources: list[Iterable[Peer]] = [
        *(ctx.forward(obj) for obj in ordered if _is_global(obj)),
        *(ctx.forward(obj) for obj in ordered if not _is_global(obj)),
        *(ctx.reverse(obj) for obj in ordered),
        ctx.mesh(),
    ]
    for source in sources:
        for peer in source:
            if peer.address != ctx.my_ip:  # never peer with yourself
                chosen.setdefault(peer.address, peer)
    return sorted(chosen.values(), key=lambda p: ipaddress.IPv4Address(p.address))


# --- internals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """The far end of a session before the per-BGPPeer settings are applied."""

    address: str
    peer_as: int
    port: int
    calico: bool  # the address is a Calico node's
    rr_cluster_id: str | None  # that node's cluster ID
    explicit_port: bool = False  # port came from peerIP "ip:port" (Calico names it)


class _Context:
    def __init__(self, local: NodeRecord, my_ip: str, nodes: Mapping[str, NodeRecord],
                 settings: BgpSettings, secrets: Secrets) -> None:
        self.local = local
        self.my_ip = my_ip
        self.settings = settings
        self.secrets = secrets
        self.my_as = local_as(local, settings)
        # Sorted by name so every "first match" below is deterministic.
        self.nodes = [n for _, n in sorted(nodes.items()) if n.ip is not None]
        self.by_ip: dict[str, NodeRecord] = {}
        for node in self.nodes:
            self.by_ip.setdefault(str(node.ip), node)

    # Calico nodes as targets: their IP, AS, cluster ID and the cluster's listen port.
    def _node_target(self, node: NodeRecord) -> _Target:
        return _Target(str(node.ip), local_as(node, self.settings), self.settings.listen_port,
                       True, node.rr_cluster_id)

    def _matching(self, selector: Any) -> list[NodeRecord]:
        return [n for n in self.nodes if _selects(selector, n.labels)]

    def _selects_local(self, spec: Mapping[str, Any]) -> bool:
        if spec.get("node"):
            return spec["node"] == self.local.name
        if spec.get("nodeSelector"):
            return _selects(spec["nodeSelector"], self.local.labels)
        return True

    def _peer_ip_target(self, spec: Mapping[str, Any]) -> _Target | None:
        split = _split_peer_ip(spec.get("peerIP"))
        if split is None:
            return None
        address, port = split
        node = self.by_ip.get(address)
        peer_as = parse_asn(spec.get("asNumber")) or self.settings.asn
        explicit = port is not None
        if port is None:
            # Calico: a peer that is a Calico node is dialled on the cluster's listen port.
            port = self.settings.listen_port if node else BGP_PORT
        return _Target(address, peer_as, port, node is not None,
                       node.rr_cluster_id if node else None, explicit_port=explicit)

    def forward(self, obj: Mapping[str, Any]) -> Iterator[Peer]:
        spec = _spec(obj)
        if spec is None or not self._selects_local(spec):
            return
        if spec.get("peerSelector"):
            targets = [self._node_target(n) for n in self._matching(spec["peerSelector"])]
        else:
            target = self._peer_ip_target(spec)
            targets = [target] if target else []
        kind = "global" if _is_global(obj) else "node"
        for target in targets:
            yield self._peer(target, kind, spec)

    def reverse(self, obj: Mapping[str, Any]) -> Iterator[Peer]:
        spec = _spec(obj)
        if spec is None or spec.get("reversePeering") == "Manual":
            return
        if not self._is_remote_side(spec):
            return
        # ...so it peers back with the BGPPeer's local side.
        if spec.get("node"):
            others = [n for n in self.nodes if n.name == spec["node"]]
        elif spec.get("nodeSelector"):
            others = self._matching(spec["nodeSelector"])
        else:
            others = self.nodes
        for node in others:
            yield self._peer(self._node_target(node), "node", spec, reverse=True)

    def _is_remote_side(self, spec: Mapping[str, Any]) -> bool:
        """Is this node what the BGPPeer peers *with* (Calico's nodesWithIPPortAndAS)?"""
        if spec.get("peerSelector"):
            return _selects(spec["peerSelector"], self.local.labels)
        split = _split_peer_ip(spec.get("peerIP"))
        if split is None or split[0] != self.my_ip:
            return False
        want_as = parse_asn(spec.get("asNumber")) or self.settings.asn
        port = split[1]
        return want_as == self.my_as and (port is None or port == self.settings.listen_port)

    def mesh(self) -> Iterator[Peer]:
        # Calico: a route reflector ignores the mesh, and nobody meshes with one.
        if not self.settings.mesh or self.local.rr_cluster_id:
            return
        for node in self.nodes:
            if node.rr_cluster_id:
                continue
            address = str(node.ip)
            yield Peer(address=address, peer_as=local_as(node, self.settings),
                       local_as=self.my_as, name=f"Mesh_{_underscored(address)}", kind="mesh",
                       passive=address > self.my_ip, port=self.settings.listen_port,
                       password=self.settings.mesh_password)

    def _peer(self, target: _Target, kind: str, spec: Mapping[str, Any],
              reverse: bool = False) -> Peer:
        # localASNumber is the AS the BGPPeer's local side speaks as: ours on a forward
        # peering, the far end's on a reverse one.
        override = parse_asn(spec.get("localASNumber"))
        my_as, peer_as = self.my_as, target.peer_as
        if override and reverse:
            peer_as = override
        elif override:
            my_as = override
        cluster = self.local.rr_cluster_id
        rr_client = bool(cluster) and peer_as == my_as and target.rr_cluster_id != cluster
        name = f"{kind.capitalize()}_{_underscored(target.address)}"
        if target.explicit_port or target.port != BGP_PORT:
            name += f"_port_{target.port}"
        return Peer(address=target.address, peer_as=peer_as, local_as=my_as, name=name,
                    kind=kind, passive=target.calico and target.address > self.my_ip,
                    rr_client=rr_client, rr_cluster_id=cluster if rr_client else None,
                    port=target.port, password=_secret(spec.get("password"), self.secrets),
                    keepalive=_seconds(spec.get("keepaliveTime")))


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    spec = obj.get("spec")
    if not isinstance(spec, Mapping) or spec.get("localWorkloadSelector"):
        return None
    return spec


def _selects(selector: Any, labels: Mapping[str, str]) -> bool:
    """Does a selector match these labels? An invalid selector matches nothing."""
    try:
        return parse(selector).matches(labels)
    except (SelectorError, TypeError):
        return False


def _is_global(obj: Mapping[str, Any]) -> bool:
    spec = obj.get("spec") or {}
    return not spec.get("node") and not spec.get("nodeSelector")


def _peer_name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _underscored(address: str) -> str:
    return address.replace(".", "_")


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _split_peer_ip(value: Any) -> tuple[str, int | None] | None:
    """("a.b.c.d", port or None) from peerIP "ip" or "ip:port"; None if not IPv4."""
    if not isinstance(value, str):
        return None
    host, sep, port_text = value.partition(":")
    try:
        address = str(ipaddress.IPv4Address(host))
    except ValueError:
        return None  # malformed, or IPv6 (this speaker is IPv4 only)
    if not sep:
        return address, None
    port = int(port_text) if port_text.isdigit() else None
    return (address, port) if _is_port(port) else None


def _secret(ref: Any, secrets: Secrets | None) -> str | None:
    """The value behind {"secretKeyRef": {"name": ..., "key": ...}}, or None."""
    if not isinstance(ref, Mapping) or not isinstance(ref.get("secretKeyRef"), Mapping):
        return None
    key = ref["secretKeyRef"]
    value = (secrets or {}).get((str(key.get("name")), str(key.get("key"))))
    return value or None


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}


def _seconds(value: Any) -> int | None:
    """Whole seconds (at least 1) of a Go duration such as "30s" or "1m30s"; None if unset,
    zero or malformed."""
    if not isinstance(value, str) or not value:
        return None
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            return None
        total += float(m[1]) * _UNIT_SECONDS[m[2]]
        pos = m.end()
    if pos != len(value) or total <= 0:
        return None
    return max(1, round(total))

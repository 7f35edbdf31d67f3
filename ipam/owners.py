"""Who owns an allocation (pure): WorkloadEndpoints and Nodes matched against IPAM's allocations.

An allocation is **in use** when something owns it:
* a WorkloadEndpoint lists the address in `spec.ipNetworks`, or
* a WorkloadEndpoint's `spec.containerID` is the container in the handle
  (`k8s-pod-network.<containerID>`), or
* a WorkloadEndpoint is the pod named by the attributes `namespace`/`pod` (or by a legacy
  `<namespace>.<pod>` handle) and it does not name another container, or
* a Node lists it as a tunnel address, or it is a tunnel address of a Node that exists, or
* it is Windows' reserved handle.
Otherwise it is **leaked** when its owner is identifiable (pod attributes, or a tunnel address of a
node that has no Node resource) and **unverified** when it is not (no pod/namespace attributes,
e.g. LoadBalancer addresses): Calico's GC assumes those valid, so Tabby never frees them
automatically either; they are reported, and `ipam release --ip` frees them by hand.

`ipam.check` builds its report and the GC decision on this; its names are re-exported there.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ipam.block import WINDOWS_RESERVED_HANDLE

if TYPE_CHECKING:
    from ipam.block import Block

Resource = dict[str, Any]
TUNNEL_TYPES = frozenset({"ipipTunnelAddress", "vxlanTunnelAddress", "vxlanV6TunnelAddress",
                          "wireguardTunnelAddress", "wireguardV6TunnelAddress"})
# Handle prefixes Calico's node agent uses for its tunnel addresses, longest first.
TUNNEL_HANDLE_PREFIXES = ("wireguard-v6-tunnel-addr-", "vxlan-v6-tunnel-addr-",
                          "wireguard-tunnel-addr-", "vxlan-tunnel-addr-", "ipip-tunnel-addr-")

IN_USE, LEAKED, UNVERIFIED = "in-use", "leaked", "unverified"


# ---- owners ---------------------------------------------------------------------------------


def _ip(text: str) -> str | None:
    """An address (or /32, /128 interface) in canonical form; None if it is not one."""
    try:
        return str(ipaddress.ip_interface(text).ip)
    except ValueError:
        return None


def _wep_label(wep: Resource) -> str:
    meta = wep.get("metadata", {})
    return f"Workload({meta.get('namespace', '')}/{meta.get('name', '')})"


def node_tunnel_addresses(node: Resource) -> list[str]:
    """The tunnel addresses a Node resource records (IPIP, VXLAN, WireGuard)."""
    spec = node.get("spec") or {}
    found = [(spec.get("bgp") or {}).get("ipv4IPIPTunnelAddr"),
             spec.get("ipv4VXLANTunnelAddr"), spec.get("ipv6VXLANTunnelAddr"),
             (spec.get("wireguard") or {}).get("interfaceIPv4Address"),
             (spec.get("wireguard") or {}).get("interfaceIPv6Address")]
    return [ip for ip in (_ip(a) for a in found if isinstance(a, str)) if ip]


@dataclass
class Owners:
    """Who could own an address: WorkloadEndpoints and Nodes, indexed every way we match."""

    by_ip: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    by_container: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # (namespace, pod) -> [(label, containerID or "", ips)]
    by_pod: dict[tuple[str, str], list[tuple[str, str, set[str]]]] = field(
        default_factory=lambda: defaultdict(list))
    nodes: set[str] = field(default_factory=set)
    wep_ips: list[tuple[str, str]] = field(default_factory=list)  # (ip, label), for pool checks


def index_owners(weps: Iterable[Resource], nodes: Iterable[Resource]) -> Owners:
    owners = Owners()
    for wep in weps:
        spec, meta = wep.get("spec") or {}, wep.get("metadata") or {}
        label = _wep_label(wep)
        ips = {ip for ip in (_ip(n) for n in spec.get("ipNetworks") or []) if ip}
        for ip in sorted(ips):
            owners.by_ip[ip].append(label)
            owners.wep_ips.append((ip, label))
        container = spec.get("containerID") or ""
        if container:
            owners.by_container[container].append(label)
        if spec.get("pod"):
            owners.by_pod[(meta.get("namespace", ""), spec["pod"])].append(
                (label, container, ips))
    for node in nodes:
        name = node.get("metadata", {}).get("name", "")
        owners.nodes.add(name)
        for ip in node_tunnel_addresses(node):
            owners.by_ip[ip].append(f"Node({name})")
    return owners


# ---- allocations ----------------------------------------------------------------------------


def tunnel_node(handle: str | None, attrs: Mapping[str, str]) -> str | None:
    """The node a tunnel address belongs to, or None when this is not a tunnel address."""
    if attrs.get("type") in TUNNEL_TYPES:
        return attrs.get("node") or _tunnel_handle_node(handle) or ""
    return _tunnel_handle_node(handle)


def _tunnel_handle_node(handle: str | None) -> str | None:
    for prefix in TUNNEL_HANDLE_PREFIXES:
        if handle and handle.startswith(prefix):
            return handle[len(prefix):]
    return None


@dataclass
class Allocation:
    ip: str
    block: str
    ordinal: int
    handle: str | None
    sequence_number: int
    attrs: dict[str, str]
    host: str | None  # the block's affinity host
    status: str = IN_USE
    owners: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def node(self) -> str:
        return self.attrs.get("node") or self.host or ""

    @property
    def borrowed(self) -> bool:
        """Handed out by a node from a block affine to another (Calico: node != affinity)."""
        return bool(self.attrs.get("node")) and self.attrs["node"] != (self.host or "")

    def to_json(self) -> dict[str, Any]:
        return {
            "ip": self.ip, "block": self.block, "ordinal": self.ordinal,
            "handle": self.handle or "", "sequenceNumber": self.sequence_number,
            "pod": self.attrs.get("pod", ""), "namespace": self.attrs.get("namespace", ""),
            "node": self.node, "type": self.attrs.get("type", ""),
            "creationTimestamp": self.attrs.get("timestamp", ""),
            "inUse": self.status == IN_USE, "borrowed": self.borrowed,
            "owners": list(self.owners), "status": self.status, "reason": self.reason,
        }


def _container_of(handle: str | None) -> str:
    """`<network>.<containerID>` -> containerID (container IDs have no dots)."""
    return handle.rpartition(".")[2] if handle and "." in handle else ""


def classify(alloc: Allocation, owners: Owners) -> Allocation:
    """Decide who owns `alloc`; sets status, owners and reason (and returns it)."""
    alloc.owners, alloc.reason = [], ""
    if alloc.handle == WINDOWS_RESERVED_HANDLE:
        alloc.status, alloc.owners = IN_USE, ["Reserved for Windows"]
        return alloc
    found = list(owners.by_ip.get(alloc.ip, []))
    container = _container_of(alloc.handle)
    found += owners.by_container.get(container, []) if container else []
    ns, pod = alloc.attrs.get("namespace", ""), alloc.attrs.get("pod", "")
    other_container = ""
    for label, wep_container, _ in owners.by_pod.get((ns, pod), []) if ns and pod else []:
        # a WEP that names another container is a newer sandbox of the same pod
        if wep_container and container and wep_container != container:
            other_container = wep_container
        else:
            found.append(label)
    # Calico v2's handle was `<namespace>.<pod>` (namespaces have no dots)
    legacy_ns, _, legacy_pod = (alloc.handle or "").partition(".")
    found += [label for label, _, _ in owners.by_pod.get((legacy_ns, legacy_pod), [])]
    node = tunnel_node(alloc.handle, alloc.attrs)
    if node is not None and node in owners.nodes:
        found.append(f"Node({node})")
    if found:
        alloc.status, alloc.owners = IN_USE, sorted(set(found))
    elif node is not None:
        alloc.status = LEAKED if node else UNVERIFIED
        alloc.reason = (f"tunnel address of node {node}, which has no Node resource" if node
                        else "tunnel address with no node attribute")
    elif ns and pod:
        alloc.status = LEAKED
        alloc.reason = f"no WorkloadEndpoint for pod {ns}/{pod}"
        if other_container:
            alloc.reason = (f"WorkloadEndpoint of pod {ns}/{pod} belongs to container "
                            f"{other_container} and does not use this address")
    else:
        alloc.status = UNVERIFIED
        alloc.reason = ("no WorkloadEndpoint for container " + container if container
                        else "no owner found") + "; no pod/namespace attributes, assumed in use"
    return alloc


def block_allocations(block: Block) -> list[Allocation]:
    """Every allocated ordinal, read from the fields so that a corrupt block still reads."""
    seqs = block.sequence_number_for_allocation or {}
    out: list[Allocation] = []
    for ordinal, index in enumerate(block.allocations):
        if index is None:
            continue
        attr = block.attributes[index] if 0 <= index < len(block.attributes) else None
        out.append(Allocation(
            ip=str(block.address(ordinal)), block=block.cidr, ordinal=ordinal,
            handle=attr.handle if attr else None,
            sequence_number=seqs.get(str(ordinal), 0),  # Calico reads a missing number as 0
            attrs=dict(attr.secondary or {}) if attr else {}, host=block.host))
    return out

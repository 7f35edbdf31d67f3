"""The node's tunnel addresses: allocated from IPAM, recorded on its Node (Calico's way).

When an enabled pool uses VXLAN (Always or CrossSubnet) the node needs a VTEP: an address from
such a pool under the IPAM handle `vxlan-tunnel-addr-<node>` (attribute type
`vxlanTunnelAddress`) in `spec.ipv4VXLANTunnelAddr`, and a MAC in `spec.vxlanTunnelMACAddr`
(random, locally administered, kept once chosen). IPIP likewise: `ipip-tunnel-addr-<node>`,
type `ipipTunnelAddress`, `spec.bgp.ipv4IPIPTunnelAddr`. When no pool needs one any more the
address is released and the field removed. `tunnel_changes` is the pure decision;
`ensure_tunnel_addresses` does the IPAM and Node writes (the Node with a compare-and-swap on
its revision, retried, so a concurrent registration write is never lost).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bgp.model import NodeRecord, PoolRecord

VXLAN, IPIP = "vxlan", "ipip"
WRITE_ATTEMPTS = 10

log = logging.getLogger("tabby.bgp.tunnels")


@dataclass(frozen=True)
class TunnelKind:
    name: str
    handle_prefix: str
    attr_type: str

    def handle(self, node: str) -> str:
        return f"{self.handle_prefix}{node}"


KINDS = {VXLAN: TunnelKind(VXLAN, "vxlan-tunnel-addr-", "vxlanTunnelAddress"),
         IPIP: TunnelKind(IPIP, "ipip-tunnel-addr-", "ipipTunnelAddress")}


def pools_needing(kind: str, pools: Sequence[PoolRecord]) -> list[PoolRecord]:
    mode = (lambda p: p.vxlan_mode) if kind == VXLAN else (lambda p: p.ipip_mode)
    return [p for p in pools if not p.disabled and mode(p) in ("Always", "CrossSubnet")]


def tunnel_changes(node: NodeRecord, pools: Sequence[PoolRecord]) -> dict[str, bool]:
    """kind -> True (allocate: needed and missing or outside every such pool) / False
    (release: present but no longer needed); kinds already right are absent (pure)."""
    out: dict[str, bool] = {}
    for kind, have in ((VXLAN, node.vxlan_ip), (IPIP, node.ipip_ip)):
        wanted = pools_needing(kind, pools)
        if wanted and (have is None or not any(have in p.cidr for p in wanted)
                       or (kind == VXLAN and not node.vxlan_mac)):
            out[kind] = True
        elif not wanted and have is not None:
            out[kind] = False
    return out


def random_mac() -> str:
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in octets)


def _set_field(node: dict[str, Any], kind: str, address: str | None, mac: str | None) -> None:
    spec = node.setdefault("spec", {})
    if kind == VXLAN:
        if address is None:
            spec.pop("ipv4VXLANTunnelAddr", None)
            spec.pop("vxlanTunnelMACAddr", None)
        else:
            spec["ipv4VXLANTunnelAddr"] = address
            spec["vxlanTunnelMACAddr"] = mac or spec.get("vxlanTunnelMACAddr") or random_mac()
        return
    bgp = spec.setdefault("bgp", {})
    if address is None:
        bgp.pop("ipv4IPIPTunnelAddr", None)
    else:
        bgp["ipv4IPIPTunnelAddr"] = address


async def ensure_tunnel_addresses(store: Any, ipam: Any, node: NodeRecord,
                                  pools: Sequence[PoolRecord]) -> list[str]:
    """Bring the Node's tunnel addresses in line with the pools; returns what was done."""
    from ipam.allocator import AssignRequest

    done: list[str] = []
    for kind_name, allocate in tunnel_changes(node, pools).items():
        kind = KINDS[kind_name]
        handle = kind.handle(node.name)
        await ipam.release_by_handle(handle)
        address = None
        if allocate:
            got = await ipam.auto_assign(AssignRequest(
                handle_id=handle, hostname=node.name, num_v4=1,
                attrs={"node": node.name, "type": kind.attr_type,
                       "timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())},
                ipv4_pools=[str(p.cidr) for p in pools_needing(kind_name, pools)],
                intended_use="Tunnel"))
            if not got.ipv4:
                raise RuntimeError(f"no address left for the {kind_name} tunnel of {node.name}")
            address = str(got.ipv4[0].ip)
        await _update_node(store, node.name, kind_name, address)
        done.append(f"{kind_name} tunnel address {address}" if address
                    else f"released the {kind_name} tunnel address")
    return done


async def _update_node(store: Any, name: str, kind: str, address: str | None) -> None:
    from datastore.kinds import kind_for
    from datastore.store import ConflictError

    for _ in range(WRITE_ATTEMPTS):
        current = await store.get(kind_for("Node"), name)
        updated = copy.deepcopy(current)
        _set_field(updated, kind, address, None)
        if updated == current:
            return
        try:
            await store.replace(updated)  # guarded by the resourceVersion just read
            return
        except ConflictError:
            continue  # someone else wrote the Node meanwhile: read it again
    raise RuntimeError(f"Node {name} kept changing; could not record its {kind} tunnel address")

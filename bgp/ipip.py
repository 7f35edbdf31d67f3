"""The IPIP device, Calico's way: `tunl0` with the node's IPIP tunnel address (/32), MTU of the
uplink minus 20, up. The kernel's ipip module creates `tunl0` when it loads; asking for an
`ipip` link loads it where it exists. Where the kernel has no IPIP at all, `ensure_ipip` says so
in an IpipError (the routes through tunl0 then fail too, and are reported): use VXLAN there.
"""

from __future__ import annotations

from dataclasses import dataclass

from bgp.model import NodeRecord
from bgp.routes import IPIP_DEVICE, IPIP_OVERHEAD

EOPNOTSUPP = 95


class IpipError(RuntimeError):
    """tunl0 cannot be set up; the message says why and what to do."""


@dataclass(frozen=True)
class IpipDevice:
    address: str | None  # the node's spec.bgp.ipv4IPIPTunnelAddr (None until allocated)
    mtu: int
    name: str = IPIP_DEVICE


def ipip_device(local: NodeRecord, uplink_mtu: int) -> IpipDevice:
    """What tunl0 should look like on this node (pure)."""
    return IpipDevice(str(local.ipip_ip) if local.ipip_ip else None, uplink_mtu - IPIP_OVERHEAD)


def ensure_ipip(device: IpipDevice) -> list[str]:
    """Make tunl0 exist, carry the tunnel address, have the MTU and be up; returns what it did."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    done: list[str] = []
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=device.name)
        if not found:
            try:
                ipr.link("add", ifname=device.name, kind="ipip")
            except NetlinkError as e:
                if e.code == EOPNOTSUPP:
                    raise IpipError(
                        "this kernel has no IPIP support (module ipip): pools with ipipMode "
                        "cannot carry traffic on this node; use vxlanMode instead") from None
                raise IpipError(f"cannot create {device.name}: {e}") from None
            done.append(f"created {device.name}")
            found = ipr.link_lookup(ifname=device.name)
        index = found[0]
        link = ipr.get_links(index)[0]
        if link.get_attr("IFLA_MTU") != device.mtu:
            ipr.link("set", index=index, mtu=device.mtu)
            done.append(f"MTU {device.mtu}")
        if not link["flags"] & 1:
            ipr.link("set", index=index, state="up")
            done.append("up")
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)}
        if device.address and device.address not in have:
            ipr.addr("replace", index=index, address=device.address, prefixlen=32)
            done.append(f"address {device.address}/32")
        for stale in have - {device.address}:
            ipr.addr("del", index=index, address=stale, prefixlen=32)
            done.append(f"removed address {stale}")
    return done

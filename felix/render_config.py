"""What the renderer is told about the node: Felix configuration, IP pools and mark bits (pure)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from felix.rules import IPNetwork, parse_net

# Felix's default failsafe ports (config_params.go): (protocol, port).
FAILSAFE_INBOUND: tuple[tuple[str, int], ...] = (
    ("tcp", 22), ("udp", 68), ("tcp", 179), ("tcp", 2379), ("tcp", 2380), ("tcp", 5473),
    ("tcp", 6443), ("tcp", 6666), ("tcp", 6667),
)
FAILSAFE_OUTBOUND: tuple[tuple[str, int], ...] = (
    ("udp", 53), ("udp", 67), ("tcp", 179), ("tcp", 2379), ("tcp", 2380), ("tcp", 5473),
    ("tcp", 6443), ("tcp", 6666), ("tcp", 6667),
)


@dataclass(frozen=True)
class Pool:
    """An IPPool as NAT needs it."""

    cidr: IPNetwork
    nat_outgoing: bool = False


def pools_from_resources(objs: Iterable[Mapping[str, Any]]) -> tuple[Pool, ...]:
    """IPPool resources -> Pools (disabled pools still count as "inside the cluster")."""
    pools = []
    for obj in objs:
        spec = obj.get("spec") or {}
        if spec.get("cidr"):
            pools.append(Pool(parse_net(spec["cidr"]), bool(spec.get("natOutgoing"))))
    return tuple(pools)


@dataclass(frozen=True)
class MarkBits:
    """Calico's mark bits, allocated low-to-high from IptablesMarkMask."""

    accept: int
    pass_: int
    drop: int
    scratch0: int
    scratch1: int

    @classmethod
    def from_mask(cls, mask: int) -> MarkBits:
        bits = [1 << i for i in range(32) if mask & (1 << i)]
        if len(bits) < 5:
            raise ValueError(f"mark mask {mask:#x} has fewer than the 5 bits Felix needs")
        return cls(*bits[:5])

    @property
    def all(self) -> int:
        return self.accept | self.pass_ | self.drop | self.scratch0 | self.scratch1


@dataclass(frozen=True)
class RenderConfig:
    interface_prefix: str = "cali"
    mark_mask: int = 0xFFFF0000
    # k8s manifests set ACCEPT (Felix's own default is DROP); RETURN falls through INPUT.
    endpoint_to_host_action: str = "ACCEPT"
    deny_action: str = "DROP"
    failsafe_inbound: tuple[tuple[str, int], ...] = FAILSAFE_INBOUND
    failsafe_outbound: tuple[tuple[str, int], ...] = FAILSAFE_OUTBOUND
    # LOG prefix; %k kind, %p namespace/name, %n name, %t tier (Calico's LogPrefix syntax).
    log_prefix: str = "calico-%k %p"
    pools: tuple[Pool, ...] = ()
    ip_versions: tuple[int, ...] = (4, 6)
    # Calico drops VXLAN (udp 4789) and IPIP packets sent by pods unless allowed.
    drop_encap_from_workloads: bool = True
    vxlan_port: int = 4789
    # raw-table strict reverse-path check for workload traffic (anti-spoofing).
    strict_rpf: bool = True
    # The node's non-workload interfaces and their addresses ("10.0.0.5" or "10.0.0.5/24"),
    # filled in by the agent: host endpoints naming only expectedIPs are resolved against them.
    host_interfaces: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @cached_property
    def marks(self) -> MarkBits:  # asked for per chain; worth computing once
        return MarkBits.from_mask(self.mark_mask)

    @property
    def workload_wildcard(self) -> str:
        return self.interface_prefix + "+"

    def pool_nets(self, family: int, nat_only: bool = False) -> list[IPNetwork]:
        return [p.cidr for p in self.pools
                if p.cidr.version == family and (p.nat_outgoing or not nat_only)]


def catch_all(family: int) -> IPNetwork:
    return ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0")

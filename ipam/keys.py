"""Calico's IPAM key layout in etcd (libcalico-go `model/block.go`, `block_affinity.go`,
`ipam_handle.go`, `ipam_config.go`, `ipam_host.go`) (pure).

CIDRs in keys write `/` as `-` (`10.244.1.0/26` -> `10.244.1.0-26`; IPv6 keeps its colons).
That encoding is load-bearing: another spelling would strand existing rows.
"""

from __future__ import annotations

import functools
import ipaddress
import re

IPAM_PREFIX = "/calico/ipam/v2/"
BLOCK_PREFIX = "/calico/ipam/v2/assignment/"
HOST_PREFIX = "/calico/ipam/v2/host/"
HANDLE_PREFIX = "/calico/ipam/v2/handle/"
CONFIG_KEY = "/calico/ipam/v2/config"

_BLOCK = re.compile(r"^/?calico/ipam/v2/assignment/ipv[46]/block/([^/]+)$")
_AFFINITY = re.compile(r"^/?calico/ipam/v2/host/([^/]+)/ipv[46]/block/([^/]+)$")
_HANDLE = re.compile(r"^/?calico/ipam/v2/handle/([^/]+)$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def network(cidr: str | Network) -> Network:
    """A CIDR as a network, host bits cleared (Calico masks block CIDRs too)."""
    if isinstance(cidr, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return cidr
    return _parsed_network(cidr)


@functools.lru_cache(maxsize=4096)
def _parsed_network(cidr: str) -> Network:
    """Parsed once per process: a node asks for the same few block CIDRs on every ADD (the
    networks are immutable, so sharing them is safe)."""
    return ipaddress.ip_network(cidr, strict=False)


def _encoded(cidr: str | Network) -> tuple[int, str]:
    net = network(cidr)
    return net.version, str(net).replace("/", "-", 1)


def block_prefix(version: int | None = None) -> str:
    return f"{BLOCK_PREFIX}ipv{version}/" if version else BLOCK_PREFIX


def block_key(cidr: str | Network) -> str:
    version, text = _encoded(cidr)
    return f"{BLOCK_PREFIX}ipv{version}/block/{text}"


def host_prefix(host: str) -> str:
    """Everything of one host: its affinities of both families (and the legacy marker's
    children)."""
    return f"{HOST_PREFIX}{host}/"


def ipam_host_key(host: str) -> str:
    """The legacy, empty "IPAM host" marker; deleted with the host."""
    return f"{HOST_PREFIX}{host}"


def affinity_key(host: str, cidr: str | Network) -> str:
    version, text = _encoded(cidr)
    return f"{HOST_PREFIX}{host}/ipv{version}/block/{text}"


def handle_key(handle_id: str) -> str:
    return f"{HANDLE_PREFIX}{handle_id}"


@functools.lru_cache(maxsize=4096)
def _cidr(text: str) -> str | None:
    try:
        return str(ipaddress.ip_network(text.replace("-", "/", 1), strict=False))
    except ValueError:
        return None


def parse_block_key(key: str) -> str | None:
    match = _BLOCK.match(key)
    return _cidr(match.group(1)) if match else None


def parse_affinity_key(key: str) -> tuple[str, str] | None:
    """(host, cidr) of a host affinity key; None for anything else (the host marker too)."""
    match = _AFFINITY.match(key)
    if not match:
        return None
    cidr = _cidr(match.group(2))
    return (match.group(1), cidr) if cidr else None


def parse_handle_key(key: str) -> str | None:
    match = _HANDLE.match(key)
    return match.group(1) if match else None

"""Which pools a request may use, where a host looks for blocks, and what is reserved (pure).

Follows libcalico-go `ipam.go: determinePools / filterPoolsByUse`, `pools.go`,
`ipam_block_reader_writer.go: randomBlockGenerator / findUsableBlock` and `addr_filter.go`.

The block walk: a host starts at a pseudo-random block of the pool, seeded with the 32-bit FNV-1
hash of its name, and goes round the pool once. Concurrent nodes therefore start in different
places while one node keeps coming back to the same region. The start index comes from
Python's PRNG rather than Go's math/rand stream, so it differs from Calico's for the same name;
what matters (deterministic per host, different between hosts, one full cycle) is kept.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datastore.selector import SelectorError, parse
from ipam.block import IP, Block
from ipam.errors import InvalidRequest, NoMatchingPool
from ipam.keys import Network

WORKLOAD, TUNNEL, LOAD_BALANCER = "Workload", "Tunnel", "LoadBalancer"
DEFAULT_USES = (WORKLOAD, TUNNEL)
AUTOMATIC, MANUAL = "Automatic", "Manual"
EMPTY_BLOCK_MIN_RECLAIM_AGE = 60.0  # seconds; stops two nodes ping-ponging an empty block


@dataclass(frozen=True)
class Pool:
    name: str
    cidr: Network
    block_size: int
    disabled: bool = False
    node_selector: str = ""
    namespace_selector: str = ""
    allowed_uses: tuple[str, ...] = DEFAULT_USES
    assignment_mode: str = AUTOMATIC

    @classmethod
    def from_resource(cls, obj: Mapping[str, Any]) -> Pool:
        """From a stored IPPool (v3 JSON); fills Calico's defaults for anything missing."""
        spec = obj.get("spec") or {}
        cidr = ipaddress.ip_network(spec["cidr"], strict=False)
        return cls(
            name=obj["metadata"]["name"],
            cidr=cidr,
            block_size=int(spec.get("blockSize") or (26 if cidr.version == 4 else 122)),
            disabled=bool(spec.get("disabled", False)),
            node_selector=spec.get("nodeSelector") or "",
            namespace_selector=spec.get("namespaceSelector") or "",
            allowed_uses=tuple(spec.get("allowedUses") or DEFAULT_USES),
            assignment_mode=spec.get("assignmentMode") or AUTOMATIC,
        )

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def num_blocks(self) -> int:
        return 1 << max(self.block_size - self.cidr.prefixlen, 0)

    def block_at(self, index: int) -> Network:
        step = 1 << (self.cidr.max_prefixlen - self.block_size)
        base = int(self.cidr.network_address) + index * step
        return ipaddress.ip_network((base, self.block_size))

    def block_of(self, address: IP) -> Network:
        return ipaddress.ip_network((address, self.block_size), strict=False)

    def index_of(self, block: Network) -> int:
        step = 1 << (self.cidr.max_prefixlen - self.block_size)
        return (int(block.network_address) - int(self.cidr.network_address)) // step

    def contains(self, item: IP | Network) -> bool:
        if item.version != self.version:
            return False
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return item.subnet_of(self.cidr)  # type: ignore[arg-type]
        return item in self.cidr

    def __str__(self) -> str:
        return f"{self.name} ({self.cidr})"


def pool_containing(pools: Iterable[Pool], item: IP | Network) -> Pool | None:
    return next((p for p in pools if p.contains(item)), None)


# -- selection ---------------------------------------------------------------------------------


def select_pools(pools: Sequence[Pool], version: int, requested: Sequence[str],
                 node: str, node_labels: Mapping[str, str],
                 namespace_labels: Mapping[str, str], use: str = WORKLOAD) -> list[Pool]:
    """The pools one family of a request may draw from, in the order to try them.

    Requested pools (by name or CIDR) are used as given: each must exist and be enabled, and
    their selectors and assignment mode are not consulted. Otherwise every enabled Automatic
    pool of the family whose nodeSelector matches the node and whose namespaceSelector matches
    the namespace, by name. Either way the pool must allow `use`.
    """
    family = f"IPv{version}"
    if requested:
        chosen = [_requested_pool(pools, version, r) for r in requested]
        chosen = list(dict.fromkeys(chosen))
        skipped = [(p, f"its allowedUses {list(p.allowed_uses)} exclude {use}")
                   for p in chosen if use not in p.allowed_uses]
        usable = [p for p in chosen if use in p.allowed_uses]
    else:
        usable, skipped = [], []
        for pool in sorted((p for p in pools if p.version == version), key=lambda p: p.name):
            reason = _why_not(pool, node_labels, namespace_labels, use)
            if reason:
                skipped.append((pool, reason))
            else:
                usable.append(pool)
    if usable:
        return usable
    if not skipped:
        raise NoMatchingPool(f"no {family} pool exists for node {node}; create an IPPool "
                             f"(tabbyctl apply -f pool.yaml)")
    reasons = "; ".join(f"{p}: {why}" for p, why in skipped)
    raise NoMatchingPool(f"no {family} pool can be used for {use} on node {node}: {reasons}")


def _requested_pool(pools: Sequence[Pool], version: int, wanted: str) -> Pool:
    match = next((p for p in pools if p.name == wanted), None)
    if match is None:
        try:
            net = ipaddress.ip_network(wanted.strip(), strict=False)
        except ValueError:
            net = None
        match = next((p for p in pools if net is not None and p.cidr == net), None)
    if match is None:
        known = ", ".join(str(p) for p in pools) or "none"
        raise NoMatchingPool(f"requested pool {wanted!r} does not exist (pools: {known})")
    if match.version != version:
        raise InvalidRequest(f"requested pool {match} is IPv{match.version}, "
                             f"but was given as an IPv{version} pool")
    if match.disabled:
        raise NoMatchingPool(f"requested pool {match} is disabled")
    return match


def _why_not(pool: Pool, node_labels: Mapping[str, str], namespace_labels: Mapping[str, str],
             use: str) -> str | None:
    if pool.disabled:
        return "disabled"
    if pool.assignment_mode != AUTOMATIC:
        return f"assignmentMode {pool.assignment_mode} (used only when asked for by name)"
    if not selects(pool.node_selector, node_labels):
        return f"nodeSelector {pool.node_selector!r} does not match the node's labels"
    if not selects(pool.namespace_selector, namespace_labels):
        return f"namespaceSelector {pool.namespace_selector!r} does not match the namespace"
    if use not in pool.allowed_uses:
        return f"its allowedUses {list(pool.allowed_uses)} exclude {use}"
    return None


def selects(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether a pool's node or namespace selector selects these labels."""
    if not selector.strip():
        return True  # no selector selects everything, as in Calico
    try:
        return parse(selector).matches(labels)
    except SelectorError:
        return False  # validated on write; a bad one stored by hand selects nothing


# -- reservations ------------------------------------------------------------------------------


class Reservations:
    """The CIDRs of every IPReservation: never handed out by automatic assignment."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(networks)

    @classmethod
    def from_resources(cls, objs: Iterable[Mapping[str, Any]]) -> Reservations:
        nets: list[Network] = []
        for obj in objs:
            for cidr in (obj.get("spec") or {}).get("reservedCIDRs") or []:
                nets.append(ipaddress.ip_network(cidr, strict=False))
        return cls(nets)

    def matches(self, address: IP) -> bool:
        return any(address in n for n in self.networks)

    def covers(self, block: Network) -> bool:
        """Whether every address of `block` is reserved (then the block is not worth a claim)."""
        same = [n for n in self.networks if n.version == block.version]
        if any(block.subnet_of(n) for n in same):  # type: ignore[arg-type]
            return True
        inside = [n for n in same if n.subnet_of(block)]  # type: ignore[arg-type]
        covered = sum(n.num_addresses for n in ipaddress.collapse_addresses(inside))  # type: ignore[arg-type]
        return covered == block.num_addresses


# -- the per-host block walk -------------------------------------------------------------------


def fnv32(data: bytes) -> int:
    """FNV-1 (not 1a), 32 bits: Go's hash/fnv New32, which Calico seeds the walk with."""
    h = 0x811C9DC5
    for byte in data:
        h = (h * 0x01000193) & 0xFFFFFFFF
        h ^= byte
    return h


def walk_start(pool: Pool, hostname: str) -> int:
    if pool.block_size == pool.cidr.max_prefixlen:
        # single-address blocks: Calico seeds with the time, any start is as good
        return random.randrange(pool.num_blocks)
    return random.Random(fnv32(hostname.encode())).randrange(pool.num_blocks)


def block_walk(pool: Pool, hostname: str) -> Iterator[Network]:
    """Every block CIDR of the pool once, starting at the host's place and wrapping round."""
    n = pool.num_blocks
    start = walk_start(pool, hostname)
    for i in range(n):
        yield pool.block_at((start + i) % n)


def in_walk_order(pool: Pool, hostname: str, cidrs: Iterable[Network]) -> list[Network]:
    """Existing blocks of the pool in the order the host's walk would meet them."""
    n, start = pool.num_blocks, walk_start(pool, hostname)
    return sorted(cidrs, key=lambda c: (pool.index_of(c) - start) % n)


@dataclass(frozen=True)
class Reclaimable:
    cidr: str
    host: str
    sequence_number: int


@dataclass(frozen=True)
class Usable:
    """Result of the search for a block to claim: a CIDR without a block, or one of ours with
    room (`cidr`), else empty blocks of other hosts old enough to take over."""

    cidr: str | None
    reclaimable: tuple[Reclaimable, ...] = ()


def find_usable_block(pools: Sequence[Pool], hostname: str, blocks: Mapping[str, Block],
                      reservations: Reservations, now: float) -> Usable:
    """Walk each pool in the host's order: the first CIDR with no block wins, or a block of
    ours with free room. Empty blocks of other hosts claimed more than a minute ago are
    collected as a last resort."""
    candidates: list[Reclaimable] = []
    for pool in pools:
        for cidr in block_walk(pool, hostname):
            if reservations.covers(cidr):
                continue
            block = blocks.get(str(cidr))
            if block is None:
                return Usable(str(cidr))
            free = block.free_count(reservations.networks)
            if block.host == hostname and free:
                return Usable(str(cidr))
            if block.host and block.host != hostname and free and block.is_empty():
                claimed = block.claim_time()
                if claimed is None or now - claimed >= EMPTY_BLOCK_MIN_RECLAIM_AGE:
                    candidates.append(Reclaimable(str(cidr), block.host, block.sequence_number))
    return Usable(None, tuple(candidates))


def describe_usage(pools: Sequence[Pool], blocks: Mapping[str, Block],
                   reservations: Reservations, exclude: Collection[IP] = ()) -> str:
    """How full each pool is, for exhaustion errors; `exclude` are addresses about to be given
    back (a failed request's own), which are not counted as in use."""
    parts = []
    for pool in pools:
        inside = [b for b in blocks.values() if pool.contains(b.network)]
        used = sum(b.in_use() for b in inside) - sum(1 for a in exclude if pool.contains(a))
        reserved = sum(
            n.num_addresses for n in ipaddress.collapse_addresses(  # type: ignore[arg-type]
                [n for n in reservations.networks
                 if n.version == pool.version and n.subnet_of(pool.cidr)]))  # type: ignore[arg-type]
        text = (f"pool {pool}: {used} of {pool.cidr.num_addresses} addresses in use, "
                f"{len(inside)} of {pool.num_blocks} /{pool.block_size} blocks exist")
        if reserved:
            text += f", {reserved} reserved"
        parts.append(text)
    return "; ".join(parts)

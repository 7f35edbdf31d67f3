"""One IPAM allocation block, as Calico stores it (`model/block.go`, `ipam/ipam_block.go`) (pure).

A block is a power-of-two slice of a pool. `allocations[ordinal]` is the index of the
allocation's attribute (or None when free); `unallocated` is a FIFO of free ordinals: allocation
pops from the head and releases append to the tail, so the address free the longest is reused
first. Equal attributes are shared. `sequenceNumber` starts at the creation time in nanoseconds
and goes up on every write; each allocation records the number the block had when it was made,
so a release based on stale information can be refused.

Every address of the block is handed out, the network and last address included (Calico on
Linux does the same). The JSON round-trips field for field, unknown fields included.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ipam.errors import AddressInUse, AddressNotAllocated, InvalidRequest, StaleSequenceNumber
from ipam.keys import Network
from ipam.records import sorted_map

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

WINDOWS_RESERVED_HANDLE = "windows-reserved-ipam-handle"
AFFINITY_HOST = "host:"

_BLOCK_FIELDS = ("cidr", "affinity", "affinity_claim_time", "allocations", "unallocated",
                 "attributes", "sequenceNumber", "sequenceNumberForAllocation", "deleted")


def sanitize_handle(handle_id: str) -> str:
    """Calico cuts handles at the first CR (host-local migration once wrote them with one)."""
    return handle_id.split("\r", 1)[0]


def _ip(value: str | IP) -> IP:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidRequest(f"{value!r} is not an IP address") from None


@dataclass
class Attribute:
    """Who holds an allocation: the handle and free-form `secondary` attributes (node,
    namespace, pod, timestamp, type). `extra` keeps fields Tabby does not use
    (`alternateOwnerAttrs`, `releasedAt`)."""

    handle_id: str | None = None
    secondary: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def handle(self) -> str | None:
        return sanitize_handle(self.handle_id) if self.handle_id is not None else None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attribute:
        extra = {k: v for k, v in data.items() if k not in ("handle_id", "secondary")}
        return cls(data.get("handle_id"), dict(data.get("secondary") or {}), extra)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.handle_id is not None:
            out["handle_id"] = self.handle_id
        if self.secondary:
            out["secondary"] = sorted_map(self.secondary)
        out.update(self.extra)
        return out


@dataclass
class Block:
    cidr: str
    affinity: str | None
    allocations: list[int | None]
    unallocated: list[int]
    attributes: list[Attribute]
    sequence_number: int
    sequence_number_for_allocation: dict[str, int]
    deleted: bool = False
    affinity_claim_time: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Go writes a never-used block's attributes as null and an emptied one's as []
    attributes_null: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._net: Network = ipaddress.ip_network(self.cidr, strict=False)
        self._base = int(self._net.network_address)
        self._size = self._net.num_addresses

    # -- construction and JSON --

    @classmethod
    def new(cls, cidr: str | Network, host: str | None, now_ns: int) -> Block:
        """An empty block, affine to `host`; its sequence numbers start at `now_ns` so a block
        deleted and created again never repeats them."""
        net = ipaddress.ip_network(cidr, strict=False)
        size = net.num_addresses
        return cls(
            cidr=str(net),
            affinity=f"{AFFINITY_HOST}{host}" if host else None,
            allocations=[None] * size,
            unallocated=list(range(size)),
            attributes=[],
            sequence_number=now_ns,
            sequence_number_for_allocation={},
            affinity_claim_time=format_time(now_ns) if host else None,
            attributes_null=True,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Block:
        attributes = data.get("attributes")
        return cls(
            cidr=data["cidr"],
            affinity=data.get("affinity"),
            allocations=list(data.get("allocations") or []),
            unallocated=list(data.get("unallocated") or []),
            attributes=[Attribute.from_json(a) for a in attributes or []],
            sequence_number=int(data.get("sequenceNumber") or 0),
            sequence_number_for_allocation={
                str(k): int(v) for k, v in (data.get("sequenceNumberForAllocation") or {}).items()
            },
            deleted=bool(data.get("deleted", False)),
            affinity_claim_time=data.get("affinity_claim_time"),
            extra={k: v for k, v in data.items() if k not in _BLOCK_FIELDS},
            attributes_null=attributes is None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cidr": self.cidr, "affinity": self.affinity}
        if self.affinity_claim_time:
            out["affinity_claim_time"] = self.affinity_claim_time
        out["allocations"] = self.allocations
        out["unallocated"] = self.unallocated
        if self.attributes or not self.attributes_null:
            out["attributes"] = [a.to_json() for a in self.attributes]
        else:
            out["attributes"] = None
        out["sequenceNumber"] = self.sequence_number
        out["sequenceNumberForAllocation"] = sorted_map(self.sequence_number_for_allocation)
        out["deleted"] = self.deleted
        out.update(self.extra)
        return out

    # -- reading --

    @property
    def network(self) -> Network:
        return self._net

    @property
    def host(self) -> str | None:
        """The host the block is affine to (None when unaffine or affine to a virtual owner)."""
        if self.affinity and self.affinity.startswith(AFFINITY_HOST):
            return self.affinity[len(AFFINITY_HOST):]
        return None

    def claim_time(self) -> float | None:
        """When the affinity was claimed (epoch seconds); None for blocks that predate it."""
        return parse_time(self.affinity_claim_time) if self.affinity_claim_time else None

    def ordinal(self, ip: str | IP) -> int:
        address = _ip(ip)
        n = int(address) - self._base
        if address.version != self._net.version or not 0 <= n < self._size:
            raise InvalidRequest(f"{address} is not in block {self.cidr}")
        return n

    def address(self, ordinal: int) -> IP:
        return ipaddress.ip_address(self._base + ordinal)

    def interface(self, ordinal: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        """The address with the block's prefix length, as a CNI result shows it."""
        return ipaddress.ip_interface((self._base + ordinal, self._net.prefixlen))

    def free_count(self, reserved: Collection[Network] = ()) -> int:
        rsv = self._relevant(reserved)
        if not rsv:
            return len(self.unallocated)
        return sum(1 for o in self.unallocated if not _reserved(self.address(o), rsv))

    def in_use(self) -> int:
        return sum(1 for a in self.allocations if a is not None)

    def is_empty(self) -> bool:
        """No address in use (Windows' reserved addresses do not count, as in Calico)."""
        for index in self.allocations:
            if index is not None and self.attributes[index].handle != WINDOWS_RESERVED_HANDLE:
                return False
        return True

    def is_allocated(self, ip: str | IP) -> bool:
        return self.allocations[self.ordinal(ip)] is not None

    def attribute_of(self, ip: str | IP) -> Attribute:
        index = self.allocations[self.ordinal(ip)]
        if index is None:
            raise AddressNotAllocated(f"{_ip(ip)} is not allocated in block {self.cidr}")
        return self.attributes[index]

    def allocated(self) -> list[tuple[IP, Attribute]]:
        return [(self.address(o), self.attributes[i])
                for o, i in enumerate(self.allocations) if i is not None]

    def ips_for_handle(self, handle_id: str) -> list[IP]:
        indexes = self._indexes_of(handle_id)
        return [self.address(o) for o, i in enumerate(self.allocations) if i in indexes]

    # -- changing --

    def assign(self, num: int, handle_id: str | None, secondary: Mapping[str, str],
               reserved: Collection[Network] = ()) -> list[IP]:
        """Take up to `num` free addresses from the head of the free list, passing over
        reserved ones (which keep their place in the queue)."""
        rsv = self._relevant(reserved)
        taken: list[IP] = []
        kept: list[int] = []
        index: int | None = None
        for position, ordinal in enumerate(self.unallocated):
            if len(taken) >= num:
                kept.extend(self.unallocated[position:])
                break
            address = self.address(ordinal)
            if rsv and _reserved(address, rsv):
                kept.append(ordinal)
                continue
            if index is None:
                index = self._attribute_index(handle_id, secondary)
            self._take(ordinal, index)
            taken.append(address)
        self.unallocated = kept
        return taken

    def assign_ip(self, ip: str | IP, handle_id: str | None,
                  secondary: Mapping[str, str]) -> None:
        ordinal = self.ordinal(ip)
        current = self.allocations[ordinal]
        if current is not None:
            holder = self.attributes[current].handle or "no handle"
            raise AddressInUse(f"{_ip(ip)} is already in use (handle {holder})")
        self._take(ordinal, self._attribute_index(handle_id, secondary))
        self.unallocated.remove(ordinal)

    def release(self, ips: Iterable[str | IP],
                sequence_numbers: Mapping[str, int] | None = None) -> dict[str, int]:
        """Free the allocated addresses among `ips` (free ones are passed over); returns how
        many each handle lost. A sequence number that does not match the allocation's fails
        the whole call before anything changes."""
        expected = {_ip(k): v for k, v in (sequence_numbers or {}).items()}
        ordinals: set[int] = set()
        for address in {_ip(ip) for ip in ips}:
            ordinal = self.ordinal(address)
            if address in expected:
                current = self.sequence_number_for_allocation.get(str(ordinal), 0)
                if expected[address] != current:
                    raise StaleSequenceNumber(
                        f"{address} was not released: its sequence number is now {current}, "
                        f"not {expected[address]}; it changed hands since it was read")
            if self.allocations[ordinal] is not None:
                ordinals.add(ordinal)
        return self._free(ordinals)

    def release_handle(self, handle_id: str) -> int:
        """Free every address the handle holds here; returns how many."""
        indexes = self._indexes_of(handle_id)
        ordinals = {o for o, i in enumerate(self.allocations) if i is not None and i in indexes}
        return sum(self._free(ordinals).values())

    # -- internals --

    def _take(self, ordinal: int, index: int) -> None:
        self.allocations[ordinal] = index
        self.sequence_number_for_allocation[str(ordinal)] = self.sequence_number

    def _free(self, ordinals: set[int]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ordinal in sorted(ordinals):  # ascending, as Calico's clean-up appends them
            index = self.allocations[ordinal]
            assert index is not None
            handle = self.attributes[index].handle
            if handle:
                counts[handle] = counts.get(handle, 0) + 1
            self.allocations[ordinal] = None
            self.unallocated.append(ordinal)
            self.sequence_number_for_allocation.pop(str(ordinal), None)
        if ordinals:
            self._prune_attributes()
        return counts

    def _attribute_index(self, handle_id: str | None, secondary: Mapping[str, str]) -> int:
        wanted = Attribute(handle_id, dict(secondary))
        for index, existing in enumerate(self.attributes):
            if existing == wanted:
                return index
        self.attributes.append(wanted)
        self.attributes_null = False
        return len(self.attributes) - 1

    def _prune_attributes(self) -> None:
        used = sorted({i for i in self.allocations if i is not None})
        if len(used) == len(self.attributes):
            return
        remap = {old: new for new, old in enumerate(used)}
        self.attributes = [self.attributes[i] for i in used]
        self.attributes_null = False
        self.allocations = [None if i is None else remap[i] for i in self.allocations]

    def _indexes_of(self, handle_id: str) -> set[int]:
        wanted = sanitize_handle(handle_id)
        return {i for i, a in enumerate(self.attributes) if a.handle == wanted}

    def _relevant(self, reserved: Collection[Network]) -> list[Network]:
        return [r for r in reserved if r.version == self._net.version and r.overlaps(self._net)]


def _reserved(address: IP, reserved: Iterable[Network]) -> bool:
    return any(address in r for r in reserved)


def format_time(epoch_ns: int) -> str:
    """RFC 3339 in UTC to the second, as Kubernetes' metav1.Time is written."""
    return datetime.fromtimestamp(epoch_ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None

"""The small IPAM values: block affinity, handle, IPAM config, and Go-style JSON (pure).

Formats follow libcalico-go's `model/block_affinity.go`, `ipam_handle.go` and `ipam_config.go`;
`encode` writes JSON the way Go's encoding/json does (compact, map keys sorted, `<>&` escaped),
so a value Tabby writes is byte for byte what Calico would write for the same content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ipam.errors import InvalidRequest

DEFAULT_MAX_BLOCKS = 20  # Calico's safeguard when maxBlocksPerHost is 0

PENDING = "pending"
CONFIRMED = "confirmed"
PENDING_DELETION = "pendingDeletion"
_STATES = (PENDING, CONFIRMED, PENDING_DELETION)

# Go escapes these even inside strings; Python's json leaves them raw.
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
               "\u2029": "\\u2029"}
_GO_TABLE = str.maketrans(_GO_ESCAPES)


def encode(value: Any) -> bytes:
    """JSON as Go's json.Marshal writes it; callers build dicts in Go's field order and sort
    the keys of Go maps themselves."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.translate(_GO_TABLE).encode()


def decode(raw: bytes) -> dict[str, Any]:
    """A stored value as a dict; an empty value (old affinities) reads as `{}`, as in Calico."""
    if not raw:
        return {}
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def sorted_map(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in sorted(m)}


@dataclass(frozen=True)
class Affinity:
    """A host's claim on a block: `pending` -> `confirmed` -> `pendingDeletion`."""

    state: str = CONFIRMED
    deleted: bool = False

    @property
    def confirmed(self) -> bool:
        return self.state == CONFIRMED

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Affinity:
        # Calico reads the empty values of old versions as state "" and treats "" as confirmed.
        state = data.get("state") or CONFIRMED
        if state not in _STATES:
            raise ValueError(f"unknown affinity state {state!r}")
        return cls(state, bool(data.get("deleted", False)))

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "deleted": self.deleted}


@dataclass
class Handle:
    """How many addresses one handle holds in each block; lets release-by-handle go straight
    to the right blocks."""

    block: dict[str, int] = field(default_factory=dict)
    deleted: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Handle:
        counts = data.get("block") or {}
        return cls({str(k): int(v) for k, v in counts.items()}, bool(data.get("deleted", False)))

    def to_json(self) -> dict[str, Any]:
        return {"block": sorted_map(self.block), "deleted": self.deleted}

    def is_empty(self) -> bool:
        return not any(n > 0 for n in self.block.values())

    def total(self) -> int:
        return sum(self.block.values())

    def adjusted(self, cidr: str, delta: int) -> Handle:
        """A copy with `delta` added to the block's count; entries that reach 0 go away."""
        counts = dict(self.block)
        n = counts.get(cidr, 0) + delta
        if n > 0:
            counts[cidr] = n
        else:
            counts.pop(cidr, None)
        return Handle(counts, self.deleted)

    def without(self, cidr: str) -> Handle:
        return Handle({k: v for k, v in self.block.items() if k != cidr}, self.deleted)


@dataclass(frozen=True)
class IPAMConfig:
    """The cluster-wide IPAM settings at `/calico/ipam/v2/config`.

    Every field is `omitempty` in Calico: false and 0 are left out of the JSON, and a stored
    object that omits `auto_allocate_blocks` means false (only a missing key means the
    defaults). Fields Tabby does not use (`ipCooldownSeconds`, ...) are kept in `extra`.
    """

    strict_affinity: bool = False
    auto_allocate_blocks: bool = True
    max_blocks_per_host: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def effective_max_blocks(self) -> int:
        return self.max_blocks_per_host or DEFAULT_MAX_BLOCKS

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IPAMConfig:
        known = ("strict_affinity", "auto_allocate_blocks", "maxBlocksPerHost")
        return cls(
            strict_affinity=bool(data.get("strict_affinity", False)),
            auto_allocate_blocks=bool(data.get("auto_allocate_blocks", False)),
            max_blocks_per_host=int(data.get("maxBlocksPerHost", 0) or 0),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.strict_affinity:
            out["strict_affinity"] = True
        if self.auto_allocate_blocks:
            out["auto_allocate_blocks"] = True
        if self.max_blocks_per_host:
            out["maxBlocksPerHost"] = self.max_blocks_per_host
        out.update(self.extra)
        return out

    def check(self) -> None:
        """Calico's rules for a config write (`SetIPAMConfig`)."""
        if self.max_blocks_per_host < 0:
            raise InvalidRequest(
                f"maxBlocksPerHost must be 0 (no limit but the default {DEFAULT_MAX_BLOCKS}) "
                f"or more, not {self.max_blocks_per_host}")
        if not self.strict_affinity and not self.auto_allocate_blocks:
            raise InvalidRequest(
                "strict affinity and automatic block allocation cannot both be off: "
                "no node could get an address")
        if self.max_blocks_per_host > 0 and not self.strict_affinity:
            raise InvalidRequest(
                "maxBlocksPerHost needs strict affinity: without it a node past its limit "
                "would borrow instead; set --strictaffinity true as well")

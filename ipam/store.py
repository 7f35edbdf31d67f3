"""Typed reads and revision-guarded writes of IPAM keys, with write and conflict counts (I/O).

Every write goes through `commit`: one etcd transaction whose guards are the revisions the
values were read at. A failed guard is not an error here: `commit` returns the refusal, the
caller re-reads and tries again, and `attempts` bounds how often.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from datastore.etcd import (
    KV,
    AlreadyExists,
    Conflict,
    Create,
    Datastore,
    Delete,
    NotFound,
    Op,
    Update,
)
from ipam import keys
from ipam.block import Block
from ipam.errors import IPAMError
from ipam.records import Affinity, Handle, decode, encode

log = logging.getLogger(__name__)

T = TypeVar("T")
Refused = AlreadyExists | Conflict | NotFound
Versioned = tuple[T, int]  # a value and the mod_revision it was read at

STAT_NAMES = ("cas_conflicts", "writes", "blocks_claimed", "borrowed")


class Store:
    def __init__(self, ds: Datastore, stats: dict[str, int], max_retries: int) -> None:
        self.ds = ds
        self.stats = stats
        self.max_retries = max_retries
        # blocks as this store last wrote them: a guess at their current value for a request
        # that skips reading (every write of one is guarded by its revision anyway)
        self.written_blocks: dict[str, KV] = {}
        self._block_locks: dict[str, asyncio.Lock] = {}

    def block_lock(self, cidr: str) -> asyncio.Lock:
        """Held from reading a block to committing it: this process's requests on one block
        wait for each other instead of failing each other's guards and reading again."""
        return self._block_locks.setdefault(cidr, asyncio.Lock())

    def newest(self, cidr: str, got: Versioned[Block] | None) -> Versioned[Block] | None:
        """`got` (read or remembered earlier), or the block as this store wrote it since."""
        written = self.written_blocks.get(keys.block_key(cidr))
        if written is not None and (got is None or written.mod_revision > got[1]):
            return block_from(written)
        return got

    def attempts(self, what: str) -> Iterator[int]:
        """Loop counter for a read-modify-write: raises once `max_retries` rounds are used."""
        yield from range(self.max_retries)
        raise IPAMError(f"gave up {what} after {self.max_retries} attempts: other writers kept "
                        "changing the same IPAM keys; try again")

    # -- reads --

    async def block(self, cidr: str) -> Versioned[Block] | None:
        return block_from(await self.ds.get(keys.block_key(cidr)))

    async def blocks(self, version: int | None = None) -> dict[str, Versioned[Block]]:
        kvs, _ = await self.ds.list(keys.block_prefix(version))
        out: dict[str, Versioned[Block]] = {}
        for kv in kvs:
            cidr = keys.parse_block_key(kv.key)
            block = _parse(kv.key, kv.value, Block.from_json) if cidr else None
            if cidr and block is not None and not block.deleted:
                out[cidr] = (block, kv.mod_revision)
        return out

    async def affinity(self, host: str, cidr: str) -> Versioned[Affinity] | None:
        kv = await self.ds.get(keys.affinity_key(host, cidr))
        if kv is None:
            return None
        affinity = _read(kv.key, kv.value, Affinity.from_json)
        return None if affinity.deleted else (affinity, kv.mod_revision)

    async def host_affinities(self, host: str) -> dict[str, Versioned[Affinity]]:
        """The host's affinities of both families, by block CIDR, in key order."""
        return affinities_from((await self.ds.list(keys.host_prefix(host)))[0])

    async def handle(self, handle_id: str) -> Versioned[Handle] | None:
        return handle_from(await self.ds.get(keys.handle_key(handle_id)))

    # -- writes --

    async def commit(self, ops: Sequence[Op]) -> int | Refused:
        """The new revision, or the refusal when a guard failed (counted as a conflict)."""
        self.stats["writes"] += 1
        try:
            revision = await self.ds.commit(ops)
        except (AlreadyExists, Conflict, NotFound) as refusal:
            self.stats["cas_conflicts"] += 1
            log.debug("IPAM write refused: %s", refusal)
            return refusal
        for op in ops:
            if keys.parse_block_key(op.key):
                if isinstance(op, Create | Update):
                    self.written_blocks[op.key] = KV(op.key, op.value, revision)
                else:
                    self.written_blocks.pop(op.key, None)
        return revision


# -- decoding what was read (also from a batch of reads, datastore.reads) -----------------------


def block_from(kv: KV | None) -> Versioned[Block] | None:
    if kv is None:
        return None
    block = _read(kv.key, kv.value, Block.from_json)
    return None if block.deleted else (block, kv.mod_revision)


def affinities_from(kvs: Sequence[KV]) -> dict[str, Versioned[Affinity]]:
    """A listing of `keys.host_prefix(host)`: the host's affinities by block CIDR."""
    out: dict[str, Versioned[Affinity]] = {}
    for kv in kvs:
        parsed = keys.parse_affinity_key(kv.key)
        affinity = _parse(kv.key, kv.value, Affinity.from_json) if parsed else None
        if parsed and affinity is not None and not affinity.deleted:
            out[parsed[1]] = (affinity, kv.mod_revision)
    return out


def handle_from(kv: KV | None) -> Versioned[Handle] | None:
    return (_read(kv.key, kv.value, Handle.from_json), kv.mod_revision) if kv else None


# -- op builders -------------------------------------------------------------------------------


def write_block(block: Block, revision: int | None) -> Op:
    """Create, or replace the block still at `revision`; every update moves its sequence
    number on, so allocations made before and after it can be told apart."""
    key = keys.block_key(block.cidr)
    if revision is None:
        return Create(key, encode(block.to_json()))
    block.sequence_number += 1
    return Update(key, encode(block.to_json()), revision)


def write_handle(handle_id: str, handle: Handle, revision: int | None) -> Op | None:
    """Create, update or (when it holds nothing any more) delete a handle; None when there is
    nothing to write (an empty handle that was never stored)."""
    key = keys.handle_key(handle_id)
    if handle.is_empty():
        return Delete(key, revision) if revision is not None else None
    if revision is None:
        return Create(key, encode(handle.to_json()))
    return Update(key, encode(handle.to_json()), revision)


def write_affinity(host: str, cidr: str, affinity: Affinity, revision: int | None) -> Op:
    key = keys.affinity_key(host, cidr)
    if revision is None:
        return Create(key, encode(affinity.to_json()))
    return Update(key, encode(affinity.to_json()), revision)


def _parse(key: str, raw: bytes, parse: Callable[[Mapping[str, Any]], T]) -> T | None:
    """A listed value; one unreadable row is logged and passed over, not fatal to a listing."""
    try:
        return parse(decode(raw))
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring %s: unreadable value (%s)", key, e)
        return None


def _read(key: str, raw: bytes, parse: Callable[[Mapping[str, Any]], T]) -> T:
    try:
        return parse(decode(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise IPAMError(f"{key} holds an unreadable value ({e}); inspect it with etcdctl") from None

"""The block affinity protocol: claiming a block for a host and giving it up (I/O).

Calico's sequence (`ipam_block_reader_writer.go`): a claim writes the affinity `pending`, then
creates the block naming the host, then marks the affinity `confirmed`; a release marks it
`pendingDeletion`, then deletes the block (when empty) or clears its affinity, then deletes the
affinity. Other Calico clients rely on seeing these states, so Tabby writes them too; because
etcd has multi-key transactions, the last two steps of each are one transaction (block created
and affinity confirmed together; block removed or cleared and affinity deleted together), so no
reader ever sees a block and its affinity disagree because of Tabby.
"""

from __future__ import annotations

import asyncio
import logging

from datastore.etcd import AlreadyExists, Delete, Update
from ipam import keys
from ipam.block import AFFINITY_HOST, Block
from ipam.errors import BlockNotEmpty
from ipam.records import CONFIRMED, PENDING, PENDING_DELETION, Affinity, encode
from ipam.store import Store, Versioned, write_affinity, write_block

log = logging.getLogger(__name__)


async def claim(store: Store, host: str, cidr: str, now_ns: int) -> Versioned[Block] | None:
    """Claim the block at `cidr` for `host`, creating it. Returns the block (ours, possibly
    created by another request of the same host) or None when another host owns it."""
    for _ in store.attempts(f"claiming block {cidr} for {host}"):
        pending = await _pending_affinity(store, host, cidr)
        if pending is None:
            continue
        aff_rev = pending[1]
        block = Block.new(cidr, host, now_ns)
        done = await store.commit([
            write_block(block, None),
            write_affinity(host, cidr, Affinity(CONFIRMED), aff_rev),
        ])
        if isinstance(done, int):
            store.stats["blocks_claimed"] += 1
            return block, done
        if not isinstance(done, AlreadyExists):
            continue  # our affinity changed under us: start over
        existing = await store.block(cidr)
        if existing is None:
            continue  # deleted in between: start over
        if existing[0].host == host:
            # another request of this host created it: confirm and share it
            confirmed = await store.commit([
                write_affinity(host, cidr, Affinity(CONFIRMED), aff_rev)])
            if isinstance(confirmed, int) or await _is_confirmed(store, host, cidr):
                return existing
            continue
        # another host won the race: withdraw our claim
        await store.commit([Delete(keys.affinity_key(host, cidr), aff_rev)])
        return None
    raise AssertionError("unreachable")


async def _pending_affinity(store: Store, host: str, cidr: str) -> Versioned[Affinity] | None:
    """Phase one: our affinity, written `pending` unless it is already confirmed."""
    current = await store.affinity(host, cidr)
    if current is not None and current[0].confirmed:
        return current
    revision = current[1] if current else None
    done = await store.commit([write_affinity(host, cidr, Affinity(PENDING), revision)])
    return (Affinity(PENDING), done) if isinstance(done, int) else None


async def _is_confirmed(store: Store, host: str, cidr: str) -> bool:
    current = await store.affinity(host, cidr)
    return current is not None and current[0].confirmed


async def confirm(store: Store, host: str, cidr: str, affinity: Versioned[Affinity],
                  block: Versioned[Block]) -> Versioned[Block] | None:
    """Re-confirm our affinity to an existing block of ours (it was pending, or someone was
    releasing it): pending first, then the block rewritten (so a release that read the old
    block fails its guard) together with the confirmation. None when a guard failed."""
    marked = await store.commit([write_affinity(host, cidr, Affinity(PENDING), affinity[1])])
    if not isinstance(marked, int):
        return None
    b, revision = block
    done = await store.commit([
        write_block(b, revision),
        write_affinity(host, cidr, Affinity(CONFIRMED), marked),
    ])
    return (b, done) if isinstance(done, int) else None


async def release(store: Store, host: str, cidr: str, *, require_empty: bool,
                  required_sequence: int | None = None) -> bool:
    """Give up `host`'s affinity to the block at `cidr`: an empty block is deleted, a block
    still in use stays (unaffine) for the addresses in it. Returns whether this call released
    it; False when there was nothing of `host`'s to release or the block changed since the
    caller read `required_sequence`. Raises BlockNotEmpty if `require_empty` and it is in use.
    """
    for _ in store.attempts(f"releasing {host}'s affinity to {cidr}"):
        affinity, block = await asyncio.gather(store.affinity(host, cidr), store.block(cidr))
        if affinity is None:
            return False
        aff_key = keys.affinity_key(host, cidr)
        if block is None:
            # a dangling affinity: nothing to release but the key itself
            return isinstance(await store.commit([Delete(aff_key, affinity[1])]), int)
        b, revision = block
        if required_sequence is not None and b.sequence_number != required_sequence:
            return False
        if b.affinity != f"{AFFINITY_HOST}{host}":
            log.info("deleting stale affinity of %s to %s (block is %s's)", host, cidr,
                     b.affinity)
            await store.commit([Delete(aff_key, affinity[1])])
            return False
        if require_empty and not b.is_empty():
            raise BlockNotEmpty(f"block {cidr} of {host} still has {b.in_use()} addresses in "
                                "use; release them first")
        marked = await store.commit([
            Update(aff_key, encode(Affinity(PENDING_DELETION).to_json()), affinity[1])])
        if not isinstance(marked, int):
            continue
        if b.is_empty():
            ops = [Delete(keys.block_key(cidr), revision), Delete(aff_key, marked)]
        else:
            b.affinity = None
            b.affinity_claim_time = None
            ops = [write_block(b, revision), Delete(aff_key, marked)]
        if isinstance(await store.commit(ops), int):
            return True
        # the block changed after we marked the affinity: undo the mark, then look again
        await store.commit([Update(aff_key, encode(Affinity(CONFIRMED).to_json()), marked)])
    raise AssertionError("unreachable")

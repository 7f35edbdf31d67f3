"""Reads answered from memory: key prefixes kept current by etcd watches, for a hot path that
cannot afford a read round trip (tabby-node's CNI ADD) (I/O).

`RememberedReads.answer(batch)` gives what `batch.run(ds)` would, from memory, together with
guards (`Unchanged` for every key it answered, present or absent, and `NothingNewer` for every
listing) that hold only while all of it is still true in etcd. The caller puts them into the
transaction its decision ends in; when that is refused, it reads for real and decides again.
So a watch that lags, or a connection that is down, costs a retry, never a wrong write.

A batch is answered only when each of its keys and listings lies under a watched prefix that
has been listed (the first batch that needs a prefix starts its watch and is read for real).
The watched prefixes: `ROOTS` for keys under them, else the listed prefix or the key itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from datastore.etcd import KV, Datastore, Event, Guard, NothingNewer, Resync, Unchanged
from datastore.reads import ReadBatch, ReadResult

log = logging.getLogger(__name__)

MAX_GUARDS = 100  # compares in one transaction; etcd's default --max-txn-ops is 128
MAX_WATCHES = 32  # prefixes started on demand (a node asks for a handful)


@dataclass
class _Watched:
    """One prefix's keys as of `revision` (every event up to it applied)."""

    items: dict[str, KV] = field(default_factory=dict)
    revision: int = 0
    synced: bool = False

    def apply(self, item: Event | Resync) -> None:
        if isinstance(item, Resync):
            self.items = {kv.key: kv for kv in item.items}
            self.revision, self.synced = item.revision, True
            return
        if item.type == "delete":
            self.items.pop(item.key, None)
        else:
            self.items[item.key] = KV(item.key, item.value or b"", item.mod_revision)
        self.revision = max(self.revision, item.mod_revision)


class RememberedReads:
    def __init__(self, ds: Datastore, roots: Sequence[str] = ()) -> None:
        """`roots`: prefixes watched whole for any key under them (e.g. all Pods), instead of
        one watch per key."""
        self._ds = ds
        self._roots = tuple(roots)
        self._watched: dict[str, _Watched] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def answer(self, batch: ReadBatch, assume_absent: Iterable[str] = (),
               known: Mapping[str, KV] = {}, leave_out: Iterable[str] = ()
               ) -> tuple[ReadResult, list[Guard]] | None:
        """The batch's result from memory and its guards; None when something in it is not
        watched and listed yet (its watch is started) or it would need too many guards.

        `assume_absent`: keys answered as absent, guarded so (a request's own new keys);
        `known`: values the caller vouches for without a guard (a write of theirs is guarded
        by its revision anyway, e.g. a block this process wrote last); `leave_out`: keys
        not answered at all (the caller reads them if it needs them)."""
        absent, skipped = set(assume_absent), set(leave_out)
        values: dict[str, KV | None] = {}
        listings: dict[str, list[KV]] = {}
        guards: list[Guard] = []
        revision = 0
        ready = True
        for key in batch.gets:
            if key in skipped:
                continue
            if key in known:
                values[key] = known[key]
            elif key in absent:
                values[key] = None
                guards.append(Unchanged(key, 0))
            elif (watched := self._ready(self._root_of(key))) is None:
                ready = False
            else:
                values[key] = kv = watched.items.get(key)
                guards.append(Unchanged(key, kv.mod_revision if kv else 0))
                revision = max(revision, watched.revision)
        for prefix in batch.lists:
            if (watched := self._ready(self._root_of(prefix))) is None:
                ready = False
                continue
            listed = sorted((kv for k, kv in watched.items.items() if k.startswith(prefix)),
                            key=lambda kv: kv.key)
            listings[prefix] = listed
            guards += [Unchanged(kv.key, kv.mod_revision) for kv in listed]
            guards.append(NothingNewer(prefix, watched.revision))
            revision = max(revision, watched.revision)
        if not ready or len(guards) > MAX_GUARDS:
            return None
        return ReadResult(values, listings, revision), guards

    def watching(self) -> dict[str, bool]:
        """Each watched prefix and whether it has been listed yet."""
        return {root: watched.synced for root, watched in self._watched.items()}

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._watched.clear()

    # -- internals --

    def _root_of(self, key: str) -> str:
        return next((root for root in self._roots if key.startswith(root)), key)

    def _ready(self, root: str) -> _Watched | None:
        """The prefix's copy once listed; starts watching it on first use."""
        watched = self._watched.get(root)
        if watched is None:
            if len(self._watched) < MAX_WATCHES:
                self._watched[root] = watched = _Watched()
                self._tasks[root] = asyncio.ensure_future(self._follow(root, watched))
            return None
        return watched if watched.synced else None

    async def _follow(self, root: str, watched: _Watched) -> None:
        try:
            async for item in self._ds.watch(root):
                watched.apply(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the connection was closed, or a bug: read for real again
            log.warning("remembered reads: watching %s stopped (%s); reading it again", root, e)
        watched.synced = False
        if self._watched.get(root) is watched:  # the next answer() that needs it restarts it
            del self._watched[root]
            self._tasks.pop(root, None)

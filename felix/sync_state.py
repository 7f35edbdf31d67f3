"""When the agent writes the dataplane: coalescing, first-sync doctrine, retry backoff (pure).

Every change marks the state dirty. Writes start at least `window` seconds apart, and, as with
Felix's apply throttle, a change after a quiet spell is written at once rather than held back
for company: changes that arrive while a write runs, or within `window` of its start, join the
next write, so a burst becomes one write per window. Nothing is written before the first full
listing has been loaded (`loaded()`): a restarted agent leaves the old rules in place until
the new state replaces them. The first write does not sweep; once it succeeded the next write
sweeps stale Tabby chains and sets, and one is scheduled for that. A failed write is retried
with exponential backoff; a success resets it."""

from __future__ import annotations

from dataclasses import dataclass

WINDOW = 0.05
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0


@dataclass
class SyncState:
    window: float = WINDOW
    backoff_start: float = BACKOFF_START
    backoff_max: float = BACKOFF_MAX
    ready: bool = False  # the first full listing is in memory
    dirty: bool = False
    first_change: float | None = None  # of the pending burst
    last_write: float | None = None  # start of the previous attempt
    retry_at: float = 0.0
    failures: int = 0
    applied_once: bool = False  # a complete sync reached the kernel
    swept: bool = False  # a sweeping sync reached the kernel

    def loaded(self, now: float) -> None:
        """A full listing (first or after compaction) replaced the state."""
        if not self.ready:  # whatever came before the first listing does not count
            self.ready, self.dirty = True, False
        self.changed(now)

    def changed(self, now: float) -> None:
        if not self.dirty:
            self.dirty = True
            self.first_change = now

    def due_at(self) -> float | None:
        """When the next write should start, or None while there is nothing to write."""
        if not (self.ready and self.dirty):
            return None
        at = self.first_change or 0.0
        if self.last_write is not None:
            at = max(at, self.last_write + self.window)
        return max(at, self.retry_at)

    def start(self, now: float) -> bool:
        """A write begins now; returns whether it sweeps. Changes from here on are a new
        burst (the write renders everything received so far)."""
        self.last_write = now
        self.dirty = False
        self.first_change = None
        return self.applied_once

    def succeeded(self, now: float, swept: bool) -> None:
        self.failures = 0
        self.retry_at = 0.0
        if swept:
            self.swept = True
        if not self.applied_once:
            self.applied_once = True
            self.changed(now)  # the sweeping sync follows straight away

    def failed(self, now: float) -> float:
        """The write failed: retry it (everything is re-rendered) after the returned delay."""
        delay = min(self.backoff_start * 2 ** self.failures, self.backoff_max)
        self.failures += 1
        self.retry_at = now + delay
        self.changed(now)
        return delay

    @property
    def in_sync(self) -> bool:
        """The kernel holds the latest state, stale objects swept."""
        return self.swept and not self.dirty and self.failures == 0

"""One sync of the whole dataplane, in Felix's order (calico-anchor §3.1), per IP family (the
two families are written side by side):

1. IP sets created/updated first, so no rule ever references a set before it exists;
2. one `iptables-restore --noflush` per table that changed;
3. stale IP sets destroyed last, once no rule references them.

Restart doctrine: the caller applies nothing before its first complete calculation, then applies
with `sweep=True` (mark-and-sweep of stale `cali-*` chains and `cali4*`/`cali6*` sets). A fresh
`DataplaneState` reads the kernel before writing, so restarting over an identical ruleset writes
nothing, and a changed chain is replaced within one transaction: there is no flushed window.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from felix.dataplane.backend import Backend, detect_backend
from felix.dataplane.ipsets import IPSets, IPSetStats
from felix.dataplane.iptables import IptablesTable, WriteStats
from felix.dataplane.runner import Runner
from felix.model import Dataplane, Table

TABLES = ("raw", "mangle", "nat", "filter")
POST_WRITE_CHECK = 5.0  # s, doubling after each check (Felix IptablesPostWriteCheckIntervalSecs)
REFRESH_INTERVAL = 180.0  # s, full re-read (Felix IptablesRefreshInterval)
IPSETS_REFRESH_INTERVAL = 90.0  # s (Felix IpsetsRefreshInterval)
SETS_KEY = (0, "ipsets")


@dataclass
class DataplaneState:
    """The reconcilers of one node (or one test netns); long-lived across syncs."""

    runner: Runner
    families: tuple[int, ...] = (4, 6)
    backend: Backend | None = None  # None: detected on first use
    tables: dict[tuple[int, str], IptablesTable] = field(default_factory=dict)
    ipsets: dict[int, IPSets] = field(default_factory=dict)
    _next_check: dict[tuple[int, str], float] = field(default_factory=dict)
    _interval: dict[tuple[int, str], float] = field(default_factory=dict)

    def table(self, family: int, name: str) -> IptablesTable:
        if self.backend is None:
            self.backend = detect_backend(self.runner)
        key = (family, name)
        if key not in self.tables:
            self.tables[key] = IptablesTable(family, name, self.runner, self.backend)
        return self.tables[key]

    def sets(self, family: int) -> IPSets:
        if family not in self.ipsets:
            self.ipsets[family] = IPSets(family, self.runner)
        return self.ipsets[family]

    def _schedule(self, key: tuple[int, str], now: float, *, wrote: bool) -> None:
        if wrote:  # someone may be fighting us: look again soon
            self._interval[key] = POST_WRITE_CHECK
            self._next_check[key] = now + POST_WRITE_CHECK
        elif key not in self._next_check:
            self._interval[key] = REFRESH_INTERVAL
            self._next_check[key] = now + REFRESH_INTERVAL

    def check_drift(self, *, force: bool = False, now: float | None = None) -> list[WriteStats]:
        """Re-read and repair what is due: a table soon after our own write (someone may be
        fighting us), backing off to the periodic refresh; sets on their own refresh timer.
        `force` checks everything. Sets go first, as in apply_dataplane."""
        now = time.monotonic() if now is None else now
        if force or now >= self._next_check.get(SETS_KEY, 0.0):
            for ipsets in self.ipsets.values():
                ipsets.check_drift()
            self._next_check[SETS_KEY] = now + IPSETS_REFRESH_INTERVAL
        out = []
        for key, table in self.tables.items():
            if table.last_desired is None or not (force or now >= self._next_check.get(key, 0)):
                continue
            stats = table.check_drift()
            out.append(stats)
            interval = min(self._interval.get(key, REFRESH_INTERVAL / 2) * 2, REFRESH_INTERVAL)
            self._interval[key] = POST_WRITE_CHECK if stats.wrote else interval
            self._next_check[key] = now + self._interval[key]
        return out


@dataclass
class ApplyStats:
    tables: list[WriteStats] = field(default_factory=list)
    ipsets: list[IPSetStats] = field(default_factory=list)
    sets_destroyed: list[str] = field(default_factory=list)
    total_ms: float = 0.0

    @property
    def chains_written(self) -> int:
        return sum(t.chains_written for t in self.tables)

    @property
    def rules_written(self) -> int:
        return sum(t.rules_written for t in self.tables)

    @property
    def restores(self) -> int:
        """iptables-restore calls made (one per table that changed)."""
        return sum(1 for t in self.tables if t.wrote)

    @property
    def ms_per_table(self) -> dict[str, float]:
        return {f"v{t.family}/{t.table}": t.ms for t in self.tables if t.wrote}

    @property
    def wrote(self) -> bool:
        return bool(self.restores or any(s.wrote for s in self.ipsets) or self.sets_destroyed)


def _apply_family(desired: Dataplane, state: DataplaneState, family: int, *,
                  sweep: bool) -> tuple[IPSetStats, list[WriteStats], list[str]]:
    """One family in Felix's order: its sets, its tables, then its stale sets."""
    sets = state.sets(family).apply(desired.ipsets, sweep=sweep)
    keys = [k for k in desired.tables if k[0] == family]
    if sweep:  # a table Tabby no longer wants anything in must still lose its old chains
        keys += [(family, t) for t in TABLES if (family, t) not in desired.tables]
    now = time.monotonic()
    tables = []
    for key in keys:
        table = desired.tables.get(key) or Table(key[1], {})
        result = state.table(*key).apply(table, sweep=sweep)
        state._schedule(key, now, wrote=result.wrote)
        tables.append(result)
    return sets, tables, state.sets(family).delete_stale()


def apply_dataplane(desired: Dataplane, state: DataplaneState, *, sweep: bool) -> ApplyStats:
    """Brings the kernel to `desired`; with `sweep`, also removes Tabby objects it lacks.

    The IP families are independent (a v6 rule only names v6 sets), so they are written side
    by side: most of a write is each restore tool reading its table back from the kernel."""
    start = time.perf_counter()
    if state.backend is None:
        state.backend = detect_backend(state.runner)
    with ThreadPoolExecutor(max_workers=len(state.families)) as pool:
        futures = [pool.submit(_apply_family, desired, state, f, sweep=sweep)
                   for f in state.families]
        done = [f.result() for f in futures]  # re-raises the first failure, after all ended
    stats = ApplyStats()
    for sets, tables, destroyed in done:
        stats.ipsets.append(sets)
        stats.tables += tables
        stats.sets_destroyed += destroyed
    stats.total_ms = (time.perf_counter() - start) * 1000
    return stats

"""The felix agent: store -> policy calculation -> rendering -> kernel, for one node.

`python -m felix.agent --nodename N [--etcd-endpoints URLS | -c FILE]` programs iptables and
ipsets in the network namespace it runs in (tabby-node starts it there as a child process).

One watch on the Calico resource prefix feeds an in-memory mirror of the store (`felix.mirror`);
a full listing (at start and after a compaction) replaces it. Changes are coalesced
(`felix.sync_state`): a burst becomes one sync, which renders everything for this node and
applies it (`felix.dataplane.apply_dataplane`). What the previous sync computed is kept
(`SyncCaches`), so a sync only recomputes what the changes touch; its output is the same as a
render from scratch. Nothing is written before the first listing is
loaded, so a restarted agent leaves the previous rules in place until the new state replaces
them; stale Tabby chains and sets are swept only after the first complete sync. A failed sync
is logged and retried with backoff; the loop never dies of it. A drift check re-reads the
kernel periodically and repairs what someone else changed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import logging
import logging.handlers
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace

from datastore.daemon import daemon_main, etcd_config, run_until_stopped
from datastore.etcd import Event, Resync
from datastore.snapshot import Resource, Snapshot
from felix.agent_config import merged_felix_spec, render_config
from felix.calc import PolicyIndex
from felix.calc_memo import IndexMemo
from felix.counters import DeniedCounters
from felix.dataplane import ApplyStats, DataplaneState, apply_dataplane
from felix.host_interfaces import read_host_interfaces
from felix.metrics import DEFAULT_PORT, Metrics, MetricsServer
from felix.mirror import WATCH_PREFIX, StoreMirror, build_snapshot
from felix.render import local_endpoints, render_with_report
from felix.render_cache import RenderCache
from felix.render_config import RenderConfig
from felix.sync_state import WINDOW, SyncState

log = logging.getLogger("tabby.felix")

DRIFT_TICK = 1.0  # s between due-only drift checks (cheap: nothing is read unless due)
DRIFT_INTERVAL = 10.0  # s between full re-reads of every table and set
WATCH_RETRY_MAX = 10.0
NOISY_LOGGERS = ("grpc", "aetcd", "asyncio")

WatchSource = Callable[[], AsyncIterator[Event | Resync]]


@dataclass(frozen=True)
class SyncResult:
    stats: ApplyStats
    rules: int
    members: int
    sets: int
    endpoints: int
    problems: tuple[str, ...]
    render_s: float


@dataclass
class SyncCaches:
    """What an agent keeps from one sync to the next: compiled objects and PolicyIndex
    answers (`IndexMemo`) and the pieces of the last rendering (`RenderCache`)."""

    memo: IndexMemo = field(default_factory=IndexMemo)
    render: RenderCache = field(default_factory=RenderCache)

    def retain(self, objects: Mapping[str, Resource], snapshot: Snapshot) -> None:
        """Forget compiled objects no longer in the store, once they pile up."""
        cache = self.memo.cache
        if len(cache) > 4 * len(objects) + 64:
            cache.retain([*objects.values(), *(o for kind in Snapshot.FIELDS.values()
                                               for o in getattr(snapshot, kind))])


# The calling agent's caches (set by FelixAgent._sync for the sync it runs).
_SYNC_CACHES: contextvars.ContextVar[SyncCaches | None] = contextvars.ContextVar(
    "felix_sync_caches", default=None)


def _needs_host_interfaces(snapshot: Snapshot, node: str) -> bool:
    """Only a local host endpoint without interfaceName is resolved by the node's addresses;
    otherwise reading them (a subprocess) cannot change the rendering."""
    for hep in snapshot.host_endpoints:
        spec = hep.get("spec") or {}
        if spec.get("node", "") == node and not spec.get("interfaceName"):
            return True
    return False


def sync_once(objects: Mapping[str, Resource], node: str, state: DataplaneState,
              base: RenderConfig, *, sweep: bool, cache: SyncCaches | None = None
              ) -> SyncResult:
    """Render the whole dataplane for `node` from `objects` and apply it (blocking).

    `cache` keeps what was computed between calls; only for `objects` whose values are
    replaced, never mutated in place (as the agent's mirror's)."""
    start = time.perf_counter()
    if cache is None:
        cache = _SYNC_CACHES.get()
    snapshot, problems = build_snapshot(objects, cache.memo.cache if cache else None)
    pools = [o for o in objects.values() if o.get("kind") == "IPPool"]
    felix = merged_felix_spec((o for o in objects.values()
                               if o.get("kind") == "FelixConfiguration"), node)
    config = render_config(pools, felix, base)
    if _needs_host_interfaces(snapshot, node):
        config = replace(config, host_interfaces=read_host_interfaces(state.runner))
    index = cache.memo.index(snapshot) if cache else PolicyIndex(snapshot)
    if cache is not None:
        cache.retain(objects, snapshot)
    result = render_with_report(index, node, config, cache.render if cache else None)
    render_s = time.perf_counter() - start
    stats = apply_dataplane(result.dataplane, state, sweep=sweep)
    dp = result.dataplane
    workloads, hosts = local_endpoints(index, node)
    return SyncResult(
        stats=stats,
        rules=sum(len(c.rules) for t in dp.tables.values() for c in t.chains.values())
        + sum(len(t.hooks) for t in dp.tables.values()),
        members=sum(len(s.members) for s in dp.ipsets.values()),
        sets=len(dp.ipsets),
        endpoints=len(workloads) + len(hosts),
        problems=tuple(map(str, problems)) + tuple(map(str, result.problems)),
        render_s=render_s,
    )


class FelixAgent:
    """The watch task and the dataplane worker of one node."""

    def __init__(self, node: str, source: WatchSource, dataplane: DataplaneState, *,
                 metrics: Metrics | None = None, base: RenderConfig | None = None,
                 window: float = WINDOW, drift_interval: float = DRIFT_INTERVAL,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.node = node
        self.source = source
        self.dataplane = dataplane
        self.metrics = metrics or Metrics()
        self.metrics.collectors.append(DeniedCounters(dataplane).metrics_text)  # denied per policy
        self.base = base or RenderConfig()
        self.mirror = StoreMirror()
        self.caches = SyncCaches()  # what each sync keeps for the next
        self.sync = SyncState(window=window)
        self.drift_interval = drift_interval
        self.on_ready = on_ready
        self._wake = asyncio.Event()
        self._reported: set[str] = set()
        self._next_drift = 0.0
        self._next_full_drift = 0.0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_loop())
            tg.create_task(self._worker())

    # -- the store side --

    async def _watch_loop(self) -> None:
        delay = 0.5
        while True:
            try:
                async for item in self.source():
                    self._receive(item)
                    delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the watch ended: a new one starts from a full listing
                log.warning("watch %s failed (%s); restarting in %.1f s", WATCH_PREFIX, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WATCH_RETRY_MAX)

    def _receive(self, item: Event | Resync) -> None:
        now = time.monotonic()
        if isinstance(item, Resync):
            self.mirror.resync(item.items, item.revision)
            log.info("loaded %d objects at revision %d", len(self.mirror.objects), item.revision)
            self.sync.loaded(now)
        elif isinstance(item, Event) and self.mirror.event(item):
            self.sync.changed(now)
        else:
            return
        self._wake.set()

    # -- the kernel side --

    async def _worker(self) -> None:
        while True:
            now = time.monotonic()
            due = self.sync.due_at()
            drift = self._next_drift if self.sync.applied_once else None
            if due is not None and due <= now:
                await self._sync()
                continue
            if drift is not None and drift <= now:
                await self._drift(now)
                continue
            waits = [t - now for t in (due, drift) if t is not None]
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(waits) if waits else None)

    async def _sync(self) -> None:
        start = time.monotonic()
        sweep = self.sync.start(start)
        objects = dict(self.mirror.objects)  # values are replaced, never mutated: safe to share
        revision = self.mirror.revision
        self.metrics.inc("felix_syncs_total")
        try:
            # to_thread runs sync_once in a copy of this context: it finds our caches there
            _SYNC_CACHES.set(self.caches)
            result = await asyncio.to_thread(sync_once, objects, self.node, self.dataplane,
                                             self.base, sweep=sweep)
        except Exception as e:  # render or apply failed: the old rules stay; try again later
            self.caches = SyncCaches()  # and the retry starts from scratch
            delay = self.sync.failed(time.monotonic())
            self.metrics.inc("felix_sync_errors_total")
            self.metrics.set("felix_in_sync", 0)
            log.error("sync of revision %d failed (retrying in %.1f s): %s", revision, delay, e,
                      exc_info=not isinstance(e, RuntimeError | OSError))
            return
        end = time.monotonic()
        first = not self.sync.applied_once
        self.sync.succeeded(end, swept=sweep)
        self._record(result, revision, end - start)
        self._report(result.problems)
        if result.stats.wrote or first:
            log.info("revision %d applied%s in %.0f ms (render %.0f ms): %d chains, %d rules "
                     "written, %d restores; %d rules, %d set members programmed",
                     revision, " (sweeping)" if sweep else " (first sync, no sweep)",
                     (end - start) * 1000, result.render_s * 1000, result.stats.chains_written,
                     result.stats.rules_written, result.stats.restores, result.rules,
                     result.members)
        if sweep and not self.sync.dirty and self.on_ready is not None:
            self.on_ready()
        if first:
            self._next_drift = end + DRIFT_TICK
            self._next_full_drift = end + self.drift_interval

    def _record(self, result: SyncResult, revision: int, seconds: float) -> None:
        m = self.metrics
        if result.stats.wrote:
            m.inc("felix_writes_total")
        m.set("felix_last_sync_seconds", seconds)
        m.set("felix_last_apply_seconds", result.stats.total_ms / 1000)
        m.set("felix_rules_programmed", result.rules)
        m.set("felix_ipset_members_programmed", result.members)
        m.set("felix_ipsets_programmed", result.sets)
        m.set("felix_local_endpoints", result.endpoints)
        m.set("felix_render_problems", len(result.problems))
        m.set("felix_datastore_revision", revision)
        m.set("felix_in_sync", 1 if self.sync.in_sync else 0)

    def _report(self, problems: tuple[str, ...]) -> None:
        """Log each fail-closed object once (and again if it comes back after a fix)."""
        current = set(problems)
        for p in sorted(current - self._reported):
            log.error("cannot render, enforcing DROP: %s", p)
        for p in sorted(self._reported - current):
            log.info("rendered again: %s", p.split(":", 1)[0])
        self._reported = current

    async def _drift(self, now: float) -> None:
        force = now >= self._next_full_drift
        try:
            stats = await asyncio.to_thread(self.dataplane.check_drift, force=force)
        except Exception as e:
            self.metrics.inc("felix_sync_errors_total")
            log.error("drift check failed: %s", e)
            self.sync.failed(time.monotonic())  # a full sync rewrites whatever is off
        else:
            repaired = [s for s in stats if s.wrote]
            if repaired:
                self.metrics.inc("felix_drift_repairs_total")
                log.warning("repaired drift in %s", ", ".join(
                    f"v{s.family}/{s.table} ({s.chains_written} chains)" for s in repaired))
        done = time.monotonic()
        self._next_drift = done + DRIFT_TICK
        if force:
            self._next_full_drift = done + self.drift_interval


# -- the program -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m felix.agent", description=__doc__.split("\n")[0])
    p.add_argument("--nodename", default=os.environ.get("NODENAME"), required=False,
                   help="this node's name (default: NODENAME)")
    p.add_argument("-c", "--config", default=os.environ.get("TABBY_CONFIG"),
                   help="calicoctl-style config file (default: ETCD_* from the environment, "
                        "else /etc/tabby/tabbyctl.cfg)")
    p.add_argument("--etcd-endpoints", help="comma list of etcd URLs (overrides --config)")
    p.add_argument("--log-file", default="", help="log file besides stderr")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--metrics-port", type=int, default=DEFAULT_PORT,
                   help=f"/metrics, /liveness, /readiness on 127.0.0.1 (default {DEFAULT_PORT};"
                        " 0: none)")
    p.add_argument("--coalesce-ms", type=float, default=WINDOW * 1000,
                   help=f"write at most once per this window (default {WINDOW * 1000:g})")
    p.add_argument("--drift-interval", type=float, default=DRIFT_INTERVAL,
                   help=f"seconds between full drift checks (default {DRIFT_INTERVAL:g})")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="exit when the parent process (tabby-node) is gone")
    opts = p.parse_args(argv)
    if not opts.nodename:
        p.error("--nodename (or NODENAME) is required")
    return opts


async def run(opts: argparse.Namespace) -> int:
    from datastore.config import ConfigError
    from datastore.etcd import Datastore
    from felix.dataplane import Runner

    try:
        config = etcd_config(opts.etcd_endpoints, opts.config)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    metrics = Metrics()
    server = MetricsServer(metrics, opts.metrics_port) if opts.metrics_port else None
    ds = Datastore(config)
    agent = FelixAgent(opts.nodename, lambda: ds.watch(WATCH_PREFIX),
                       DataplaneState(Runner()), metrics=metrics,
                       window=opts.coalesce_ms / 1000, drift_interval=opts.drift_interval,
                       on_ready=lambda: setattr(server, "ready", True) if server else None)
    try:
        if server is not None:
            await server.start()
        log.info("felix agent for node %s (etcd %s, pid %d)", opts.nodename,
                 ",".join(config.endpoints), os.getpid())
        # the agent itself never returns; a crash is re-raised
        await run_until_stopped(agent.run(), log, opts.exit_with_parent)
    finally:
        if server is not None:
            await server.stop()
        await ds.close()
    log.info("stopped (the programmed rules stay in place)")
    return 0


def main(argv: list[str] | None = None) -> None:
    daemon_main("felix", parse_args(argv), run, NOISY_LOGGERS)


if __name__ == "__main__":
    main()

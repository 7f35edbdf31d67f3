"""DEL: the endpoint, the addresses and the veth, retrying etcd for ETCD_RETRY seconds before
the datastore part is spooled; the pending deletes (the spool's records) and
`replay_pending_deletes`, which finishes them once etcd answers again (see cni.handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cni import delegate, plumbing, wep
from cni.context import Ctx, Services
from datastore.errors import ValidationError
from datastore.etcd import Unavailable

ETCD_RETRY = 5.0  # DEL: how long etcd may stay unreachable before the rest is spooled
RETRY_PAUSE = 0.25


class _EtcdDown(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _with_etcd(fn: Callable[[], Awaitable[Any]], budget: float = ETCD_RETRY) -> Any:
    """fn() retried while etcd is unreachable, for at most `budget` seconds in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    while True:
        remaining = deadline - loop.time()
        try:
            return await asyncio.wait_for(fn(), max(remaining, 0.05))
        except (Unavailable, TimeoutError) as e:
            if loop.time() + RETRY_PAUSE >= deadline:
                raise _EtcdDown(e) from e
            await asyncio.sleep(RETRY_PAUSE)


async def cmd_del(ctx: Ctx) -> None:
    """The local part (veth, delegated IPAM) runs alongside the datastore part, since the
    kernel's veth unregister is the slow step. In the datastore the endpoint goes before the
    addresses, as in Calico, so no released address is still claimed by an endpoint."""
    results = await asyncio.gather(_del_local(ctx), _del_datastore(ctx), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _del_local(ctx: Ctx) -> None:
    await _teardown(ctx)
    if not ctx.conf.in_process_ipam:
        await delegate.delete(ctx.conf.ipam_type, ctx.stdin, ctx.environ, ctx.req.path)
        ctx.log.info("IPAM plugin %s released the addresses", ctx.conf.ipam_type)


async def _del_datastore(ctx: Ctx) -> None:
    w = ctx.workload
    try:
        name: str | None = w.name
    except ValidationError:
        name = None  # ADD could not have written an endpoint under such a name
    if name is not None:
        try:
            outcome = await _with_etcd(lambda: wep.delete_if_owned(
                ctx.svc.store, name, w.namespace, w.container_id))
        except _EtcdDown as e:
            _spool(ctx, e, wep_pending=True)
            return
        _log_wep_outcome(ctx, outcome, w.namespace, name)
    if ctx.conf.in_process_ipam:
        try:
            await _with_etcd(lambda: _release(ctx))
        except _EtcdDown as e:
            _spool(ctx, e, wep_pending=False)


def _log_wep_outcome(ctx: Ctx, outcome: str, namespace: str, name: str) -> None:
    if outcome == wep.DELETED:
        ctx.log.info("deleted WorkloadEndpoint %s/%s", namespace, name)
    elif outcome == wep.KEPT:
        ctx.log.info("WorkloadEndpoint %s/%s belongs to a newer container; kept", namespace,
                     name)
    else:
        ctx.log.info("no WorkloadEndpoint %s/%s; nothing to delete", namespace, name)


async def _teardown(ctx: Ctx) -> None:
    """The pod's interface in its netns; by name on the host only a half-made pair, so a newer
    sandbox of the same pod (same `cali…` name) keeps its veth (cni.plumbing.teardown)."""
    req, w = ctx.req, ctx.workload
    path = req.netns or None
    await asyncio.to_thread(plumbing.teardown, path, req.ifname, w.host_ifname, ctx.host_netns)
    ctx.log.info("removed %s%s", f"{req.ifname} in {path}" if path else "the veth",
                 "" if path else " (no netns given: only a half-made pair is looked for)")


async def _release(ctx: Ctx) -> list[str]:
    released = []
    for handle in ctx.handles:
        got = await ctx.svc.ipam.release_by_handle(handle)
        if got:
            ctx.log.info("released %s (handle %s)", ", ".join(got), handle)
        released += got
    if not released:
        ctx.log.info("nothing allocated to %s; nothing to release", " or ".join(ctx.handles))
    return released


def _spool(ctx: Ctx, err: _EtcdDown, wep_pending: bool) -> None:
    """etcd stayed unreachable: record what is left for replay_pending_deletes; DEL succeeds."""
    path = write_pending(ctx.svc.spool_dir, pending_record(ctx, wep_pending))
    ctx.log.warning("etcd (%s) unreachable for %.0f s (%s): the local cleanup is done; "
                    "releasing the addresses%s is recorded in %s and finished when etcd is back",
                    ctx.endpoints, ETCD_RETRY, err.cause,
                    " and deleting the WorkloadEndpoint" if wep_pending else "", path)


# -- pending deletes ----------------------------------------------------------------------------


def pending_record(ctx: Ctx, wep_pending: bool) -> dict[str, Any]:
    w = ctx.workload
    endpoint = None
    if wep_pending:
        with contextlib.suppress(ValidationError):
            endpoint = {"name": w.name, "namespace": w.namespace, "containerID": w.container_id}
    return {
        "network": ctx.conf.name,
        "containerID": ctx.req.container_id,
        "ifname": ctx.req.ifname,
        "handles": ctx.handles if ctx.conf.in_process_ipam else [],
        "workloadEndpoint": endpoint,
        "node": ctx.node,
        "etcdEndpoints": list(ctx.svc.config.endpoints),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _pending_name(network: str, container_id: str, ifname: str) -> str:
    return f"{network}.{container_id}.{ifname}.json"  # all three are safe in file names


def write_pending(spool_dir: Path, record: dict[str, Any]) -> Path:
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = spool_dir / _pending_name(record["network"], record["containerID"], record["ifname"])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _drop_pending(ctx: Ctx) -> None:
    path = ctx.svc.spool_dir / _pending_name(ctx.conf.name, ctx.req.container_id, ctx.req.ifname)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        ctx.log.warning("dropped the pending DEL %s: the container was added again", path)


async def replay_pending_deletes(services: Services) -> int:
    """Finish the spooled DELs of this etcd; the number finished. Stops at the first record
    etcd cannot take (it is still down); a record that fails otherwise is kept and logged."""
    try:
        paths = sorted(p for p in services.spool_dir.iterdir() if p.suffix == ".json")
    except FileNotFoundError:
        return 0
    done = 0
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            services.log.error("pending DEL %s is unreadable (%s); remove it by hand", path, e)
            continue
        endpoints = record.get("etcdEndpoints")
        if endpoints and set(endpoints) != set(services.config.endpoints):
            continue  # another etcd's record
        try:
            await _replay(services, record)
        except (Unavailable, TimeoutError) as e:
            services.log.info("pending DELs wait for etcd: %s", e)
            break
        except Exception as e:
            services.log.error("pending DEL %s failed: %s", path, e)
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        services.log.info("finished the pending DEL of container %s", record.get("containerID"))
        done += 1
    return done


async def _replay(services: Services, record: dict[str, Any]) -> None:
    endpoint = record.get("workloadEndpoint")
    if endpoint:
        outcome = await asyncio.wait_for(wep.delete_if_owned(
            services.store, endpoint["name"], endpoint["namespace"], endpoint["containerID"]),
            ETCD_RETRY)
        services.log.info("pending DEL: WorkloadEndpoint %s/%s %s", endpoint["namespace"],
                          endpoint["name"], outcome)
    for handle in record.get("handles") or []:
        released = await asyncio.wait_for(services.ipam.release_by_handle(handle), ETCD_RETRY)
        if released:
            services.log.info("pending DEL: released %s (handle %s)", ", ".join(released), handle)


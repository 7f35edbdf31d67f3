"""CHECK (the plumbing, the addresses and the endpoint still as ADD made them), GC (CNI 1.1:
what stale attachments still hold) and STATUS (CNI 1.1: etcd answers); see cni.handler.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from typing import Any

from cni import annotations as calico_annotations
from cni import delegate, plumbing, spec, wep
from cni.cmd_add import _Allocation, _allocation, _mtu
from cni.context import ENDPOINT_MISSING, PLUMBING_FAILED, Ctx
from cni.ipam_plugin import cmd_status as ipam_status
from cni.spec import CNIError
from datastore.etcd import Unavailable


async def cmd_check(ctx: Ctx) -> None:
    req, conf, w = ctx.req, ctx.conf, ctx.workload
    prev = req.prev_result
    if prev is None:
        raise CNIError(spec.INVALID_CONFIG, "CHECK needs prevResult",
                       "the runtime must pass the ADD result as prevResult")
    if not os.path.exists(req.netns):
        raise CNIError(spec.UNKNOWN_CONTAINER, f"CNI_NETNS={req.netns} does not exist",
                       "the sandbox is gone")
    allocation = _allocation(prev, new=False)
    if not allocation.addresses:
        raise CNIError(spec.INVALID_CONFIG, "prevResult has no addresses")
    mac = next((i.get("mac") for i in prev["interfaces"]
                if i.get("name") == req.ifname and i.get("sandbox")), None)
    pod_if = plumbing.PodInterface(
        netns=req.netns, container_ifname=req.ifname, host_ifname=w.host_ifname,
        addresses=tuple(allocation.addresses), mtu=await _mtu(ctx), mac=mac,
        allow_ip_forwarding=conf.allow_ip_forwarding)
    problems, ipam_problem, endpoint = await asyncio.gather(
        asyncio.to_thread(plumbing.check, pod_if, ctx.host_netns),
        _check_ipam(ctx, allocation), wep.get(ctx.svc.store, w))
    if problems:
        raise CNIError(PLUMBING_FAILED, f"the pod's plumbing differs from what ADD made: "
                       f"{'; '.join(problems)}", "delete and re-create the pod")
    if ipam_problem:
        raise ipam_problem
    if endpoint is None or not wep.owned_by(endpoint, req.container_id):
        what = "does not exist" if endpoint is None else "belongs to another container"
        raise CNIError(ENDPOINT_MISSING, f"WorkloadEndpoint {w.namespace}/{w.name} {what}",
                       "delete and re-create the pod")
    ctx.log.info("CHECK passed: plumbing, addresses and endpoint match")


async def _check_ipam(ctx: Ctx, allocation: _Allocation) -> CNIError | None:
    if not ctx.conf.in_process_ipam:
        try:
            await delegate.check(ctx.conf.ipam_type, ctx.stdin, ctx.environ, ctx.req.path)
        except CNIError as e:
            return e
        return None
    want = {a.ip for a in allocation.addresses} - await _given_without_ipam(ctx)
    held = {ipaddress.ip_interface(ip).ip for ip in await ctx.svc.ipam.ips_by_handle(ctx.handle)}
    missing = sorted(map(str, want - held))
    if missing:
        return CNIError(spec.ALLOCATION_MISSING,
                        f"handle {ctx.handle} no longer holds {', '.join(missing)}",
                        "the allocation was released (by tabbyctl ipam release or gc?); "
                        "recreate the pod to get a new address")
    return None


async def _given_without_ipam(ctx: Ctx) -> set[Any]:
    """The Pod's `ipAddrsNoIpam` addresses, which no IPAM handle holds (when allowed)."""
    key = wep.pod_key(ctx.workload)
    if key is None or not ctx.conf.ip_addrs_no_ipam:
        return set()
    w = ctx.workload
    found = calico_annotations.annotations_of(wep.resource(await ctx.svc.ds.get(key)))
    try:
        given = calico_annotations.addresses_without_ipam(found, f"{w.namespace}/{w.pod}")
    except CNIError:  # ADD refused such a pod: nothing of it is exempt
        return set()
    return set(given)


# -- GC and STATUS ------------------------------------------------------------------------------


async def cmd_gc(ctx: Ctx) -> None:
    """Release what this network holds on this node for attachments the runtime no longer
    lists: handles (Tabby's IPAM), their endpoints, and any half-made veth."""
    from ipam.state import read_state

    valid = {cid for cid, _ in ctx.req.valid_attachments}
    svc, network = ctx.svc, ctx.conf.name
    stale: dict[str, str] = {}  # container ID -> handle
    if ctx.conf.in_process_ipam:
        prefix = f"{network}."
        state = await read_state(svc.ds)
        for block, _rev in state.blocks.values():
            for _ip, attr in block.allocated():
                handle = attr.handle or ""
                cid = handle[len(prefix):]
                if (handle.startswith(prefix) and cid and cid not in valid
                        and attr.secondary.get("node") == ctx.node):
                    stale[cid] = handle
    else:
        ctx.log.info("GC: addresses of IPAM plugin %s are left to it", ctx.conf.ipam_type)
    failures: list[str] = []
    for endpoint in await svc.store.list(wep.WEP):
        spec_ = endpoint.get("spec") or {}
        cid = spec_.get("containerID") or ""
        if spec_.get("node") != ctx.node or not cid or cid in valid:
            continue
        if ctx.conf.in_process_ipam and cid not in stale:
            continue  # not this network's (its addresses came from another handle)
        try:
            await _gc_endpoint(ctx, endpoint)
        except Exception as e:  # keep going: GC frees as much as it can
            failures.append(f"endpoint {endpoint['metadata']['name']}: {e}")
    for cid, handle in sorted(stale.items()):
        try:
            released = await svc.ipam.release_by_handle(handle)
            ctx.log.info("GC released %s (handle %s, container %s)", ", ".join(released), handle,
                         cid)
        except Exception as e:
            failures.append(f"{handle}: {e}")
    if failures:
        raise CNIError(spec.TRY_AGAIN_LATER, f"GC could not clean up {len(failures)} "
                       "attachments", "; ".join(failures))


async def _gc_endpoint(ctx: Ctx, endpoint: dict[str, Any]) -> None:
    meta, spec_ = endpoint["metadata"], endpoint["spec"]
    outcome = await wep.delete_if_owned(ctx.svc.store, meta["name"], meta["namespace"],
                                        spec_["containerID"])
    ctx.log.info("GC: WorkloadEndpoint %s/%s %s", meta["namespace"], meta["name"], outcome)
    if spec_.get("interfaceName"):
        await asyncio.to_thread(plumbing.teardown, None, spec_.get("endpoint") or "eth0",
                                spec_["interfaceName"], ctx.host_netns)


async def cmd_status(ctx: Ctx) -> None:
    try:
        if ctx.conf.in_process_ipam:
            await ipam_status(ctx.svc.ds)  # etcd answers and an enabled pool exists
        else:
            await ctx.svc.ds.revision()
    except (Unavailable, TimeoutError) as e:
        raise CNIError(spec.NOT_AVAILABLE, f"etcd ({ctx.endpoints}) is unreachable: {e}",
                       "check that etcd is running and that etcd_endpoints points at it") from e


"""ADD: take what it needs from tabby-node's watched copies (guarded in the commit; else one
etcd read), allocate the addresses (Tabby's IPAM commits the WorkloadEndpoint in the same etcd
transaction; a delegated IPAM plugin's addresses get the endpoint written while the pod is
plumbed), plumb the pod, answer the result; a failure after the allocation undoes what was done
(see cni.handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cni import annotations as calico_annotations
from cni import delegate, plumbing, spec, wep
from cni.cmd_del import _drop_pending, _release
from cni.context import Ctx
from cni.ipam_plugin import Context as IpamContext
from cni.ipam_plugin import _assign_requested, allocation_attrs, requested_ips
from cni.netconf import read_mtu_file
from cni.spec import CNIError
from datastore.etcd import KV, Guard
from datastore.kinds import kind_for
from datastore.reads import ReadBatch, ReadResult
from ipam import keys as ipam_keys
from ipam.allocator import AssignRequest, Prefetched
from ipam.block import sanitize_handle
from ipam.errors import InputsChanged

ROLLBACK_TIMEOUT = 10.0

CLUSTER_INFO = kind_for("ClusterInformation")


@dataclass
class _Allocation:
    result: dict[str, Any]  # internal 1.x shape from the IPAM (ips, routes, dns)
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]  # /32 and /128
    new: bool  # allocated by this request (so released if it fails)
    endpoint_written: bool = False  # committed with the addresses (Tabby's IPAM, one txn)


async def cmd_add(ctx: Ctx) -> dict[str, Any]:
    req, w = ctx.req, ctx.workload
    if not os.path.exists(req.netns):
        raise CNIError(spec.INVALID_ENVIRONMENT, f"CNI_NETNS={req.netns} does not exist",
                       "the runtime must create the sandbox's network namespace before ADD")
    _ = w.name  # a name Calico cannot form fails here, before anything is allocated
    _drop_pending(ctx)  # this attachment is live again: an old pending DEL must not undo it
    mac = _requested_mac(req, None) or random_mac()
    remembered = _remembered_reads(ctx)
    reading = None if remembered else asyncio.ensure_future(_read_for_add(ctx))
    veth: _Veth | None = None
    allocation: _Allocation | None = None
    try:
        veth = _Veth(ctx, await _pod_interface(ctx, mac))
        if reading is not None:
            await asyncio.sleep(0)  # the read goes out first; etcd answers while the veth is made
            # the plumbing runs right on this thread: a netlink request is a syscall the kernel
            # answers at once, and handing it to a worker thread costs more in wake-ups than it
            # takes (each phase is under a millisecond; see cni.plumbing)
            veth.prepare()
            reads, guards = await reading, []
        else:  # no read at all: the veth is made and finished while etcd commits
            assert remembered is not None
            reads, guards = remembered
        try:
            allocation, mac, endpoint = await _allocate_for(ctx, reads, mac, veth, guards)
        except InputsChanged as e:
            ctx.log.info("%s; reading them and allocating again", e)
            reads = await _read_for_add(ctx)
            allocation, mac, endpoint = await _allocate_for(ctx, reads, mac, veth, [])
        if endpoint is not None:  # a delegated IPAM plugin or requested addresses
            await wep.write(ctx.svc.store, endpoint, reads.get(w.key))
            allocation.endpoint_written = True
        plumbed = await veth.finished(allocation.addresses, mac)
    except BaseException:
        await _abandon(ctx, reading, veth.prepared if veth else None)
        if allocation is not None:
            await _rollback(ctx, allocation, endpoint_written=allocation.endpoint_written)
        raise
    assert veth.prepared is not None
    veth.prepared.close()
    ctx.log.info("plumbed %s <-> %s:%s (%s, MTU %d) and wrote WorkloadEndpoint %s/%s",
                 w.host_ifname, req.netns, req.ifname, ", ".join(map(str, allocation.addresses)),
                 plumbed.mtu, w.namespace, w.name)
    return _result(ctx, allocation, plumbed)


class _Veth:
    """The pod's veth through ADD: made while etcd is read (`prepare`), finished with the
    addresses while etcd commits them (the allocator's `while_last_commits`; Calico too
    plumbs before the endpoint is written), else after the allocation (`finished`). Without a
    read (remembered inputs) it is made in the commit's shadow too."""

    def __init__(self, ctx: Ctx, pod_if: plumbing.PodInterface) -> None:
        self.ctx, self.pod_if = ctx, pod_if
        self.prepared: plumbing.PreparedVeth | None = None
        self.mac = pod_if.mac  # the MAC to finish with (the Pod's, once it has been read)
        self.early: list[Any] | None = None  # the addresses finish() ran with meanwhile
        self.plumbed: plumbing.Plumbed | None = None
        self.error: Exception | None = None

    def prepare(self) -> plumbing.PreparedVeth:
        if self.prepared is None:
            self.prepared = plumbing.prepare(self.pod_if, self.ctx.host_netns)
        return self.prepared

    def while_committing(self, taken: list[Any]) -> None:
        """The allocator's hook (must not raise): finish with the addresses in flight."""
        if self.early is not None:
            return  # a refused transaction retried with other addresses: finished() redoes it
        self.early = [ipaddress.ip_interface((a.ip, a.max_prefixlen)) for a in taken]
        try:
            self.plumbed = self.prepare().finish(self.early, self.mac)
        except Exception as e:  # finish() removed the pair; raised by finished()
            self.error = e

    async def finished(self, addresses: list[Any], mac: str | None) -> plumbing.Plumbed:
        """The veth plumbed with the addresses the store holds (removed if that fails)."""
        if self.error is not None:
            raise self.error
        # the MAC it was finished with: a Pod read again (InputsChanged) may ask for another
        same_mac = self.plumbed is not None and (mac is None
                                                 or self.plumbed.container_mac == mac.lower())
        if same_mac and self.early == addresses:
            assert self.plumbed is not None
            return self.plumbed
        if self.prepared is not None and self.early is not None:
            self.ctx.log.info("the store refused %s after the veth had them; plumbing %s",
                              ", ".join(map(str, self.early)), ", ".join(map(str, addresses)))
            if same_mac:  # removes the pair if it fails
                return self.prepared.readdress(self.early, addresses)
            # deleting a veth waits for the kernel (~30 ms): not on the loop's thread
            await asyncio.to_thread(self.prepared.abandon)
            self.prepared = None
        return self.prepare().finish(addresses, mac)  # removes the pair if it fails


async def _pod_interface(ctx: Ctx, mac: str) -> plumbing.PodInterface:
    """The veth to make; its addresses come later (PreparedVeth.finish)."""
    req, w = ctx.req, ctx.workload
    return plumbing.PodInterface(
        netns=req.netns, container_ifname=req.ifname, host_ifname=w.host_ifname, addresses=(),
        mtu=await _mtu(ctx), mac=mac, allow_ip_forwarding=ctx.conf.allow_ip_forwarding)


async def _abandon(ctx: Ctx, reading: asyncio.Future[ReadResult] | None,
                   prepared: plumbing.PreparedVeth | None) -> None:
    """After a failure: stop the read if it still runs, remove the veth if one was made."""
    if reading is not None:
        if not reading.done():
            reading.cancel()
        await asyncio.wait([reading])
        if not reading.cancelled():
            reading.exception()  # retrieved: the failure being raised is the one that matters
    if prepared is None:
        return
    try:  # deleting a veth waits for the kernel (~30 ms): not on the loop's thread
        await asyncio.wait_for(asyncio.to_thread(prepared.abandon), ROLLBACK_TIMEOUT)
    except Exception as e:  # the runtime's DEL removes it anyway
        ctx.log.error("could not remove the veth after the failure: %s", e)


async def _allocate_for(ctx: Ctx, reads: ReadResult, mac: str, veth: _Veth,
                        guards: list[Guard]) -> tuple[_Allocation, str, dict[str, Any] | None]:
    """The addresses, the pod MAC (the Pod's hwAddr annotation, known only now, wins over the
    one the veth was made with) and the WorkloadEndpoint still to write (None when Tabby's IPAM
    committed it with the addresses). `guards`: with remembered reads, what must still hold
    when the addresses and the endpoint are committed (else InputsChanged)."""
    req, conf, svc, w = ctx.req, ctx.conf, ctx.svc, ctx.workload
    _check_datastore_ready(reads.get(CLUSTER_INFO.key("default")))
    pod = wep.resource(reads.get(pod_key)) if (pod_key := wep.pod_key(w)) else None
    ns_obj = wep.resource(reads.get(ns_key)) if (ns_key := wep.namespace_key(w)) else None
    prefetched = (svc.ipam.assign_reads(reads, ctx.node, ctx.handle, _ipam_namespace(ctx))
                  if conf.in_process_ipam else None)
    if prefetched is not None and guards:
        prefetched = replace(prefetched, remembered=True)
    if pod and (pod.get("spec") or {}).get("hostNetwork"):
        raise CNIError(spec.INVALID_CONFIG, f"pod {w.namespace}/{w.pod} uses the host network",
                       "host-network pods get no CNI attachment")
    mac = veth.mac = _requested_mac(req, pod) or mac
    given = _addresses_without_ipam(ctx, pod)
    if given:
        if guards:  # its endpoint is written alone, so it cannot carry them
            raise InputsChanged("addresses given without IPAM are used with inputs read now")
        ctx.log.info("using %s as given by the Pod (no IPAM)", ", ".join(map(str, given)))
        allocation = _allocation({"ips": [{"address": str(a)} for a in given]}, new=False)
        return allocation, mac, wep.build(w, pod, [str(a) for a in allocation.addresses], mac)
    held = await _held(ctx, prefetched)

    def endpoint_ops(addresses: list[Any]) -> list[Any]:
        """The WorkloadEndpoint, committed in the allocation's own transaction."""
        single = [f"{a.ip}/{a.max_prefixlen}" for a in addresses]
        return [wep.put_op(wep.build(w, pod, single, mac), reads.get(w.key))[0], *guards]

    allocation = await _allocate(ctx, held, pod, ns_obj, prefetched, reads.get(w.key),
                                 endpoint_ops, veth.while_committing)
    if allocation.endpoint_written:
        return allocation, mac, None
    return allocation, mac, wep.build(w, pod, [str(a) for a in allocation.addresses], mac)


def _addresses_without_ipam(ctx: Ctx, pod: dict[str, Any] | None) -> list[Any]:
    """The Pod's `ipAddrsNoIpam` addresses (/32, /128), if the netconf allows them; Calico's
    `floatingIPs` is refused rather than silently not done."""
    w = ctx.workload
    pod_name = f"{w.namespace}/{w.pod}"
    found = calico_annotations.annotations_of(pod)
    if found.get(calico_annotations.FLOATING_IPS):
        raise CNIError(spec.INVALID_CONFIG, f"pod {pod_name} asks for floating IPs "
                       f"({calico_annotations.FLOATING_IPS}); Tabby has no floating IPs",
                       "remove the annotation, or expose the pod through a Service")
    given = calico_annotations.addresses_without_ipam(found, pod_name)
    if given and not ctx.conf.ip_addrs_no_ipam:
        raise CNIError(spec.INVALID_CONFIG, f"pod {pod_name} has "
                       f"{calico_annotations.IP_ADDRS_NO_IPAM}, which this network does not "
                       "allow", 'set "feature_control": {"ip_addrs_no_ipam": true} in the '
                       "netconf (any pod may then claim any address), or use "
                       f"{calico_annotations.IP_ADDRS}")
    return [ipaddress.ip_interface((a, a.max_prefixlen)) for a in given]


def _add_reads(ctx: Ctx) -> ReadBatch:
    """Everything ADD reads before it writes: the ClusterInformation, the endpoint's key, the
    Pod and its Namespace, and (Tabby's IPAM) what the allocator reads first
    (`IPAM.queue_assign_reads`)."""
    w = ctx.workload
    batch = ReadBatch(gets=[CLUSTER_INFO.key("default"), w.key])
    for key in (wep.pod_key(w), wep.namespace_key(w)):
        if key:
            batch.get(key)
    if ctx.conf.in_process_ipam:
        ctx.svc.ipam.queue_assign_reads(batch, ctx.node, ctx.handle, _ipam_namespace(ctx))
    return batch


async def _read_for_add(ctx: Ctx) -> ReadResult:
    """`_add_reads` in one etcd request, at one revision."""
    return await _add_reads(ctx).run(ctx.svc.ds)


def _remembered_reads(ctx: Ctx) -> tuple[ReadResult, list[Guard]] | None:
    """`_add_reads` answered from tabby-node's watched copies, with the guards the commit
    carries; None (read them) without them, or for a delegated IPAM plugin, whose write of
    the endpoint could not carry the guards. The endpoint and the handle are new keys on an
    ADD (guarded absent: a repeated ADD reads); a block comes as this allocator last wrote
    it (its write is guarded by its revision), else it is read when needed."""
    remembered = ctx.svc.remembered
    if remembered is None or not ctx.conf.in_process_ipam:
        return None
    batch = _add_reads(ctx)
    blocks = [key for key in batch.gets if ipam_keys.parse_block_key(key)]
    known = ctx.svc.ipam.written_blocks(blocks)
    return remembered.answer(batch, assume_absent=[ctx.workload.key, ipam_keys.handle_key(
        sanitize_handle(ctx.handle))], known=known,
        leave_out=[key for key in blocks if key not in known])


def _ipam_namespace(ctx: Ctx) -> str | None:
    """The namespace whose labels the pools' namespaceSelectors see."""
    return ctx.workload.namespace if ctx.workload.is_k8s else None


async def _held(ctx: Ctx, prefetched: Prefetched | None) -> list[str]:
    """Addresses this attachment's handle already holds (a repeated ADD), Tabby's IPAM only."""
    if prefetched is None:
        return []
    return await ctx.svc.ipam.ips_by_handle(ctx.handle, prefetched.handle)


async def _mtu(ctx: Ctx) -> int:
    """The netconf's, else the routing agent's file (as Calico's Felix writes it), else the
    uplink's minus mtu_overhead."""
    conf = ctx.conf
    if conf.mtu:
        return conf.mtu
    if (from_file := read_mtu_file(conf.mtu_file)) is not None:
        return from_file
    if conf.require_mtu_file:
        raise CNIError(spec.TRY_AGAIN_LATER, f"no MTU in {conf.mtu_file} (require_mtu_file is "
                       "set)", "tabby-node's routing agent writes it once it has synced; "
                       "or set mtu in the netconf")
    return await ctx.svc.pod_mtu(conf.mtu_overhead, ctx.host_netns)


def _check_datastore_ready(kv: KV | None) -> None:
    """Calico refuses ADD while ClusterInformation (`kv`) says the datastore is not ready."""
    if kv is None:
        return
    with contextlib.suppress(ValueError, AttributeError):
        if json.loads(kv.value).get("spec", {}).get("datastoreReady") is False:
            raise CNIError(spec.TRY_AGAIN_LATER, "the datastore is not ready "
                           "(ClusterInformation default: datastoreReady false)",
                           "an upgrade or restore is in progress; the runtime will retry")


def random_mac() -> str:
    """A random unicast, locally administered MAC, as the kernel's eth_random_addr() makes."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _requested_mac(req: spec.Request, pod: dict[str, Any] | None) -> str | None:
    """runtimeConfig `mac`, then CNI_ARGS `MAC=` (podman), then Calico's hwAddr annotation."""
    annotations = calico_annotations.annotations_of(pod)
    for source, value in (("runtimeConfig.mac", req.runtime_config.get("mac")),
                          ("CNI_ARGS MAC", req.args.get("MAC")),
                          ("annotation cni.projectcalico.org/hwAddr",
                           annotations.get("cni.projectcalico.org/hwAddr"))):
        if not value:
            continue
        text = str(value).strip().lower().replace("-", ":")
        octets = text.split(":")
        if len(octets) != 6 or not all(len(o) == 2 for o in octets) or \
                any(c not in "0123456789abcdef:" for c in text):
            raise CNIError(spec.INVALID_CONFIG, f"{source}: {value!r} is not a MAC address",
                           "e.g. 02:42:0a:f4:00:05")
        if int(octets[0], 16) & 1:
            raise CNIError(spec.INVALID_CONFIG, f"{source}: {value} is a multicast MAC",
                           "the first octet must be even")
        return text
    return None


async def _allocate(ctx: Ctx, held: list[str], pod: dict[str, Any] | None,
                    ns_obj: dict[str, Any] | None, prefetched: Prefetched | None,
                    endpoint_kv: KV | None,
                    endpoint_ops: Callable[[list[Any]], list[Any]] | None = None,
                    while_committing: Callable[[list[Any]], None] | None = None
                    ) -> _Allocation:
    req, conf = ctx.req, ctx.conf
    if conf.in_process_ipam:
        if held:
            ctx.log.info("handle %s already holds %s (repeated ADD); keeping it", ctx.handle,
                         ", ".join(held))
            return _allocation({"ips": [{"address": a} for a in held]}, new=False)
        addresses, with_endpoint = await _assign(ctx, pod, ns_obj, prefetched, endpoint_ops,
                                                 while_committing)
        ctx.log.info("assigned %s to handle %s", ", ".join(addresses), ctx.handle)
        done = _allocation({"ips": [{"address": a} for a in addresses]}, new=True)
        done.endpoint_written = with_endpoint
        return done
    existing = wep.resource(endpoint_kv)
    if existing and (existing["spec"].get("containerID") == req.container_id
                     and existing["spec"].get("ipNetworks")):
        nets = existing["spec"]["ipNetworks"]
        ctx.log.info("endpoint of this container already has %s (repeated ADD); keeping them",
                     ", ".join(nets))
        return _allocation({"ips": [{"address": n} for n in nets]}, new=False)
    result = await delegate.add(conf.ipam_type, ctx.stdin, ctx.environ, req.path, req.version)
    ctx.log.info("IPAM plugin %s assigned %s", conf.ipam_type,
                 ", ".join(ip["address"] for ip in result["ips"]))
    return _allocation(result, new=True)


def _allocation(result: dict[str, Any], new: bool) -> _Allocation:
    addresses = []
    for ip in result.get("ips", []):
        iface = ipaddress.ip_interface(ip["address"])
        addresses.append(ipaddress.ip_interface(f"{iface.ip}/{iface.max_prefixlen}"))
    return _Allocation(result, addresses, new)


async def _assign(ctx: Ctx, pod: dict[str, Any] | None, ns_obj: dict[str, Any] | None,
                  prefetched: Prefetched | None,
                  endpoint_ops: Callable[[list[Any]], list[Any]] | None = None,
                  while_committing: Callable[[list[Any]], None] | None = None
                  ) -> tuple[list[str], bool]:
    """tabby-ipam's ADD without its host lock file (the allocator queues one node's requests
    in memory instead). The addresses, and whether `endpoint_ops` went
    into the same transaction (auto-assignment only; a requested address is written alone)."""
    req, conf, w = ctx.req, ctx.conf.ipam_conf, ctx.workload
    pod_ann = calico_annotations.annotations_of(pod)
    ns_ann = calico_annotations.annotations_of(ns_obj)
    pod_name = f"{w.namespace}/{w.pod}"
    wanted = (requested_ips(req.config, req.args)
              or calico_annotations.requested_addresses(pod_ann, pod_name))
    attrs = allocation_attrs(ctx.node, req.args, time.time_ns())
    if wanted and prefetched is not None and prefetched.remembered:
        raise InputsChanged("requested addresses are assigned from inputs read now")
    if wanted:
        ipam_ctx = IpamContext(req, conf, ctx.node, ctx.log)
        return await _assign_requested(ipam_ctx, ctx.svc.ipam, wanted, attrs), False
    if not (conf.assign_ipv4 or conf.assign_ipv6):
        raise CNIError(spec.INVALID_CONFIG, "invalid network config: ipam assigns nothing: "
                       "assign_ipv4 and assign_ipv6 are both false")
    v4_pools = calico_annotations.pools(pod_ann, ns_ann, calico_annotations.IPV4_POOLS,
                                        pod_name, w.namespace) or conf.ipv4_pools
    v6_pools = calico_annotations.pools(pod_ann, ns_ann, calico_annotations.IPV6_POOLS,
                                        pod_name, w.namespace) or conf.ipv6_pools
    got = await ctx.svc.ipam.auto_assign(AssignRequest(
        handle_id=ctx.handle, hostname=ctx.node, num_v4=int(conf.assign_ipv4),
        num_v6=int(conf.assign_ipv6), attrs=attrs, ipv4_pools=v4_pools, ipv6_pools=v6_pools,
        namespace=_ipam_namespace(ctx), with_last=endpoint_ops,
        while_last_commits=while_committing), prefetched=prefetched)
    return [str(a) for a in [*got.ipv4, *got.ipv6]], got.with_last_committed


async def _rollback(ctx: Ctx, allocation: _Allocation, endpoint_written: bool) -> None:
    """Undo a failed ADD's datastore side: the endpoint, then the addresses it allocated (each
    bounded, best effort: the runtime's DEL finishes whatever is left). The veth is removed
    before this, by `_abandon`."""
    w = ctx.workload
    if endpoint_written:
        try:
            await asyncio.wait_for(wep.delete_if_owned(
                ctx.svc.store, w.name, w.namespace, w.container_id), ROLLBACK_TIMEOUT)
        except Exception as e:
            ctx.log.error("could not delete the WorkloadEndpoint after the failure: %s", e)
    if not allocation.new:
        return
    try:
        await asyncio.wait_for(_release(ctx), ROLLBACK_TIMEOUT)
        ctx.log.info("released %s after the failure", ", ".join(map(str, allocation.addresses)))
    except Exception as e:  # the runtime's DEL releases the handle anyway
        ctx.log.error("could not release %s after the failure: %s",
                      ", ".join(map(str, allocation.addresses)), e)


def _result(ctx: Ctx, allocation: _Allocation, plumbed: plumbing.Plumbed) -> dict[str, Any]:
    """Calico's result: [host veth, pod interface], addresses on interface 1, no gateway."""
    pod_iface: dict[str, Any] = {"name": plumbed.container_ifname, "mac": plumbed.container_mac,
                                 "sandbox": plumbed.netns}
    if spec.version_at_least(ctx.req.version, "1.1.0"):
        pod_iface["mtu"] = plumbed.mtu
    result = {
        "cniVersion": spec.CURRENT_VERSION,
        "interfaces": [{"name": plumbed.host_ifname, "mac": plumbed.host_mac}, pod_iface],
        "ips": [{"address": str(a), "interface": 1} for a in allocation.addresses],
        "routes": allocation.result.get("routes") or [],
        "dns": allocation.result.get("dns") or {},
    }
    return spec.convert_result(result, ctx.req.version)


"""The `tabby` CNI plugin's commands, shared by tabby-node (through the shim's socket) and the
in-process fallback (`python -m cni.fallback`).

`handle(environ, stdin, services)` takes what a runtime gives a plugin (CNI_* variables and the
netconf) and answers what the plugin prints (a `Reply`): it never raises. Calico's plugin is the
model (`cni-plugin/pkg/k8s/k8s.go`):

- ADD: parse and check the request (nothing is touched before that: a malformed stdin is code 6,
  an unknown cniVersion 1, a missing or absent CNI_NETNS 4), allocate addresses (Tabby's IPAM
  in-process for `tabby-ipam`/`calico-ipam`, else the IPAM plugin exec'd from CNI_PATH), then
  plumb the pod (`cni.plumbing`, in a thread) while writing the WorkloadEndpoint (`cni.wep`; the
  pod MAC is chosen up front so neither waits for the other), and print the result: interfaces
  [host veth, pod interface], the addresses as /32 and /128 on interface 1, no gateway. A failure
  after the allocation removes the veth and the endpoint and releases the addresses. A repeated
  ADD of the same container replaces the plumbing and keeps the addresses its handle holds.
- DEL: the endpoint (only while it belongs to this container), then the addresses (by handle
  and by Calico's legacy `<ns>.<pod>` handle); meanwhile the veth (an empty or vanished netns is
  fine). Whatever is already gone is success, so DEL can be repeated. When etcd stays
  unreachable for ETCD_RETRY seconds, the local part is done, the rest is written to the spool
  directory (one JSON file per attachment) and DEL succeeds with a warning: a runtime must never
  loop on DEL.
  `replay_pending_deletes` finishes those records once etcd answers again.
- CHECK: the plumbing read back from the kernel, the handle still holding prevResult's
  addresses (or the delegated plugin's CHECK) and the endpoint still existing.
- GC (CNI 1.1): releases this node's handles of this network whose container is not among the
  `cni.dev/valid-attachments`, deleting their endpoints and any half-made veth.
- STATUS (CNI 1.1): code 50 unless etcd answers (and, for Tabby's IPAM, an enabled pool exists).
- VERSION: answered from the request alone.

Each command runs within DEADLINE seconds. Log lines go to the reply's stderr (the runtime's
log), to `log_file_path` when the netconf sets it, and to the Services' logger (tabby-node's).

For tests only: `TABBY_HOST_NETNS` in the request's environment names the namespace that plays
the host (the host veth, its routes and sysctls go there instead of the calling process's
namespace), so tests reach etcd on the root namespace's loopback while plumbing only in
namespaces they made. The shim never forwards it, so tabby-node never sees it.
`TABBY_SPOOL_DIR` overrides the fallback's spool directory (DEFAULT_SPOOL) the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni import annotations as calico_annotations
from cni import delegate, plumbing, spec, wep
from cni.ipam_plugin import Context as IpamContext
from cni.ipam_plugin import (
    _assign_requested,
    allocation_attrs,
    determine_nodename,
    error_for,
    handle_id,
    legacy_handle,
    requested_ips,
)
from cni.ipam_plugin import cmd_status as ipam_status
from cni.netconf import NetConf, parse_netconf
from cni.spec import CNIError
from datastore.config import EtcdConfig
from datastore.errors import ValidationError
from datastore.etcd import KV, Datastore, Unavailable
from datastore.kinds import kind_for
from datastore.reads import ReadBatch, ReadResult
from datastore.store import ResourceStore, StoreError
from ipam.allocator import IPAM, AssignRequest, Prefetched

DEADLINE = 60.0  # one whole ADD/DEL/CHECK/GC
ETCD_RETRY = 5.0  # DEL: how long etcd may stay unreachable before the rest is spooled
RETRY_PAUSE = 0.25
ROLLBACK_TIMEOUT = 10.0
REPLAY_TIMEOUT = 5.0  # the fallback's opportunistic replay after a successful ADD
MTU_CACHE = 30.0  # seconds a detected MTU is reused
DEFAULT_SPOOL = "/var/lib/tabby/pending-del"
HOST_NETNS_ENV = "TABBY_HOST_NETNS"
SPOOL_ENV = "TABBY_SPOOL_DIR"
PREFIX_ENV = "FELIX_INTERFACEPREFIX"  # the request's, else tabby-node's own environment

# Tabby's own codes (100+ belong to plugins); next to cni.spec's 100-104
PLUMBING_FAILED = spec.PLUMBING_FAILED
ENDPOINT_MISSING = spec.ENDPOINT_MISSING

CLUSTER_INFO = kind_for("ClusterInformation")
log = logging.getLogger("tabby.cni")


@dataclass
class Reply:
    exit_code: int
    stdout: str  # the CNI result or error JSON (or "" for DEL/CHECK success)
    stderr: str = ""  # human log lines for the runtime's log


class Services:
    """What stays warm between requests of one etcd configuration: the connection (dialled on
    first use), the allocator, the resource store and a cache of the detected MTU."""

    def __init__(self, config: EtcdConfig, ds: Datastore, log: logging.Logger,
                 spool_dir: Path) -> None:
        self.config = config
        self.ds = ds
        self.ipam = IPAM(ds)
        self.store = ResourceStore(ds)
        self.log = log
        self.spool_dir = Path(spool_dir)
        self._mtu: dict[tuple[int, str | None], tuple[float, int]] = {}

    @classmethod
    async def open(cls, config: EtcdConfig, log: logging.Logger, spool_dir: Path) -> Services:
        """No I/O: a DEL must be able to run (and spool) while etcd is down."""
        return cls(config, Datastore(config), log, Path(spool_dir))

    async def close(self) -> None:
        await self.ds.close()

    async def pod_mtu(self, overhead: int, host_netns: str | None) -> int:
        key = (overhead, host_netns)
        cached = self._mtu.get(key)
        now = time.monotonic()
        if cached and now - cached[0] < MTU_CACHE:
            return cached[1]
        mtu = await asyncio.to_thread(plumbing.detect_mtu, overhead, host_netns)
        self._mtu[key] = (now, mtu)
        return mtu


ServicesFactory = Callable[[EtcdConfig], Awaitable[Services]]


# -- logging ------------------------------------------------------------------------------------


class RequestLog:
    """One request's log: lines for the reply's stderr and log_file_path, plus the shared
    logger. The same interface as a logging.Logger for the calls the IPAM helpers make."""

    def __init__(self, tag: str, level: int = logging.INFO, file_path: str = "",
                 base: logging.Logger = log) -> None:
        self.tag = tag
        self.level = level
        self.file_path = file_path
        self.base = base
        self.lines: list[str] = []

    def log(self, level: int, msg: str, *args: Any, **_: Any) -> None:
        text = msg % args if args else msg
        self.base.log(level, "%s: %s", self.tag, text)
        if level >= self.level:
            now = time.time()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            self.lines.append(f"{stamp}.{int(now % 1 * 1000):03d} [{logging.getLevelName(level)}]"
                              f"[{os.getpid()}] tabby {self.tag}: {text}")

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **kw)

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        self.log(logging.INFO, msg, *args, **kw)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kw)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self.log(logging.ERROR, msg, *args, **kw)

    def finish(self) -> str:
        """The stderr text; the lines are appended to log_file_path (best effort)."""
        text = "".join(line + "\n" for line in self.lines)
        if self.file_path and text:
            try:
                os.makedirs(os.path.dirname(self.file_path) or ".", exist_ok=True)
                with open(self.file_path, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as e:
                text += f"tabby: cannot write the log file {self.file_path}: {e.strerror}\n"
        return text


# -- the request --------------------------------------------------------------------------------


@dataclass
class Ctx:
    req: spec.Request
    conf: NetConf
    svc: Services
    log: RequestLog
    environ: Mapping[str, str]
    stdin: bytes
    node: str
    workload: wep.Workload
    host_netns: str | None = None

    @property
    def handle(self) -> str:
        return handle_id(self.conf.name, self.req.container_id)

    @property
    def handles(self) -> list[str]:
        """The primary handle, then Calico's legacy one (`<ns>.<pod>`, or the container ID)."""
        legacy = legacy_handle(self.req.args, self.req.container_id)
        return [self.handle] + ([legacy] if legacy != self.handle else [])

    @property
    def endpoints(self) -> str:
        return ", ".join(self.svc.config.endpoints)


async def handle(environ: Mapping[str, str], stdin: bytes, services: ServicesFactory) -> Reply:
    """One CNI request; never raises: every failure is a Reply with the CNI error JSON."""
    version = _peek_version(stdin)
    rlog = RequestLog(environ.get("CNI_COMMAND", "?"))
    ctx: Ctx | None = None
    try:
        req = spec.read_request(environ, stdin)
        version = req.version
        if req.command == spec.VERSION:
            return Reply(0, _dump(spec.version_result(req.version)))
        prefix = environ.get(PREFIX_ENV) or os.environ.get(PREFIX_ENV, "")
        conf = parse_netconf(req.config, {PREFIX_ENV: prefix})
        rlog = RequestLog(f"{req.command} {req.container_id[:12] or '-'}", conf.log_level,
                          conf.log_file_path)
        svc = await services(conf.etcd)
        rlog.base = svc.log
        node = determine_nodename(conf.ipam_conf)
        ctx = Ctx(req, conf, svc, rlog, environ, stdin, node,
                  wep.workload_for(req.args, req.container_id, req.ifname, node, conf.name,
                                   conf.interface_prefix),
                  environ.get(HOST_NETNS_ENV) or None)
        result = await asyncio.wait_for(_dispatch(ctx), DEADLINE)
        return Reply(0, _dump(result) if result is not None else "", rlog.finish())
    except Exception as e:
        err = _error_for(e, ctx.endpoints if ctx else "")
        rlog.log(logging.ERROR, "%s%s", err, "" if err.code != spec.INTERNAL else
                 "\n" + _traceback(e))
        return Reply(1, _dump(err.to_json(version)), rlog.finish())


async def _dispatch(ctx: Ctx) -> dict[str, Any] | None:
    command = ctx.req.command
    if command == spec.ADD:
        return await cmd_add(ctx)
    if command == spec.DEL:
        await cmd_del(ctx)
    elif command == spec.CHECK:
        await cmd_check(ctx)
    elif command == spec.GC:
        await cmd_gc(ctx)
    elif command == spec.STATUS:
        await cmd_status(ctx)
    return None


# -- ADD ----------------------------------------------------------------------------------------


@dataclass
class _Allocation:
    result: dict[str, Any]  # internal 1.x shape from the IPAM (ips, routes, dns)
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]  # /32 and /128
    new: bool  # allocated by this request (so released if it fails)


async def cmd_add(ctx: Ctx) -> dict[str, Any]:
    req, conf, svc, w = ctx.req, ctx.conf, ctx.svc, ctx.workload
    if not os.path.exists(req.netns):
        raise CNIError(spec.INVALID_ENVIRONMENT, f"CNI_NETNS={req.netns} does not exist",
                       "the runtime must create the sandbox's network namespace before ADD")
    _ = w.name  # a name Calico cannot form fails here, before anything is allocated
    _drop_pending(ctx)  # this attachment is live again: an old pending DEL must not undo it
    reads, mtu = await asyncio.gather(_read_for_add(ctx), _mtu(ctx))
    _check_datastore_ready(reads.get(CLUSTER_INFO.key("default")))
    pod = wep.resource(reads.get(pod_key)) if (pod_key := wep.pod_key(w)) else None
    ns_obj = wep.resource(reads.get(ns_key)) if (ns_key := wep.namespace_key(w)) else None
    prefetched = (svc.ipam.assign_reads(reads, ctx.node, ctx.handle, _ipam_namespace(ctx))
                  if conf.in_process_ipam else None)
    held = await _held(ctx, prefetched)
    if pod and (pod.get("spec") or {}).get("hostNetwork"):
        raise CNIError(spec.INVALID_CONFIG, f"pod {w.namespace}/{w.pod} uses the host network",
                       "host-network pods get no CNI attachment")
    # the pod MAC is chosen here, so the endpoint can be written while the pod is plumbed
    mac = _requested_mac(req, pod) or random_mac()
    allocation = await _allocate(ctx, held, pod, ns_obj, prefetched, reads.get(w.key))
    plumb = write = None
    try:
        pod_if = plumbing.PodInterface(
            netns=req.netns, container_ifname=req.ifname, host_ifname=w.host_ifname,
            addresses=tuple(allocation.addresses), mtu=mtu, mac=mac,
            allow_ip_forwarding=conf.allow_ip_forwarding)
        endpoint = wep.build(w, pod, [str(a) for a in allocation.addresses], mac)
        plumb = asyncio.ensure_future(asyncio.to_thread(plumbing.setup, pod_if, ctx.host_netns))
        write = asyncio.ensure_future(wep.write(svc.store, endpoint, reads.get(w.key)))
        plumbed, _ = await asyncio.gather(plumb, write)
    except BaseException:
        # gather leaves the other one running: let it finish, then undo what both did
        started = [t for t in (plumb, write) if t is not None]
        if started:
            await asyncio.wait(started)
        written = write is not None and not write.cancelled() and write.exception() is None
        await _rollback(ctx, allocation, endpoint_written=written)
        raise
    ctx.log.info("plumbed %s <-> %s:%s (%s, MTU %d) and wrote WorkloadEndpoint %s/%s",
                 w.host_ifname, req.netns, req.ifname, ", ".join(map(str, allocation.addresses)),
                 mtu, w.namespace, w.name)
    return _result(ctx, allocation, plumbed)


async def _read_for_add(ctx: Ctx) -> ReadResult:
    """Everything ADD reads before it writes, in one etcd request at one revision: the
    ClusterInformation, the endpoint's key, the Pod and its Namespace, and (Tabby's IPAM)
    what the allocator reads first (`IPAM.queue_assign_reads`)."""
    w = ctx.workload
    batch = ReadBatch(gets=[CLUSTER_INFO.key("default"), w.key])
    for key in (wep.pod_key(w), wep.namespace_key(w)):
        if key:
            batch.get(key)
    if ctx.conf.in_process_ipam:
        ctx.svc.ipam.queue_assign_reads(batch, ctx.node, ctx.handle, _ipam_namespace(ctx))
    return await batch.run(ctx.svc.ds)


def _ipam_namespace(ctx: Ctx) -> str | None:
    """The namespace whose labels the pools' namespaceSelectors see."""
    return ctx.workload.namespace if ctx.workload.is_k8s else None


async def _held(ctx: Ctx, prefetched: Prefetched | None) -> list[str]:
    """Addresses this attachment's handle already holds (a repeated ADD), Tabby's IPAM only."""
    if prefetched is None:
        return []
    return await ctx.svc.ipam.ips_by_handle(ctx.handle, prefetched.handle)


async def _mtu(ctx: Ctx) -> int:
    if ctx.conf.mtu:
        return ctx.conf.mtu
    return await ctx.svc.pod_mtu(ctx.conf.mtu_overhead, ctx.host_netns)


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
                    endpoint_kv: KV | None) -> _Allocation:
    req, conf = ctx.req, ctx.conf
    if conf.in_process_ipam:
        if held:
            ctx.log.info("handle %s already holds %s (repeated ADD); keeping it", ctx.handle,
                         ", ".join(held))
            return _allocation({"ips": [{"address": a} for a in held]}, new=False)
        addresses = await _assign(ctx, pod, ns_obj, prefetched)
        ctx.log.info("assigned %s to handle %s", ", ".join(addresses), ctx.handle)
        return _allocation({"ips": [{"address": a} for a in addresses]}, new=True)
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
                  prefetched: Prefetched | None) -> list[str]:
    """tabby-ipam's ADD without its host lock (the daemon serves many requests in parallel;
    every write is a compare-and-swap anyway)."""
    req, conf, w = ctx.req, ctx.conf.ipam_conf, ctx.workload
    pod_ann = calico_annotations.annotations_of(pod)
    ns_ann = calico_annotations.annotations_of(ns_obj)
    pod_name = f"{w.namespace}/{w.pod}"
    wanted = (requested_ips(req.config, req.args)
              or calico_annotations.requested_addresses(pod_ann, pod_name))
    attrs = allocation_attrs(ctx.node, req.args, time.time_ns())
    if wanted:
        ipam_ctx = IpamContext(req, conf, ctx.node, ctx.log)
        return await _assign_requested(ipam_ctx, ctx.svc.ipam, wanted, attrs)
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
        namespace=_ipam_namespace(ctx)), prefetched=prefetched)
    return [str(a) for a in [*got.ipv4, *got.ipv6]]


async def _rollback(ctx: Ctx, allocation: _Allocation, endpoint_written: bool) -> None:
    """Undo a failed ADD: the veth, the endpoint, then the addresses it allocated (each
    bounded, best effort: the runtime's DEL finishes whatever is left)."""
    req, w = ctx.req, ctx.workload
    try:
        await asyncio.wait_for(asyncio.to_thread(
            plumbing.teardown, req.netns, req.ifname, w.host_ifname, ctx.host_netns),
            ROLLBACK_TIMEOUT)
    except Exception as e:
        ctx.log.error("could not remove the veth after the failure: %s", e)
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


# -- DEL ----------------------------------------------------------------------------------------


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


# -- CHECK --------------------------------------------------------------------------------------


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
    want = {a.ip for a in allocation.addresses}
    held = {ipaddress.ip_interface(ip).ip for ip in await ctx.svc.ipam.ips_by_handle(ctx.handle)}
    missing = sorted(map(str, want - held))
    if missing:
        return CNIError(spec.ALLOCATION_MISSING,
                        f"handle {ctx.handle} no longer holds {', '.join(missing)}",
                        "the allocation was released (by tabbyctl ipam release or gc?); "
                        "recreate the pod to get a new address")
    return None


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


# -- errors and output --------------------------------------------------------------------------


def _error_for(exc: BaseException, endpoints: str = "") -> CNIError:
    if isinstance(exc, CNIError):
        return exc
    if isinstance(exc, plumbing.PlumbingError):
        return CNIError(PLUMBING_FAILED, f"pod plumbing failed: {exc}",
                        "the runtime will retry; `ip -d link` and `ip route` on the node show "
                        "what is there")
    if isinstance(exc, ValidationError):
        return CNIError(spec.INVALID_CONFIG, f"invalid workload: {exc}",
                        "check the pod's name, namespace and labels")
    if isinstance(exc, StoreError):
        return CNIError(spec.TRY_AGAIN_LATER, str(exc), "the runtime will retry")
    if isinstance(exc, TimeoutError):
        return CNIError(spec.TRY_AGAIN_LATER, f"the request did not finish within "
                        f"{DEADLINE:.0f} s", f"etcd ({endpoints}) or the kernel is overloaded; "
                        "the runtime will retry")
    err = error_for(exc, endpoints)
    if err.code == spec.INTERNAL:
        return CNIError(spec.INTERNAL, err.msg, "this is a bug in tabby; the log (stderr, "
                        "log_file_path) has the traceback")
    return err


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(exc)).rstrip()


def _peek_version(stdin: bytes) -> str:
    """The config's cniVersion for error output, when there is a usable one."""
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
        version = json.loads(stdin).get("cniVersion")
        if version in spec.SUPPORTED_VERSIONS:
            return str(version)
    return spec.CURRENT_VERSION


_dump = spec.render


# -- the in-process fallback --------------------------------------------------------------------


def run_in_process(environ: Mapping[str, str] | None = None, stdin: bytes | None = None) -> int:
    """The shim's fallback: open Services for this request, handle it, print, exit code.

    After a successful ADD (etcd answers) the pending DELs of the spool are finished too,
    within REPLAY_TIMEOUT, since no tabby-node may be running to do it.
    """
    environ = os.environ if environ is None else environ
    if stdin is None:
        stdin = _read_stdin(environ)
    base = logging.getLogger("tabby.cni.inprocess")
    base.propagate = False
    if not base.handlers:
        base.addHandler(logging.NullHandler())  # the lines reach stderr through the Reply
    spool = Path(environ.get(SPOOL_ENV) or DEFAULT_SPOOL)
    opened: list[Services] = []

    async def factory(config: EtcdConfig) -> Services:
        svc = await Services.open(config, base, spool)
        opened.append(svc)
        return svc

    async def main() -> Reply:
        try:
            reply = await handle(environ, stdin, factory)
            if reply.exit_code == 0 and opened and environ.get("CNI_COMMAND") == spec.ADD:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(replay_pending_deletes(opened[0]), REPLAY_TIMEOUT)
            return reply
        finally:
            for svc in opened:
                with contextlib.suppress(Exception):
                    await svc.close()

    reply = asyncio.run(main())
    sys.stdout.write(reply.stdout)
    sys.stdout.flush()
    sys.stderr.write(reply.stderr)
    sys.stderr.flush()
    return reply.exit_code


def _read_stdin(environ: Mapping[str, str]) -> bytes:
    if environ.get("CNI_COMMAND") == spec.VERSION and sys.stdin.isatty():
        return b""  # a person typing the probe: nothing will come
    try:
        return sys.stdin.buffer.read()
    except OSError:
        return b""

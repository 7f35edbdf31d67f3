"""tabby-ipam: a CNI IPAM plugin over Tabby's etcd IPAM, a drop-in for calico-ipam.

It reads calico-ipam's netconf fields (`etcd_endpoints`, `etcd_*_file`, `nodename`,
`nodename_file`, `ipam: {assign_ipv4, assign_ipv6, ipv4_pools, ipv6_pools}`, `ipam_lock_file`,
`log_level`, `log_file_path`) and behaves as calico-ipam does:

- ADD allocates under the handle `<network name>.<CNI_CONTAINERID>` with the attributes node,
  timestamp and (for Kubernetes pods) pod and namespace, and prints the addresses with their
  block's prefix length (10.244.1.5/26). A requested address (runtimeConfig `ips`, args
  `cni.ips`, or CNI_ARGS `IP=`, in that order of precedence) is assigned as asked and printed
  as /32 or /128, as calico-ipam does.
- DEL releases by that handle and by the legacy `<namespace>.<pod>` one; an unknown handle is
  success, so repeated DELs are safe.
- CHECK fails when the handle no longer holds an address of prevResult.
- GC (CNI 1.1) releases this network's handles on this node whose container is not among the
  valid attachments; STATUS says whether etcd answers and an enabled pool exists.

Two optional fields calico-ipam does not have make the plugin usable under main plugins that,
like `ptp` and `bridge`, configure what the IPAM result says: `ipam.gateway` (an address, or a
list with one per family) is set as each address's gateway, and `ipam.routes` (host-local's
`[{"dst": ..., "gw": ...}]`) is copied into the result. Without them the result is exactly
calico-ipam's: addresses only.

For Kubernetes pods, Calico's annotations `cni.projectcalico.org/ipv4pools`, `ipv6pools` (pod,
then namespace) and `ipAddrs` (pod) are honoured, read from the Pod and Namespace applied with
tabbyctl (`cni/annotations.py`); without those objects the netconf decides.

Every failure is a CNI error on stdout with a message saying what to do. Imports of the etcd
client and the allocator are deferred until a command needs them, so VERSION stays cheap.

The netconf is parsed in `cni.ipam_conf`, handles, attributes, results and errors are made in
`cni.ipam_result`; their names are re-exported here. This module runs the commands.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sys
import time

from cni import spec

# `name as name`: re-exported, so cni.ipam_plugin.<name> keeps working for tests and callers
from cni.ipam_conf import LOCK_FILE as LOCK_FILE
from cni.ipam_conf import NODENAME_FILE as NODENAME_FILE
from cni.ipam_conf import IPAddress as IPAddress
from cni.ipam_conf import PluginConf as PluginConf
from cni.ipam_conf import _bad, determine_nodename, parse_conf, requested_ips
from cni.ipam_result import (
    DEADLINE,
    allocation_attrs,
    error_for,
    handle_id,
    ipam_result,
    legacy_handle,
)
from cni.ipam_result import go_timestamp as go_timestamp
from cni.spec import CNIError

# VERSION probes come before every ADD and DEL (podman): asyncio, dataclasses and typing would
# triple their cost, so they are imported only where needed or not at all
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Iterable, Iterator, Mapping
    from typing import IO, Any

    from datastore.etcd import Datastore
    from ipam.allocator import IPAM

ABOUT = "tabby-ipam: Calico-compatible CNI IPAM over etcd"
LOCK_WAIT = 30.0  # the host lock is an optimisation; past this we go on without it
ROLLBACK_TIMEOUT = 5.0
POOLS_PREFIX = "/calico/resources/v3/projectcalico.org/ippools/"
KNOWN_ARGS = (*spec.K8S_ARGS, "IP")

# -- host environment (I/O) ---------------------------------------------------------------------


@contextlib.contextmanager
def host_lock(path: str, log: logging.Logger, wait: float = LOCK_WAIT) -> Iterator[None]:
    """calico-ipam's best-effort host-wide flock: fewer CAS conflicts between local execs.

    Correctness never depends on it (every write is a CAS), so any problem means going on
    without it.
    """
    import fcntl

    fd = None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("IPAM lock %s still held after %.0f s; going on without it",
                                path, wait)
                    break
                time.sleep(0.005)
    except OSError as e:
        log.warning("cannot take the IPAM lock %s (%s); going on without it", path, e.strerror)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the lock


def setup_logging(conf: PluginConf, container_id: str) -> logging.Logger:
    """Logs go to stderr (the runtime keeps them) and to log_file_path when set."""
    import logging

    log = logging.getLogger("tabby-ipam")
    log.setLevel(conf.log_level)
    log.propagate = False
    for old in list(log.handlers):  # a second request in one process (tests) starts afresh
        log.removeHandler(old)
        old.close()
    fmt = logging.Formatter(
        f"%(asctime)s [%(levelname)s][%(process)d] tabby-ipam {container_id[:12] or '-'}: "
        "%(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if conf.log_file_path:
        try:
            os.makedirs(os.path.dirname(conf.log_file_path) or ".", exist_ok=True)
            handlers.append(logging.FileHandler(conf.log_file_path))
        except OSError as e:
            print(f"tabby-ipam: cannot write the log file {conf.log_file_path}: {e.strerror}",
                  file=sys.stderr)
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


# -- commands (I/O) -----------------------------------------------------------------------------


class Context:
    """What every command needs: the request, the netconf, the node name and the log."""

    def __init__(self, req: spec.Request, conf: PluginConf, node: str,
                 log: logging.Logger) -> None:
        self.req = req
        self.conf = conf
        self.node = node
        self.log = log

    @property
    def handle(self) -> str:
        return handle_id(self.conf.network, self.req.container_id)


async def cmd_add(ctx: Context, ipam: IPAM) -> dict[str, Any]:
    from cni import annotations as calico_annotations  # it imports typing: ADD only
    from ipam.allocator import AssignRequest

    req, conf, log = ctx.req, ctx.conf, ctx.log
    pod_ann, ns_ann = await _pod_annotations(ctx, ipam)
    pod_name = f"{req.args.pod_namespace}/{req.args.pod_name}"
    wanted = (requested_ips(req.config, req.args)
              or calico_annotations.requested_addresses(pod_ann, pod_name))
    ipv4_pools = calico_annotations.pools(pod_ann, ns_ann, calico_annotations.IPV4_POOLS, pod_name,
                                   req.args.pod_namespace) or conf.ipv4_pools
    ipv6_pools = calico_annotations.pools(pod_ann, ns_ann, calico_annotations.IPV6_POOLS, pod_name,
                                   req.args.pod_namespace) or conf.ipv6_pools
    attrs = allocation_attrs(ctx.node, req.args, time.time_ns())
    with host_lock(conf.lock_file, log):
        if wanted:
            addresses = await _assign_requested(ctx, ipam, wanted, attrs)
        else:
            if not (conf.assign_ipv4 or conf.assign_ipv6):
                raise _bad("ipam", "assigns nothing: assign_ipv4 and assign_ipv6 are both false")
            log.info("auto-assigning IPv4=%d IPv6=%d for handle %s on node %s",
                     conf.assign_ipv4, conf.assign_ipv6, ctx.handle, ctx.node)
            got = await ipam.auto_assign(AssignRequest(
                handle_id=ctx.handle,
                hostname=ctx.node,
                num_v4=int(conf.assign_ipv4),
                num_v6=int(conf.assign_ipv6),
                attrs=attrs,
                ipv4_pools=ipv4_pools,
                ipv6_pools=ipv6_pools,
                namespace=req.args.pod_namespace if req.args.is_k8s else None,
            ))
            addresses = [str(a) for a in [*got.ipv4, *got.ipv6]]  # block-masked, as calico-ipam
    log.info("assigned %s to handle %s", ", ".join(addresses), ctx.handle)
    return ipam_result(addresses, req.version, conf.gateways, conf.routes)


async def _pod_annotations(ctx: Context, ipam: IPAM) -> tuple[dict[str, str], dict[str, str]]:
    """Annotations of the pod and its namespace, from the objects applied with tabbyctl."""
    import json

    from cni import annotations as calico_annotations
    from datastore.kinds import kind_for

    args = ctx.req.args
    if not args.is_k8s:
        return {}, {}
    pod_key = kind_for("Pod", "v1").key(args.pod_name, args.pod_namespace)
    ns_key = kind_for("Namespace", "v1").key(args.pod_namespace)
    found = [await ipam.ds.get(key) for key in (pod_key, ns_key)]
    pod, ns = (json.loads(kv.value) if kv else None for kv in found)
    return calico_annotations.annotations_of(pod), calico_annotations.annotations_of(ns)


async def _assign_requested(ctx: Context, ipam: IPAM, wanted: Iterable[IPAddress],
                            attrs: Mapping[str, str]) -> list[str]:
    """Each requested address; if a later one fails the earlier ones are given back."""
    import asyncio

    done: list[IPAddress] = []
    try:
        for ip in wanted:
            ctx.log.info("assigning requested address %s to handle %s", ip, ctx.handle)
            await ipam.assign_ip(str(ip), ctx.handle, ctx.node, attrs)
            done.append(ip)
    except BaseException:
        if done:
            try:
                await asyncio.wait_for(ipam.release_ips([str(ip) for ip in done]),
                                       ROLLBACK_TIMEOUT)
                ctx.log.info("released %s after the failure", ", ".join(map(str, done)))
            except Exception as e:  # the runtime's DEL releases the handle anyway
                ctx.log.error("could not release %s: %s", ", ".join(map(str, done)), e)
        raise
    return [f"{ip}/{ip.max_prefixlen}" for ip in done]  # calico-ipam prints requested ones so


async def cmd_del(ctx: Context, ipam: IPAM) -> None:
    handles = [ctx.handle]
    legacy = legacy_handle(ctx.req.args, ctx.req.container_id)
    if legacy not in handles:
        handles.append(legacy)
    with host_lock(ctx.conf.lock_file, ctx.log):
        for handle in handles:
            released = await ipam.release_by_handle(handle)
            if released:
                ctx.log.info("released %s (handle %s)", ", ".join(released), handle)
            else:
                ctx.log.info("nothing allocated to handle %s; nothing to release", handle)


async def cmd_check(ctx: Context, ipam: IPAM) -> None:
    prev = ctx.req.prev_result
    if prev is None:
        raise CNIError(spec.INVALID_CONFIG, "CHECK needs prevResult",
                       "the runtime must pass the ADD result as prevResult")
    want = {ipaddress.ip_interface(ip["address"]).ip for ip in prev["ips"]}
    held = {ipaddress.ip_interface(ip).ip for ip in await ipam.ips_by_handle(ctx.handle)}
    missing = sorted(map(str, want - held))
    if missing or not held:
        what = ", ".join(missing) if missing else "any address"
        raise CNIError(spec.ALLOCATION_MISSING,
                       f"handle {ctx.handle} no longer holds {what}",
                       "the allocation was released (by tabbyctl ipam release or gc?); "
                       "recreate the pod to get a new address")


async def cmd_gc(ctx: Context, ds: Datastore, ipam: IPAM) -> None:
    """Release this network's handles on this node whose attachment is no longer valid."""
    from ipam.state import read_state

    valid = {cid for cid, _ in ctx.req.valid_attachments}
    prefix = f"{ctx.conf.network}."
    state = await read_state(ds)
    stale: set[str] = set()
    for block, _rev in state.blocks.values():
        for _ip, attr in block.allocated():
            handle = attr.handle_id or ""
            if (handle.startswith(prefix) and attr.secondary.get("node") == ctx.node
                    and handle[len(prefix):] not in valid):
                stale.add(handle)
    failures = []
    for handle in sorted(stale):
        try:
            released = await ipam.release_by_handle(handle)
            ctx.log.info("GC released %s (handle %s)", ", ".join(released), handle)
        except Exception as e:  # keep going: the spec asks GC to free as much as it can
            failures.append(f"{handle}: {e}")
    if failures:
        raise CNIError(spec.TRY_AGAIN_LATER, f"GC could not release {len(failures)} handles",
                       "; ".join(failures))


async def cmd_status(ds: Datastore) -> None:
    kvs, _ = await ds.list(POOLS_PREFIX)
    for kv in kvs:
        with contextlib.suppress(ValueError):
            if not json.loads(kv.value).get("spec", {}).get("disabled", False):
                return
    raise CNIError(spec.NOT_AVAILABLE, "no enabled IP pool: tabby-ipam cannot assign addresses",
                   "create an IPPool with `tabbyctl apply -f pool.yaml`")


async def run(ctx: Context) -> dict[str, Any] | None:
    """Connect to etcd and run one command, within DEADLINE."""
    from datastore.config import config_from_netconf

    config = config_from_netconf(ctx.req.config)  # a bad setting fails before the heavy imports

    import asyncio

    from datastore.etcd import Datastore
    from ipam.allocator import IPAM

    async def go() -> dict[str, Any] | None:
        async with Datastore(config) as ds:
            ipam = IPAM(ds)
            command = ctx.req.command
            if command == spec.ADD:
                return await cmd_add(ctx, ipam)
            if command == spec.DEL:
                await cmd_del(ctx, ipam)
            elif command == spec.CHECK:
                await cmd_check(ctx, ipam)
            elif command == spec.GC:
                await cmd_gc(ctx, ds, ipam)
            elif command == spec.STATUS:
                await cmd_status(ds)
            return None

    try:
        return await asyncio.wait_for(go(), DEADLINE)
    except Exception as e:
        err = error_for(e, ", ".join(config.endpoints))
        if ctx.req.command == spec.STATUS and err.code == spec.TRY_AGAIN_LATER:
            err = CNIError(spec.NOT_AVAILABLE, err.msg, err.details)  # STATUS's own codes
        raise err from e


# -- entry point --------------------------------------------------------------------------------


def handle_request(environ: Mapping[str, str], stdin: IO[bytes],
                   stdout: IO[str]) -> int:
    """One exec of the plugin: parse, run, print the result or the error; the exit code."""
    version = spec.CURRENT_VERSION
    log = None
    try:
        data = _read_stdin(environ, stdin)
        version = spec.peek_version(data)
        req = spec.read_request(environ, data)
        if req.command == spec.VERSION:
            _emit(stdout, spec.version_result(req.version))
            return 0
        req.args.require_known(KNOWN_ARGS)
        conf = parse_conf(req.config)
        log = setup_logging(conf, req.container_id)
        ctx = Context(req, conf, determine_nodename(conf), log)
        log.debug("%s container=%s netns=%s args=%s", req.command, req.container_id,
                  req.netns, dict(req.args.pairs))
        import asyncio

        result = asyncio.run(run(ctx))
        if result is not None:
            _emit(stdout, result)
        return 0
    except Exception as e:
        err = error_for(e)
        if log is not None:
            log.error("%s", err, exc_info=err.code == spec.INTERNAL)
        elif err.code == spec.INVALID_ENVIRONMENT and not environ.get("CNI_COMMAND"):
            print(f"{ABOUT}\nCNI protocol versions supported: "
                  f"{', '.join(spec.SUPPORTED_VERSIONS)}", file=sys.stderr)
        _emit(stdout, err.to_json(version))
        return 1


def _read_stdin(environ: Mapping[str, str], stdin: IO[bytes]) -> bytes:
    if environ.get("CNI_COMMAND") == spec.VERSION and stdin.isatty():
        return b""  # a person typing the probe: nothing will come
    try:
        return stdin.read()
    except OSError as e:
        raise CNIError(spec.IO_FAILURE, f"error reading the network config from stdin: {e}",
                       "the runtime must write the config to the plugin's stdin") from None




def _emit(stdout: IO[str], obj: Mapping[str, Any]) -> None:
    stdout.write(json.dumps(obj, indent=4) + "\n")
    stdout.flush()


def main() -> None:
    sys.exit(handle_request(os.environ, sys.stdin.buffer, sys.stdout))


if __name__ == "__main__":
    main()

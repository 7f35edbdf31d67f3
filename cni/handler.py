"""The `tabby` CNI plugin's commands, shared by tabby-node (through the shim's socket) and the
in-process fallback (`python -m cni.fallback`).

`handle(environ, stdin, services)` takes what a runtime gives a plugin (CNI_* variables and the
netconf) and answers what the plugin prints (a `Reply`): it never raises. Calico's plugin is the
model (`cni-plugin/pkg/k8s/k8s.go`):

- ADD: parse and check the request (nothing is touched before that: a malformed stdin is code 6,
  an unknown cniVersion 1, a missing or absent CNI_NETNS 4), allocate addresses (Tabby's IPAM
  in-process for `tabby-ipam`/`calico-ipam`, else the IPAM plugin exec'd from CNI_PATH), then
  plumb the pod (`cni.plumbing`, in a thread) and write the WorkloadEndpoint (`cni.wep`: with
  Tabby's IPAM in the allocation's own etcd transaction, else while the pod is plumbed; the pod
  MAC is chosen up front so neither waits for the other), and print the result: interfaces
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

The commands live in their own modules, over the shared types of `cni.context` (Reply,
Services, RequestLog, Ctx): `cni.cmd_add`, `cni.cmd_del` (with the pending deletes and
`replay_pending_deletes`) and `cni.cmd_check` (CHECK, GC, STATUS). This module takes the
request, dispatches it, maps errors and runs the in-process fallback; every name it held
before that split is still importable from here.
"""

from __future__ import annotations

# `noqa: F401`: names this module held before the commands moved out stay importable from it
import asyncio
import contextlib
import ipaddress  # noqa: F401
import logging
import os
import sys
import time  # noqa: F401
from collections.abc import Awaitable, Callable, Mapping  # noqa: F401
from dataclasses import dataclass  # noqa: F401
from pathlib import Path
from typing import Any

from cni import annotations as calico_annotations  # noqa: F401
from cni import delegate, plumbing, spec, wep  # noqa: F401
from cni.cmd_add import (  # noqa: F401
    CLUSTER_INFO,
    ROLLBACK_TIMEOUT,
    _allocate,
    _Allocation,
    _allocation,
    _assign,
    _check_datastore_ready,
    _held,
    _ipam_namespace,
    _mtu,
    _read_for_add,
    _requested_mac,
    _result,
    _rollback,
    cmd_add,
    random_mac,
)
from cni.cmd_check import _check_ipam, _gc_endpoint, cmd_check, cmd_gc, cmd_status  # noqa: F401
from cni.cmd_del import (  # noqa: F401
    ETCD_RETRY,
    RETRY_PAUSE,
    _del_datastore,
    _del_local,
    _drop_pending,
    _EtcdDown,
    _log_wep_outcome,
    _pending_name,
    _release,
    _replay,
    _spool,
    _teardown,
    _with_etcd,
    cmd_del,
    pending_record,
    replay_pending_deletes,
    write_pending,
)
from cni.context import (  # noqa: F401
    ENDPOINT_MISSING,
    MTU_CACHE,
    PLUMBING_FAILED,
    Ctx,
    Reply,
    RequestLog,
    Services,
    ServicesFactory,
    log,
)
from cni.ipam_plugin import Context as IpamContext  # noqa: F401
from cni.ipam_plugin import (  # noqa: F401
    _assign_requested,
    allocation_attrs,
    determine_nodename,
    error_for,
    handle_id,
    legacy_handle,
    requested_ips,
)
from cni.ipam_plugin import cmd_status as ipam_status  # noqa: F401
from cni.netconf import NetConf, parse_netconf  # noqa: F401
from cni.spec import CNIError
from datastore.config import EtcdConfig
from datastore.errors import ValidationError
from datastore.etcd import KV, Datastore, Unavailable  # noqa: F401
from datastore.kinds import kind_for  # noqa: F401
from datastore.reads import ReadBatch, ReadResult  # noqa: F401
from datastore.store import ResourceStore, StoreError  # noqa: F401
from ipam.allocator import IPAM, AssignRequest, Prefetched  # noqa: F401

DEADLINE = 60.0  # one whole ADD/DEL/CHECK/GC
REPLAY_TIMEOUT = 5.0  # the fallback's opportunistic replay after a successful ADD
DEFAULT_SPOOL = "/var/lib/tabby/pending-del"
HOST_NETNS_ENV = "TABBY_HOST_NETNS"
SPOOL_ENV = "TABBY_SPOOL_DIR"
PREFIX_ENV = "FELIX_INTERFACEPREFIX"  # the request's, else tabby-node's own environment


async def handle(environ: Mapping[str, str], stdin: bytes, services: ServicesFactory) -> Reply:
    """One CNI request; never raises: every failure is a Reply with the CNI error JSON."""
    version = spec.peek_version(stdin)
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
        async with asyncio.timeout(DEADLINE):  # no extra task, unlike wait_for
            result = await _dispatch(ctx)
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

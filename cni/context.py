"""What every command of the `tabby` plugin shares (cni.handler and the cni.cmd_* modules):
the `Reply` a request gets, the `Services` kept warm between requests, one request's log
(`RequestLog`) and the request itself (`Ctx`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni import plumbing, spec, wep
from cni.ipam_plugin import handle_id, legacy_handle
from cni.netconf import NetConf
from datastore.config import EtcdConfig
from datastore.etcd import Datastore
from datastore.kinds import kind_for
from datastore.remembered import RememberedReads
from datastore.store import ResourceStore
from ipam.allocator import IPAM
from ipam.keys import CONFIG_KEY

MTU_CACHE = 30.0  # seconds a detected MTU is reused
# prefixes tabby-node watches whole for ADD's remembered reads (the node's own Node and IPAM
# affinities are watched one prefix each, as asked for)
ADD_ROOTS = (*(kind_for(k).prefix for k in ("Pod", "Namespace", "Profile", "ClusterInformation",
                                            "IPPool", "IPReservation")), CONFIG_KEY)

# Tabby's own codes (100+ belong to plugins); next to cni.spec's 100-104
PLUMBING_FAILED = spec.PLUMBING_FAILED
ENDPOINT_MISSING = spec.ENDPOINT_MISSING

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
                 spool_dir: Path, remember: bool = False) -> None:
        self.config = config
        self.ds = ds
        self.ipam = IPAM(ds)
        self.store = ResourceStore(ds)
        self.log = log
        self.spool_dir = Path(spool_dir)
        self._mtu: dict[tuple[int, str | None], tuple[float, int]] = {}
        # tabby-node only (a one-shot process would watch for nothing): ADD's reads from
        # watched copies, guarded in its commit (datastore.remembered)
        self.remembered = RememberedReads(ds, ADD_ROOTS) if remember else None

    @classmethod
    async def open(cls, config: EtcdConfig, log: logging.Logger, spool_dir: Path,
                   remember: bool = False) -> Services:
        """No I/O: a DEL must be able to run (and spool) while etcd is down. The watches of
        `remember` start with the first ADD that wants them."""
        return cls(config, Datastore(config), log, Path(spool_dir), remember)

    async def close(self) -> None:
        if self.remembered is not None:
            await self.remembered.close()
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
                _append(self.file_path, text.encode("utf-8", "surrogateescape"))
            except OSError as e:
                text += f"tabby: cannot write the log file {self.file_path}: {e.strerror}\n"
        return text


def _append(path: str, data: bytes) -> None:
    """One O_APPEND write (lines of concurrent requests never interleave); the directory is
    made only when it is missing (every request writes here, so no makedirs each time)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


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

"""tabby-node: the per-node daemon: the CNI service, the felix agent and the routing agent.

Start order: logging, node name, etcd config, the node's BGP address (`node.autodetect`: `--ip`
or IP, else IP_AUTODETECTION_METHOD, default the default-route interface's address), the CNI
socket (serving at once: VERSION and the in-daemon handler need no etcd), the health endpoint,
the felix agent and the routing agent as supervised child processes (`python -m felix.agent`,
`python -m bgp.agent`, in this process's network namespace; `--no-felix` and
`--networking-backend none` leave them out), then in the background the Node /
ClusterInformation registration (retried until etcd answers) and the periodic replay of DELs
spooled while etcd was down. SIGTERM/SIGINT stop it cleanly: the children are stopped (rules
and routes stay), the socket stops accepting, running requests get DRAIN_TIMEOUT to finish,
the socket file is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from datastore.daemon import etcd_config, setup_logging
from node.cni_service import (
    CONCURRENCY,
    DEFAULT_SOCKET,
    REQUEST_TIMEOUT,
    CniService,
    ServiceError,
    ServicesCache,
    probe,
)
from node.health import DEFAULT_PORT, HealthServer
from node.supervisor import Supervisor

if TYPE_CHECKING:
    from datastore.config import EtcdConfig

VERSION = "0.1.0"
DEFAULT_NODENAME_FILE = "/var/lib/calico/nodename"  # where Calico's CNI looks for it
DEFAULT_MTU_FILE = Path("/var/lib/calico/mtu")  # = bgp.mtu.DEFAULT_MTU_FILE
DEFAULT_SECRETS_NAMESPACE = "calico-system"  # = bgp.view.DEFAULT_SECRETS_NAMESPACE
DEFAULT_LOG_FILE = "/var/log/tabby/tabby-node.log"
DEFAULT_SPOOL = "/var/lib/tabby/pending-del"  # = cni.handler.DEFAULT_SPOOL
REPLAY_INTERVAL = 30.0
RETRY_MAX = 30.0
NOISY_LOGGERS = ("pyroute2", "grpc", "aetcd", "asyncio")
FELIX_METRICS_PORT = 9091  # = felix.metrics.DEFAULT_PORT (not imported: keeps startup light)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tabby-node", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"tabby-node {VERSION}")
    p.add_argument("--nodename", default=os.environ.get("NODENAME"),
                   help="this node's name (default: NODENAME, else the --nodename-file, "
                        "else the hostname); written to --nodename-file")
    p.add_argument("--nodename-file", default=DEFAULT_NODENAME_FILE, type=Path,
                   help="where the CNI plugin reads the node name "
                        f"(default {DEFAULT_NODENAME_FILE})")
    p.add_argument("--socket", default=os.environ.get("TABBY_CNI_SOCKET") or DEFAULT_SOCKET,
                   type=Path, help=f"the CNI service's unix socket (default {DEFAULT_SOCKET})")
    p.add_argument("-c", "--config", default=os.environ.get("TABBY_CONFIG"),
                   help="calicoctl-style config file (default /etc/tabby/tabbyctl.cfg, or "
                        "ETCD_ENDPOINTS and ETCD_*_FILE from the environment)")
    p.add_argument("--etcd-endpoints", help="comma list of etcd URLs (overrides --config)")
    p.add_argument("--log-file", default=DEFAULT_LOG_FILE,
                   help=f"log file besides stderr; '' for none (default {DEFAULT_LOG_FILE})")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--health-port", type=int, default=DEFAULT_PORT,
                   help=f"health endpoint on 127.0.0.1 (default {DEFAULT_PORT}; 0: none)")
    p.add_argument("--spool-dir", default=DEFAULT_SPOOL, type=Path,
                   help=f"DELs waiting for etcd (default {DEFAULT_SPOOL})")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT,
                   help=f"bound on one CNI request, seconds (default {REQUEST_TIMEOUT:g}; "
                        "keep it below the shim's 75 s wait)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY,
                   help=f"CNI requests handled at once (default {CONCURRENCY})")
    p.add_argument("--replay-interval", type=float, default=REPLAY_INTERVAL,
                   help=f"seconds between replays of spooled DELs (default {REPLAY_INTERVAL:g})")
    p.add_argument("--no-felix", action="store_true",
                   help="do not run the felix agent (no iptables/ipset programming)")
    p.add_argument("--felix-metrics-port", type=int, default=FELIX_METRICS_PORT,
                   help="felix's /metrics and /readiness on 127.0.0.1 "
                        f"(default {FELIX_METRICS_PORT}; 0: none)")
    p.add_argument("--ip", default=os.environ.get("IP") or "autodetect",
                   help="this node's BGP address (ADDR/LEN), 'autodetect' (default, see "
                        "--ip-autodetection-method) or 'none'")
    p.add_argument("--ip-autodetection-method",
                   default=os.environ.get("IP_AUTODETECTION_METHOD") or "default-route",
                   help="default-route (default), first-found, interface=REGEX, "
                        "skip-interface=REGEX, can-reach=ADDR, cidr=CIDR")
    p.add_argument("--as", dest="asn", type=int,
                   default=int(os.environ["AS"]) if os.environ.get("AS", "").isdigit() else None,
                   help="this node's AS number (default: BGPConfiguration's, else 64512)")
    p.add_argument("--networking-backend", choices=["bird", "vxlan", "none"],
                   default=os.environ.get("CALICO_NETWORKING_BACKEND") or "bird",
                   help="bird (default): BGP with exabgp, plus VXLAN where pools use it; "
                        "vxlan: VXLAN only, no BGP; none: no routing agent")
    p.add_argument("--run-dir", type=Path,
                   help="the routing agent's files and bgp-status.json (default: the CNI "
                        "socket's directory)")
    p.add_argument("--secrets-namespace",
                   default=os.environ.get("NAMESPACE") or DEFAULT_SECRETS_NAMESPACE,
                   help="where BGP passwords' Secrets are (BGPPeer password.secretKeyRef): the "
                        "namespace calico-node would run in (default NAMESPACE, else "
                        f"{DEFAULT_SECRETS_NAMESPACE})")
    p.add_argument("--mtu-file", type=Path, default=DEFAULT_MTU_FILE,
                   help="where the routing agent writes the pod MTU the encapsulation leaves, "
                        f"for the CNI plugin (default {DEFAULT_MTU_FILE}, as Calico's Felix)")
    return p.parse_args(argv)


def routing_argv(opts: argparse.Namespace, nodename: str) -> list[str]:
    """The routing agent's command line: this node, backend, etcd settings, run and log dirs."""
    argv = [sys.executable, "-m", "bgp.agent", "--nodename", nodename,
            "--backend", opts.networking_backend, "--log-level", opts.log_level,
            "--run-dir", str(opts.run_dir or Path(opts.socket).parent),
            "--mtu-file", str(opts.mtu_file), "--secrets-namespace", opts.secrets_namespace,
            "--exit-with-parent"]
    return argv + _child_common(opts, "routing.log")


def bgp_address(opts: argparse.Namespace, log: logging.Logger) -> str | None:
    """The address to record on the Node (CIDR form), or None (`--ip none`, or not found:
    then the Node keeps what it has and the routing agent waits for an address)."""
    from node.autodetect import AutodetectError, detect, explicit

    try:
        if opts.ip == "none":
            return None
        if opts.ip == "autodetect":
            found = detect(opts.ip_autodetection_method)
            log.info("BGP address %s (autodetected: %s)", found, opts.ip_autodetection_method)
            return str(found)
        return str(explicit(opts.ip))
    except AutodetectError as e:
        log.error("no BGP address: %s", e)
        return None


def felix_argv(opts: argparse.Namespace, nodename: str) -> list[str]:
    """The felix agent's command line: this node, the same etcd settings and log directory."""
    argv = [sys.executable, "-m", "felix.agent", "--nodename", nodename,
            "--log-level", opts.log_level, "--metrics-port", str(opts.felix_metrics_port),
            "--exit-with-parent"]
    return argv + _child_common(opts, "felix.log")


def _child_common(opts: argparse.Namespace, log_name: str) -> list[str]:
    """What every supervised child gets: tabby-node's etcd settings and a log file beside its
    own."""
    argv = []
    if opts.etcd_endpoints:
        argv += ["--etcd-endpoints", opts.etcd_endpoints]
    elif opts.config:
        argv += ["--config", opts.config]
    if opts.log_file:
        argv += ["--log-file", str(Path(opts.log_file).with_name(log_name))]
    return argv


def resolve_nodename(given: str | None, nodename_file: Path) -> str:
    """--nodename, else the file Calico's CNI reads, else the hostname (lower-cased, as
    calico-node does)."""
    if given and given.strip():
        return given.strip()
    with contextlib.suppress(FileNotFoundError):
        if text := nodename_file.read_text().strip():
            return text
    return socket.gethostname().strip().lower()


def write_nodename(path: Path, nodename: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip() == nodename:
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(nodename)
    os.replace(tmp, path)  # readers never see a half-written name


def load_etcd_config(opts: argparse.Namespace) -> EtcdConfig:
    return etcd_config(opts.etcd_endpoints, opts.config)


class NodeAgent:
    """The running daemon: its components, their background tasks, and a clean stop."""

    def __init__(self, opts: argparse.Namespace, config: EtcdConfig, nodename: str,
                 log: logging.Logger) -> None:
        self.opts = opts
        self.config = config
        self.nodename = nodename
        self.log = log
        self.registered = False
        self.cache = ServicesCache(logging.getLogger("tabby.cni"), opts.spool_dir)
        self.cni = CniService(opts.socket, self.cache, timeout=opts.request_timeout,
                              concurrency=opts.concurrency, log=logging.getLogger("tabby.cni"))
        self.health: HealthServer | None = None
        self.felix: Supervisor | None = None
        if not opts.no_felix:
            self.felix = Supervisor("felix", felix_argv(opts, nodename),
                                    logging.getLogger("tabby.supervisor"))
        self.routing: Supervisor | None = None
        if opts.networking_backend != "none":
            self.routing = Supervisor("routing", routing_argv(opts, nodename),
                                      logging.getLogger("tabby.supervisor"))
        self.address: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # pyroute2's synchronous socket cannot be opened inside a running event loop
        self.address = await asyncio.to_thread(bgp_address, self.opts, self.log)
        await self.cni.start()
        if self.opts.health_port:
            checks = {"etcd": self._etcd_ready, "cni": self._cni_ready}
            for child in self.children:
                checks[child.name] = child.check
            self.health = HealthServer(self.opts.health_port, checks)
            await self.health.start()
        for child in self.children:
            child.start()
        self._tasks.append(asyncio.create_task(self._retrying("registration", self._register)))
        self._tasks.append(asyncio.create_task(self._replay_loop()))

    @property
    def children(self) -> list[Supervisor]:
        return [c for c in (self.felix, self.routing) if c is not None]

    async def stop(self) -> None:
        for child in self.children:
            await child.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.health is not None:
            await self.health.stop()
        await self.cni.stop()
        await self.cache.close()

    # -- background work --

    async def _register(self) -> None:
        from datastore.store import ResourceStore
        from node.registration import register

        services = await self.cache.get(self.config)
        await register(ResourceStore(services.ds), self.nodename, self.log, self.address,
                       self.opts.asn)
        self.registered = True

    async def _retrying(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        delay = 1.0
        while True:
            try:
                await step()
                return
            except Exception as e:  # etcd down or slow: keep serving, try again
                self.log.warning("%s failed (retrying in %g s): %s", what, delay, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _replay_loop(self) -> None:
        from cni.handler import replay_pending_deletes

        while True:
            await asyncio.sleep(self.opts.replay_interval)
            try:
                services = await self.cache.get(self.config)
                if done := await replay_pending_deletes(services):
                    self.log.info("replayed %d DEL(s) spooled while etcd was down", done)
            except Exception as e:  # the spool stays for the next round
                self.log.warning("replaying spooled DELs failed: %s", e)

    # -- readiness checks --

    async def _etcd_ready(self) -> str:
        services = await self.cache.get(self.config)
        revision = await services.ds.revision()
        return f"{services.ds.endpoint} answers at revision {revision}"

    async def _cni_ready(self) -> str:
        await probe(self.opts.socket)
        return f"{self.opts.socket} answers VERSION ({self.cni.handled} requests served)"


async def run(opts: argparse.Namespace, log: logging.Logger) -> int:
    from datastore.config import ConfigError

    try:
        config = load_etcd_config(opts)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    nodename = resolve_nodename(opts.nodename, opts.nodename_file)
    write_nodename(opts.nodename_file, nodename)
    import cni.handler  # noqa: F401 - warm imports (pyroute2, etcd) before the first request

    agent = NodeAgent(opts, config, nodename, log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
        log.info("tabby-node %s running as node %s (etcd %s)", VERSION, nodename,
                 ",".join(config.endpoints))
        await stop.wait()
        log.info("stopping")
    except (ServiceError, OSError) as e:
        log.error("%s", e)
        return 1
    finally:
        await agent.stop()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    try:
        setup_logging(opts.log_file, opts.log_level, NOISY_LOGGERS)
        log = logging.getLogger("tabby.node")
    except OSError as e:
        sys.exit(f"tabby-node: cannot open the log file {opts.log_file}: {e.strerror or e}")
    sys.exit(asyncio.run(run(opts, log)))


if __name__ == "__main__":
    main()

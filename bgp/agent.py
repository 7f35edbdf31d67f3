"""The routing agent: the store and BGP in, exabgp's announcements and kernel routes out.

`python -m bgp.agent --nodename N [--etcd-endpoints URLS | -c FILE] [--backend bird|vxlan]`
runs in the node's network namespace (tabby-node starts it as a supervised child).

- Six watches (Nodes, IPPools, BGPConfigurations, BGPPeers, IPAM blocks, affinities) feed a
  `StoreView`; a burst of changes becomes one sync after WINDOW.
- A sync: the node's tunnel addresses (`bgp.tunnels`); with the `bird` backend (Calico's name
  for "BGP on"), exabgp's config from the peers (`bgp.peers`, `bgp.exabgp_conf`) applied to the
  speaker child (`bgp.speaker`: started, reloaded or restarted) and the announcements
  (`bgp.announce`) diffed into announce/withdraw commands; then the routing plan
  (`bgp.routes.plan`: blackholes for local blocks, BGP-learned routes, VXLAN) programmed into
  the kernel (`bgp.vxlan`, `bgp.kernel_routes`, all under the agent's route protocol).
- exabgp's API relay (`bgp.pipe`) connects to a unix socket here (`bgp.api_server`): a new
  relay gets every announcement; a peer coming up gets them again (exabgp does not replay API
  routes to a neighbor added by a reload); updates feed the RIB (`bgp.rib`), a session going down
  drops that peer's routes, and either triggers a sync.
- After programming, the pod MTU the pools' encapsulation leaves goes to the MTU file
  (`bgp.mtu`, Calico's /var/lib/calico/mtu), where the CNI reads it.
- IPv4 forwarding is switched on at start (a node routes for its pods).
- Restart: the kernel keeps the routes of the previous run; for GRACE seconds after start (and
  after exabgp itself restarted) the learned ones are kept (not removed) while the sessions come
  back, so a restart of the agent, exabgp or tabby-node does not black-hole other nodes' pods.
- `<run dir>/bgp-status.json` says what the speaker and each peer are doing (`tabbyctl node
  status` reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bgp import announce as announce_mod
from bgp import messages, reflect, rib, status, view
from bgp.ipip import IpipDevice, ipip_device
from bgp.model import NodeRecord
from bgp.mtu import DEFAULT_MTU_FILE, pod_mtu, write_mtu_file
from datastore.daemon import daemon_main, etcd_config, run_until_stopped

WINDOW = 0.01  # s: coalesce a burst of store changes into one sync
GRACE = 20.0  # s after start during which learned kernel routes are kept, not removed
RETRY_MAX = 10.0
BACKENDS = ("bird", "vxlan")
NOISY_LOGGERS = ("grpc", "aetcd", "asyncio", "pyroute2")

log = logging.getLogger("tabby.bgp")


class RoutingAgent:
    def __init__(self, nodename: str, backend: str, ds: Any, run_dir: Path, *,
                 status_path: Path | None = None, grace: float = GRACE,
                 program_kernel: bool = True, mtu_file: Path | None = None,
                 secrets_namespace: str | None = view.DEFAULT_SECRETS_NAMESPACE) -> None:
        from bgp.speaker import Speaker

        self.nodename, self.backend, self.ds = nodename, backend, ds
        self.run_dir = run_dir
        self.status_path = status_path or run_dir / "bgp-status.json"
        self.grace = grace
        self.grace_until = time.monotonic() + grace
        self.stale: set[str] | None = None  # learned routes of a previous speaker, kept in grace
        self.program_kernel = program_kernel
        self.mtu_file = mtu_file
        self.pod_mtu: int | None = None  # last written to mtu_file
        self.view = view.StoreView(secrets_namespace)
        self.rib = rib.Rib()
        self.speaker = Speaker(run_dir / "exabgp")
        self.api: Any = None
        self.peers: list[Any] = []
        self.peer_state: dict[str, dict[str, Any]] = {}
        self.announced: frozenset[str] = frozenset()
        self.router_id: str | None = None
        self.cluster_id: str | None = None  # spec.bgp.routeReflectorClusterID: we reflect
        self.reflected: reflect.Reflections = {}  # what exabgp was told to send for others
        self.routes_programmed = 0
        self.last_errors: list[str] = []
        self.syncs = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._tunnel_retry = 0.0
        self._last_key: tuple[Any, ...] | None = None
        self._dirty = False  # something failed that a retry may fix: sync even if unchanged

    # -- lifecycle --

    async def start(self) -> None:
        from bgp.api_server import ApiServer

        if self.program_kernel:
            _enable_forwarding()
        if self.backend == "bird":
            self.api = ApiServer(self.run_dir / "bgp-api.sock", self._on_line,
                                 self._on_relay_connect)
            await self.api.start()
        for prefix in self.view.prefixes:
            self._tasks.append(asyncio.create_task(self._watch(prefix), name=f"watch {prefix}"))
        self._tasks.append(asyncio.create_task(self._sync_loop(), name="sync"))
        loop = asyncio.get_running_loop()
        loop.call_later(max(self.grace_until - time.monotonic(), 0) + 0.1, self._wake.set)

    async def run(self) -> None:
        await self.start()
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.speaker.stop()
        if self.api is not None:
            await self.api.stop()

    # -- store --

    async def _watch(self, prefix: str) -> None:
        from datastore.etcd import Resync

        async for item in self.ds.watch(prefix):
            if isinstance(item, Resync):
                self.view.replace(prefix, ((kv.key, kv.value) for kv in item.items))
            else:
                self.view.put(prefix, item.key, item.value if item.type == "put" else None)
            self._wake.set()

    async def _sync_loop(self) -> None:
        delay = 0.5
        while True:
            await self._wake.wait()
            await asyncio.sleep(WINDOW)
            self._wake.clear()
            if not self.view.complete:
                continue
            try:
                await self.sync()
                delay = 0.5
            except Exception as e:  # logged and retried; the loop never dies of it
                log.exception("sync failed (retrying in %.1f s): %s", delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()

    # -- one sync --

    async def sync(self) -> None:
        inputs = self.view.inputs()
        for problem in inputs.problems:
            log.warning("skipping %s", problem)
        # most store changes (a pod's address taken from a block) change nothing routing
        # reads: skip the sync then, so a CNI ADD never shares the CPU with a no-op
        learned_now = self.rib.learned() if self.backend == "bird" else {}
        key = (inputs.nodes, inputs.pools, inputs.blocks, inputs.bgp_config, inputs.bgp_peers,
               inputs.secrets, learned_now,
               frozenset(self.stale) if self.stale is not None else None,
               time.monotonic() < self.grace_until)
        if key == self._last_key and not self._dirty and not self.last_errors:
            return
        self._dirty = False
        local = inputs.nodes.get(self.nodename)
        if local is None:
            log.info("no Node %s in the store yet; waiting for tabby-node's registration",
                     self.nodename)
            self._last_key = key
            return
        await self._tunnels(local, inputs)
        learned: dict[str, str] = {}
        if self.backend == "bird":
            await self._bgp(local, inputs)
            learned = self.rib.learned()
        if self.program_kernel:
            await self._program(local, inputs, learned)
        self.syncs += 1
        self._write_status(local)
        self._last_key = key  # only after a whole sync: a failed one is tried again

    async def _tunnels(self, local: NodeRecord, inputs: view.Inputs) -> None:
        from bgp.tunnels import ensure_tunnel_addresses, tunnel_changes

        if not tunnel_changes(local, inputs.pools) or time.monotonic() < self._tunnel_retry:
            return
        from datastore.store import ResourceStore
        from ipam.allocator import IPAM

        try:
            for line in await ensure_tunnel_addresses(ResourceStore(self.ds), IPAM(self.ds),
                                                      local, inputs.pools):
                log.info("%s", line)
        except Exception as e:  # no pool space, etcd trouble: try again later
            self._tunnel_retry = time.monotonic() + 5.0
            self._dirty = True
            asyncio.get_running_loop().call_later(5.1, self._wake.set)
            log.error("tunnel address for %s: %s", self.nodename, e)

    async def _bgp(self, local: NodeRecord, inputs: view.Inputs) -> None:
        from bgp import exabgp_conf, peers

        if local.ip is None:
            log.warning("Node %s has no spec.bgp.ipv4Address: BGP waits for it", self.nodename)
            return
        settings = peers.bgp_settings(inputs.bgp_config, inputs.secrets)
        asn = peers.local_as(local, settings)
        self.router_id, self.cluster_id = str(local.ip), local.rr_cluster_id
        self.peers = peers.peers_for(local, inputs.nodes, settings, inputs.bgp_peers,
                                     inputs.secrets)
        speaker = exabgp_conf.Speaker(router_id=str(local.ip), local_address=str(local.ip),
                                      local_as=asn, listen_port=settings.listen_port)
        api_argv = [sys.executable, "-m", "bgp.pipe", str(self.api.path)]
        config = exabgp_conf.render_config(speaker, self.peers, api_argv)
        env = exabgp_conf.render_env(speaker)
        did = await self.speaker.apply(config, env)
        if did != "unchanged":
            log.info("exabgp %s: AS %d, %d peer(s): %s", did, asn, len(self.peers),
                     ", ".join(f"{p.address} ({p.kind})" for p in self.peers) or "none")
        if did == "restarted":
            self.rib = rib.Rib()  # every session starts again
        configured = {p.address for p in self.peers}
        for address in list(self.peer_state):
            if address not in configured:
                del self.peer_state[address]
                self.rib.drop_peer(address)
        await self._announce(announce_mod.announcements(self.nodename, inputs.blocks,
                                                        inputs.pools))
        await self._reflect()

    async def _announce(self, want: frozenset[str]) -> None:
        added, removed = sorted(want - self.announced), sorted(self.announced - want)
        if not added and not removed:
            return
        lines = [messages.announce(p) for p in added] + [messages.withdraw(p) for p in removed]
        await self.api.send(lines)  # without a relay: sent in full when one connects
        self.announced = want
        for prefix in added:
            log.info("announcing %s", prefix)
        for prefix in removed:
            log.info("withdrawing %s", prefix)

    async def _program(self, local: NodeRecord, inputs: view.Inputs,
                       learned: dict[str, str]) -> None:
        from bgp import routes

        mtu = await asyncio.to_thread(_uplink_mtu, str(local.ip) if local.ip else None)
        plan = routes.plan(self.nodename, inputs.nodes, inputs.pools, inputs.blocks, learned,
                           uplink_mtu=mtu)
        keep: frozenset[str] = frozenset()
        if self.backend == "bird" and time.monotonic() < self.grace_until:
            if self.stale is None:
                self.stale = await asyncio.to_thread(_learned_in_kernel)
            keep = frozenset(self.stale)
        else:
            self.stale = None
        ipip = ipip_device(local, mtu) if plan.ipip else None
        errors = await asyncio.to_thread(_apply_plan, plan, keep, ipip)
        self._write_pod_mtu(mtu, inputs)
        self.routes_programmed = len(plan.routes)
        if errors != self.last_errors:
            for error in errors:
                log.error("route programming: %s", error)
        self.last_errors = errors

    def _write_pod_mtu(self, uplink_mtu: int, inputs: view.Inputs) -> None:
        """Calico's /var/lib/calico/mtu: what the CNI gives pods when the netconf has no mtu."""
        if self.mtu_file is None:
            return
        value = pod_mtu(uplink_mtu, inputs.pools)
        try:
            if write_mtu_file(self.mtu_file, value) or value != self.pod_mtu:
                log.info("pod MTU %d (uplink %d) written to %s", value, uplink_mtu,
                         self.mtu_file)
        except OSError as e:
            log.error("cannot write the pod MTU to %s: %s", self.mtu_file, e.strerror or e)
            return
        self.pod_mtu = value

    async def _reflect(self) -> None:
        """As a route reflector: tell exabgp what to pass on to each peer (bgp.reflect)."""
        want = reflect.reflections(self.cluster_id, self.peers, self.rib.paths(),
                                   own=self.announced)
        announce, withdraw = reflect.changes(self.reflected, want)
        # a prefix that became our own was re-announced (next-hop self) over the reflected one
        withdraw = [(peer, prefix) for peer, prefix in withdraw if prefix not in self.announced]
        lines = [messages.withdraw(prefix, neighbor=peer) for peer, prefix in withdraw]
        lines += [messages.announce(prefix, path.next_hop, neighbor=peer,
                                    originator=path.originator, cluster_list=path.cluster_list)
                  for peer, prefix, path in announce]
        if lines and not await self.api.send(lines):
            return  # no exabgp: a new relay starts from nothing (see _on_relay_connect)
        if lines:
            log.info("reflecting: %d route(s) sent, %d withdrawn", len(announce), len(withdraw))
        self.reflected = want

    # -- exabgp's API channel --

    async def _on_relay_connect(self) -> None:
        self.rib = rib.Rib()  # a new relay means a new exabgp: its sessions start over
        self.reflected = {}
        self.peer_state = {}
        await self.api.send([messages.announce(p) for p in sorted(self.announced)])
        # what the old speaker learned stays in the kernel while the sessions come back
        self.stale = None  # read again at the next sync
        self._extend_grace()

    def _extend_grace(self) -> None:
        self.grace_until = max(self.grace_until, time.monotonic() + self.grace)
        asyncio.get_running_loop().call_later(self.grace + 0.1, self._wake.set)

    async def _on_line(self, line: str) -> None:
        msg = messages.parse_line(line)
        if msg is None:
            return
        if isinstance(msg, messages.PeerState):
            previous = self.peer_state.get(msg.peer, {}).get("state")
            state = "up" if msg.up else "down"
            if previous != state:
                self.peer_state[msg.peer] = {"state": state, "since": time.time()}
                log.info("BGP peer %s is %s", msg.peer, state)
            if msg.up:
                await self.api.send([messages.announce(p, neighbor=msg.peer)
                                     for p in sorted(self.announced)])
                await self.api.send([  # and what we reflect to it
                    messages.announce(prefix, path.next_hop, neighbor=msg.peer,
                                      originator=path.originator, cluster_list=path.cluster_list)
                    for prefix, path in sorted(self.reflected.get(msg.peer, {}).items())])
            elif self.rib.drop_peer(msg.peer):
                await self._reflect()
                self._wake.set()  # its routes go; the sync writes the status
            if previous != state:
                self._refresh_status()
        elif isinstance(msg, messages.Update):
            paths = {prefix: reflect.Path(hop, msg.originator, msg.cluster_list)
                     for prefix, hop in msg.announced.items()}
            looped = [p for p, path in paths.items()
                      if reflect.looped(path, self.router_id or "", self.cluster_id)]
            for prefix in looped:  # RFC 4456: ours, or through our cluster, already
                del paths[prefix]
            changed = self.rib.announce(msg.peer, paths)
            changed = self.rib.withdraw(msg.peer, [*msg.withdrawn, *looped]) or changed
            if self.stale and msg.withdrawn:  # withdrawn for real: no longer kept in grace
                self.stale.difference_update(msg.withdrawn)
                changed = True
            if changed:
                await self._reflect()
                self._wake.set()

    # -- status --

    def _refresh_status(self) -> None:
        local = self.view.inputs().nodes.get(self.nodename)
        if local is not None:
            self._write_status(local)

    def _write_status(self, local: NodeRecord) -> None:
        peers = []
        for p in self.peers:
            st = self.peer_state.get(p.address, {})
            up = st.get("state") == "up"
            peers.append({"address": p.address, "name": p.name, "kind": p.kind,
                          "peer_as": p.peer_as, "state": st.get("state", "idle"),
                          "since": st.get("since"),
                          "info": "Established" if up else ("Active" if st else "Connect"),
                          "routes_received": self.rib.peer_count(p.address)})
        status.write_status(self.status_path, {
            "node": self.nodename, "backend": self.backend, "agent_pid": os.getpid(),
            "address": str(local.ip) if local.ip else None,
            "speaker": {"pid": self.speaker.pid, "starts": self.speaker.starts},
            "peers": peers, "announced": sorted(self.announced),
            "routes_programmed": self.routes_programmed, "errors": self.last_errors,
            "syncs": self.syncs, "updated": time.time()})


def _enable_forwarding() -> None:
    """A node forwards between its pods and the other nodes (Felix sets the same at start)."""
    path = "/proc/sys/net/ipv4/ip_forward"
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return
        with open(path, "w") as f:
            f.write("1")
        log.info("enabled IPv4 forwarding (net.ipv4.ip_forward=1)")
    except OSError as e:
        log.error("cannot enable IPv4 forwarding (%s): pods on other nodes will not be reached",
                  e)


def _uplink_mtu(address: str | None) -> int:
    """The MTU of the interface holding the node's address (1500 when unknown)."""
    if address is None:
        return 1500
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2, address=address):
            links = ipr.get_links(msg["index"])
            if links:
                return int(links[0].get_attr("IFLA_MTU") or 1500)
    return 1500


def _learned_in_kernel() -> set[str]:
    """Destinations of our routes that came from BGP (not blackholes, not VXLAN)."""
    from bgp import kernel_routes, routes

    return {r.dst for r in kernel_routes.read_routes(routes.ROUTE_PROTO)
            if r.type != "blackhole" and r.dev != routes.VXLAN_DEVICE}


def _apply_plan(plan: Any, keep: frozenset[str] = frozenset(),
                ipip: IpipDevice | None = None) -> list[str]:
    """Devices, VTEPs, then routes (the order bgp.vxlan documents); returns the problems."""
    from bgp import kernel_routes, routes, vxlan
    from bgp.ipip import IpipError, ensure_ipip

    errors: list[str] = []
    if ipip is not None:
        try:
            for action in ensure_ipip(ipip):
                log.info("tunl0: %s", action)
        except (IpipError, OSError) as e:
            errors.append(f"ipip: {e}")
    try:
        for action in vxlan.ensure_vxlan(plan.vxlan):
            log.info("vxlan: %s", action)
        if plan.vxlan is not None:
            errors += [f"vxlan: {e}" for e in vxlan.reconcile_vteps(plan.vteps).errors]
    except Exception as e:  # VxlanError and kernel trouble: the routes are still worth it
        errors.append(f"vxlan device: {e}")
    desired = set(plan.routes)
    if keep:  # just restarted: keep what the previous speaker learned until sessions are up
        wanted = {d.dst for d in desired}
        desired |= {r for r in kernel_routes.read_routes(routes.ROUTE_PROTO)
                    if r.dst in keep and r.dst not in wanted}
    result = kernel_routes.reconcile_routes(desired)
    return errors + list(result.errors)


# -- the process ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgp.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodename", required=True)
    p.add_argument("-c", "--config", help="calicoctl-style config file")
    p.add_argument("--etcd-endpoints", help="comma list of etcd URLs (overrides --config)")
    p.add_argument("--backend", choices=BACKENDS, default="bird",
                   help="bird: BGP with exabgp (+ VXLAN where pools use it); vxlan: no BGP")
    p.add_argument("--run-dir", type=Path, default=Path("/run/tabby"),
                   help="exabgp's files, the API socket and bgp-status.json")
    p.add_argument("--log-file", default="")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--mtu-file", type=Path, default=DEFAULT_MTU_FILE,
                   help="where the pod MTU for the CNI plugin is written "
                        f"(default {DEFAULT_MTU_FILE}); '' for nowhere")
    p.add_argument("--secrets-namespace", default=view.DEFAULT_SECRETS_NAMESPACE,
                   help="the namespace of the Secrets BGP passwords come from, as calico-node's "
                        f"own (default {view.DEFAULT_SECRETS_NAMESPACE})")
    p.add_argument("--grace", type=float, default=GRACE,
                   help=f"seconds learned routes survive a restart (default {GRACE:g})")
    p.add_argument("--exit-with-parent", action="store_true")
    return p.parse_args(argv)


async def run(opts: argparse.Namespace) -> int:
    from datastore.config import ConfigError
    from datastore.etcd import Datastore

    try:
        config = etcd_config(opts.etcd_endpoints, opts.config)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    ds = Datastore(config)
    agent = RoutingAgent(opts.nodename, opts.backend, ds, opts.run_dir, grace=opts.grace,
                         mtu_file=opts.mtu_file if str(opts.mtu_file) not in ("", ".") else None,
                         secrets_namespace=opts.secrets_namespace or None)
    log.info("routing agent for node %s (backend %s, etcd %s, pid %d)", opts.nodename,
             opts.backend, ",".join(config.endpoints), os.getpid())
    try:
        await run_until_stopped(agent.run(), log, opts.exit_with_parent)
    finally:
        await agent.stop()
        await ds.close()
    log.info("stopped (programmed routes stay in place)")
    return 0


def main(argv: list[str] | None = None) -> None:
    daemon_main("routing agent", parse_args(argv), run, NOISY_LOGGERS)


if __name__ == "__main__":
    main()

"""Felix: (a) policy write -> probe flip latency, (b) full resync at 10,000 endpoints x 1,000
policies, (c) TCP connections per second with 500 policies vs none, in one run.

    sudo .venv/bin/python bench/bench_felix.py [--flips 20] [--conn-seconds 3] [--rounds 3]

(a) and (c) run in a lab made here (`lab up`, one node, two real pods on node1, 1,000 store-only
WorkloadEndpoints beside them); (b) runs in-process (build_snapshot -> PolicyIndex -> render ->
apply_dataplane into a fresh private network namespace), each phase timed. Everything happens in
namespaces this script creates; the lab is torn down and the namespace deleted at the end, even
on failure. The root namespace's iptables and ipsets are never read or written.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import io
import json
import os
import platform
import pstats
import re
import secrets
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import precompile, production_env, write_section  # noqa: E402

BEGIN, END = "<!-- bench_felix:begin -->", "<!-- bench_felix:end -->"
CLONE_NEWNET = 0x40000000
CALICO = "projectcalico.org/v3"
NODE = "node1"
APPS, ROLES, TEAMS = 50, 200, 5
SERVER_PORT = 80
PROBE_TIMEOUT = 0.005  # s: a connect not answered within this counts as "blocked"
AIM_FLIP_MS, AIM_CONN_RATIO = 100.0, 0.90
LINGER_RST = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT pile-up on the client

_libc = ctypes.CDLL(None, use_errno=True)


# ---- helpers -----------------------------------------------------------------------------------

def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def in_netns(ns: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """fn on a fresh thread that joined `ns` (setns is per thread); sockets it makes stay there."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            with open(f"/run/netns/{ns}", "rb") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer inside {ns} within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


# ---- the synthetic cluster ---------------------------------------------------------------------

def namespace_objects(names: list[str]) -> list[dict[str, Any]]:
    """What the store holds for each namespace: its profile and its default SA's profile."""
    from datastore import k8s
    from datastore.resources import validate_any

    out = []
    for k, name in enumerate(names):
        ns = {"apiVersion": "v1", "kind": "Namespace",
              "metadata": {"name": name, "labels": {"team": f"t{k % TEAMS}"}}}
        sa = {"apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": {"name": "default", "namespace": name}}
        for obj in (ns, sa):
            out += [validate_any(d) for d in k8s.derived_objects(validate_any(obj))]
    return out


def endpoint(j: int, namespace: str, node: str, ip: str,
             labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The WorkloadEndpoint Calico's CNI plugin would write for pod `pod<j>`."""
    from datastore import k8s
    from datastore.resources import validate_any

    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"pod{j}", "namespace": namespace,
                        "labels": labels or {"app": f"app{j % APPS}", "role": f"r{j % ROLES}"}},
           "spec": {"nodeName": node, "containers": [{"name": "main", "ports": [
               {"name": "http", "containerPort": 80, "protocol": "TCP"}]}]}}
    return k8s.workload_endpoint_for_pod(validate_any(pod), node, [ip])


def scale_policy(i: int, namespace: str) -> dict[str, Any]:
    """(b)'s policy i: selects one app of its namespace; ingress from a role (a selector set) and
    from a team of namespaces to the named port (a named-port set); egress to another app."""
    return {"apiVersion": CALICO, "kind": "NetworkPolicy",
            "metadata": {"name": f"pol{i}", "namespace": namespace},
            "spec": {"order": 100 + i, "selector": f"app == 'app{i % APPS}'",
                     "types": ["Ingress", "Egress"],
                     "ingress": [
                         {"action": "Allow", "protocol": "TCP",
                          "source": {"selector": f"role == 'r{i % ROLES}'"},
                          "destination": {"ports": [8000 + i % 100]}},
                         {"action": "Allow", "protocol": "TCP",
                          "source": {"namespaceSelector": f"team == 't{i % TEAMS}'"},
                          "destination": {"ports": ["http"]}}],
                     "egress": [
                         {"action": "Allow", "protocol": "TCP",
                          "destination": {"selector": f"app == 'app{(i + 1) % APPS}'",
                                          "ports": ["http"]}},
                         {"action": "Allow", "protocol": "UDP", "destination": {"ports": [53]}}]}}


def scale_world(endpoints: int, policies: int, local: int, namespaces: int = 20
                ) -> dict[str, dict[str, Any]]:
    """(b)'s store: `endpoints` WEPs, the first `local` of them on the measured node (node0),
    the rest over 99 other nodes; `policies` NetworkPolicies; an IPPool."""
    names = [f"ns{k}" for k in range(namespaces)]
    objs: dict[str, dict[str, Any]] = {
        "pool": {"apiVersion": CALICO, "kind": "IPPool", "metadata": {"name": "pool"},
                 "spec": {"cidr": "10.0.0.0/8", "natOutgoing": True}}}
    for obj in namespace_objects(names):
        objs[f"profile/{obj['metadata']['name']}"] = obj
    for j in range(endpoints):
        node = "node0" if j < local else f"node{1 + j % 99}"
        ip = f"10.{1 + j // 65536}.{(j // 256) % 256}.{j % 256}"
        objs[f"wep/{j}"] = endpoint(j, names[j % namespaces], node, ip)
    for i in range(policies):
        objs[f"policy/{i}"] = scale_policy(i, names[i % namespaces])
    return objs


# ---- (b) full resync, in-process ---------------------------------------------------------------

def calc_render(objs: dict[str, dict[str, Any]], node: str) -> tuple[dict[str, float], Any]:
    """The agent's sync_once up to the kernel, each phase timed (same functions, same order)."""
    from felix.agent_config import merged_felix_spec, render_config
    from felix.calc import PolicyIndex
    from felix.mirror import build_snapshot
    from felix.render import render_with_report
    from felix.render_config import RenderConfig

    t0 = time.perf_counter()
    snapshot, problems = build_snapshot(objs)
    pools = [o for o in objs.values() if o.get("kind") == "IPPool"]
    config = render_config(pools, merged_felix_spec([], node), RenderConfig())
    t1 = time.perf_counter()
    index = PolicyIndex(snapshot)
    t2 = time.perf_counter()
    result = render_with_report(index, node, config)
    t3 = time.perf_counter()
    if problems or result.problems:
        raise RuntimeError(f"unexpected render problems: {[*problems, *result.problems][:3]}")
    return {"snapshot": t1 - t0, "index": t2 - t1, "render": t3 - t2}, result.dataplane


def incremental_change(objs: dict[str, dict[str, Any]], node: str, rounds: int = 5) -> float:
    """Median calc + render (as `sync_once` does them, with the caches the previous sync left)
    after one policy changed: the cost a policy write pays on top of its apply."""
    from felix.agent import SyncCaches
    from felix.agent_config import merged_felix_spec, render_config
    from felix.mirror import build_snapshot
    from felix.render import render_with_report
    from felix.render_config import RenderConfig

    pools = [o for o in objs.values() if o.get("kind") == "IPPool"]
    config = render_config(pools, merged_felix_spec([], node), RenderConfig())
    caches = SyncCaches()

    def sync(objs: dict[str, dict[str, Any]]) -> float:
        start = time.perf_counter()
        snapshot, _ = build_snapshot(objs, caches.memo.cache)
        render_with_report(caches.memo.index(snapshot), node, config, caches.render)
        return time.perf_counter() - start

    sync(objs)
    took = []
    for k in range(rounds):
        policy = json.loads(json.dumps(objs["policy/0"]))
        policy["spec"]["ingress"][0]["destination"]["ports"] = [7000 + k]
        objs = {**objs, "policy/0": policy}
        took.append(sync(objs))
    return statistics.median(took)


def counts(dp: Any, endpoints: int, policies: int) -> dict[str, float]:
    """Rules (chain rules + hooks, both families, as felix_rules_programmed) split by chain kind."""
    by_kind = {"endpoint": 0, "policy": 0, "other": 0}
    policy_chains = 0
    for table in dp.tables.values():
        by_kind["other"] += len(table.hooks)
        for chain in table.chains.values():
            n = chain.name
            kind = ("policy" if n.startswith(("cali-pi-", "cali-po-", "cali-pri-", "cali-pro-"))
                    else "endpoint" if n.startswith(("cali-tw-", "cali-fw-", "cali-th-",
                                                     "cali-fh-", "cali-gi-", "cali-go-"))
                    else "other")  # cali-gi-/go-: an endpoint chain's runs of guarded jumps
            by_kind[kind] += len(chain.rules)
            policy_chains += kind == "policy"
    return {"rules": sum(by_kind.values()), "rules_endpoint": by_kind["endpoint"],
            "rules_policy": by_kind["policy"], "rules_other": by_kind["other"],
            "sets": len(dp.ipsets), "members": sum(len(s.members) for s in dp.ipsets.values()),
            "per_endpoint": by_kind["endpoint"] / max(endpoints, 1),
            "per_policy_chain": by_kind["policy"] / max(policy_chains, 1),
            "policy_chains": policy_chains}


def resync_case(label: str, endpoints: int, policies: int, local: int,
                ns_name: str) -> dict[str, Any]:
    """Calc + render + cold apply into an empty namespace + a warm resync over the result."""
    from felix.dataplane import DataplaneState, Runner, apply_dataplane

    objs = scale_world(endpoints, policies, local)
    phases, dp = calc_render(objs, "node0")
    phases["incremental"] = incremental_change(objs, "node0")
    subprocess.run(["ip", "netns", "add", ns_name], check=True, capture_output=True)
    try:
        runner = Runner.in_netns(ns_name, timeout=900)
        start = time.perf_counter()
        stats = apply_dataplane(dp, DataplaneState(runner), sweep=False)
        phases["apply_cold"] = time.perf_counter() - start
        phases["apply_cold_iptables"] = sum(t.ms for t in stats.tables) / 1000
        phases["apply_cold_ipsets"] = sum(s.ms for s in stats.ipsets) / 1000
        # a resync as after a compaction or a restart: fresh reconcilers read the kernel and
        # diff; the same state means nothing is written
        start = time.perf_counter()
        warm = apply_dataplane(dp, DataplaneState(runner), sweep=True)
        phases["apply_warm"] = time.perf_counter() - start
        wrote_warm = warm.wrote
    finally:
        subprocess.run(["ip", "netns", "del", ns_name], capture_output=True)
    return {"label": label, "endpoints": endpoints, "policies": policies, "local": local,
            "phases": phases, "wrote_warm": wrote_warm, **counts(dp, local, policies)}


def profile_render(endpoints: int, policies: int, local: int, top: int = 8) -> str:
    """Where calc + render spend their time (cProfile, internal time), as text lines."""
    objs = scale_world(endpoints, policies, local)
    prof = cProfile.Profile()
    prof.enable()
    calc_render(objs, "node0")
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    lines = []
    for func, (_cc, nc, tt, ct, _callers) in sorted(stats.stats.items(),  # type: ignore[attr-defined]
                                                    key=lambda kv: -kv[1][2])[:top]:
        where = f"{Path(func[0]).parent.name}/{Path(func[0]).name}:{func[1]}({func[2]})"
        lines.append(f"{where}: {tt:.2f} s own, {ct:.2f} s cumulative, {nc} calls")
    return "\n".join(lines)


# ---- the lab: store writer, server, probes --------------------------------------------------

WRITER = r"""
import asyncio, json, sys, time
from datastore.config import EtcdConfig
from datastore.etcd import Datastore
from datastore.kinds import kind_for
from datastore.store import ResourceStore

async def main():
    async with Datastore(EtcdConfig(endpoints=(sys.argv[1],))) as ds:
        st = ResourceStore(ds)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            req = json.loads(line)
            start = time.monotonic()
            try:
                if "apply" in req:
                    res = await st.write(req["apply"], "apply")
                    rev = max(int(r.obj["metadata"].get("resourceVersion") or 0) for r in res)
                else:
                    targets = [(kind_for(k, a), n, ns, None) for k, a, n, ns in req["delete"]]
                    await st.delete_many(targets, skip_missing=True)
                    rev = 0
                if not rev:  # a delete: the store's revision now covers it
                    _, rev = await ds.list("/calico/resources/v3/projectcalico.org/ippools/")
                out = {"revision": rev, "start": start, "done": time.monotonic()}
            except Exception as e:
                out = {"error": repr(e)}
            print(json.dumps(out), flush=True)

asyncio.run(main())
"""

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
while True:
    try:
        c, _ = s.accept()
        c.close()
    except OSError:
        pass
"""

CLIENT = r"""
import socket, struct, sys, time
ip, port, seconds, warm = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
linger = struct.pack("ii", 1, 0)
def burst(seconds):
    n, fails, end = 0, 0, time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < end:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.settimeout(1.0)
        try:
            s.connect((ip, port))
            n += 1
        except OSError:
            fails += 1
        s.close()
    return n, fails, time.monotonic() - start
burst(warm)
n, fails, took = burst(seconds)
print(f"{n / took} {fails}", flush=True)
"""


class Writer:
    """A long-lived store writer inside the lab's etcd namespace (one JSON line per request)."""

    def __init__(self, etcd_ns: str, endpoint: str, env: dict[str, str]) -> None:
        from lab import netns

        self.proc = subprocess.Popen(
            netns.nsenter(etcd_ns, [sys.executable, "-c", WRITER, endpoint]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(f"store write failed: {reply['error']}")
        return reply

    def apply(self, objs: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request({"apply": objs})

    def delete(self, objs: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request({"delete": [[o["kind"], o["apiVersion"], o["metadata"]["name"],
                                         o["metadata"].get("namespace")] for o in objs]})

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def agent_metrics(node_ns: str) -> dict[str, float]:
    from felix.metrics import parse_text

    def read() -> dict[str, float]:
        try:
            with urllib.request.urlopen("http://127.0.0.1:9091/metrics", timeout=2) as r:
                return parse_text(r.read().decode())
        except OSError:
            return {}

    return in_netns(node_ns, read)


def wait_applied(node_ns: str, revision: int, timeout: float = 300.0) -> dict[str, float]:
    def ok() -> dict[str, float] | None:
        m = agent_metrics(node_ns)
        done = m.get("felix_in_sync") == 1 and m.get("felix_datastore_revision", 0) >= revision
        return m if done else None

    return wait_for(f"felix on {node_ns} to apply revision {revision}", ok, timeout)


class Prober:
    """New TCP connections from the client pod to the server, back to back, on one thread; each
    attempt is (start time, connected within PROBE_TIMEOUT)."""

    def __init__(self, client_ns: str, ip: str) -> None:
        self.client_ns, self.ip = client_ns, ip
        self.last: tuple[float, bool] = (0.0, False)
        self.history: list[tuple[float, bool]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _attempt(self) -> bool:
        s = socket.socket()  # on the prober thread, which has joined the client's namespace
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            s.setblocking(False)
            s.connect_ex((self.ip, SERVER_PORT))
            _, w, _ = select.select([], [s], [], PROBE_TIMEOUT)
            return bool(w) and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        finally:
            s.close()

    def _run(self) -> None:
        # this thread joins the client's namespace once; every socket it makes lives there
        with open(f"/run/netns/{self.client_ns}", "rb") as f:
            if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        while not self.stop.is_set():
            start = time.monotonic()
            ok = self._attempt()
            with self.lock:
                self.last = (start, ok)
                self.history.append((start, ok))
                if len(self.history) > 20000:
                    del self.history[:10000]
            if not ok:
                continue
            time.sleep(0.001)  # an open path answers at once: do not flood the server

    def first_since(self, t0: float, state: bool) -> float | None:
        with self.lock:
            for start, ok in self.history:
                if start >= t0 and ok == state:
                    return start
        return None

    def state(self) -> bool:
        with self.lock:
            return self.last[1]


# ---- the lab world ---------------------------------------------------------------------------

LAB_NS = "bench"


def lab_policy(i: int, on_path: bool = True) -> dict[str, Any]:
    """Filler policy i: selects one app of the store-only endpoints and, `on_path`, the server
    too (hot=true), so every new connection to the server walks every filler chain: ingress from
    a role's set on a port the probe does not use, which never matches it."""
    selector = f"app == 'app{i % APPS}'" + (" || hot == 'true'" if on_path else "")
    return {"apiVersion": CALICO, "kind": "NetworkPolicy",
            "metadata": {"name": f"fill{i:03d}", "namespace": LAB_NS},
            "spec": {"order": 100 + i, "selector": selector,
                     "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "source": {"selector": f"role == 'r{i % ROLES}'"},
                                  "destination": {"ports": [8000 + i % 100]}}]}}


def allow_client() -> dict[str, Any]:
    """The last policy (highest order): the only one admitting the client to the server."""
    return {"apiVersion": CALICO, "kind": "NetworkPolicy",
            "metadata": {"name": "allow-client", "namespace": LAB_NS},
            "spec": {"order": 10000, "selector": "app == 'server'", "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "source": {"selector": "app == 'client'"},
                                  "destination": {"ports": [SERVER_PORT]}}]}}


def flip_policy(action: str) -> dict[str, Any]:
    """The policy (a) rewrites: first in order, Deny or Allow client -> server."""
    return {"apiVersion": CALICO, "kind": "NetworkPolicy",
            "metadata": {"name": "flip", "namespace": LAB_NS},
            "spec": {"order": 1, "selector": "app == 'server'", "types": ["Ingress"],
                     "ingress": [{"action": action, "protocol": "TCP",
                                  "source": {"selector": "app == 'client'"},
                                  "destination": {"ports": [SERVER_PORT]}}]}}


def store_only_endpoints(count: int, local: int) -> list[dict[str, Any]]:
    """`count` WEPs with no pod behind them: `local` on node1 (interfaces that do not exist),
    the rest on nine other nodes, addresses in 10.250/16 (outside the lab's pool)."""
    return [endpoint(j, LAB_NS, NODE if j < local else f"store-node{1 + j % 9}",
                     f"10.250.{j // 256}.{j % 256}") for j in range(count)]


SYNC_RE = re.compile(r"applied.* in (\d+) ms \(render (\d+) ms\)")


def felix_syncs(log: Path, offset: int) -> list[tuple[float, float]]:
    """(sync ms, render+calc ms) of each sync the agent logged after `offset`."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [(float(m[1]), float(m[2])) for m in SYNC_RE.finditer(text)]


@contextlib.contextmanager
def lab_cluster(name: str, base: Path) -> Iterator[tuple[Any, dict[str, Any]]]:
    from lab import cluster
    from lab.state import Lab

    lab = Lab(name, base)
    try:
        state = cluster.up(lab, 1)
        yield lab, state
    finally:
        cluster.down(lab)


def lab_bench(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    from lab import netns, pods
    from lab.cluster import etcd_endpoint

    base = Path(tempfile.mkdtemp(prefix="tabby-bench-felix-"))
    name = f"bfx{secrets.token_hex(3)}"
    out: dict[str, Any] = {}
    writer: Writer | None = None
    procs: list[subprocess.Popen] = []
    prober: Prober | None = None
    try:
        with lab_cluster(name, base) as (lab, state):
            node_ns = state["nodes"][NODE]["ns"]
            writer = Writer(state["etcd"]["ns"], etcd_endpoint(state), env)
            writer.apply([{"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": LAB_NS, "labels": {"team": "t0"}}}])
            port = [pods.parse_port(f"http:{SERVER_PORT}/TCP")]
            server = pods.add(lab, pods.PodRef(LAB_NS, "server"), NODE,
                              {"app": "server", "hot": "true"}, port)
            client = pods.add(lab, pods.PodRef(LAB_NS, "client"), NODE, {"app": "client"}, port)
            server_ip = server["ips"][0].split("/")[0]
            srv = subprocess.Popen(netns.nsenter(server["netns"], [sys.executable, "-c", SERVER,
                                                                   str(SERVER_PORT)]),
                                   stdout=subprocess.PIPE, text=True, env=env)
            procs.append(srv)
            assert srv.stdout and srv.stdout.readline().strip() == "ready"

            # the store: 1,000 store-only endpoints, 499 fillers + allow-client (+ the flip)
            weps = store_only_endpoints(args.endpoints, args.local_endpoints)
            for start in range(0, len(weps), 250):
                writer.apply(weps[start:start + 250])
            policies = [lab_policy(i) for i in range(args.policies - 1)] + [allow_client()]
            writer.apply(policies)
            rev = writer.apply([flip_policy("Allow")])["revision"]
            m = wait_applied(node_ns, rev)
            out["a_rules"], out["a_members"] = m["felix_rules_programmed"], m[
                "felix_ipset_members_programmed"]
            out["a_local"] = m["felix_local_endpoints"]

            # (a) flips: the client probes back to back; each write toggles Deny <-> Allow
            prober = Prober(client["netns"], server_ip)
            prober.thread.start()
            wait_for("the probe to pass", prober.state, 30)
            felix_log = Path(state["nodes"][NODE]["dir"]) / "log" / "felix.log"
            log_from = felix_log.stat().st_size if felix_log.exists() else 0
            flips: dict[str, list[float]] = {"close": [], "open": []}
            commits: list[float] = []
            for k in range(2 * args.flips):
                action, want = ("Deny", False) if k % 2 == 0 else ("Allow", True)
                time.sleep(0.3 + 0.2 * (k % 3) / 3)  # settled, and not in step with anything
                t0 = time.monotonic()
                reply = writer.apply([flip_policy(action)])
                commits.append(reply["done"] - t0)
                seen = wait_for(f"the probe to become {'open' if want else 'closed'}",
                                lambda t0=t0, want=want: prober.first_since(t0, want), 30)
                flips["open" if want else "close"].append(seen - t0)
            out["flips"] = flips
            out["syncs"] = felix_syncs(felix_log, log_from)
            out["commits"] = commits
            prober.stop.set()
            prober.thread.join(5)

            # (c) conn/s, alternating "500 policies" and "none" (the fillers and allow-client
            # deleted; the endpoints stay)
            wait_applied(node_ns, writer.delete([flip_policy("Allow")])["revision"])
            off_path = [lab_policy(i, on_path=False) for i in range(args.policies - 1)]
            modes = ("policies", "none", "offpath")
            rates: dict[str, list[float]] = {m: [] for m in modes}
            fails = 0
            for r in range(args.rounds):
                for mode in modes[r % 3:] + modes[:r % 3]:  # rotate: drift hits every mode
                    if mode == "none":
                        rev = writer.delete(policies)["revision"]
                    else:
                        rev = writer.apply(policies if mode == "policies" else
                                           [*off_path, allow_client()])["revision"]
                    m = wait_applied(node_ns, rev)
                    out[f"c_rules_{mode}"] = m["felix_rules_programmed"]
                    time.sleep(0.5)
                    done = subprocess.run(
                        netns.nsenter(client["netns"], [
                            sys.executable, "-c", CLIENT, server_ip, str(SERVER_PORT),
                            str(args.conn_seconds), "0.5"]),
                        capture_output=True, text=True, env=env, timeout=120, check=True)
                    rate, failed = done.stdout.split()
                    rates[mode].append(float(rate))
                    fails += int(failed)
            out["rates"], out["conn_fails"] = rates, fails
    finally:
        if prober is not None:
            prober.stop.set()
        if writer is not None:
            writer.close()
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(base, ignore_errors=True)
    return out


# ---- the report ------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flips", type=int, default=20, help="writes per direction in (a)")
    parser.add_argument("--endpoints", type=int, default=1000, help="(a)/(c) store-only WEPs")
    parser.add_argument("--local-endpoints", type=int, default=98,
                        help="how many of them are on node1 (beside the two real pods)")
    parser.add_argument("--policies", type=int, default=500)
    parser.add_argument("--conn-seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3, help="(c) rounds of each mode")
    parser.add_argument("--scale", default="10000x1000", help="(b) ENDPOINTSxPOLICIES")
    parser.add_argument("--spread-local", type=int, default=100,
                        help="(b) local endpoints in the spread case (the rest on 99 nodes)")
    parser.add_argument("--skip-dense", action="store_true",
                        help="(b): only the spread case (all endpoints local is the slow one)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_felix needs root (network namespaces)")
    precompile()
    env = production_env()
    n_ep, n_pol = (int(x) for x in args.scale.split("x"))
    ns_name = f"tabby-bench-felix-{os.getpid()}"

    print("(b) resync, spread", flush=True)
    cases = [resync_case("spread", n_ep, n_pol, args.spread_local, ns_name)]
    if not args.skip_dense:
        print("(b) resync, dense", flush=True)
        cases.append(resync_case("dense", n_ep, n_pol, n_ep, ns_name))
    for c in cases:
        print(json.dumps(c), flush=True)
    print("(b) profile", flush=True)
    small_ep, small_pol = n_ep // 5, n_pol // 5
    prof = (f"# spread: {n_ep} endpoints, {args.spread_local} local, {n_pol} policies\n"
            + profile_render(n_ep, n_pol, args.spread_local)
            + f"\n# dense: {small_ep} endpoints, all local, {small_pol} policies\n"
            + profile_render(small_ep, small_pol, small_ep))
    print(prof, flush=True)
    print("(a)+(c) lab", flush=True)
    lab = lab_bench(args, env)
    print(json.dumps(lab), flush=True)
    body = report(args, cases, prof, lab)
    write_section(BEGIN, END, body)
    print(body)


def report(args: argparse.Namespace, cases: list[dict[str, Any]], prof: str,
           lab: dict[str, Any]) -> str:
    flips = lab["flips"]
    both = flips["open"] + flips["close"]
    ms = [x * 1000 for x in both]
    p50, p90 = quantile(ms, 0.5), quantile(ms, 0.9)
    rates = lab["rates"]
    with_p, none = statistics.median(rates["policies"]), statistics.median(rates["none"])
    off = statistics.median(rates["offpath"])
    syncs = lab.get("syncs") or [(0.0, 0.0)]
    ratio = with_p / none
    verdict: Callable[[bool], str] = lambda ok: "meets the aim" if ok else "MISSES the aim"  # noqa: E731
    lines = [
        BEGIN,
        "### Felix: policy latency, full resync, connection rate",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, bytecode cache on). Reproduce: "
        "`sudo .venv/bin/python bench/bench_felix.py`.",
        "",
        f"**(a) policy write -> probe flip** (lab, one node; the client and server pods on "
        f"{NODE} plus {args.endpoints} store-only WorkloadEndpoints, {args.local_endpoints} of "
        f"them on {NODE}; {args.policies} policies + the toggled one). The client opens new TCP "
        f"connections back to back ({PROBE_TIMEOUT * 1000:g} ms timeout, so a flip to open is "
        f"seen up to {PROBE_TIMEOUT * 1000:g} ms late); each write toggles the first-order "
        "policy between Deny and Allow; time from just before the write to the first probe "
        "that started after it and saw the new state. Includes the store commit "
        f"(median {statistics.median(lab['commits']) * 1000:.1f} ms); felix writes a change "
        "that follows a quiet spell at once (writes start at least 50 ms apart). Felix programs "
        f"{lab['a_rules']:.0f} rules and {lab['a_members']:.0f} ipset members for "
        f"{lab['a_local']:.0f} local endpoints; its log shows {len(syncs)} syncs during the "
        f"flips, median {statistics.median(s[0] for s in syncs):.0f} ms each, of which snapshot + "
        f"calc + render {statistics.median(s[1] for s in syncs):.0f} ms (incremental: only what "
        "the change touches is recomputed; the rest: apply, which re-plans every table and "
        "restores what changed, the IPv4 and IPv6 tables side by side).",
        "",
        "| flips | p50 | p90 | max | aim p50 |",
        "|---|---|---|---|---|",
        f"| {len(both)} (both directions) | {p50:.0f} ms | {p90:.0f} ms | {max(ms):.0f} ms | "
        f"<= {AIM_FLIP_MS:g} ms: {verdict(p50 <= AIM_FLIP_MS)} |",
        f"| {len(flips['close'])} Allow -> Deny | "
        f"{quantile(flips['close'], 0.5) * 1000:.0f} ms | "
        f"{quantile(flips['close'], 0.9) * 1000:.0f} ms | {max(flips['close']) * 1000:.0f} ms | |",
        f"| {len(flips['open'])} Deny -> Allow | {quantile(flips['open'], 0.5) * 1000:.0f} ms | "
        f"{quantile(flips['open'], 0.9) * 1000:.0f} ms | {max(flips['open']) * 1000:.0f} ms | |",
        "",
        "**(b) full resync** in-process: `build_snapshot` -> `PolicyIndex` -> "
        "`render_with_report` -> `apply_dataplane` into a fresh private namespace (cold: empty "
        "kernel; warm: fresh reconcilers over the programmed kernel, as after a restart or a "
        "compaction resync: read, diff, nothing written). Every policy selects one app of its "
        "namespace and has 2 ingress rules (a selector set, a namespaceSelector named-port set) "
        "and 2 egress rules; 20 namespaces, each endpoint selected by about "
        f"{cases[0]['policies'] // 100} policies. Rules: chain rules + hooks, both families.",
        "",
        "| node | endpoints / local / policies | snapshot | index | render | one policy "
        "changed: calc + render, incremental | apply cold (iptables / ipset, both families "
        "summed) | resync warm | rules (endpoint chains / policy chains / other) | "
        "ipsets / members |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        p = c["phases"]
        lines.append(
            f"| {c['label']} | {c['endpoints']} / {c['local']} / {c['policies']} | "
            f"{p['snapshot']:.2f} s | {p['index']:.2f} s | {p['render']:.2f} s | "
            f"{p['incremental'] * 1000:.0f} ms | {p['apply_cold']:.1f} s "
            f"({p['apply_cold_iptables']:.1f} / "
            f"{p['apply_cold_ipsets']:.1f}) | {p['apply_warm']:.1f} s"
            f"{' (wrote!)' if c['wrote_warm'] else ''} | {c['rules']} ({c['rules_endpoint']} / "
            f"{c['rules_policy']} / {c['rules_other']}) | {c['sets']} / {c['members']} |")
    lines += [
        "",
        "Rules grow with endpoints + rules: per local endpoint "
        + ", ".join(f"{c['per_endpoint']:.1f} ({c['label']})" for c in cases)
        + " rules (its to/from chains: a jump and a return per policy that selects it, plus the "
        "fixed conntrack/mark rules; port-guarded policies' jumps move into shared group chains, "
        "counted here too); per policy chain (one per policy, direction, family in "
        "use) "
        + ", ".join(f"{c['per_policy_chain']:.1f} ({c['label']}, {c['policy_chains']} chains)"
                    for c in cases)
        + " rules whatever the number of endpoints (peers are ipset members, not rules). "
        "Nothing grows as endpoints x policies except through how many policies select each "
        "endpoint.",
        "",
        "Where snapshot + calc + render time goes (cProfile, top functions by own time):",
        "",
        "```",
        prof,
        "```",
        "",
        f"**(c) TCP connections per second**, client pod -> server pod on {NODE} (new "
        "connection, connect, close with RST; one Python client process, one Python server "
        f"process; {args.rounds} rounds of {args.conn_seconds:g} s per mode, modes rotated). "
        f"*On path*: the {args.policies} policies all select the server (each filler has one "
        "set rule on a port 8000-8099 that does not match the client; the allow is last in "
        "order), so every new connection meets all of them: each policy's jump is guarded by "
        "its ports and runs of guarded jumps share group chains behind the union of their "
        "ports, so a connection to port 80 tests a few guards rather than entering 499 policy "
        "chains. *Off path*: the same 500 policies, but the fillers "
        "select only store-only endpoints (the server is selected by the allow alone). *None*: "
        "the same pods and endpoints, no policy. Rules programmed: "
        f"{lab.get('c_rules_policies', 0):.0f} / {lab.get('c_rules_offpath', 0):.0f} / "
        f"{lab.get('c_rules_none', 0):.0f}.",
        "",
        "| | on path | off path | none (anchor) |",
        "|---|---|---|---|",
        f"| conn/s (median of rounds) | {with_p:.0f} | {off:.0f} | {none:.0f} |",
        f"| vs none (aim >= {AIM_CONN_RATIO * 100:g} %) | {ratio * 100:.0f} %: "
        f"{verdict(ratio >= AIM_CONN_RATIO)} | {off / none * 100:.0f} %: "
        f"{verdict(off / none >= AIM_CONN_RATIO)} | |",
        f"| rounds | {', '.join(f'{r:.0f}' for r in rates['policies'])} | "
        f"{', '.join(f'{r:.0f}' for r in rates['offpath'])} | "
        f"{', '.join(f'{r:.0f}' for r in rates['none'])} |",
        f"| failed connects | {lab['conn_fails']} in all rounds | | |",
        END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

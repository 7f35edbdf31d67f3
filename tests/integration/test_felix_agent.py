"""The felix agent against a real etcd and the real kernel, all inside a namespace made here.

SAFETY: the "node" is a fresh network namespace; etcd, the agent and every iptables/ipset
command run inside it (nsenter / `ip netns exec`), and the test's own sockets join it from a
helper thread (setns is per thread). The root namespace's iptables are never read or written.
Namespaces and processes are removed in `finally`.

Waiting is always a poll with a deadline; no assertion depends on how fast anything was.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from felix.calc import PolicyId
from felix.metrics import parse_text
from felix.render_names import POLICY_IN, policy_chain
from tests.conftest import require_binary
from tests.etcd_server import EtcdServer

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

T = TypeVar("T")
NODE = "node1"
NS_PREFIX = "tabby-fa-"
CLONE_NEWNET = 0x40000000
WAIT = 20.0  # generous bound for anything the agent should do "soon"
REPO = Path(__file__).resolve().parents[2]

_libc = ctypes.CDLL(None, use_errno=True)


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def call_in(ns: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """fn in a fresh thread that joined the namespace; the test's thread never leaves its own."""
    assert ns.startswith(NS_PREFIX)
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            with open(f"/run/netns/{ns}", "rb") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer inside {ns} within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT,
             interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class NsEtcd(EtcdServer):
    """The test etcd, started inside the node namespace and probed from there."""

    def __init__(self, workdir: Path, ns: str) -> None:
        super().__init__(workdir)
        self.ns = ns

    def _command(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}", *super()._command()]

    def _healthy(self) -> bool:
        return call_in(self.ns, super()._healthy)


STORE_SHELL = r"""
import asyncio, json, sys
from datastore.config import EtcdConfig
from datastore.etcd import Datastore
from datastore.kinds import kind_for
from datastore.store import ResourceStore

async def one(st, op):
    if "apply" in op:
        return [r.action for r in await st.write(op["apply"], "apply")]
    kind = kind_for(op["kind"], op.get("apiVersion"))
    return len(await st.delete_many([(kind, op["name"], op.get("namespace"), None)],
                                    skip_missing=True))

async def main():
    async with Datastore(EtcdConfig(endpoints=(sys.argv[1],))) as ds:
        st = ResourceStore(ds)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            try:
                out = {"results": [await one(st, op) for op in json.loads(line)]}
            except Exception as e:
                out = {"error": repr(e)}
            print(json.dumps(out), flush=True)

asyncio.run(main())
"""


class Store:
    """A long-lived writer process inside the namespace (one JSON line per batch of ops)."""

    def __init__(self, ns: str, endpoint: str) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", STORE_SHELL, endpoint],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def ops(self, *ops: dict[str, Any]) -> list[Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(list(ops)) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        assert "error" not in reply, reply["error"]
        return reply["results"]

    def apply(self, *objs: dict[str, Any]) -> None:
        self.ops({"apply": list(objs)})

    def delete(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.ops({"kind": obj["kind"], "apiVersion": obj["apiVersion"], "name": meta["name"],
                  "namespace": meta.get("namespace")})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Node:
    ns: str
    etcd: NsEtcd
    store: Store
    workdir: Path
    made: list[str]

    def save(self, table: str = "filter") -> str:
        return sh("ip", "netns", "exec", self.ns, "iptables-save", "-t", table)

    def save_all(self) -> str:
        """Both families, every table, no counters, no timestamps."""
        out = []
        for tool in ("iptables-save", "ip6tables-save"):
            text = sh("ip", "netns", "exec", self.ns, tool)
            out += [line for line in text.splitlines() if not line.startswith("#")]
        out += sh("ip", "netns", "exec", self.ns, "ipset", "save").splitlines()
        return "\n".join(out)

    def chain(self, name: str, table: str = "filter") -> list[str] | None:
        """The chain's rules, or None when it does not exist."""
        text = self.save(table)
        if f":{name} " not in text:
            return None
        return [line for line in text.splitlines() if line.startswith(f"-A {name} ")]

    def add_ns(self, suffix: str) -> str:
        name = f"{self.ns}-{suffix}"
        sh("ip", "netns", "add", name)
        self.made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name


class Agent:
    """One `python -m felix.agent` inside the node namespace."""

    def __init__(self, node: Node, tag: str) -> None:
        self.node = node
        self.log = node.workdir / f"felix-{tag}.log"
        self.port = 19091
        argv = ["nsenter", f"--net=/run/netns/{node.ns}", sys.executable, "-m", "felix.agent",
                "--nodename", NODE, "--etcd-endpoints", node.etcd.endpoint,
                "--metrics-port", str(self.port), "--drift-interval", "1"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=REPO)

    def metrics(self) -> dict[str, float]:
        def get() -> str:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        return parse_text(call_in(self.node.ns, get))

    def ready(self) -> bool:
        def get() -> int:
            try:
                url = f"http://127.0.0.1:{self.port}/readiness"
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status
            except OSError:
                return 0
        assert self.proc.poll() is None, f"agent exited:\n{self.tail()}"
        return call_in(self.node.ns, get) == 200

    def wait_ready(self) -> None:
        wait_for("the agent's first complete sync", self.ready)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    for tool in ("ip", "nsenter", "iptables-save", "ipset", "etcd"):
        require_binary(tool)
    ns = NS_PREFIX + secrets.token_hex(3)
    workdir = tmp_path_factory.mktemp("felix-agent")
    made = [ns]
    sh("ip", "netns", "add", ns)
    etcd: NsEtcd | None = None
    store: Store | None = None
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        etcd = NsEtcd(workdir / "etcd", ns)
        etcd.start()
        store = Store(ns, etcd.endpoint)
        store.apply(NAMESPACE)
        yield Node(ns, etcd, store, workdir, made)
    finally:
        if store is not None:
            store.close()
        if etcd is not None:
            etcd.stop()
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def agent(node: Node, request: pytest.FixtureRequest) -> Iterator[Agent]:
    a = Agent(node, request.node.name)
    try:
        a.wait_ready()
        yield a
    finally:
        a.stop()


# ---- objects ---------------------------------------------------------------------------------

NAMESPACE = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "dev"}}


def wep(pod: str, iface: str, ip: str, on: str = NODE) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": f"{on}-k8s-{pod}-eth0", "namespace": "dev",
                         "labels": {"app": pod}},
            "spec": {"orchestrator": "k8s", "node": on, "pod": pod, "endpoint": "eth0",
                     "interfaceName": iface, "ipNetworks": [f"{ip}/32"],
                     "profiles": ["kns.dev"]}}


def knp(name: str, pod: str, ingress: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Kubernetes NetworkPolicy selecting `pod`: deny all ingress, or allow `ingress`."""
    spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": pod}},
                            "policyTypes": ["Ingress"]}
    if ingress:
        spec["ingress"] = ingress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "dev"}, "spec": spec}


def knp_chain(name: str) -> str:
    return policy_chain(POLICY_IN, PolicyId("KubernetesNetworkPolicy", "dev",
                                            f"knp.default.{name}").chain_id)


def endpoint_chain(iface: str) -> str:
    from felix.render_names import TO_WORKLOAD, endpoint_chain
    return endpoint_chain(TO_WORKLOAD, iface)


# ---- tests -----------------------------------------------------------------------------------


def test_programs_a_local_endpoint_and_follows_policy_changes(node: Node, agent: Agent) -> None:
    iface, web = "calia1a1a1a1a1a", wep("web", "calia1a1a1a1a1a", "10.65.1.2")
    node.store.apply(web)
    wait_for("the endpoint's chain", lambda: node.chain(endpoint_chain(iface)) is not None)
    # another node's endpoint gets nothing here
    node.store.apply(wep("far", "califarfarfarfa", "10.65.9.9", on="node2"))

    chain = knp_chain("web-deny")
    node.store.apply(knp("web-deny", "web"))
    wait_for("the policy chain", lambda: node.chain(chain) is not None)
    assert any(chain in line for line in node.chain(endpoint_chain(iface)) or [])
    assert node.chain(endpoint_chain("califarfarfarfa")) is None

    # a change to the policy shows up in its chain; measure how long it took (reported)
    before = node.chain(chain)
    start = time.monotonic()
    node.store.apply(knp("web-deny", "web", [{"ports": [{"protocol": "TCP", "port": 8080}]}]))
    wait_for("the changed policy chain", lambda: node.chain(chain) != before, interval=0.005)
    latency = time.monotonic() - start
    assert any("8080" in line for line in node.chain(chain) or [])
    print(f"policy write -> chain changed: {latency * 1000:.0f} ms")

    # deleting the policy removes its chain (the agent sweeps after its first sync)
    node.store.delete(knp("web-deny", "web"))
    wait_for("the policy chain to go", lambda: node.chain(chain) is None)
    assert not any(chain in line for line in node.chain(endpoint_chain(iface)) or [])
    assert agent.metrics()["felix_sync_errors_total"] == 0


def test_a_burst_of_writes_is_coalesced(node: Node, agent: Agent) -> None:
    node.store.apply(wep("burst", "calib2b2b2b2b2b", "10.65.2.2"))
    wait_for("the endpoint's chain", lambda: node.chain(endpoint_chain("calib2b2b2b2b2b")))
    wait_for("a quiet agent", lambda: agent.metrics()["felix_in_sync"] == 1)
    syncs = agent.metrics()["felix_syncs_total"]
    ops = [{"apply": [knp(f"burst-{i}", "burst", [{"ports": [{"port": 1000 + i}]}])]}
           for i in range(50)]
    node.store.ops(*ops)  # 50 separate transactions, one after the other
    last = knp_chain("burst-49")
    wait_for("the last policy of the burst", lambda: node.chain(last))
    wait_for("a quiet agent", lambda: agent.metrics()["felix_in_sync"] == 1)
    done = agent.metrics()["felix_syncs_total"] - syncs
    print(f"{done:g} syncs for 50 policy writes")
    assert 1 <= done <= 15, f"{done} syncs for 50 writes"
    for i in range(50):
        node.store.delete(knp(f"burst-{i}", "burst"))
    wait_for("the burst's chains to go", lambda: ":cali-pi-" not in node.save())


def test_drift_is_repaired(node: Node, agent: Agent) -> None:
    text = node.save()
    hook = next(line for line in text.splitlines()
                if line.startswith("-A FORWARD ") and "-j cali-FORWARD" in line)
    sh("ip", "netns", "exec", node.ns, "iptables", "-D", *shlex.split(hook)[1:])
    assert hook not in node.save()
    wait_for("the hook to be restored", lambda: hook in node.save())
    wait_for("the repair counted", lambda: agent.metrics()["felix_drift_repairs_total"] >= 1)


def test_restart_keeps_the_rules_and_rewrites_nothing(node: Node) -> None:
    first = Agent(node, "restart-1")
    try:
        first.wait_ready()
        before = node.save_all()
        assert ":cali-FORWARD" in before
    finally:
        first.stop(9)  # killed: no chance to clean up (it never does anyway)
    assert node.save_all() == before  # the rules outlive the agent
    second = Agent(node, "restart-2")
    try:
        # sample the kernel while the new agent starts: never anything but the old rules
        deadline = time.monotonic() + WAIT
        while not second.ready():
            assert node.save_all() == before
            assert time.monotonic() < deadline, "the new agent never became ready"
        assert node.save_all() == before
        assert second.metrics()["felix_writes_total"] == 0
    finally:
        second.stop()


# ---- real packets ------------------------------------------------------------------------------

LISTEN = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"pong")
    c.close()
"""
CONNECT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 8080), timeout=1.5)
    print(c.recv(10).decode())
except OSError as e:
    print("failed", e)
"""


def plug(node: Node, pod_ns: str, iface: str, ip: str) -> None:
    """A Calico-style veth: /32 route to the pod on the host side; the pod's gateway
    169.254.1.1 resolves to the host side's MAC (a static entry: proxy ARP would need the node
    to have a route to that address)."""
    sh("ip", "-n", node.ns, "link", "add", iface, "type", "veth", "peer", "name", "eth0",
       "netns", pod_ns)
    sh("ip", "-n", node.ns, "link", "set", iface, "up")
    sh("ip", "-n", node.ns, "route", "add", f"{ip}/32", "dev", iface)
    sh("ip", "-n", pod_ns, "addr", "add", f"{ip}/32", "dev", "eth0")
    sh("ip", "-n", pod_ns, "link", "set", "eth0", "up")
    sh("ip", "-n", pod_ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", pod_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    mac = json.loads(sh("ip", "-n", node.ns, "-j", "link", "show", iface))[0]["address"]
    sh("ip", "-n", pod_ns, "neigh", "replace", "169.254.1.1", "lladdr", mac, "dev", "eth0")


def connects(client_ns: str, ip: str) -> bool:
    out = sh("ip", "netns", "exec", client_ns, sys.executable, "-c", CONNECT, ip)
    return out.strip() == "pong"


def test_real_packets_follow_policy(node: Node, agent: Agent) -> None:
    sh("ip", "netns", "exec", node.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    client_ns, server_ns = node.add_ns("pa"), node.add_ns("pb")
    plug(node, client_ns, "calic3c3c3c3c3c", "10.65.3.2")
    plug(node, server_ns, "calid4d4d4d4d4d", "10.65.3.3")
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", LISTEN],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout and server.stdout.readline().strip() == "ready"
        # no endpoints yet: traffic from an unknown cali interface is dropped
        assert not connects(client_ns, "10.65.3.3")
        node.store.apply(wep("client", "calic3c3c3c3c3c", "10.65.3.2"),
                         wep("server", "calid4d4d4d4d4d", "10.65.3.3"))
        wait_for("client -> server allowed", lambda: connects(client_ns, "10.65.3.3"),
                 interval=0.1)
        node.store.apply(knp("server-deny", "server"))
        wait_for("client -> server dropped", lambda: not connects(client_ns, "10.65.3.3"),
                 interval=0.1)
        node.store.delete(knp("server-deny", "server"))
        wait_for("client -> server allowed again", lambda: connects(client_ns, "10.65.3.3"),
                 interval=0.1)
    finally:
        server.kill()
        server.wait()


def test_an_unrenderable_policy_denies_its_endpoints(node: Node, agent: Agent) -> None:
    """A stored policy the agent cannot compile fails closed (its endpoints get DROP) and is
    logged by name; the rest of the dataplane keeps being programmed."""
    iface = "calie5e5e5e5e5e"
    node.store.apply(wep("odd", iface, "10.65.5.2"))
    wait_for("the endpoint's chain", lambda: node.chain(endpoint_chain(iface)))
    bad = {"kind": "GlobalNetworkPolicy", "apiVersion": "projectcalico.org/v3",
           "metadata": {"name": "broken"},
           "spec": {"selector": "app == 'odd'", "types": ["Ingress"],
                    "ingress": [{"action": "Allow", "source": {"selector": "this is not ("}}]}}
    # written around validation, as a newer writer or a corrupted key could
    key = "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/broken"
    _etcdctl(node, "put", key, json.dumps(bad))
    try:
        wait_for("the broken policy logged", lambda: "broken" in agent.log.read_text()
                 and "enforcing DROP" in agent.log.read_text())
        gnp_chain = policy_chain(POLICY_IN, PolicyId("GlobalNetworkPolicy", None,
                                                     "broken").chain_id)
        rules = wait_for("the broken policy's chain", lambda: node.chain(gnp_chain))
        assert any("DROP" in r for r in rules), rules
        assert not any("ACCEPT" in r for r in rules), rules
        assert agent.metrics()["felix_render_problems"] >= 1
    finally:
        _etcdctl(node, "del", key)


def _etcdctl(node: Node, *args: str) -> str:
    cmd = ["nsenter", f"--net=/run/netns/{node.ns}", "etcdctl",
           f"--endpoints={node.etcd.endpoint}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "ETCDCTL_API": "3"})
    assert done.returncode == 0, done.stderr
    return done.stdout

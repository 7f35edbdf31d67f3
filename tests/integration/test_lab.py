"""The lab end to end through `tabbyctl lab`: namespaces, etcd, tabby-node, pods via the real
`tabby` conflist, traffic between them, and cleanup (also after a crash).

Every lab here has its own name and state dir; traffic stays between lab namespaces (pod IPs
and the lab's 198.18.0.0/24 underlay exist nowhere else).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datastore.k8s.endpoints import veth_name
from lab import netns, procs
from lab.state import Lab
from tests.conftest import require_binary

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

TABBYCTL = str(Path(sys.prefix) / "bin" / "tabbyctl")
PY = "/usr/bin/python3"
RUN_TIMEOUT = 60

# one connection: prints "ready", answers "pong <data> from <peer ip>"
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
s.settimeout(30)
print("ready", flush=True)
c, peer = s.accept()
data = c.recv(100)
c.sendall(b"pong " + data + b" from " + peer[0].encode())
c.close()
"""
CONNECTOR = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b"ping")
c.shutdown(socket.SHUT_WR)
print(c.recv(200).decode())
"""


class LabCli:
    def __init__(self, name: str, state_dir: Path) -> None:
        self.name, self.state_dir = name, state_dir
        self.lab = Lab(name, state_dir)

    def opts(self) -> list[str]:
        return ["--name", self.name, "--state-dir", str(self.state_dir)]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([TABBYCTL, "lab", *args, *self.opts()], capture_output=True,
                              text=True, timeout=RUN_TIMEOUT)
        if check:
            assert done.returncode == 0, f"lab {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def exec(self, pod: str, *cmd: str) -> list[str]:
        return [TABBYCTL, "lab", "exec", *self.opts(), pod, "--", *cmd]

    def state(self) -> dict[str, Any]:
        state = self.lab.load()
        assert state is not None
        return state

    def status(self) -> dict[str, Any]:
        return json.loads(self.run("status", "-o", "json").stdout)


def leftovers(cli: LabCli) -> list[str]:
    return netns.names_with_prefix(cli.lab.prefix)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCli]:
    require_binary("nsenter")
    require_binary("/usr/lib/cni/portmap")  # the conflist chains Debian's portmap
    cli = LabCli(f"t{os.getpid()}", tmp_path_factory.mktemp("lab"))
    try:
        cli.run("up", "--nodes", "2")
        yield cli
    finally:
        cli.run("down", check=False)


def listen(argv_prefix: list[str], port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*argv_prefix, PY, "-I", "-c", LISTENER, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"listener did not start: {line}{proc.communicate()[1]}")
    return proc


def connect(cli: LabCli, pod: str, host: str, port: int) -> str:
    done = subprocess.run(cli.exec(pod, PY, "-I", "-c", CONNECTOR, host, str(port)),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def pod_ip(cli: LabCli, key: str) -> str:
    return cli.state()["pods"][key]["ips"][0].split("/")[0]


def test_up_builds_the_cluster(lab: LabCli) -> None:
    state = lab.state()
    assert set(state["nodes"]) == {"node1", "node2"}
    assert {lab.lab.ns(r) for r in ("underlay", "etcd", "node1", "node2")} <= set(leftovers(lab))
    for role in ("etcd", "node1", "node2"):
        assert procs.alive(state["processes"][role]), role
    # node eth0 on the underlay, default route inside the lab only
    route = netns.ip(state["nodes"]["node2"]["ns"], "route", "show", "default").stdout
    assert "via 198.18.0.1 dev eth0" in route
    addr = netns.ip(state["nodes"]["node2"]["ns"], "-br", "addr", "show", "eth0").stdout
    assert "198.18.0.12/24" in addr
    conflist = json.loads(next(Path(state["nodes"]["node1"]["net_dir"]).glob("*.conflist"))
                          .read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["tabby", "portmap"]


def test_pods_traffic_and_endpoints(lab: LabCli) -> None:
    lab.run("pod", "add", "shop/web", "--labels", "app=web,tier=front", "--port", "http:80/TCP")
    lab.run("pod", "add", "shop/db", "--node", "node1", "--labels", "app=db",
            "--port", "pg:5432")
    lab.run("pod", "add", "shop/api", "--labels", "app=api")  # the next node in turn
    pods = lab.state()["pods"]
    assert {k: p["node"] for k, p in pods.items()} == {
        "shop/web": "node1", "shop/db": "node1", "shop/api": "node2"}
    web, db = pod_ip(lab, "shop/web"), pod_ip(lab, "shop/db")
    assert web.startswith("10.244.") and db.startswith("10.244.") and web != db

    # same-node pod to pod: db listens, web connects; the source address is web's own
    server = listen(lab.exec("shop/db"), 5432)
    assert connect(lab, "shop/web", db, 5432) == f"pong ping from {web}"
    server.wait(10)

    # pod to its host: node1 listens on its underlay address
    node1 = lab.state()["nodes"]["node1"]
    server = listen(netns.nsenter(node1["ns"], []), 9000)
    assert connect(lab, "shop/web", node1["ip"], 9000) == f"pong ping from {web}"
    server.wait(10)

    # WorkloadEndpoints as Calico's CNI writes them, read straight from the lab's etcd
    got = subprocess.run(
        netns.nsenter(lab.state()["etcd"]["ns"], [
            "etcdctl", "--endpoints=http://198.18.0.2:2379", "get", "--prefix",
            "--print-value-only", "/calico/resources/v3/projectcalico.org/workloadendpoints/"]),
        capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
    values = [json.loads(line) for line in got.stdout.splitlines() if line.strip()]
    weps = {w["spec"]["pod"]: w for w in values}
    assert set(weps) == {"web", "db", "api"}, got
    w = weps["web"]
    assert w["metadata"]["name"] == "node1-k8s-web-eth0"
    assert w["metadata"]["labels"]["app"] == "web"
    assert w["metadata"]["labels"]["tier"] == "front"
    assert w["metadata"]["labels"]["projectcalico.org/namespace"] == "shop"
    assert w["spec"]["interfaceName"] == veth_name("shop", "web")
    assert w["spec"]["ipNetworks"] == [f"{web}/32"]
    assert {"name": "http", "port": 80, "protocol": "TCP"}.items() <= w["spec"]["ports"][0].items()
    assert weps["api"]["spec"]["node"] == "node2"

    # status lists nodes and pods with addresses and endpoints
    status = lab.status()
    rows = {p["pod"]: p for p in status["pods"]}
    assert rows["shop/web"]["wep"] == "node1-k8s-web-eth0"
    assert rows["shop/web"]["labels"]["app"] == "web"
    assert all(n["running"] for n in status["nodes"])
    text = lab.run("status").stdout
    assert "shop/api" in text and "node2" in text and pod_ip(lab, "shop/api") in text


def test_pod_del_cleans_up(lab: LabCli) -> None:
    state = lab.state()
    pod = state["pods"]["shop/db"]
    node_ns = state["nodes"]["node1"]["ns"]
    host_if = veth_name("shop", "db")
    assert netns.ip(node_ns, "link", "show", host_if, check=False).returncode == 0
    lab.run("pod", "del", "shop/db")
    assert netns.ip(node_ns, "link", "show", host_if, check=False).returncode != 0
    assert pod_ip_route_gone(node_ns, pod["ips"][0].split("/")[0])
    assert not netns.exists(pod["netns"])
    assert "shop/db" not in lab.state()["pods"]
    assert "db" not in {p["pod"].split("/")[1] for p in lab.status()["pods"]}
    # the other pods still work after a neighbour left
    web = pod_ip(lab, "shop/web")
    server = listen(lab.exec("shop/web"), 8080)
    assert connect(lab, "shop/web", web, 8080) == f"pong ping from {web}"
    server.wait(10)


def pod_ip_route_gone(node_ns: str, ip: str) -> bool:
    return ip not in netns.ip(node_ns, "route", "show").stdout


def test_down_removes_everything(lab: LabCli) -> None:
    state = lab.state()
    records = list(state["processes"].values())
    lab.run("down")
    assert leftovers(lab) == []
    assert not any(procs.alive(r) for r in records)
    assert not lab.lab.dir.exists()
    assert "nothing to remove" in lab.run("down").stdout  # idempotent


def test_down_after_a_crash(tmp_path: Path) -> None:
    cli = LabCli(f"c{os.getpid()}", tmp_path)
    try:
        cli.run("up", "--nodes", "1")
        cli.run("pod", "add", "default/p1")
        state = cli.state()
        # the crash: node daemons killed, the lock gone, a pod namespace never recorded,
        # a process left running inside a pod
        for name in state["nodes"]:
            os.kill(state["processes"][name]["pid"], signal.SIGKILL)
        cli.lab.lock_path.unlink()
        netns.add(cli.lab.ns("pod-default-half-made"))
        stray = listen(cli.exec("default/p1"), 7000)
        records = list(state["processes"].values())

        out = cli.run("down").stdout
        assert leftovers(cli) == [], out
        assert not any(procs.alive(r) for r in records)
        assert stray.wait(10) is not None
        assert not cli.lab.dir.exists()
    finally:
        cli.run("down", check=False)


def test_down_without_state_finds_namespaces_by_name(tmp_path: Path) -> None:
    cli = LabCli(f"s{os.getpid()}", tmp_path)
    try:
        for role in ("underlay", "node1", "pod-default-x"):
            netns.add(cli.lab.ns(role))
        sleeper = subprocess.Popen(netns.nsenter(cli.lab.ns("node1"), ["sleep", "60"]))
        cli.run("down")
        assert leftovers(cli) == []
        assert sleeper.wait(10) is not None
    finally:
        cli.run("down", check=False)

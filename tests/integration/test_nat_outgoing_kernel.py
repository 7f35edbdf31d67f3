"""natOutgoing and the denied-packet counters with real packets.

SAFETY: three namespaces made here: "node" (the reconcilers run there through
`Runner.in_netns`), "pod" (10.244.1.5/32 behind the node's `cali0pod` veth, Calico-style
169.254.1.1 gateway) and "outside" (behind the node's uplink `up0`, also holding 10.244.9.9, an
address inside the pool). The outside listener answers each connection with the source address
it saw. The root namespace is never touched; every namespace is deleted in `finally`.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from datastore.snapshot import Snapshot
from felix.calc import PolicyIndex
from felix.counters import DeniedCounters, DenyKey
from felix.dataplane.apply import DataplaneState, apply_dataplane
from felix.dataplane.runner import Runner
from felix.render import render_with_report
from felix.render_config import RenderConfig, pools_from_resources
from tests.conftest import require_binary
from tests.netns_tools import sh

pytestmark = pytest.mark.netns

API = "projectcalico.org/v3"
POD_IP, GATEWAY = "10.244.1.5", "169.254.1.1"
NODE_UPLINK, OUTSIDE_IP, OUTSIDE_POOL_IP = "10.88.0.1", "10.88.0.2", "10.244.9.9"
POD_IFACE, PORT = "cali0pod", 8080

ECHO_PEER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
print("ready", flush=True)
while True:
    conn, peer = s.accept()
    conn.sendall(peer[0].encode()); conn.close()
"""
CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(100).decode()); c.close()
except OSError:
    sys.exit(1)
"""

OPEN = {"kind": "Profile", "apiVersion": API, "metadata": {"name": "open"},
        "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}}
POD = {"kind": "WorkloadEndpoint", "apiVersion": API,
       "metadata": {"name": "node-k8s-pod-eth0", "namespace": "dev", "labels": {"app": "pod"}},
       "spec": {"node": "node", "pod": "pod", "interfaceName": POD_IFACE,
                "ipNetworks": [f"{POD_IP}/32"], "profiles": ["open"]}}


def pool(nat: bool) -> dict[str, Any]:
    return {"kind": "IPPool", "apiVersion": API, "metadata": {"name": "default"},
            "spec": {"cidr": "10.244.0.0/16", "natOutgoing": nat}}


@dataclass
class Lab:
    node: str
    pod: str
    outside: str
    state: DataplaneState

    def seen_as(self, dest: str, timeout: float = 1.0) -> str | None:
        """The source address the outside listener saw for a connection from the pod."""
        argv = ["ip", "netns", "exec", self.pod, sys.executable, "-c", CLIENT, dest, str(PORT),
                str(timeout)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def program(self, *objs: dict[str, Any]) -> None:
        snap = Snapshot()
        for obj in objs:
            snap.add(obj)
        pools = pools_from_resources(o for o in objs if o["kind"] == "IPPool")
        result = render_with_report(PolicyIndex(snap), "node",
                                    RenderConfig(ip_versions=(4,), pools=pools))
        assert not result.problems, result.problems
        apply_dataplane(result.dataplane, self.state, sweep=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    for tool in ("ip", "ipset", "iptables-restore", "nsenter"):
        require_binary(tool)
    tag = secrets.token_hex(3)
    node, pod, outside = (f"tabby-nat-{tag}-{n}" for n in ("node", "pod", "out"))
    made: list[str] = []
    server = None
    try:
        for name in (node, pod, outside):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        # the pod, Calico-style: a /32 and a link-local gateway the node answers for
        sh("ip", "-n", node, "link", "add", POD_IFACE, "type", "veth", "peer", "name", "eth0",
           "netns", pod)
        sh("ip", "-n", node, "addr", "add", f"{GATEWAY}/32", "dev", POD_IFACE)
        sh("ip", "-n", pod, "addr", "add", f"{POD_IP}/32", "dev", "eth0")
        sh("ip", "-n", node, "link", "set", POD_IFACE, "up")
        sh("ip", "-n", pod, "link", "set", "eth0", "up")
        sh("ip", "-n", pod, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
        sh("ip", "-n", pod, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        sh("ip", "-n", node, "route", "add", f"{POD_IP}/32", "dev", POD_IFACE, "scope", "link")
        # the uplink to the outside, which routes the pool back through the node
        sh("ip", "-n", node, "link", "add", "up0", "type", "veth", "peer", "name", "eth0",
           "netns", outside)
        sh("ip", "-n", node, "addr", "add", f"{NODE_UPLINK}/24", "dev", "up0")
        sh("ip", "-n", outside, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        sh("ip", "-n", outside, "addr", "add", f"{OUTSIDE_POOL_IP}/32", "dev", "eth0")
        sh("ip", "-n", node, "link", "set", "up0", "up")
        sh("ip", "-n", outside, "link", "set", "eth0", "up")
        sh("ip", "-n", outside, "route", "add", "10.244.1.0/24", "via", NODE_UPLINK)
        sh("ip", "-n", node, "route", "add", f"{OUTSIDE_POOL_IP}/32", "via", OUTSIDE_IP)
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        server = subprocess.Popen(["ip", "netns", "exec", outside, sys.executable, "-c",
                                   ECHO_PEER, str(PORT)], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        lab = Lab(node, pod, outside, DataplaneState(Runner.in_netns(node), families=(4,)))
        # no rules yet: plain routing, the pod's own address (the first SYN may wait for ARP)
        assert any(lab.seen_as(OUTSIDE_IP) == POD_IP for _ in range(5)), "no connectivity"
        yield lab
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def test_nat_outgoing_masquerades_only_traffic_leaving_the_pools(lab: Lab) -> None:
    lab.program(POD, OPEN, pool(nat=True))
    assert lab.seen_as(OUTSIDE_IP) == NODE_UPLINK  # MASQUERADE to the uplink's address
    assert lab.seen_as(OUTSIDE_POOL_IP) == POD_IP  # pool to pool: never masqueraded
    lab.program(POD, OPEN, pool(nat=False))
    assert lab.seen_as(OUTSIDE_IP) == POD_IP
    assert lab.seen_as(OUTSIDE_POOL_IP) == POD_IP
    lab.program(POD, OPEN, pool(nat=True))
    assert lab.seen_as(OUTSIDE_IP) == NODE_UPLINK


def test_denied_packets_are_counted_per_policy(lab: Lab) -> None:
    deny = {"kind": "NetworkPolicy", "apiVersion": API,
            "metadata": {"name": "no-8080", "namespace": "dev"},
            "spec": {"selector": "app == 'pod'", "types": ["Egress"],
                     "egress": [{"action": "Deny", "protocol": "TCP",
                                 "destination": {"ports": [PORT]}},
                                {"action": "Allow"}]}}
    lab.program(POD, OPEN, pool(nat=True), deny)
    counters = DeniedCounters(lab.state, ttl=0)
    key = DenyKey("default", "dev", "no-8080", "egress", "rule")
    assert counters.totals()[key] == (0, 0)
    assert lab.seen_as(OUTSIDE_IP, timeout=0.5) is None
    packets, nbytes = counters.totals()[key]
    assert packets >= 1 and nbytes >= 40  # the SYN (and its retries)
    text = counters.metrics_text()
    assert ('felix_denied_packets_total{tier="default",namespace="dev",policy="no-8080",'
            'direction="egress",kind="rule"}') in text

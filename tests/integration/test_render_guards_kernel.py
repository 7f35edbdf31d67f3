"""Guarded policy jumps and their group chains with real packets: the kernel's verdicts equal
the simulator's, port by port, for Allow, Deny, Log and Pass policies grouped behind guards.

SAFETY: three namespaces made by the `make_ns` fixture ("node", and a server and a client pod
joined to it by veths, plumbed as Calico plumbs pods); the reconcilers run through
`Runner.in_netns(node)` and the probes through `ip netns exec`. The root namespace is never
touched; every namespace is deleted afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from felix.calc import PolicyIndex
from felix.dataplane.apply import DataplaneState, apply_dataplane
from felix.dataplane.runner import Runner
from felix.render import render_with_report
from felix.render_config import RenderConfig
from felix.simulate import Flow, simulate
from tests.conftest import require_binary
from tests.netns_tools import TCP_CLIENT as CLIENT
from tests.netns_tools import TCP_SERVER as SERVER
from tests.netns_tools import sh
from tests.unit.test_calc import namespaces, np, pod, snapshot

pytestmark = pytest.mark.netns

NODE = "node"
SERVER_IP, CLIENT_IP = "10.65.0.2", "10.65.0.3"
FILLERS = 20  # policies on nearby ports: enough for nested groups
PORTS = (80, 81, 7005, 8000, 8001, 8002, 9000)

def plumb(node: str, pod_ns: str, iface: str, ip: str) -> None:
    """A pod as Calico plumbs it: /32 on eth0, default via 169.254.1.1 (proxy ARP on the
    host side), a /32 route to it on the node."""
    sh("ip", "-n", node, "link", "add", iface, "type", "veth", "peer", "name", "eth0",
       "netns", pod_ns)
    sh("ip", "-n", pod_ns, "addr", "add", f"{ip}/32", "dev", "eth0")
    sh("ip", "-n", pod_ns, "link", "set", "eth0", "up")
    sh("ip", "-n", pod_ns, "route", "add", "169.254.1.1", "dev", "eth0")
    sh("ip", "-n", pod_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    sh("ip", "-n", node, "link", "set", iface, "up")
    sh("ip", "netns", "exec", node, "sysctl", "-qw", f"net.ipv4.conf.{iface}.proxy_arp=1",
       f"net.ipv4.neigh.{iface}.proxy_delay=0")
    sh("ip", "-n", node, "route", "add", ip, "dev", iface)


@pytest.fixture
def pods(make_ns: Callable[[], str]) -> Iterator[tuple[str, str, str]]:
    for tool in ("ipset", "iptables-restore"):
        require_binary(tool)
    node, server_ns, client_ns = make_ns(), make_ns(), make_ns()
    sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    # proxy ARP answers only for addresses routed elsewhere: give the node an uplink
    sh("ip", "-n", node, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    sh("ip", "-n", node, "addr", "add", "198.18.0.1/24", "dev", "up0")
    for dev in ("up0", "up1"):
        sh("ip", "-n", node, "link", "set", dev, "up")
    sh("ip", "-n", node, "route", "add", "default", "dev", "up0")
    plumb(node, server_ns, "caliserver", SERVER_IP)
    plumb(node, client_ns, "caliclient", CLIENT_IP)
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", SERVER,
                               *map(str, PORTS)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield node, server_ns, client_ns
    finally:
        server.kill()
        server.wait()


def connects(client_ns: str, port: int, timeout: float = 0.5) -> bool:
    argv = ["ip", "netns", "exec", client_ns, sys.executable, "-c", CLIENT, SERVER_IP,
            str(port), str(timeout)]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def to_server(name: str, order: int, action: str, port: int, **source: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": action, "protocol": "TCP",
                            "destination": {"ports": [port]}}
    if source:
        rule["source"] = source
    return np("dev", name, selector="app == 'server'", order=order, types=["Ingress"],
              ingress=[rule])


def world() -> list[dict[str, Any]]:
    policies = [to_server(f"fill{i}", 10 + i, "Allow", 7000 + i, selector="app == 'nobody'")
                for i in range(FILLERS)]
    policies += [
        to_server("log-8000", 100, "Log", 8000),  # logs, then the end of the tier drops
        to_server("deny-8001", 101, "Deny", 8001),
        to_server("pass-8002", 102, "Pass", 8002),  # leaves the tier: the profile allows
        to_server("web", 103, "Allow", 80, selector="app == 'client'"),
        to_server("other", 104, "Allow", 9000),
    ]
    return [*namespaces("dev"),
            pod("dev", "server", SERVER_IP, {"app": "server"}, node=NODE),
            pod("dev", "client", CLIENT_IP, {"app": "client"}, node=NODE), *policies]


def test_guarded_and_grouped_jumps_give_the_simulators_verdicts(
        pods: tuple[str, str, str]) -> None:
    node, _, client_ns = pods
    index = PolicyIndex(snapshot(world()))
    result = render_with_report(index, NODE, RenderConfig(ip_versions=(4,)))
    assert not result.problems
    chains = result.dataplane.tables[(4, "filter")].chains
    assert sum(name.startswith("cali-gi-") for name in chains) >= 2  # groups, nested
    apply_dataplane(result.dataplane, DataplaneState(Runner.in_netns(node), families=(4,)),
                    sweep=True)
    assert any(connects(client_ns, 80, 1.0) for _ in range(5)), "no path to the server"
    want = {port: simulate(index, Flow("dev/client", "dev/server", "TCP", port)).allowed
            for port in PORTS}
    assert want == {80: True, 81: False, 7005: False, 8000: False, 8001: False, 8002: True,
                    9000: True}
    assert {port: connects(client_ns, port) for port in PORTS} == want

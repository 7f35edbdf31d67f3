"""Host endpoint policy with real packets: the rendering, applied to a "node" namespace.

SAFETY: two namespaces made here ("node" with eth0 carrying the host endpoint, "client" as the
outside peer), joined by a veth; the reconcilers run through `Runner.in_netns(node)` and the
probes through `ip netns exec`. The root namespace is never touched; both namespaces are deleted
in `finally`.
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
from felix.dataplane.apply import DataplaneState, apply_dataplane
from felix.dataplane.runner import Runner
from felix.render import render_with_report
from felix.render_config import RenderConfig
from tests.conftest import require_binary
from tests.netns_tools import TCP_CLIENT as CLIENT
from tests.netns_tools import TCP_SERVER as SERVER
from tests.netns_tools import sh

pytestmark = pytest.mark.netns

API = "projectcalico.org/v3"
NODE_IP, CLIENT_IP = "10.77.0.1", "10.77.0.2"
PORTS = (22, 8080)  # 22 is a default failsafe port; 8080 is not

@dataclass
class Lab:
    node: str
    client: str
    state: DataplaneState

    def connects(self, port: int, timeout: float = 1.0) -> bool:
        argv = ["ip", "netns", "exec", self.client, sys.executable, "-c", CLIENT, NODE_IP,
                str(port), str(timeout)]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0

    def notracked(self) -> int:
        """Packets the raw table's host endpoint chains sent past conntrack."""
        out = subprocess.run(["ip", "netns", "exec", self.node, "iptables-save", "-c", "-t",
                              "raw"], check=True, capture_output=True, text=True, timeout=30)
        counts = [int(line[1:].split(":")[0]) for line in out.stdout.splitlines()
                  if line.startswith("[") and "-A cali-" in line
                  and ("NOTRACK" in line or "--notrack" in line)]
        assert len(counts) == 2, out.stdout
        return min(counts)

    def blocked(self, port: int) -> bool:
        return not self.connects(port, timeout=0.5)

    def program(self, *objs: dict[str, Any], **config: Any) -> None:
        snap = Snapshot()
        for obj in objs:
            snap.add(obj)
        result = render_with_report(PolicyIndex(snap), "node",
                                    RenderConfig(ip_versions=(4,), **config))
        assert not result.problems, result.problems
        apply_dataplane(result.dataplane, self.state, sweep=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    for tool in ("ip", "ipset", "iptables-restore"):
        require_binary(tool)
    tag = secrets.token_hex(3)
    node, client = f"tabby-hep-{tag}-node", f"tabby-hep-{tag}-client"
    made: list[str] = []
    server = None
    try:
        for name in (node, client):
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", "c0",
           "netns", client)
        for ns, dev, addr in ((node, "eth0", NODE_IP), (client, "c0", CLIENT_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        server = subprocess.Popen(["ip", "netns", "exec", node, sys.executable, "-c", SERVER,
                                   *map(str, PORTS)], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        lab = Lab(node, client, DataplaneState(Runner.in_netns(node), families=(4,)))
        # a fresh veth may drop the first SYN while ARP settles
        assert any(lab.connects(8080) for _ in range(5)), "no connectivity before any rules"
        yield lab
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def hep(**spec: Any) -> dict[str, Any]:
    return {"kind": "HostEndpoint", "apiVersion": API,
            "metadata": {"name": "node-eth0", "labels": {"role": "node"}},
            "spec": {"node": "node", **spec}}


def gnp(name: str, **spec: Any) -> dict[str, Any]:
    return {"kind": "GlobalNetworkPolicy", "apiVersion": API, "metadata": {"name": name},
            "spec": {"selector": "role == 'node'", **spec}}


def tcp(action: str, port: int, side: str = "destination") -> dict[str, Any]:
    return {"action": action, "protocol": "TCP", side: {"ports": [port]}}


ETH0 = hep(interfaceName="eth0")
ALLOW_8080 = gnp("allow-8080", ingress=[tcp("Allow", 8080)])


@pytest.mark.parametrize("how", ["interfaceName", "expectedIPs", "wildcard"])
def test_default_deny_keeps_failsafe_open_and_policy_opens(lab: Lab, how: str) -> None:
    endpoint, config = {
        "interfaceName": (ETH0, {}),
        "expectedIPs": (hep(expectedIPs=[NODE_IP]),
                        {"host_interfaces": {"eth0": [f"{NODE_IP}/24"]}}),
        "wildcard": (hep(interfaceName="*"), {}),
    }[how]
    lab.program(endpoint, **config)
    assert lab.blocked(8080)
    assert lab.connects(22)  # failsafe, with the reply leaving through the same endpoint
    lab.program(endpoint, ALLOW_8080, **config)
    assert lab.connects(8080)


def test_failsafe_ports_follow_config(lab: Lab) -> None:
    lab.program(ETH0, failsafe_inbound=(("tcp", 8080),))
    assert lab.connects(8080)
    assert lab.blocked(22)


def test_do_not_track_allow(lab: Lab) -> None:
    untracked = gnp("untracked", doNotTrack=True, applyOnForward=True,
                    types=["Ingress", "Egress"], ingress=[tcp("Allow", 8080)],
                    egress=[tcp("Allow", 8080, side="source")])
    lab.program(ETH0)
    assert lab.blocked(8080)
    lab.program(ETH0, untracked)  # no normal policy: only the raw table can let 8080 in
    assert lab.connects(8080)
    assert lab.connects(22)
    assert lab.notracked() > 0  # both ways: the SYN and the SYN-ACK skipped conntrack


def test_pre_dnat_deny_blocks_before_normal_policy(lab: Lab) -> None:
    lab.program(ETH0, ALLOW_8080)
    assert lab.connects(8080)
    deny = gnp("pre-deny", preDNAT=True, applyOnForward=True, ingress=[tcp("Deny", 8080)])
    lab.program(ETH0, ALLOW_8080, deny)
    assert lab.blocked(8080)
    assert lab.connects(22)  # preDNAT chains keep the failsafes too
    lab.program(ETH0, ALLOW_8080)
    assert lab.connects(8080)


# --- a local pod behind the node -----------------------------------------------------------

POD_IP, POD_GW = "10.78.0.2", "10.78.0.1"
POD_IFACE = "cali0pod"
OPEN = {"kind": "Profile", "apiVersion": API, "metadata": {"name": "open"},
        "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}}
POD = {"kind": "WorkloadEndpoint", "apiVersion": API,
       "metadata": {"name": "node-k8s-pod-eth0", "namespace": "x", "labels": {"app": "pod"}},
       "spec": {"node": "node", "pod": "pod", "interfaceName": POD_IFACE,
                "ipNetworks": [f"{POD_IP}/32"], "profiles": ["open"]}}


@pytest.fixture
def pod(lab: Lab) -> Iterator[str]:
    """A pod namespace on the node (veth cali0pod), serving 8080, routed from the client."""
    name = lab.node.replace("-node", "-pod")
    sh("ip", "netns", "add", name)
    server = None
    try:
        sh("ip", "-n", lab.node, "link", "add", POD_IFACE, "type", "veth", "peer", "name",
           "eth0", "netns", name)
        sh("ip", "-n", lab.node, "addr", "add", f"{POD_GW}/24", "dev", POD_IFACE)
        sh("ip", "-n", name, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        for ns, dev in ((lab.node, POD_IFACE), (name, "eth0"), (name, "lo")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", name, "route", "add", "default", "via", POD_GW)
        sh("ip", "-n", lab.client, "route", "add", "10.78.0.0/24", "via", NODE_IP)
        sh("ip", "netns", "exec", lab.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        server = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", SERVER,
                                   "8080"], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield name
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def probe(ns: str, addr: str, port: int, timeout: float = 1.0) -> bool:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, addr, str(port),
            str(timeout)]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def test_host_to_local_pod_and_forwarded_traffic(lab: Lab, pod: str) -> None:
    deny_out = gnp("deny-out", types=["Egress"], egress=[{"action": "Deny"}])
    everything = hep(interfaceName="*")
    lab.program(everything, deny_out, POD, OPEN)
    assert lab.blocked(8080)  # the all-interfaces endpoint is default-deny
    # host -> local pod is never policed, whatever the host endpoint's egress policy says
    assert any(probe(lab.node, POD_IP, 8080) for _ in range(3))
    # forwarded traffic is allowed while no applyOnForward policy applies...
    assert any(probe(lab.client, POD_IP, 8080) for _ in range(3))
    # ...and governed by the first one that does
    forward_deny = gnp("fwd-deny", applyOnForward=True, ingress=[tcp("Deny", 8080)])
    lab.program(everything, deny_out, forward_deny, POD, OPEN)
    assert not probe(lab.client, POD_IP, 8080, timeout=0.5)
    assert probe(lab.node, POD_IP, 8080)

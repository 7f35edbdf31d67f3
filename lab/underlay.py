"""Routing on the lab's underlay for pods on several nodes, and external hosts.

The nodes route to each other's pods themselves (their routing agents: BGP or VXLAN), but the
underlay namespace (the lab's gateway, through which externals reach pods) does not peer: for
`lab run`, `route_pod` gives it the /32 route a ToR router would learn (`ip route replace
POD/32 via NODE`), and `enable_forwarding` turns on IPv4 forwarding in the underlay and the
nodes (the routing agent does the same on each node). An external is a namespace
`tabby-lab-<lab>-ext-<k>` on the underlay bridge with its fixed address (a /32 on eth0, default
route via the underlay's gateway on-link); the underlay routes that /32 onto the bridge.
Everything here happens inside lab namespaces, and each namespace is recorded in the lab's state
before it is created.
"""

from __future__ import annotations

import subprocess

from lab import LabError, netns, procs
from lab.state import Lab, State


def _sysctl(ns: str, setting: str) -> None:
    done = subprocess.run(netns.nsenter(ns, ["sysctl", "-qw", setting]), capture_output=True,
                          text=True, timeout=netns.IP_TIMEOUT)
    if done.returncode != 0:
        raise LabError(f"sysctl {setting} in {ns} failed: {done.stderr.strip()}")


def enable_forwarding(state: State) -> None:
    for ns in [state["underlay"]["ns"], *(n["ns"] for n in state["nodes"].values())]:
        _sysctl(ns, "net.ipv4.ip_forward=1")
    _sysctl(state["underlay"]["ns"], "net.ipv4.conf.all.send_redirects=0")


def route_pod(state: State, ip: str, node: str) -> None:
    netns.ip(state["underlay"]["ns"], "route", "replace", f"{ip}/32", "via",
             state["nodes"][node]["ip"])


def unroute_pod(state: State, ip: str) -> None:
    netns.ip(state["underlay"]["ns"], "route", "del", f"{ip}/32", check=False)


def pin_bridge_mac(ns: str, bridge: str) -> None:
    """A bridge without an address set takes the lowest MAC of its ports: adding or removing an
    external's port would change the gateway's MAC under the nodes' neighbour caches (their
    traffic to the gateway then goes nowhere until the entries expire). Setting it fixes it."""
    out = netns.ip(ns, "-o", "link", "show", bridge).stdout.split()
    mac = out[out.index("link/ether") + 1]
    netns.ip(ns, "link", "set", bridge, "address", mac)


def external_ns(lab: Lab, index: int) -> str:
    return lab.ns(f"ext{index}")


def attach_external(lab: Lab, index: int, ip: str) -> str:
    """Namespace `ext<index>` holding `ip`, reachable through the underlay; returns its name."""
    name = external_ns(lab, index)
    with lab.locked():
        state = lab.require()
        if name not in state["namespaces"]:
            state["namespaces"].append(name)
            lab.save(state)
    netns.add(name)
    underlay, bridge = state["underlay"]["ns"], state["underlay"]["bridge"]
    gateway, port = state["underlay"]["gateway"], f"u-ext{index}"
    pin_bridge_mac(underlay, bridge)
    netns.ip(underlay, "link", "del", port, check=False)
    netns.ip(name, "link", "del", "eth0", check=False)
    netns.ip(underlay, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", netns.path(name))
    netns.ip(underlay, "link", "set", port, "master", bridge, "up")
    netns.ip(name, "addr", "add", f"{ip}/32", "dev", "eth0")
    netns.ip(name, "link", "set", "eth0", "up")
    netns.ip(name, "route", "replace", gateway, "dev", "eth0", "scope", "link")
    netns.ip(name, "route", "replace", "default", "via", gateway, "dev", "eth0", "onlink")
    netns.ip(underlay, "route", "replace", f"{ip}/32", "dev", bridge)
    # an earlier external with this address left its MAC in the neighbour table
    netns.ip(underlay, "neigh", "flush", "to", f"{ip}/32", check=False)
    return name


def detach_external(lab: Lab, index: int, ip: str) -> None:
    name = external_ns(lab, index)
    state = lab.load()
    if state is not None and state.get("underlay"):
        netns.ip(state["underlay"]["ns"], "route", "del", f"{ip}/32", check=False)
        netns.ip(state["underlay"]["ns"], "link", "del", f"u-ext{index}", check=False)
        netns.ip(state["underlay"]["ns"], "neigh", "flush", "to", f"{ip}/32", check=False)
    for pid in netns.pids_in(name):
        procs.kill_pid(pid)
    netns.delete(name)
    with lab.locked():
        state = lab.load()
        if state is not None and name in state["namespaces"]:
            state["namespaces"].remove(name)
            lab.save(state)

"""The node's own interfaces and addresses, for host endpoints known only by expectedIPs (I/O).

The renderer is pure and takes them as input (`RenderConfig.host_interfaces`); the agent reads
them on every sync, so an address added to an interface is picked up by the next sync.
"""

from __future__ import annotations

import json
import logging

from felix.dataplane.runner import CommandError, Runner

log = logging.getLogger("tabby.felix")


def parse_ip_addr_json(text: str, pod_prefix: str = "cali") -> dict[str, list[str]]:
    """`ip -j addr show` -> {interface: [addresses]}, without pod veths (pure)."""
    out: dict[str, list[str]] = {}
    for link in json.loads(text or "[]"):
        name = link.get("ifname", "")
        if not name or name.startswith(pod_prefix):
            continue
        out[name] = [a["local"] for a in link.get("addr_info", []) if a.get("local")]
    return out


def read_host_interfaces(runner: Runner, pod_prefix: str = "cali") -> dict[str, list[str]]:
    """The interfaces of the namespace the runner works in; empty (and logged) on failure."""
    try:
        done = runner.run(["ip", "-j", "addr", "show"])
    except (CommandError, OSError) as e:
        log.warning("cannot list the host's interfaces (host endpoints by expectedIPs wait): %s", e)
        return {}
    return parse_ip_addr_json(done.stdout, pod_prefix)

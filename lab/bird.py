"""`lab up --bird`: a BIRD 2 router on the underlay, the nodes' route reflector.

BIRD runs in namespace `tabby-lab-<lab>-bird` at 198.18.0.3 (`bird -f -c CONF -s SOCK`), with
one iBGP session per node (`rr client`), its kernel protocol exporting what it learns into its
own namespace's FIB, and a static route it originates itself (EXTERNAL_PREFIX, standing for a
data-center network behind the router). The store gets what a Calico operator writes for this
topology: BGPConfiguration `default` with the node-to-node mesh off and a global BGPPeer to the
router. `birdc` answers on the socket in the lab directory.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab import LabError, netns
from lab.state import Lab, State

BIRD_IP = "198.18.0.3"
ASN = 64512
EXTERNAL_PREFIX = "203.0.113.0/24"  # TEST-NET-3: exists only inside the lab


def render_config(router_ip: str, node_ips: Sequence[str], log_file: str) -> str:
    sessions = "\n".join(
        f"protocol bgp node_{ip.replace('.', '_')} from tabby_nodes {{\n"
        f"    neighbor {ip} as {ASN};\n}}\n" for ip in node_ips)
    return f"""router id {router_ip};
log "{log_file}" all;

protocol device {{
}}

protocol kernel {{
    ipv4 {{
        export where source = RTS_BGP;
    }};
}}

protocol static tabby_external {{
    ipv4;
    route {EXTERNAL_PREFIX} blackhole;
}}

filter tabby_export {{
    if proto = "tabby_external" then bgp_next_hop = {router_ip};
    accept;
}}

template bgp tabby_nodes {{
    local {router_ip} as {ASN};
    direct;
    rr client;
    rr cluster id {router_ip};
    hold time 30;
    connect retry time 1;
    error wait time 1, 5;
    ipv4 {{
        import all;
        export filter tabby_export;
    }};
}}

{sessions}"""


def peering_objects() -> list[dict[str, Any]]:
    return [
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration",
         "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": False, "asNumber": ASN}},
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer",
         "metadata": {"name": "lab-bird-rr"},
         "spec": {"peerIP": BIRD_IP, "asNumber": ASN}},
    ]


def socket_path(state: State) -> str:
    return state["bird_router"]["socket"]


def start(lab: Lab, state: State, node_ips: Sequence[str],
          record_ns: Callable[[Lab, State, str], str],
          start_process: Callable[[Lab, State, str, str, list[str], Path], None]) -> None:
    ns = record_ns(lab, state, lab.ns("bird"))
    underlay = state["underlay"]
    netns.plug(underlay["ns"], underlay["bridge"], "u-bird", ns, f"{BIRD_IP}/24",
               underlay["gateway"])
    d = lab.dir / "bird"
    d.mkdir(parents=True, exist_ok=True)
    conf, sock = d / "bird.conf", d / "bird.ctl"
    conf.write_text(render_config(BIRD_IP, node_ips, str(d / "bird.log")))
    state["bird_router"] = {"ns": ns, "ip": BIRD_IP, "socket": str(sock), "config": str(conf),
                            "external": EXTERNAL_PREFIX}
    lab.save(state)
    start_process(lab, state, "bird", ns, ["bird", "-f", "-c", str(conf), "-s", str(sock),
                                           "-P", str(d / "bird.pid")], d / "bird.out")


def birdc(state: State, *args: str) -> str:
    """Run `birdc` against the lab's BIRD (the control socket is a file: no namespace needed)."""
    done = subprocess.run(["birdc", "-s", socket_path(state), *args], capture_output=True,
                          text=True, timeout=10)
    if done.returncode != 0:
        raise LabError(f"birdc {' '.join(args)}: {(done.stderr or done.stdout).strip()}")
    return done.stdout

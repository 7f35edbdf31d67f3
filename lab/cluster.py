"""`lab up`, `lab status`, `lab down`: the cluster's namespaces, etcd and nodes.

Layout (all inside namespaces named `tabby-lab-<lab>-...`, nothing in the root namespace):

    underlay   bridge br0 198.18.0.1/24 (the lab's gateway; ports u-etcd, u-node1, ...)
    etcd       eth0 198.18.0.2/24, etcd on 198.18.0.2:2379 (and 127.0.0.1:2379 there)
    bird       (`--bird`) eth0 198.18.0.3/24, BIRD 2: the nodes' route reflector
    node<k>    eth0 198.18.0.<10+k>/24, default via 198.18.0.1, tabby-node, CNI files under
               <lab dir>/nodes/node<k>/{bin,net.d,etc,run,log,spool,cni-cache}

Routing between nodes is Tabby's own: with `encap none` every node's routing agent runs exabgp
in a full mesh (or, with `--bird`, peers only with the BIRD route reflector) and programs the
other nodes' blocks `via` their underlay address; with `encap vxlan` the pool is VXLAN Always
and the agents program `vxlan.calico` from the store (no BGP; pods get MTU 1450).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab import LabError, netns, procs, tools
from lab.state import Lab, State

UNDERLAY = ipaddress.ip_network("198.18.0.0/24")
GATEWAY = "198.18.0.1"
ETCD_IP = "198.18.0.2"
NODE_BASE = 10  # node k is at 198.18.0.(10 + k)
BRIDGE = "br0"
DEFAULT_POOL = "10.244.0.0/16"
MAX_NODES = 50
ENCAPS = ("none", "vxlan")
HEALTH_PORT = 9099
READY_TIMEOUT = 30.0

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def node_ip(k: int) -> str:
    return str(UNDERLAY.network_address + NODE_BASE + k)


def etcd_endpoint(state: State) -> str:
    return state["etcd"]["endpoint"]


def store(state: State, ops: list[dict[str, Any]]) -> list[Any]:
    return tools.store(state["etcd"]["ns"], etcd_endpoint(state), ops)


def _record_ns(lab: Lab, state: State, name: str) -> str:
    """Write the namespace into the state before creating it: a crash cannot orphan it."""
    if name not in state["namespaces"]:
        state["namespaces"].append(name)
        lab.save(state)
    netns.add(name)
    return name


def up(lab: Lab, nodes: int, pool: str = DEFAULT_POOL, say: Say = _quiet, *,
       encap: str = "none", bird: bool = False) -> State:
    if not 1 <= nodes <= MAX_NODES:
        raise LabError(f"--nodes must be 1..{MAX_NODES}")
    if encap not in ENCAPS:
        raise LabError(f"--encap must be one of {', '.join(ENCAPS)}")
    if bird and encap != "none":
        raise LabError("--bird peers the nodes over BGP: use it with --encap none")
    if bird and not shutil.which("bird"):
        raise LabError("--bird needs BIRD 2 (Debian package bird2; ./install.sh installs it)")
    with lab.locked():
        leftovers = netns.names_with_prefix(lab.prefix)
        if lab.load() is not None or leftovers:
            raise LabError(f"lab {lab.name!r} already exists ({lab.state_path}"
                           f"{', namespaces ' + ', '.join(leftovers) if leftovers else ''}); "
                           f"run `tabbyctl lab down --name {lab.name}` first")
        state: State = {"lab": lab.name, "dir": str(lab.dir), "created": time.time(),
                        "namespaces": [], "processes": {}, "nodes": {}, "pods": {},
                        "next_node": 0, "pool": pool, "encap": encap, "bird": bird}
        lab.save(state)
        try:
            _build(lab, state, nodes, pool, say)
        except BaseException:
            say("lab up failed; removing what it made")
            down(lab, say=say, locked=False)
            raise
        return state


def _build(lab: Lab, state: State, nodes: int, pool: str, say: Say) -> None:
    underlay = _record_ns(lab, state, lab.ns("underlay"))
    state["underlay"] = {"ns": underlay, "bridge": BRIDGE, "gateway": GATEWAY,
                         "cidr": str(UNDERLAY)}
    netns.make_bridge(underlay, BRIDGE, f"{GATEWAY}/{UNDERLAY.prefixlen}")
    say(f"underlay {underlay}: {BRIDGE} {GATEWAY}/{UNDERLAY.prefixlen}")

    etcd_ns = _record_ns(lab, state, lab.ns("etcd"))
    netns.plug(underlay, BRIDGE, "u-etcd", etcd_ns, f"{ETCD_IP}/{UNDERLAY.prefixlen}", GATEWAY)
    state["etcd"] = {"ns": etcd_ns, "ip": ETCD_IP, "endpoint": f"http://{ETCD_IP}:2379"}
    _start(lab, state, "etcd", etcd_ns, _etcd_argv(lab), lab.dir / "etcd" / "etcd.log")
    _wait_etcd(state)
    say(f"etcd {etcd_ns}: {etcd_endpoint(state)}")
    store(state, [{"op": "apply", "objects": [_ippool(pool, state["encap"])]}])
    say(f"IPPool default-ipv4-ippool {pool} (encapsulation: {state['encap']})")
    if state["bird"]:
        from lab import bird

        bird.start(lab, state, [node_ip(k) for k in range(1, nodes + 1)], _record_ns, _start)
        store(state, [{"op": "apply", "objects": bird.peering_objects()}])
        say(f"BIRD route reflector {state['bird_router']['ns']}: "
            f"{state['bird_router']['ip']} (node-to-node mesh off)")

    for k in range(1, nodes + 1):
        _make_node(lab, state, f"node{k}", k)
    for name in state["nodes"]:
        _wait_node(state, name)
        n = state["nodes"][name]
        say(f"{name} {n['ns']}: {n['ip']} tabby-node pid {state['processes'][name]['pid']}")
    lab.save(state)


def _start(lab: Lab, state: State, role: str, ns: str, argv: list[str], log: Path) -> None:
    record = procs.start(netns.nsenter(ns, argv), log)  # nsenter execs: the pid is the daemon's
    record["ns"] = ns
    state["processes"][role] = record
    lab.save(state)


def _etcd_argv(lab: Lab) -> list[str]:
    data = lab.dir / "etcd" / "data"
    client = f"http://{ETCD_IP}:2379"
    peer = "http://127.0.0.1:2380"  # a one-member cluster: peers stay on its loopback
    return ["etcd", f"--name={lab.name}", f"--data-dir={data}",
            f"--listen-client-urls={client},http://127.0.0.1:2379",
            f"--advertise-client-urls={client}", f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}", f"--initial-cluster={lab.name}={peer}",
            "--initial-cluster-state=new", "--logger=zap", "--log-outputs=stderr"]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return b'"true"' in r.read()
    except OSError:
        return False


def _wait_etcd(state: State) -> None:
    url = f"{etcd_endpoint(state)}/health"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not procs.alive(state["processes"]["etcd"]):
            raise LabError(f"etcd exited; log tail:\n{_tail(state['processes']['etcd']['log'])}")
        if netns.call_in(state["etcd"]["ns"], lambda: _healthy(url)):
            return
        time.sleep(0.1)
    raise LabError(f"etcd not healthy after {READY_TIMEOUT:g} s at {url}")


def _ippool(cidr: str, encap: str = "none") -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
            "metadata": {"name": "default-ipv4-ippool"},
            "spec": {"cidr": cidr, "blockSize": 26, "ipipMode": "Never",
                     "vxlanMode": "Always" if encap == "vxlan" else "Never",
                     "natOutgoing": False, "nodeSelector": "all()"}}


def node_dir(lab: Lab, name: str) -> Path:
    return lab.dir / "nodes" / name


def _make_node(lab: Lab, state: State, name: str, k: int) -> None:
    ns = _record_ns(lab, state, lab.ns(name))
    address = node_ip(k)
    netns.plug(state["underlay"]["ns"], BRIDGE, f"u-{name}", ns,
               f"{address}/{UNDERLAY.prefixlen}", GATEWAY)
    d = node_dir(lab, name)
    dirs = {key: d / key for key in ("bin", "net.d", "etc", "run", "log", "spool", "cni-cache")}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)
    node = {"ns": ns, "ip": address, "dir": str(d), "socket": str(dirs["run"] / "cni.sock"),
            "bin_dir": str(dirs["bin"]), "net_dir": str(dirs["net.d"]),
            "cache_dir": str(dirs["cni-cache"])}
    state["nodes"][name] = node
    lab.save(state)
    endpoint = etcd_endpoint(state)
    install = [*tools.tool("cni-install", "cni.install"), "--bin-dir", str(dirs["bin"]),
               "--net-dir", str(dirs["net.d"]), "--config-dir", str(dirs["etc"]),
               "--etcd-endpoints", endpoint, "--nodename", name,
               "--cni-log-file", str(dirs["log"] / "cni.log")]
    # each node its own MTU file (the default /var/lib/calico/mtu is shared by every node
    # here); tabby-node writes the uplink's MTU minus the encapsulation's overhead into it
    install += ["--mtu-file", str(d / "mtu")]
    done = subprocess.run(netns.nsenter(ns, install), capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise LabError(f"cni-install for {name} failed (exit {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-800:]}")
    # --nodename-file too: the default (/var/lib/calico/nodename) is shared by every node here
    daemon = [*tools.tool("tabby-node", "node.main"), "--nodename", name,
              "--nodename-file", str(d / "nodename"), "--mtu-file", str(d / "mtu"),
              "--socket", node["socket"], "--etcd-endpoints", endpoint,
              "--log-file", str(dirs["log"] / "tabby-node.log"),
              "--health-port", str(HEALTH_PORT), "--spool-dir", str(dirs["spool"]),
              # the BGP address is autodetected: eth0 holds the default route
              "--networking-backend", "vxlan" if state.get("encap") == "vxlan" else "bird"]
    _start(lab, state, name, ns, daemon, dirs["log"] / "tabby-node.out")


def _socket_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)  # unix sockets are reached by path: no namespace involved
        return True
    except OSError:
        return False
    finally:
        s.close()


def _wait_node(state: State, name: str) -> None:
    record, node = state["processes"][name], state["nodes"][name]
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not procs.alive(record):
            raise LabError(f"tabby-node on {name} exited; log tail:\n{_tail(record['log'])}")
        # ready: the CNI answers and the routing agent has synced once (it wrote the pod
        # MTU, which a pod made before would otherwise not get)
        if _socket_answers(node["socket"]) and (Path(node["dir"]) / "mtu").exists():
            return
        time.sleep(0.05)
    raise LabError(f"tabby-node on {name}: no CNI socket {node['socket']} or pod MTU file "
                   f"after {READY_TIMEOUT:g} s; log tail:\n{_tail(record['log'])}")


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- status ------------------------------------------------------------------------------------

def status(lab: Lab) -> dict[str, Any]:
    """What the lab is and whether its parts are alive; WEPs read from its etcd when it runs."""
    state = lab.require()
    procs_ok = {role: procs.alive(r) for role, r in state["processes"].items()}
    out: dict[str, Any] = {
        "lab": lab.name, "state": str(lab.state_path),
        "underlay": state.get("underlay"),
        "etcd": {**state.get("etcd", {}), "pid": state["processes"].get("etcd", {}).get("pid"),
                 "running": procs_ok.get("etcd", False)},
        "nodes": [{"name": name, "ns": n["ns"], "ip": n["ip"], "socket": n["socket"],
                   "pid": state["processes"].get(name, {}).get("pid"),
                   "running": procs_ok.get(name, False), "netns": netns.exists(n["ns"])}
                  for name, n in state["nodes"].items()],
        "pods": [],
        "stray_namespaces": sorted(set(netns.names_with_prefix(lab.prefix))
                                   - set(state["namespaces"])),
    }
    weps: dict[tuple[str, str], dict[str, Any]] = {}
    if procs_ok.get("etcd"):
        try:
            for w in store(state, [{"op": "list", "kind": "WorkloadEndpoint"}])[0]:
                spec = w.get("spec", {})
                weps[(w["metadata"]["namespace"], spec.get("pod", ""))] = w
            out["datastore"] = "ok"
        except LabError as e:
            out["datastore"] = str(e)
    for key, p in sorted(state["pods"].items()):
        wep = weps.get((p["namespace"], p["name"]))
        out["pods"].append({
            "pod": key, "node": p["node"], "ns": p["netns"], "ips": p.get("ips", []),
            "phase": p.get("phase", "?"), "container_id": p["container_id"],
            "interface": wep["spec"].get("interfaceName") if wep else None,
            "wep": wep["metadata"]["name"] if wep else None,
            "labels": wep["metadata"].get("labels", {}) if wep else None,
        })
    return out


# ---- down --------------------------------------------------------------------------------------

def down(lab: Lab, say: Say = _quiet, locked: bool = True) -> list[str]:
    """Stop every process and remove every namespace and file of the lab, whatever state it
    is in: recorded objects from the state file, the rest found by namespace name prefix."""
    if locked and lab.dir.exists():  # locking would create the directory we remove
        try:
            with lab.locked(timeout=5.0):
                return _down(lab, say)
        except LabError as e:
            if "busy" not in str(e):
                raise
            say(f"{e}; cleaning up anyway")
    return _down(lab, say)


def _down(lab: Lab, say: Say) -> list[str]:
    done: list[str] = []
    try:
        state = lab.load() or {}
    except LabError as e:
        say(str(e))
        state = {}
    # daemons first (by recorded pid + start time), so they cannot recreate anything;
    # in reverse start order: the nodes before the etcd they talk to
    for role, record in reversed((state.get("processes") or {}).items()):
        if procs.stop(record):
            done.append(f"stopped {role} (pid {record['pid']})")
    names = sorted(set(state.get("namespaces") or []) | set(netns.names_with_prefix(lab.prefix)),
                   key=_teardown_order)
    for name in names:
        if not name.startswith(lab.prefix):
            continue  # a corrupted state file must never make us touch anything else
        # anything still running inside a lab namespace was started in the lab
        for pid in netns.pids_in(name):
            procs.kill_pid(pid)
            done.append(f"stopped pid {pid} in {name}")
        if netns.delete(name):
            done.append(f"deleted namespace {name}")
    if lab.dir.exists():
        shutil.rmtree(lab.dir, ignore_errors=True)
        done.append(f"removed {lab.dir}")
    for line in done:
        say(line)
    return done


def _teardown_order(name: str) -> tuple[int, str]:
    """Pods, then nodes, then etcd and BIRD, then the underlay."""
    for rank, part in enumerate(("-pod-", "-node", "-etcd", "-bird", "-underlay")):
        if part in name:
            return rank, name
    return 0, name

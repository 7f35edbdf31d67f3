"""CNI ADD/DEL latency: Tabby (shim -> tabby-node, Tabby IPAM in etcd) side by side with Debian's
Go `ptp` + `host-local`, in one run, inside a private "host" network namespace.

    .venv/bin/python bench/bench_cni.py [--pods 30] [--rounds 3] [--parallel 100/10]

Everything happens in namespaces this script creates: the script joins a fresh host namespace
before it starts anything, so etcd, tabby-node and every plugin exec live there, and each pod
gets its own namespace. All of them are deleted at the end, even on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import precompile, production_env, write_section  # noqa: E402

CLONE_NEWNET = 0x40000000
VENV_BIN = Path(sys.executable).parent
GO_PLUGINS = "/usr/lib/cni"
BEGIN, END = "<!-- bench_cni:begin -->", "<!-- bench_cni:end -->"
SHIM_PYTHON = "/usr/bin/python3"  # what cni-install puts in the shim's #! line (3.11+ here)


def enter_netns(name: str) -> None:
    """Move this (still single-threaded) process into a namespace; children inherit it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Namespaces:
    """Every namespace the run makes, removed on exit."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.made: list[str] = []

    def add(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        ip("netns", "add", full)
        self.made.append(full)
        return full

    def remove(self, full: str) -> None:
        subprocess.run(["ip", "netns", "del", full], capture_output=True)
        if full in self.made:
            self.made.remove(full)

    def cleanup(self) -> None:
        for full in list(self.made):
            self.remove(full)


def cni_exec(binary: str, command: str, conf: dict, netns: str, cid: str,
             env: dict[str, str], prev: dict | None = None) -> tuple[float, dict | None]:
    body = dict(conf)
    if prev is not None:
        body["prevResult"] = prev
    e = dict(env, CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=f"/run/netns/{netns}",
             CNI_IFNAME="eth0",
             CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={netns}")
    start = time.perf_counter()
    proc = subprocess.run([binary], input=json.dumps(body), env=e, capture_output=True,
                          text=True, timeout=120)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip()[-500:]
        raise RuntimeError(f"{binary} {command}: {proc.stdout.strip()} {tail}")
    return took, (json.loads(proc.stdout) if proc.stdout.strip() else None)


def exec_median(argv: list[str], env: dict[str, str], stdin: str = "", runs: int = 30) -> float:
    """Median ms of whole execs of argv (for the start-up rows)."""
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, input=stdin, env=env, capture_output=True, text=True, timeout=30,
                       check=True)
        took.append(time.perf_counter() - start)
    return statistics.median(took) * 1000


def daemon_add_median(log_file: Path) -> float:
    """Median ms tabby-node spent on the ADDs it logged (from accept to answer)."""
    took = [float(m.group(1)) for m in re.finditer(r"CNI ADD .* in ([0-9.]+) ms",
                                                    log_file.read_text())]
    return statistics.median(took) if took else float("nan")


def startup_figures(tabby: Plugin, anchor: Plugin) -> dict[str, float]:
    """What each side costs before any work: the interpreter, the shim's round trip to
    tabby-node (VERSION, answered without work), the Go plugins' own VERSION."""
    version = {"CNI_COMMAND": "VERSION"}
    conf = json.dumps(anchor.conf)
    return {
        "python_start": exec_median([SHIM_PYTHON, "-IS", "-c", "import posix; posix._exit(0)"],
                                    anchor.env),
        "tabby_version": exec_median([tabby.binary], dict(tabby.env, **version),
                                     json.dumps(tabby.conf)),
        "ptp_version": exec_median([anchor.binary], dict(anchor.env, **version), conf),
        "host_local_version": exec_median([f"{GO_PLUGINS}/host-local"],
                                          dict(anchor.env, **version), conf),
    }


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


class Plugin:
    """One CNI network under test: a binary, its netconf and its env."""

    def __init__(self, label: str, binary: str, conf: dict, env: dict[str, str]) -> None:
        self.label, self.binary, self.conf, self.env = label, binary, conf, env
        self.add: list[float] = []
        self.dele: list[float] = []

    def pod_cycle(self, ns: Namespaces, index: int) -> None:
        pod = ns.add(f"{self.label}-{index}")
        cid = uuid.uuid4().hex
        took, result = cni_exec(self.binary, "ADD", self.conf, pod, cid, self.env)
        self.add.append(took)
        self.pending = (pod, cid, result)

    def finish(self, ns: Namespaces) -> None:
        pod, cid, result = self.pending
        took, _ = cni_exec(self.binary, "DEL", self.conf, pod, cid, self.env, result)
        self.dele.append(took)
        ns.remove(pod)


def parallel_adds(plugin: Plugin, ns: Namespaces, count: int, width: int) -> tuple[float, float]:
    """`count` ADDs with `width` at a time: (wall seconds, median ms per ADD); then DELs."""
    pods = [ns.add(f"{plugin.label}-par-{i}") for i in range(count)]
    cids = [uuid.uuid4().hex for _ in pods]
    def add(i: int) -> tuple[float, dict | None]:
        return cni_exec(plugin.binary, "ADD", plugin.conf, pods[i], cids[i], plugin.env)

    def delete(i: int) -> None:
        cni_exec(plugin.binary, "DEL", plugin.conf, pods[i], cids[i], plugin.env,
                 results[i][1])

    start = time.perf_counter()
    with ThreadPoolExecutor(width) as pool:
        results = list(pool.map(add, range(count)))
    wall = time.perf_counter() - start
    with ThreadPoolExecutor(width) as pool:
        list(pool.map(delete, range(count)))
    for pod in pods:
        ns.remove(pod)
    return wall, statistics.median(t for t, _ in results) * 1000


def start_tabby(tmp: Path, env: dict[str, str]) -> tuple[Plugin, list[subprocess.Popen]]:
    """etcd + pool + cni-install + tabby-node in the current (bench host) namespace."""
    sys.path.insert(0, str(ROOT))
    from datastore.etcd import Datastore, Put
    from datastore.validation import validate
    from tests.etcd_server import EtcdServer

    server = EtcdServer(tmp / "etcd")
    server.start()
    procs: list[subprocess.Popen] = []
    pool = validate({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                     "metadata": {"name": "bench"}, "spec": {"cidr": "10.244.0.0/16"}})

    async def put_pool() -> None:
        async with Datastore(server.config()) as ds:
            await ds.commit([Put("/calico/resources/v3/projectcalico.org/ippools/bench",
                                 json.dumps(pool).encode())])

    asyncio.run(put_pool())
    bin_dir, net_dir, cfg_dir = tmp / "bin", tmp / "net.d", tmp / "etc"
    subprocess.run([str(VENV_BIN / "cni-install"), "--bin-dir", str(bin_dir), "--net-dir",
                    str(net_dir), "--config-dir", str(cfg_dir), "--etcd-endpoints",
                    server.endpoint, "--nodename", "bench-node"], check=True, env=env,
                   capture_output=True)
    socket = tmp / "run" / "cni.sock"
    node = subprocess.Popen([str(VENV_BIN / "tabby-node"), "--nodename", "bench-node",
                             # its own files: the defaults under /var/lib/calico are the host's
                             "--nodename-file", str(tmp / "nodename"),
                             "--mtu-file", str(tmp / "mtu"),
                             "--socket", str(socket), "--etcd-endpoints", server.endpoint,
                             "--log-file", str(tmp / "tabby-node.log"), "--health-port", "0",
                             "--spool-dir", str(tmp / "spool"),
                             # the CNI service alone: felix and the routing agent reacting to
                             # Tabby's pods would also slow the anchor's execs beside them
                             "--no-felix", "--networking-backend", "none", "--ip", "none"],
                            env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(node)
    for _ in range(200):
        if socket.exists():
            break
        time.sleep(0.05)
    conflist = json.loads((net_dir / "10-tabby.conflist").read_text())
    conf = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=conflist["cniVersion"])
    conf["log_file_path"] = str(tmp / "cni.log")
    plugin = Plugin("tabby", str(bin_dir / "tabby"), conf,
                    dict(env, TABBY_CNI_SOCKET=str(socket), CNI_PATH=f"{bin_dir}:{GO_PLUGINS}"))
    plugin.server = server  # type: ignore[attr-defined]
    return plugin, procs


def go_anchor(tmp: Path, env: dict[str, str]) -> Plugin:
    conf = {"cniVersion": "1.0.0", "name": "bench-ptp", "type": "ptp", "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": str(tmp / "host-local"),
                     "ranges": [[{"subnet": "10.250.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]}}
    return Plugin("ptp", f"{GO_PLUGINS}/ptp", conf, dict(env, CNI_PATH=GO_PLUGINS))


def run(args: argparse.Namespace) -> dict[str, float]:
    ns = Namespaces(f"tabby-bench-{os.getpid()}")
    host = ns.add("host")
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="tabby-bench-cni-"))
    tabby = None
    try:
        enter_netns(host)
        ip("link", "set", "lo", "up")
        env = production_env({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        tabby, procs = start_tabby(tmp, env)
        anchor = go_anchor(tmp, env)
        for plugin in (tabby, anchor):  # warm-up, not timed
            plugin.pod_cycle(ns, 999)
            plugin.finish(ns)
            plugin.add.clear()
            plugin.dele.clear()
        round_ratios = []
        for _ in range(args.rounds):  # this VM's speed drifts: several rounds, all pooled
            start = {plugin.label: len(plugin.add) for plugin in (tabby, anchor)}
            for i in range(args.pods):  # alternate so drift hits both, and who goes first
                pair = (tabby, anchor) if i % 2 == 0 else (anchor, tabby)
                for plugin in pair:
                    plugin.pod_cycle(ns, i)
                for plugin in pair:
                    plugin.finish(ns)
            medians = [statistics.median(plugin.add[start[plugin.label]:])
                       for plugin in (tabby, anchor)]
            round_ratios.append(medians[0] / medians[1])
        count, width = (int(x) for x in args.parallel.split("/"))
        figures = startup_figures(tabby, anchor)
        figures["round_ratios"] = round_ratios  # type: ignore[assignment]
        figures["daemon_add"] = daemon_add_median(tmp / "tabby-node.log")
        node_log = (tmp / "tabby-node.log").read_text()
        figures["adds"] = len(re.findall(r"CNI ADD .* in [0-9.]+ ms", node_log))
        figures["reread"] = node_log.count("reading them and allocating again")
        for plugin in (tabby, anchor):
            figures[f"{plugin.label}_add_median"] = statistics.median(plugin.add) * 1000
            figures[f"{plugin.label}_add_p90"] = p90(plugin.add) * 1000
            figures[f"{plugin.label}_del_median"] = statistics.median(plugin.dele) * 1000
            figures[f"{plugin.label}_del_p90"] = p90(plugin.dele) * 1000
        par: dict[str, list[tuple[float, float]]] = {tabby.label: [], anchor.label: []}
        for _ in range(args.rounds):  # one burst swings with the VM: alternate, take medians
            for plugin in (tabby, anchor):
                par[plugin.label].append(parallel_adds(plugin, ns, count, width))
        for label, runs in par.items():
            figures[f"{label}_par_wall"] = statistics.median(wall for wall, _ in runs)
            figures[f"{label}_par_median"] = statistics.median(median for _, median in runs)
        figures["par_ratios"] = [t[0] / a[0] for t, a in zip(  # type: ignore[assignment]
            par[tabby.label], par[anchor.label], strict=True)]
        figures["par_reread"] = ((tmp / "tabby-node.log").read_text()
                                 .count("reading them and allocating again") - figures["reread"])
        figures["par_adds"] = count * args.rounds
        return figures
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tabby is not None:
            tabby.server.stop()  # type: ignore[attr-defined]
        ns.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --pods pods each, pooled (default 3)")
    parser.add_argument("--parallel", default="100/10", help="COUNT/WIDTH of the parallel run")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cni needs root (network namespaces)")
    precompile()
    f = run(args)
    count, width = args.parallel.split("/")
    ratio: Callable[[str], str] = lambda k: f"{f['tabby_' + k] / f['ptp_' + k]:.2f}x"  # noqa: E731
    lines = [
        BEGIN,
        "### CNI ADD and DEL (whole plugin exec, as a runtime sees it)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, bytecode cache on), inside a private host "
        f"namespace; {args.rounds} rounds of {args.pods} pods, alternating Tabby and the anchor "
        "pod by pod (each going first every other pod), medians and p90 over all rounds. "
        "Tabby: the installed `tabby` shim forwarding to a running `tabby-node` (Tabby IPAM in "
        "a local etcd, WorkloadEndpoint written in the same transaction as the address; tabby-node "
        "without felix and the routing agent, whose reactions to Tabby's pods would slow the "
        "anchor's execs too and flatter the ratio). Anchor: Debian's Go "
        "`ptp` + `host-local` (local files, no datastore). Reproduce: "
        "`sudo .venv/bin/python bench/bench_cni.py`.",
        "",
        "| | Tabby median / p90 | ptp+host-local median / p90 | ratio of medians |",
        "|---|---|---|---|",
        f"| ADD | {f['tabby_add_median']:.1f} / {f['tabby_add_p90']:.1f} ms | "
        f"{f['ptp_add_median']:.1f} / {f['ptp_add_p90']:.1f} ms | {ratio('add_median')} "
        f"(rounds: {', '.join(f'{r:.2f}x' for r in f['round_ratios'])}) |",
        f"| DEL | {f['tabby_del_median']:.1f} / {f['tabby_del_p90']:.1f} ms | "
        f"{f['ptp_del_median']:.1f} / {f['ptp_del_p90']:.1f} ms | {ratio('del_median')} |",
        f"| {count} ADDs, {width} at a time: wall (median of {args.rounds} bursts) | "
        f"{f['tabby_par_wall']:.2f} s | {f['ptp_par_wall']:.2f} s | {ratio('par_wall')} "
        f"(bursts: {', '.join(f'{r:.2f}x' for r in f['par_ratios'])}) |",
        f"| same, median ADD | {f['tabby_par_median']:.1f} ms | {f['ptp_par_median']:.1f} ms | "
        f"{ratio('par_median')} |",
        "",
        "Where an ADD's time goes (medians, same run): "
        f"`{SHIM_PYTHON} -IS` starting and leaving with `os._exit` as the shim does (before any "
        f"code) {f['python_start']:.1f} ms; `tabby` VERSION through tabby-node (interpreter + "
        f"shim + socket round trip, no work) {f['tabby_version']:.1f} ms; inside tabby-node, "
        f"from accept to answer {f['daemon_add']:.1f} ms (no read: ADD's inputs come from "
        "tabby-node's watched copies, guarded in the one etcd transaction that commits the "
        "address and the WorkloadEndpoint, while the veth is made and finished; "
        f"{f['reread']:.0f} of {f['adds']:.0f} ADDs found a guard refused and read etcd). "
        f"The anchor's Go starts: `ptp` VERSION {f['ptp_version']:.1f} ms, `host-local` VERSION "
        f"{f['host_local_version']:.1f} ms, two of which make its whole ADD. In the parallel "
        "run tabby-node takes one node's addresses one at a time (an in-memory queue per node "
        "and per block, as Calico's CNI holds a host-wide IPAM lock file), so concurrent ADDs "
        "wait for each other's commit instead of being refused by etcd and reading again; "
        f"{f['par_reread']:.0f} of {f['par_adds']:.0f} read again, those in flight when a new "
        "block was claimed (the node's affinities moved under their guards).",
        END,
    ]
    body = "\n".join(lines)
    write_section(BEGIN, END, body)
    print(body)


if __name__ == "__main__":
    main()

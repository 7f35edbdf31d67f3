"""IPAM allocation rate: Tabby's allocator (1 and 3 concurrent nodes on one etcd) and the CNI
exec path (`tabby-ipam` against Debian's Go `host-local`), in one run on one machine.

    .venv/bin/python bench/bench_ipam.py [--per-node 300] [--execs 40]

Writes its section of bench/RESULTS.md and the README table (between its markers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import precompile, production_env, write_section  # noqa: E402
from datastore.etcd import Datastore, Put  # noqa: E402
from datastore.validation import validate  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402

HOST_LOCAL = "/usr/lib/cni/host-local"
TABBY_IPAM = str(Path(sys.executable).parent / "tabby-ipam")
POOL_KEY = "/calico/resources/v3/projectcalico.org/ippools/bench-pool"
BEGIN, END = "<!-- bench_ipam:begin -->", "<!-- bench_ipam:end -->"

WORKER = """
import asyncio, json, sys, time
sys.path.insert(0, {root!r})
from datastore.config import EtcdConfig
from datastore.etcd import Datastore
from ipam.allocator import IPAM, AssignRequest

async def main(endpoint, host, count, inflight):
    async with Datastore(EtcdConfig(endpoints=(endpoint,))) as ds:
        ipam = IPAM(ds)

        async def lane(k):
            for i in range(k, count, inflight):
                await ipam.auto_assign(AssignRequest(handle_id=f"bench.{{host}}.{{i}}",
                                                     hostname=host, attrs={{"node": host}}))

        start = time.perf_counter()
        await asyncio.gather(*(lane(k) for k in range(inflight)))
        print(json.dumps({{"seconds": time.perf_counter() - start, **ipam.stats}}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def write_pool(server: EtcdServer) -> None:
    pool = validate({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                     "metadata": {"name": "bench-pool"},
                     "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})
    async with Datastore(server.config()) as ds:
        await ds.commit([Put(POOL_KEY, json.dumps(pool).encode())])


async def wipe_ipam(server: EtcdServer) -> None:
    async with Datastore(server.config()) as ds:
        kvs, _ = await ds.list("/calico/ipam/v2/")
        for kv in kvs:
            await ds.delete(kv.key)


def run_nodes(server: EtcdServer, nodes: int, per_node: int,
              inflight: int = 1) -> dict[str, float]:
    """`nodes` processes, one node name each, allocating at once (`inflight` requests at a
    time in each, as concurrent pod starts on one node); returns totals."""
    script = WORKER.format(root=str(ROOT))
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", script, server.endpoint, f"node{n}",
                               str(per_node), str(inflight)], stdout=subprocess.PIPE, text=True,
                              env=production_env())
             for n in range(nodes)]
    outs = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    wall = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise RuntimeError("a worker failed")
    conflicts = sum(o.get("cas_conflicts", 0) for o in outs)
    writes = sum(o.get("writes", 0) for o in outs)
    busy = max(o["seconds"] for o in outs)  # allocation time, interpreter start excluded
    return {"allocs": nodes * per_node, "per_second": nodes * per_node / busy, "wall": wall,
            "conflict_rate": conflicts / max(writes, 1), "conflicts": conflicts}


def exec_rate(command: str, netconf: dict, count: int, env: dict[str, str]) -> float:
    """Median milliseconds of one CNI ADD exec of an IPAM plugin."""
    times = []
    body = json.dumps(netconf)
    for i in range(count):
        e = dict(env, CNI_COMMAND="ADD", CNI_CONTAINERID=f"bench{i:05d}", CNI_IFNAME="eth0",
                 CNI_NETNS="/var/run/netns/bench-none", CNI_PATH="/usr/lib/cni")
        start = time.perf_counter()
        proc = subprocess.run([command], input=body, env=e, capture_output=True, text=True,
                              timeout=60)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"{command}: {proc.stdout} {proc.stderr}")
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-node", type=int, default=300)
    parser.add_argument("--execs", type=int, default=40)
    args = parser.parse_args()
    precompile()
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(Path(tmp) / "etcd")
        server.start()
        try:
            asyncio.run(write_pool(server))
            one = run_nodes(server, 1, args.per_node)
            asyncio.run(wipe_ipam(server))
            three = run_nodes(server, 3, args.per_node)
            asyncio.run(wipe_ipam(server))
            contended = run_nodes(server, 3, args.per_node, inflight=4)
            asyncio.run(wipe_ipam(server))
            env = production_env({"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
            tabby_conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tabby-ipam",
                          "etcd_endpoints": server.endpoint, "nodename": "node-exec",
                          # its own lock file: the default is the host's /var/run/calico
                          "ipam_lock_file": f"{tmp}/ipam.lock",
                          "ipam": {"type": "tabby-ipam"}}
            tabby_ms = exec_rate(TABBY_IPAM, tabby_conf, args.execs, env)
            host_local_conf = {"cniVersion": "1.0.0", "name": "bench", "type": "host-local",
                               "ipam": {"type": "host-local", "dataDir": f"{tmp}/host-local",
                                        "ranges": [[{"subnet": "10.250.0.0/16"}]]}}
            anchor_ms = exec_rate(HOST_LOCAL, host_local_conf, args.execs, env)
        finally:
            server.stop()
    write_results(one, three, contended, tabby_ms, anchor_ms, args)


def write_results(one: dict[str, float], three: dict[str, float], contended: dict[str, float],
                  tabby_ms: float, anchor_ms: float, args: argparse.Namespace) -> None:
    stamp = time.strftime("%Y-%m-%d")
    lines = [
        BEGIN,
        "### IPAM allocation rate",
        "",
        f"Measured {stamp} on {platform.node()} ({os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, bytecode cache on); pool 10.244.0.0/16 with /26 "
        "blocks, one local etcd (fsync on) sharing the CPUs. Allocator rows: one "
        "`auto_assign` per address, "
        f"{args.per_node} per node, each node a separate process, interpreter start excluded. "
        f"Exec rows: median of {args.execs} CNI ADD execs of the IPAM plugin alone. Reproduce: "
        "`.venv/bin/python bench/bench_ipam.py`.",
        "",
        "| case | allocations | rate | CAS conflicts per write |",
        "|---|---|---|---|",
        f"| Tabby allocator, 1 node | {one['allocs']:.0f} | {one['per_second']:.0f}/s | "
        f"{one['conflict_rate']:.3f} |",
        f"| Tabby allocator, 3 nodes at once | {three['allocs']:.0f} | "
        f"{three['per_second']:.0f}/s | {three['conflict_rate']:.3f} ({three['conflicts']:.0f}) |",
        f"| Tabby allocator, 3 nodes x 4 requests in flight | {contended['allocs']:.0f} | "
        f"{contended['per_second']:.0f}/s | {contended['conflict_rate']:.3f} "
        f"({contended['conflicts']:.0f}) |",
        "",
        "| CNI ADD exec (IPAM plugin only) | median | ratio |",
        "|---|---|---|",
        f"| `tabby-ipam` (Python, etcd) | {tabby_ms:.0f} ms | {tabby_ms / anchor_ms:.1f}x |",
        f"| anchor: Debian `host-local` (Go, local files) | {anchor_ms:.1f} ms | 1.0x |",
        END,
    ]
    body = "\n".join(lines)
    write_section(BEGIN, END, body)
    print(body)


if __name__ == "__main__":
    main()

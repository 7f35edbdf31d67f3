"""One node allocating addresses, run as its own process by the IPAM concurrency test.

    python tests/ipam_worker.py ENDPOINT NODE COUNT [PARALLEL]

Makes COUNT single-address `auto_assign`s for NODE with distinct handles
(`k8s-pod-network.<NODE>-<i>`), PARALLEL at a time within the process (so requests of the same
node race each other as well as the other processes), and prints one JSON object:
`{"ips": {handle: address}, "stats": {...}, "seconds": ...}`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datastore.config import EtcdConfig
from datastore.etcd import Datastore
from ipam.allocator import IPAM, AssignRequest


async def main(endpoint: str, node: str, count: int, parallel: int) -> dict[str, object]:
    ips: dict[str, str] = {}
    async with Datastore(EtcdConfig(endpoints=(endpoint,))) as ds:
        ipam = IPAM(ds)
        queue = list(range(count))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                handle = f"k8s-pod-network.{node}-{i}"
                result = await ipam.auto_assign(AssignRequest(
                    handle_id=handle, hostname=node,
                    attrs={"node": node, "namespace": "default", "pod": f"pod-{i}"}))
                ips[handle] = str(result.ipv4[0].ip)

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(parallel))), 120)
        seconds = time.perf_counter() - start
    return {"ips": ips, "stats": ipam.stats, "seconds": seconds}


if __name__ == "__main__":
    endpoint, node, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    parallel = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    print(json.dumps(asyncio.run(main(endpoint, node, count, parallel))))

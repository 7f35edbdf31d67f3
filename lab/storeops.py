"""Datastore operations for the lab, run *inside* the lab (`python -m lab.storeops`).

The lab's etcd is reachable only from the lab's namespaces, so `tabbyctl lab` runs this module
there with nsenter (gRPC's own threads must be born in the right namespace, which a fresh
process guarantees). Request on stdin, one JSON object:
`{"endpoint": "http://198.18.0.2:2379", "ops": [{"op": "apply"|"ensure", "objects": [...]},
{"op": "delete", "kind": "Pod", "apiVersion": "v1", "name": .., "namespace": ..},
{"op": "list", "kind": "WorkloadEndpoint", "apiVersion": ..},
{"op": "claim_block" | "release_block", "node": .., "cidr": ..}]}` (an IPAM block affinity,
claimed or given back the way a node's IPAM does it: what routing tests and benches start from).
Reply on stdout: `{"results": [...]}` (one entry per op), or `{"error": "..."}` and exit 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from datastore.config import EtcdConfig
from datastore.errors import TabbyError
from datastore.etcd import Datastore
from datastore.kinds import kind_for
from datastore.store import ResourceStore


async def _one(st: ResourceStore, op: dict[str, Any]) -> Any:
    what = op["op"]
    if what in ("claim_block", "release_block"):
        return await _block_op(st, what, op["node"], op["cidr"])
    if what in ("apply", "ensure"):
        # ensure = create unless it exists (keeps labels a user set on a Namespace)
        mode, skip = ("apply", False) if what == "apply" else ("create", True)
        results = await st.write(op["objects"], mode, skip_existing=skip)
        return [r.action for r in results]
    kind = kind_for(op["kind"], op.get("apiVersion"))
    if what == "delete":
        gone = await st.delete_many([(kind, op["name"], op.get("namespace"), None)],
                                    skip_missing=True)
        await _release_pools(st, gone)
        return len(gone)
    if what == "list":
        return await st.list(kind, op.get("namespace"))
    raise ValueError(f"unknown op {what!r}")


async def _release_pools(st: ResourceStore, gone: list[dict[str, Any]]) -> None:
    """A deleted pool's empty blocks are given up by their nodes, as `tabbyctl delete` does."""
    from ipam.allocator import IPAM

    for obj in gone:
        if obj.get("kind") == "IPPool" and (obj.get("spec") or {}).get("cidr"):
            await IPAM(st.ds).release_pool_affinities(obj["spec"]["cidr"])


async def _block_op(st: ResourceStore, what: str, node: str, cidr: str) -> Any:
    import time

    from ipam import affinity
    from ipam.allocator import IPAM

    ipam = IPAM(st.ds)
    if what == "claim_block":
        got = await affinity.claim(ipam._store, node, cidr, time.time_ns())
        if got is None:
            raise ValueError(f"block {cidr} belongs to another node")
        return cidr
    await ipam.release_affinity(cidr, node)
    return cidr


async def run(request: dict[str, Any]) -> list[Any]:
    config = EtcdConfig(endpoints=(request["endpoint"],))
    async with Datastore(config) as ds:
        st = ResourceStore(ds)
        return [await _one(st, op) for op in request["ops"]]


def main() -> int:
    try:
        results = asyncio.run(run(json.load(sys.stdin)))
    except (TabbyError, ValueError, KeyError, OSError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

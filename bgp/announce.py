"""What a node announces over BGP (pure), Calico's export rules for its own routes.

- every block affine to this node whose affinity is confirmed, as the whole block prefix;
- a /32 for every address this node holds in a block affine to another node (or to none):
  a "borrowed" address, which the block's prefix would otherwise send elsewhere;
- nothing inside a disabled pool or a pool with `disableBGPExport`.
"""

from __future__ import annotations

from collections.abc import Sequence

from bgp.model import BlockRecord, PoolRecord


def _exported(prefix_net: object, pools: Sequence[PoolRecord]) -> bool:
    for pool in pools:
        if prefix_net.subnet_of(pool.cidr):  # type: ignore[attr-defined]
            return not (pool.disabled or pool.disable_bgp_export)
    return True  # outside every pool (a pool was deleted): still ours to route


def announcements(local: str, blocks: Sequence[BlockRecord], pools: Sequence[PoolRecord]
                  ) -> frozenset[str]:
    out: set[str] = set()
    for block in blocks:
        if block.node == local and block.confirmed and _exported(block.cidr, pools):
            out.add(str(block.cidr))
        if block.node == local:
            continue
        for ip, holder in block.borrowed:
            if holder == local and _exported(block.cidr, pools):
                out.add(f"{ip}/32")
    return frozenset(out)

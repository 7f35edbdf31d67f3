"""Giving addresses back: by address, by handle, and everything of a removed node (I/O).

Each block is changed with its handles in one etcd transaction, guarded by the revisions they
were read at, so a handle's per-block counts always agree with the block. A block left empty
and without affinity is deleted (Calico does the same); an empty block that is still affine to
a node stays, ready for that node's next pod.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping

from datastore.etcd import Datastore, Delete, Op, Purge
from ipam import affinity, keys
from ipam.block import IP, Attribute, Block, sanitize_handle
from ipam.errors import InvalidRequest
from ipam.inputs import read_pools
from ipam.pools import pool_containing
from ipam.store import Store, write_block, write_handle

log = logging.getLogger(__name__)

TUNNEL_HANDLE_KINDS = ("ipip", "vxlan", "vxlan-v6", "wireguard", "wireguard-v6")


def tunnel_handles(host: str) -> set[str]:
    """The handles Calico gives a node's tunnel addresses (`ipip-tunnel-addr-<node>`, ...)."""
    return {f"{kind}-tunnel-addr-{host}" for kind in TUNNEL_HANDLE_KINDS}


def parse_ip(text: str | IP) -> IP:
    """An address; `10.0.0.5/26` (as CNI results write them) is taken as `10.0.0.5`."""
    if not isinstance(text, str):
        return text
    try:
        return ipaddress.ip_interface(text.strip()).ip
    except ValueError:
        raise InvalidRequest(f"{text!r} is not an IP address") from None


async def release_ips(store: Store, ips: Iterable[str],
                      sequence_numbers: Mapping[str, int] | None) -> list[str]:
    """Release addresses; returns those that were not allocated (in the order given)."""
    wanted = list(dict.fromkeys(parse_ip(ip) for ip in ips))
    expected = {parse_ip(k): v for k, v in (sequence_numbers or {}).items()}
    pools = await read_pools(store.ds)
    by_block: dict[str, list[IP]] = {}
    listed: dict[str, tuple[Block, int]] | None = None
    for address in wanted:
        pool = pool_containing(pools, address)
        if pool is not None:
            cidr: str | None = str(pool.block_of(address))
        else:  # pool deleted since: find the block by scanning, as Calico does
            listed = listed if listed is not None else await store.blocks()
            cidr = next((c for c, (b, _) in listed.items() if address in b.network), None)
        if cidr is not None:
            by_block.setdefault(cidr, []).append(address)
    results = await asyncio.gather(*(
        release_from_block(store, cidr, _fixed(addresses),
                           {str(a): expected[a] for a in addresses if a in expected})
        for cidr, addresses in by_block.items()))
    released = {a for freed in results for a in freed}
    return [str(a) for a in wanted if a not in released]


def _fixed(addresses: list[IP]) -> Callable[[Block], list[IP]]:
    return lambda _block: addresses


async def release_from_block(
    store: Store, cidr: str, pick: Callable[[Block], list[IP]],
    sequence_numbers: Mapping[str, int] | None = None,
) -> list[IP]:
    """Release the addresses `pick` chooses from the current block (asked again after every
    conflict, so a predicate sees the block as it is); returns those released."""
    async with store.block_lock(cidr):
        for _ in store.attempts(f"releasing addresses in block {cidr}"):
            got = await store.block(cidr)
            if got is None:
                return []
            block, revision = got
            addresses = pick(block)
            allocated = [a for a in addresses if block.is_allocated(a)]
            counts = block.release(addresses, sequence_numbers)
            if not allocated:
                return []
            handles = await asyncio.gather(*(store.handle(h) for h in counts))
            ops: list[Op] = [_block_after_release(block, revision)]
            for (handle_id, n), current in zip(counts.items(), handles, strict=True):
                if current is not None:
                    op = write_handle(handle_id, current[0].adjusted(cidr, -n), current[1])
                    if op is not None:
                        ops.append(op)
            if isinstance(await store.commit(ops), int):
                return allocated
    raise AssertionError("unreachable")


def _block_after_release(block: Block, revision: int) -> Op:
    if block.is_empty() and block.affinity is None:
        return Delete(keys.block_key(block.cidr), revision)
    return write_block(block, revision)


async def release_by_handle(store: Store, handle_id: str) -> list[str]:
    """Release everything the handle holds, one block per transaction (block and handle
    together). A block that no longer exists, or holds fewer addresses than the handle says,
    is simply dropped from the handle: the block is the truth."""
    handle_id = sanitize_handle(handle_id)
    released: list[str] = []
    conflicts = store.attempts(f"releasing handle {handle_id}")
    while True:
        got = await store.handle(handle_id)
        if got is None:
            return released
        handle, handle_rev = got
        freed: list[IP] = []
        if not handle.block:
            done = await store.commit([Delete(keys.handle_key(handle_id), handle_rev)])
        else:
            cidr = min(handle.block)
            async with store.block_lock(cidr):  # from reading the block to committing it
                ops, freed = await _handle_block_ops(store, handle_id, cidr)
                op = write_handle(handle_id, handle.without(cidr), handle_rev)
                if op is not None:
                    ops.append(op)
                done = await store.commit(ops)
        if isinstance(done, int):
            released.extend(str(a) for a in freed)
        else:
            next(conflicts)


async def _handle_block_ops(store: Store, handle_id: str, cidr: str) -> tuple[list[Op], list[IP]]:
    got = await store.block(cidr)
    if got is None:
        return [], []
    block, revision = got
    freed = block.ips_for_handle(handle_id)
    if not freed:
        return [], []
    block.release_handle(handle_id)
    return [_block_after_release(block, revision)], freed


async def release_host(store: Store, ds: Datastore, host: str) -> list[str]:
    """A node is gone: release every allocation that names it (`node` attribute, or one of its
    tunnel handles) wherever it is, then its affinities (empty blocks are deleted, blocks still
    holding other nodes' borrowed addresses stay without affinity), then its IPAM host marker.
    Addresses of other nodes' pods are never touched, even inside this node's blocks."""
    tunnels = tunnel_handles(host)

    def belongs(attr: Attribute) -> bool:
        return attr.secondary.get("node") == host or attr.handle in tunnels

    def pick(block: Block) -> list[IP]:
        return [address for address, attr in block.allocated() if belongs(attr)]

    released: list[str] = []
    for cidr, (block, _) in (await store.blocks()).items():
        if pick(block):
            freed = await release_from_block(store, cidr, pick)
            released.extend(str(a) for a in freed)
    for cidr in await store.host_affinities(host):
        await affinity.release(store, host, cidr, require_empty=False)
    await ds.commit([Purge(keys.ipam_host_key(host))])
    log.info("released node %s: %d addresses", host, len(released))
    return released

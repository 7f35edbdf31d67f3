"""The IPAM allocator: Calico's AutoAssign / AssignIP / Release over etcd (I/O).

One family of an `auto_assign` goes, as in libcalico-go `ipam.go: autoAssign`:
1. the host's affine blocks in the usable pools, in key order;
2. new blocks: the host's walk over the pools finds a CIDR without a block (or a block of its
   own with room), claims it and assigns from it, up to maxBlocksPerHost blocks (default 20);
   when no CIDR is free, an empty block of another host claimed over a minute ago is reclaimed;
3. with strict affinity off, borrowing from any other block with room, in the host's walk order.
Short of addresses after that, everything this request took is released again and
`PoolExhausted` says which pools were tried and how full they are.

Writes: each assignment writes the block and the handle in one transaction guarded by both
revisions (Calico increments the handle, writes the block, and decrements the handle again if
that fails; one transaction makes the two agree at every revision). A refused write re-reads
what it needs and tries again, at most `max_retries` times per step, so nothing loops forever.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from datastore.etcd import KV, Create, Datastore, Delete, Op, Update
from datastore.reads import ReadBatch, ReadResult
from ipam import affinity, keys, release
from ipam.block import IP, Block, sanitize_handle
from ipam.errors import BlockNotEmpty, InputsChanged, InvalidRequest, NotInPool, PoolExhausted
from ipam.inputs import Inputs, inputs_from, queue_inputs, read_config, read_pools
from ipam.pools import (
    LOAD_BALANCER,
    TUNNEL,
    WORKLOAD,
    Pool,
    Reservations,
    describe_usage,
    find_usable_block,
    in_walk_order,
    pool_containing,
    select_pools,
    selects,
)
from ipam.records import Affinity, Handle, IPAMConfig, encode
from ipam.store import (
    STAT_NAMES,
    Store,
    Versioned,
    affinities_from,
    block_from,
    handle_from,
    write_block,
    write_handle,
)

log = logging.getLogger(__name__)

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
USES = (WORKLOAD, TUNNEL, LOAD_BALANCER)
T = TypeVar("T")


@dataclass(frozen=True)
class AssignRequest:
    handle_id: str  # e.g. "k8s-pod-network.<containerID>"
    hostname: str  # node name
    num_v4: int = 1
    num_v6: int = 0
    attrs: Mapping[str, str] = field(default_factory=dict)  # stored as the attribute's secondary
    ipv4_pools: Sequence[str] = ()  # pool names or CIDRs; empty = chosen by the pools' selectors
    ipv6_pools: Sequence[str] = ()
    namespace: str | None = None  # the pod's namespace, for pools' namespaceSelector
    intended_use: str = WORKLOAD  # Workload | Tunnel | LoadBalancer
    # ops committed in the same transaction as the request's last address, given every address
    # it took (the CNI writes the WorkloadEndpoint this way: one transaction, not two)
    with_last: Callable[[list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]],
                        Sequence[Op]] | None = None
    # called, with every address, once that transaction is on its way and before its answer
    # (the CNI plumbs the pod meanwhile); again if a refused one is retried with others
    while_last_commits: Callable[[list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]],
                                 None] | None = None


@dataclass(frozen=True)
class AssignResult:
    ipv4: list[ipaddress.IPv4Interface]  # with the block's prefix length, e.g. 10.244.1.5/26
    ipv6: list[ipaddress.IPv6Interface]
    with_last_committed: bool = False  # the request's `with_last` ops went in with the addresses


@dataclass(frozen=True)
class Prefetched:
    """What `auto_assign` reads before it writes, read by the caller in a batch of its own
    reads (`IPAM.queue_assign_reads`, then `IPAM.assign_reads`): one round trip for all."""

    inputs: Inputs
    affinities: dict[str, Versioned[Affinity]]
    handle: Versioned[Handle] | None
    blocks: dict[str, Versioned[Block] | None]  # the host's blocks that last had room
    # made from remembered values, not read (tabby-node's watched copies): the first refused
    # write raises InputsChanged instead of being retried, so the caller reads and asks again
    remembered: bool = False


@dataclass
class _Job:
    """One request in flight: what it knows and what it has taken so far."""

    hostname: str
    handle_id: str
    attrs: dict[str, str]
    handle: Versioned[Handle] | None
    inputs: Inputs
    affinities: dict[str, Versioned[Affinity]] = field(default_factory=dict)
    taken: list[Interface] = field(default_factory=list)
    # blocks read with the inputs, each used at most once (a retry reads the block again)
    known: dict[str, Versioned[Block] | None] = field(default_factory=dict)
    total: int = 0  # addresses the request wants in all (for `with_last`)
    with_last: Callable[[list[Interface]], Sequence[Op]] | None = None
    with_last_committed: bool = False
    while_last_commits: Callable[[list[Interface]], None] | None = None
    remembered: bool = False


class _Unread:
    pass


UNREAD = _Unread()


class IPAM:
    def __init__(self, ds: Datastore, *, max_retries: int = 100,
                 clock: Callable[[], float] = time.time) -> None:
        """`clock` (epoch seconds) stamps claim times and judges their age; tests move it."""
        self.ds = ds
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._store = Store(ds, self.stats, max_retries)
        self._clock = clock
        # (host, version) -> the affine block that last had room: only a read-order hint
        self._room: dict[tuple[str, int], str] = {}
        # one assignment per host at a time: concurrent requests of one node all write its
        # affine block, so letting them race only turns etcd's guards into retries (Calico's
        # CNI serializes a node's IPAM with a host-wide lock file for the same reason)
        self._assigning: dict[str, asyncio.Lock] = {}

    def _host_lock(self, hostname: str) -> asyncio.Lock:
        return self._assigning.setdefault(hostname, asyncio.Lock())

    # -- assignment --

    def queue_assign_reads(self, batch: ReadBatch, hostname: str, handle_id: str,
                           namespace: str | None = None) -> None:
        """Add what `auto_assign` reads first to a batch: the inputs, the host's affinities,
        the handle and the host's blocks that last had room."""
        queue_inputs(batch, hostname, namespace)
        batch.list(keys.host_prefix(hostname))
        batch.get(keys.handle_key(sanitize_handle(handle_id)))
        for (host, _), cidr in list(self._room.items()):
            if host == hostname:
                batch.get(keys.block_key(cidr))

    def written_blocks(self, batch_keys: Iterable[str]) -> dict[str, KV]:
        """Of `batch_keys`, the blocks as this allocator last wrote them (`Store.commit`)."""
        return {k: kv for k in batch_keys if (kv := self._store.written_blocks.get(k))}

    def assign_reads(self, result: ReadResult, hostname: str, handle_id: str,
                     namespace: str | None = None) -> Prefetched:
        """What `queue_assign_reads` asked for, decoded, for `auto_assign(prefetched=...)`."""
        blocks = {}
        for key in result.read_keys():
            cidr = keys.parse_block_key(key)
            if cidr:
                blocks[cidr] = block_from(result.get(key))
        return Prefetched(inputs_from(result, hostname, namespace),
                          affinities_from(result.list(keys.host_prefix(hostname))),
                          handle_from(result.get(keys.handle_key(sanitize_handle(handle_id)))),
                          blocks)

    async def auto_assign(self, req: AssignRequest, *,
                          prefetched: Prefetched | None = None) -> AssignResult:
        """Addresses of each family asked for, all or nothing: on any failure whatever this
        request already took is released before the error is raised. `prefetched`: the
        first reads, made by the caller at the same time as its own; else read here."""
        _check(req)
        handle_id = sanitize_handle(req.handle_id)
        if prefetched is None:
            batch = ReadBatch()
            self.queue_assign_reads(batch, req.hostname, handle_id, req.namespace)
            prefetched = self.assign_reads(await batch.run(self.ds), req.hostname, handle_id,
                                           req.namespace)
        job = _Job(req.hostname, handle_id, dict(req.attrs), prefetched.handle,
                   prefetched.inputs, dict(prefetched.affinities), known=dict(prefetched.blocks),
                   total=req.num_v4 + req.num_v6, with_last=req.with_last,
                   while_last_commits=req.while_last_commits, remembered=prefetched.remembered)
        async with self._host_lock(req.hostname):
            try:
                v4 = await self._assign_family(job, 4, req.num_v4, req.ipv4_pools,
                                               req.intended_use)
                v6 = await self._assign_family(job, 6, req.num_v6, req.ipv6_pools,
                                               req.intended_use)
            except Exception:
                await self._give_back(job)
                raise
        return AssignResult([i for i in v4 if isinstance(i, ipaddress.IPv4Interface)],
                            [i for i in v6 if isinstance(i, ipaddress.IPv6Interface)],
                            job.with_last_committed)

    async def assign_ip(self, ip: str, handle_id: str, hostname: str,
                        attrs: Mapping[str, str] | None = None, *,
                        intended_use: str | None = None) -> Interface:
        """Allocate one given address (the `ipAddrs` annotation, the `IP=` CNI arg). The block
        is claimed for `hostname` if it does not exist yet; an existing block of another host
        is borrowed from unless strict affinity is on. Reservations do not apply: asking for
        an address by name is how a reserved address is handed out."""
        address = release.parse_ip(ip)
        handle_id = sanitize_handle(handle_id)
        if not handle_id.strip() or not hostname.strip():
            raise InvalidRequest("assigning an address needs a handle ID and the node name")
        (config, _), pools, handle = await asyncio.gather(
            read_config(self.ds), read_pools(self.ds), self._store.handle(handle_id))
        enabled = [p for p in pools if not p.disabled]
        pool = pool_containing(enabled, address)
        if pool is None:
            known = ", ".join(str(p) for p in enabled) or "none"
            raise NotInPool(f"{address} is not in any enabled IP pool (pools: {known})")
        if intended_use and intended_use not in pool.allowed_uses:
            raise InvalidRequest(f"{address} is in pool {pool}, whose allowedUses "
                                 f"{list(pool.allowed_uses)} exclude {intended_use}")
        cidr = str(pool.block_of(address))
        job = _Job(hostname, handle_id, dict(attrs or {}), handle,
                   Inputs(config, pools, Reservations()))
        async with self._host_lock(hostname), self._store.block_lock(cidr):
            return await self._assign_one(job, address, cidr, config.strict_affinity)

    async def _assign_one(self, job: _Job, address: IP, cidr: str, strict: bool) -> Interface:
        handle_id, hostname = job.handle_id, job.hostname
        for _ in self._store.attempts(f"assigning {address}"):
            got = await self._store.block(cidr) or await self._claim(job, cidr)
            if got is None:
                continue  # another host created the block meanwhile: read it again
            block, revision = got
            if strict and block.host != hostname:
                owner = f"affine to {block.host}" if block.host else "without affinity"
                raise InvalidRequest(
                    f"{address} is in block {cidr}, {owner}; strict affinity is on, so node "
                    f"{hostname} may not take addresses from it")
            block.assign_ip(address, handle_id, job.attrs)
            if await self._write_assignment(job, cidr, block, revision, [address]):
                return job.taken[-1]
            job.handle = await self._store.handle(handle_id)
        raise AssertionError("unreachable")

    async def _assign_family(self, job: _Job, version: int, num: int, requested: Sequence[str],
                             use: str) -> list[Interface]:
        if num <= 0:
            return []
        inputs = job.inputs
        pools = select_pools(inputs.pools, version, requested, job.hostname, inputs.node_labels,
                             inputs.namespace_labels, use)
        mine = [c for c in job.affinities if keys.network(c).version == version]
        usable = [c for c in mine if pool_containing(pools, keys.network(c))]
        await self._drop_unselected(job, [c for c in mine if c not in usable])
        owned, limit = len(usable), inputs.config.effective_max_blocks
        start = len(job.taken)

        def missing() -> int:
            return num - (len(job.taken) - start)

        # 1. blocks already affine to the host; the one that last had room is read first,
        #    so a host with many full blocks usually needs one read, not one per block
        usable = [c for c in usable if not inputs.reservations.covers(keys.network(c))]
        hint = self._room.get((job.hostname, version))
        if hint in usable:
            await self._assign_affine(job, hint, await self._block(job, hint), missing())
            usable.remove(hint)
        if missing() and usable:
            found = await asyncio.gather(*(self._block(job, c) for c in usable))
            for cidr, got in zip(usable, found, strict=True):
                if missing():
                    await self._assign_affine(job, cidr, got, missing())
        # 2. new blocks, up to the per-host limit
        if inputs.config.auto_allocate_blocks:
            rounds = self._store.attempts("finding a block with free addresses")
            while missing():
                if owned >= limit:
                    raise await self._exhausted(job, pools, version, owned)
                claimed = await self._claim_new_block(job, pools, version)
                if claimed is None:
                    break
                cidr, got, new = claimed
                owned += int(new)
                if not await self._assign_from(job, cidr, got, missing(), own_only=True):
                    next(rounds)  # raced: someone filled it first; search again, bounded
        # 3. borrowing from other hosts' blocks
        if missing() and not inputs.config.strict_affinity:
            await self._borrow(job, pools, version, missing())
        if missing():
            raise await self._exhausted(job, pools, version, None)
        return job.taken[start:]

    async def _block(self, job: _Job, cidr: str) -> Versioned[Block] | None:
        """The block as read with the inputs (once), else read now. A request that waited
        for the host's lock may hold an older copy than this allocator has since written."""
        if cidr in job.known:
            return self._store.newest(cidr, job.known.pop(cidr))
        return await self._store.block(cidr)

    async def _assign_affine(self, job: _Job, cidr: str, got: Versioned[Block] | None,
                             num: int) -> None:
        """Assign from one of the host's affine blocks, repairing the affinity first if needed
        (as Calico's getBlockFromAffinity does)."""
        aff = job.affinities[cidr]
        if got is None:  # the affinity outlived its block: claim the block again
            got = await self._claim(job, cidr)
        elif got[0].host != job.hostname:  # stale: the block belongs to someone else now
            await self._store.commit([Delete(keys.affinity_key(job.hostname, cidr), aff[1])])
            return
        elif not aff[0].confirmed:
            got = await affinity.confirm(self._store, job.hostname, cidr, aff, got)
            got = got or await self._store.block(cidr)
        if got is not None:
            await self._assign_from(job, cidr, got, num, own_only=True)

    async def _assign_from(self, job: _Job, cidr: str, got: Versioned[Block] | None, num: int,
                           *, own_only: bool) -> int:
        """Take up to `num` addresses from one block; returns how many were taken."""
        reserved = job.inputs.reservations.networks
        async with self._store.block_lock(cidr):
            got = self._store.newest(cidr, got)  # a request before us may have written it
            for _ in self._store.attempts(f"assigning from block {cidr}"):
                if got is None:
                    return 0
                block, revision = got
                if own_only and block.host != job.hostname:
                    return 0
                addresses = block.assign(num, job.handle_id, job.attrs, reserved)
                if not addresses:
                    return 0
                if await self._write_assignment(job, cidr, block, revision, addresses):
                    return len(addresses)
                got, job.handle = await asyncio.gather(self._store.block(cidr),
                                                       self._store.handle(job.handle_id))
        raise AssertionError("unreachable")

    async def _write_assignment(self, job: _Job, cidr: str, block: Block, revision: int,
                                addresses: list[IP]) -> bool:
        """Block and handle in one transaction; on success the job records what it took."""
        current, handle_rev = job.handle if job.handle else (Handle(), None)
        handle = current.adjusted(cidr, len(addresses))
        ops = [write_block(block, revision), write_handle(job.handle_id, handle, handle_rev)]
        prefix = block.network.prefixlen
        new = [ipaddress.ip_interface((a, prefix)) for a in addresses]
        last = job.with_last is not None and len(job.taken) + len(new) == job.total
        if last:
            assert job.with_last is not None
            ops += job.with_last([*job.taken, *new])
        ops = [op for op in ops if op is not None]
        if last and job.while_last_commits is not None:
            done = await _commit_meanwhile(self._store.commit(ops), job.while_last_commits,
                                           [*job.taken, *new])
        else:
            done = await self._store.commit(ops)
        if not isinstance(done, int):
            if job.remembered:
                raise InputsChanged(f"a write of {job.handle_id} was refused ({done}); the "
                                    "remembered inputs were out of date")
            return False
        job.handle = (handle, done)
        job.with_last_committed = job.with_last_committed or last
        job.taken.extend(new)
        room_key = (job.hostname, block.network.version)
        if block.host != job.hostname:
            self.stats["borrowed"] += len(addresses)
        elif block.free_count(job.inputs.reservations.networks):
            self._room[room_key] = cidr
        elif self._room.get(room_key) == cidr:
            del self._room[room_key]
        return True

    async def _claim(self, job: _Job, cidr: str) -> Versioned[Block] | None:
        now_ns = int(self._clock() * 1_000_000_000)
        return await affinity.claim(self._store, job.hostname, cidr, now_ns)

    async def _claim_new_block(self, job: _Job, pools: Sequence[Pool],
                               version: int) -> tuple[str, Versioned[Block], bool] | None:
        """A block to assign from: new (claimed now) or an existing one of ours with room
        (another request of this host may have claimed it). None when the pools are full."""
        reservations = job.inputs.reservations
        for _ in self._store.attempts("claiming a new block"):
            listed = await self._store.blocks(version)
            blocks = {c: b for c, (b, _) in listed.items()}
            usable = find_usable_block(pools, job.hostname, blocks, reservations, self._clock())
            if usable.cidr is not None:
                existing = listed.get(usable.cidr)
                if existing is not None and existing[0].host == job.hostname:
                    return usable.cidr, existing, False
                got = await self._claim(job, usable.cidr)
                if got is not None:
                    return usable.cidr, got, True
                continue  # another host got there first: look again
            for old in usable.reclaimable:
                log.info("reclaiming empty block %s from %s for %s", old.cidr, old.host,
                         job.hostname)
                try:
                    freed = await affinity.release(self._store, old.host, old.cidr,
                                                   require_empty=True,
                                                   required_sequence=old.sequence_number)
                except BlockNotEmpty:
                    continue
                got = await self._claim(job, old.cidr) if freed else None
                if got is not None:
                    return old.cidr, got, True
            return None
        raise AssertionError("unreachable")

    async def _borrow(self, job: _Job, pools: Sequence[Pool], version: int, num: int) -> None:
        reservations = job.inputs.reservations
        listed = await self._store.blocks(version)
        start = len(job.taken)
        for pool in pools:
            inside = [b.network for b, _ in listed.values() if pool.contains(b.network)]
            for net in in_walk_order(pool, job.hostname, inside):
                left = num - (len(job.taken) - start)
                if not left:
                    return
                block = listed[str(net)]
                if reservations.covers(net) or not block[0].free_count(reservations.networks):
                    continue
                await self._assign_from(job, str(net), block, left, own_only=False)

    async def _drop_unselected(self, job: _Job, cidrs: Iterable[str]) -> None:
        """Release empty affine blocks whose pool no longer selects this node (best effort)."""
        enabled = [p for p in job.inputs.pools if not p.disabled]
        for cidr in cidrs:
            pool = pool_containing(enabled, keys.network(cidr))
            if pool is None or selects(pool.node_selector, job.inputs.node_labels):
                continue
            try:
                await affinity.release(self._store, job.hostname, cidr, require_empty=True)
            except BlockNotEmpty:
                continue

    async def _exhausted(self, job: _Job, pools: Sequence[Pool], version: int,
                         owned: int | None) -> PoolExhausted:
        listed = await self._store.blocks(version)
        mine = [i.ip for i in job.taken]  # given back when the error goes up
        usage = describe_usage(pools, {c: b for c, (b, _) in listed.items()},
                               job.inputs.reservations, mine)
        config = job.inputs.config
        text = f"no free IPv{version} address for node {job.hostname}: {usage}"
        if owned is not None:
            text += (f"; {job.hostname} already holds {owned} IPv{version} blocks, its limit "
                     f"(maxBlocksPerHost {config.effective_max_blocks}), and they are full")
        elif config.strict_affinity:
            text += (f"; strict affinity is on, so {job.hostname} may not borrow from other "
                     "nodes' blocks")
        return PoolExhausted(text + "; free leaked addresses (tabbyctl ipam check, gc) or add "
                                    "an IP pool")

    async def _give_back(self, job: _Job) -> None:
        if not job.taken:
            return
        try:
            await release.release_ips(self._store, [str(i.ip) for i in job.taken], None)
        except Exception as e:  # the original error matters more; say what may be left
            log.error("could not release %s after a failed request: %s",
                      ", ".join(str(i.ip) for i in job.taken), e)

    # -- release and queries --

    async def release_ips(self, ips: Iterable[str], *,
                          sequence_numbers: Mapping[str, int] | None = None) -> list[str]:
        """Release addresses; returns the ones that were not allocated. With
        `sequence_numbers` (address -> number read from the block), an address that changed
        hands since fails the call with StaleSequenceNumber."""
        return await release.release_ips(self._store, ips, sequence_numbers)

    async def release_by_handle(self, handle_id: str) -> list[str]:
        return await release.release_by_handle(self._store, handle_id)

    async def ips_by_handle(self, handle_id: str,
                            handle: Versioned[Handle] | _Unread | None = UNREAD) -> list[str]:
        """The addresses a handle holds; `handle`: the handle as the caller already read it."""
        got = (await self._store.handle(sanitize_handle(handle_id)) if isinstance(handle, _Unread)
               else handle)
        if got is None:
            return []
        blocks = await asyncio.gather(*(self._store.block(c) for c in sorted(got[0].block)))
        return [str(a) for b in blocks if b is not None for a in b[0].ips_for_handle(handle_id)]

    async def release_host(self, hostname: str) -> list[str]:
        return await release.release_host(self._store, self.ds, hostname)

    async def release_affinity(self, cidr: str, hostname: str, *,
                               require_empty: bool = True) -> None:
        """Release the host's affinities to the blocks inside `cidr` (a block or larger)."""
        try:
            net = keys.network(cidr)
        except ValueError:
            raise InvalidRequest(f"{cidr!r} is not a CIDR") from None
        for block_cidr in await self._store.host_affinities(hostname):
            inner = keys.network(block_cidr)
            if inner.version == net.version and inner.subnet_of(net):  # type: ignore[arg-type]
                await affinity.release(self._store, hostname, block_cidr,
                                       require_empty=require_empty)

    async def release_pool_affinities(self, cidr: str) -> list[tuple[str, str]]:
        """After an IPPool is deleted (Calico does this in its pool Delete): give up every
        host's affinity to the empty blocks inside `cidr`; blocks still holding addresses keep
        theirs (their pods still need the routes). Returns the (host, block) pairs released."""
        net = keys.network(cidr)
        released = []
        kvs, _ = await self._store.ds.list(keys.HOST_PREFIX)
        for kv in kvs:
            parsed = keys.parse_affinity_key(kv.key)
            if parsed is None:
                continue
            host, block_cidr = parsed
            inner = keys.network(block_cidr)
            if inner.version != net.version or not inner.subnet_of(net):  # type: ignore[arg-type]
                continue
            try:
                await affinity.release(self._store, host, block_cidr, require_empty=True)
                released.append((host, block_cidr))
            except BlockNotEmpty:
                continue
        return released

    # -- config --

    async def get_config(self) -> IPAMConfig:
        return (await read_config(self.ds))[0]

    async def set_config(self, config: IPAMConfig) -> None:
        config.check()
        for _ in self._store.attempts("writing the IPAM config"):
            current, revision = await read_config(self.ds)
            merged = IPAMConfig(config.strict_affinity, config.auto_allocate_blocks,
                                config.max_blocks_per_host, {**current.extra, **config.extra})
            value = encode(merged.to_json())
            op = (Create(keys.CONFIG_KEY, value) if revision is None
                  else Update(keys.CONFIG_KEY, value, revision))
            if isinstance(await self._store.commit([op]), int):
                return


async def _commit_meanwhile(commit: Awaitable[T], meanwhile: Callable[[list[Interface]], None],
                            addresses: list[Interface]) -> T:
    """Send `commit`, run `meanwhile(addresses)` while etcd works on it, then its answer.

    Two turns of the loop put the request on the wire first: one runs the commit up to its
    gRPC call, the next runs the task grpc.aio starts every call in, which sends it."""
    pending = asyncio.ensure_future(commit)
    try:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        meanwhile(addresses)
        return await pending
    except BaseException:
        pending.cancel()  # its outcome is unknown either way; the caller gives back
        raise


def _check(req: AssignRequest) -> None:
    if not req.handle_id.strip():
        raise InvalidRequest("an IPAM request needs a handle ID")
    if not req.hostname.strip():
        raise InvalidRequest("an IPAM request needs the node name")
    if req.num_v4 < 0 or req.num_v6 < 0:
        raise InvalidRequest(f"cannot assign a negative number of addresses "
                             f"({req.num_v4} IPv4, {req.num_v6} IPv6)")
    if req.num_v4 + req.num_v6 == 0:
        raise InvalidRequest("the request asks for no address (num_v4 and num_v6 are 0)")
    if req.intended_use not in USES:
        raise InvalidRequest(f"intended use {req.intended_use!r} is not one of "
                             f"{', '.join(USES)}")

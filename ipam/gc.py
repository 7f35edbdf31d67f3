"""`tabbyctl ipam gc`: free leaked addresses without ever freeing one in use (I/O).

What gc guarantees:
* Only what `ipam.check` calls **leaked** is a candidate: an allocation whose pod has no
  WorkloadEndpoint (and no WorkloadEndpoint or Node lists the address), a tunnel address of a node
  with no Node resource, or a handle no block refers to. Allocations without pod/namespace
  attributes are assumed valid, as in Calico, and never freed by gc.
* A candidate is released only when two scans at least `grace` apart (default 15 minutes) saw
  the *same* allocation leaked: same block, handle and sequence number (same revision for a
  handle). The first sighting is kept in etcd at `/tabby/ipam/gc/<ip>` (or
  `/tabby/ipam/gc/handle/<id>`), so separate runs (a cron job, another machine) remember it; a
  re-allocated address starts the clock again.
* Just before each release the block, the WorkloadEndpoints and the Nodes are read again and the
  candidate is checked again; an owner found now keeps it.
* The release carries the allocation's sequence number, so an address released and handed out
  again meanwhile is refused by the block (Calico's ABA guard), never freed.
* Handles are deleted guarded by the revision they were seen at.
Wall clocks of the machines running gc are compared; run it from one place, or keep NTP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ipam import keys
from ipam.block import Block
from ipam.check import (
    Candidate,
    CheckReport,
    Owners,
    Sighting,
    candidates,
    check,
    index_owners,
    plan_gc,
    recheck_allocation,
    recheck_handle,
    same_allocation,
)
from ipam.errors import IPAMError

if TYPE_CHECKING:
    from datastore.etcd import Datastore, Op
    from ipam.state import IPAMState

Resource = dict[str, Any]

GC_PREFIX = "/tabby/ipam/gc/"
DEFAULT_GRACE = 15 * 60.0
MAX_TXN_OPS = 100  # under etcd's default --max-txn-ops of 128


@dataclass
class Inputs:
    state: IPAMState
    weps: list[Resource]
    nodes: list[Resource]
    pools: list[Resource]
    reservations: list[Resource]


async def load_inputs(ds: Datastore) -> Inputs:
    """The IPAM state and the resources that own addresses (IPAM first: an owner written after
    the IPAM read is then still seen)."""
    from datastore.kinds import kind_for
    from datastore.store import ResourceStore
    from ipam.state import read_state

    state = await read_state(ds)
    st = ResourceStore(ds)
    return Inputs(state, await st.list(kind_for("WorkloadEndpoint")),
                  await st.list(kind_for("Node")), await st.list(kind_for("IPPool")),
                  await st.list(kind_for("IPReservation")))


async def run_check(ds: Datastore, version: str = "", now: float | None = None) -> CheckReport:
    inputs = await load_inputs(ds)
    return check(inputs.state, inputs.weps, inputs.nodes, time.time() if now is None else now,
                 pools=inputs.pools, version=version)


async def owners_now(ds: Datastore) -> Owners:
    from datastore.kinds import kind_for
    from datastore.store import ResourceStore

    st = ResourceStore(ds)
    return index_owners(await st.list(kind_for("WorkloadEndpoint")),
                        await st.list(kind_for("Node")))


async def read_block(ds: Datastore, cidr: str) -> Block | None:
    kv = await ds.get(keys.block_key(cidr))
    return Block.from_json(json.loads(kv.value)) if kv is not None and kv.value else None


async def release_allocation(ds: Datastore, identity: dict[str, Any], *,
                             check_owner: bool = True) -> str | None:
    """Re-read and re-check one leaked allocation, then release it guarded by its sequence
    number. Returns None when released, else why it was kept."""
    from ipam.allocator import IPAM

    block = await read_block(ds, identity["block"])
    if check_owner:
        owners = await owners_now(ds)  # read last: closest to the release
        why = recheck_allocation(identity, block, owners)
    else:  # forced: the owner is not asked about, but it must still be the same allocation
        alloc, reason = same_allocation(identity, block)
        why = None if alloc is not None else reason
    if why is not None:
        return why
    ip = identity["ip"]
    try:
        missing = await IPAM(ds).release_ips([ip],
                                             sequence_numbers={ip: identity["sequenceNumber"]})
    except IPAMError as e:  # StaleSequenceNumber: it changed hands since the re-check
        return str(e)
    return "it was no longer allocated" if ip in missing else None


async def delete_handle(ds: Datastore, identity: dict[str, Any]) -> str | None:
    """Delete a handle no block refers to, guarded by the revision it was seen at."""
    from datastore.etcd import Conflict, NotFound
    from ipam.state import read_state

    why = recheck_handle(identity, await read_state(ds))
    if why is not None:
        return why
    try:
        await ds.delete(keys.handle_key(identity["handle"]), revision=identity["revision"])
    except (Conflict, NotFound):
        return "it changed since it was re-checked"
    return None


# ---- gc -------------------------------------------------------------------------------------


@dataclass
class GCResult:
    grace: float
    dry_run: bool
    recorded: list[Sighting] = field(default_factory=list)
    waiting: list[tuple[Candidate, float]] = field(default_factory=list)
    released: list[Candidate] = field(default_factory=list)
    kept: list[tuple[Candidate, str]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)


async def read_sightings(ds: Datastore) -> dict[str, Sighting]:
    kvs, _ = await ds.list(GC_PREFIX)
    seen: dict[str, Sighting] = {}
    for kv in kvs:
        key = kv.key[len(GC_PREFIX):]
        try:
            seen[key] = Sighting.from_json(key, json.loads(kv.value))
        except (ValueError, KeyError, TypeError):
            continue  # unreadable: treated as never seen, so it only delays a release
    return seen


async def _commit(ds: Datastore, ops: Sequence[Op]) -> None:
    for start in range(0, len(ops), MAX_TXN_OPS):
        await ds.commit(ops[start:start + MAX_TXN_OPS])


async def run_gc(ds: Datastore, *, grace: float = DEFAULT_GRACE, dry_run: bool = False,
                 now: float | None = None) -> GCResult:
    from datastore.etcd import Purge, Put

    now = time.time() if now is None else now
    report = await run_check(ds, now=now)
    plan = plan_gc(candidates(report), await read_sightings(ds), now, grace)
    result = GCResult(grace, dry_run, recorded=plan.record, waiting=plan.waiting,
                      forgotten=plan.forget)
    if dry_run:
        result.released = plan.release  # what would be attempted
        return result
    await _commit(ds, [*(Put(GC_PREFIX + s.key, json.dumps(s.to_json()).encode())
                         for s in plan.record),
                       *(Purge(GC_PREFIX + key) for key in plan.forget)])
    for c in plan.release:
        identity = dict(c.identity)
        why = await (delete_handle(ds, identity) if c.is_handle
                     else release_allocation(ds, identity))
        if why is None:
            result.released.append(c)
        else:
            result.kept.append((c, why))
        # released or not, this sighting is spent: a still-leaked one is seen afresh next run
        await ds.commit([Purge(GC_PREFIX + c.key)])
    return result


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"


def _name(key: str) -> str:
    return f"handle {key[len('handle/'):]}" if key.startswith("handle/") else key


def format_result(r: GCResult) -> str:
    """One line per candidate, then the totals."""
    would = "would release" if r.dry_run else "released"
    lines = [f"  seen     {_name(s.key)}: {s.reason} (first seen now; released after "
             f"{format_duration(r.grace)} if still leaked)" for s in r.recorded]
    lines += [f"  waiting  {_name(c.key)}: {c.reason} ({format_duration(left)} to go)"
              for c, left in r.waiting]
    lines += [f"  {would} {_name(c.key)}: {c.reason}" for c in r.released]
    lines += [f"  kept     {_name(c.key)}: {why}" for c, why in r.kept]
    lines.append(f"gc{' (dry run: nothing written)' if r.dry_run else ''}: {would} "
                 f"{len(r.released)}, kept {len(r.kept)}, waiting {len(r.waiting)}, "
                 f"newly seen {len(r.recorded)} (grace {format_duration(r.grace)})")
    return "\n".join(lines)

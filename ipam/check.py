"""`tabbyctl ipam check` and the GC decision: what disagrees, the report, what gc frees (pure).

Input: an `IPAMState` read at one revision, the WorkloadEndpoints, Nodes and IPPools (v3 objects
as stored), and the time. Nothing here reads or writes etcd; `ipam.gc` and `ctl.ipam_cmd` do.

Who owns each allocation (in use, leaked or unverified) is decided in `ipam.owners`, whose
names are re-exported here.

The JSON report (`ipam check -o report.json`) keeps calicoctl's shape and adds to it:

    {
      "version": "tabby 0.1.0",
      "generatedAt": "2026-05-01T10:00:00.123456Z",
      "revision": 1234,                      # etcd revision of the IPAM read
      "summary": {"blocks": 3, "allocations": 40, "inUse": 37, "leaked": 2, "unverified": 1,
                  "handles": 38, "problems": 5},
      "allocations": {                        # every allocated address, as calicoctl writes it
        "10.244.1.5": [{"ip": "10.244.1.5", "block": "10.244.1.0/26", "ordinal": 5,
                        "handle": "k8s-pod-network.4f1c", "sequenceNumber": 1777,
                        "pod": "web-1", "namespace": "prod", "node": "node-a", "type": "",
                        "creationTimestamp": "...", "inUse": false, "borrowed": false,
                        "owners": [], "status": "leaked",     # in-use | leaked | unverified
                        "reason": "no WorkloadEndpoint for pod prod/web-1"}]},
      "leakedHandles": [{"ID": "k8s-pod-network.9a", "Revision": "1200"}],
      "problems": [{"kind": "leaked-allocation", "ip": "10.244.1.5", "block": "10.244.1.0/26",
                    "handle": "k8s-pod-network.4f1c", "host": "node-a",
                    "reason": "no WorkloadEndpoint for pod prod/web-1"}]
    }

Problem kinds (`PROBLEM_KINDS`) are listed below with what each means.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

# `name as name`: re-exported, so ipam.check.<name> keeps working for ipam.gc, ipam.show, ctl
from ipam.owners import IN_USE as IN_USE
from ipam.owners import LEAKED as LEAKED
from ipam.owners import TUNNEL_HANDLE_PREFIXES as TUNNEL_HANDLE_PREFIXES
from ipam.owners import TUNNEL_TYPES as TUNNEL_TYPES
from ipam.owners import UNVERIFIED as UNVERIFIED
from ipam.owners import Allocation as Allocation
from ipam.owners import Owners as Owners
from ipam.owners import Resource as Resource
from ipam.owners import block_allocations as block_allocations
from ipam.owners import classify as classify
from ipam.owners import index_owners as index_owners
from ipam.owners import node_tunnel_addresses as node_tunnel_addresses
from ipam.owners import tunnel_node as tunnel_node

if TYPE_CHECKING:
    from ipam.block import Block
    from ipam.state import IPAMState

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PROBLEM_KINDS = {
    "leaked-allocation": "an address whose pod has no WorkloadEndpoint (a GC candidate)",
    "tunnel-address-of-missing-node": "a tunnel address of a node with no Node (a GC candidate)",
    "allocation-without-owner": "no owner found and none identifiable (never freed by gc)",
    "allocation-without-handle": "an allocation whose handle has no handle record",
    "handle-without-allocations": "a handle record no block allocation refers to",
    "handle-count-mismatch": "a handle's per-block count differs from the block's allocations",
    "invalid-block": "a block whose allocations/attributes/unallocated disagree",
    "block-without-affinity": "a block affine to a host that holds no confirmed affinity for it",
    "affinity-without-block": "an affinity whose block is missing or affine elsewhere",
    "host-without-node": "blocks or affinities of a host that has no Node resource",
    "workload-address-not-allocated": "a WorkloadEndpoint address in a pool but not in IPAM",
}


# ---- blocks -------------------------------------------------------------------------------


def validate_block(block: Block) -> str | None:
    """Calico's structural checks (calicoctl ipam check): None when the block is sound."""
    size = block.network.num_addresses
    if len(block.allocations) != size:
        return f"{len(block.allocations)} allocation slots for {size} addresses"
    used_attrs: set[int] = set()
    allocated: set[int] = set()
    for ordinal, index in enumerate(block.allocations):
        if index is None:
            continue
        if not 0 <= index < len(block.attributes):
            return f"ordinal {ordinal} refers to attribute {index}, which does not exist"
        used_attrs.add(index)
        allocated.add(ordinal)
    unused = set(range(len(block.attributes))) - used_attrs
    if unused:
        return f"attribute {min(unused)} is not referred to by any allocation"
    seen: set[int] = set()
    for ordinal in block.unallocated:
        if not 0 <= ordinal < size:
            return f"unallocated ordinal {ordinal} is outside the block"
        if ordinal in seen:
            return f"ordinal {ordinal} appears twice in unallocated"
        if ordinal in allocated:
            return f"ordinal {ordinal} is allocated and also listed as unallocated"
        seen.add(ordinal)
    if len(seen) + len(allocated) != size:
        return (f"{len(allocated)} allocated + {len(seen)} unallocated ordinals "
                f"for {size} addresses")
    return None


# ---- the report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: str
    reason: str
    ip: str | None = None
    handle: str | None = None
    block: str | None = None
    host: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for name in ("ip", "block", "handle", "host"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["reason"] = self.reason
        return out

    def line(self) -> str:
        subject = self.ip or self.handle or self.block or self.host or ""
        return f"{self.kind}: {subject}: {self.reason}"


@dataclass(frozen=True)
class LeakedHandle:
    id: str
    revision: int

    def to_json(self) -> dict[str, Any]:
        return {"ID": self.id, "Revision": str(self.revision)}  # calicoctl's field names


@dataclass
class CheckReport:
    revision: int
    generated_at: float
    allocations: list[Allocation]
    leaked_handles: list[LeakedHandle]
    problems: list[Problem]
    blocks: int
    handles: int
    version: str = ""

    def count(self, status: str) -> int:
        return sum(1 for a in self.allocations if a.status == status)

    @property
    def leaked(self) -> list[Allocation]:
        return [a for a in self.allocations if a.status == LEAKED]

    def summary(self) -> dict[str, int]:
        return {"blocks": self.blocks, "allocations": len(self.allocations),
                "inUse": self.count(IN_USE), "leaked": self.count(LEAKED),
                "unverified": self.count(UNVERIFIED), "handles": self.handles,
                "problems": len(self.problems)}

    def to_json(self) -> dict[str, Any]:
        by_ip: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in self.allocations:
            by_ip[a.ip].append(a.to_json())
        return {
            "version": self.version,
            "generatedAt": rfc3339(self.generated_at),
            "revision": self.revision,
            "summary": self.summary(),
            "allocations": dict(by_ip),
            "leakedHandles": [h.to_json() for h in self.leaked_handles],
            "problems": [p.to_json() for p in self.problems],
        }


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _pool_networks(pools: Iterable[Resource]) -> list[Network]:
    nets: list[Network] = []
    for pool in pools:
        spec = pool.get("spec") or {}
        if spec.get("disabled"):
            continue
        try:
            nets.append(ipaddress.ip_network(spec.get("cidr", ""), strict=False))
        except ValueError:
            continue
    return nets


def check(state: IPAMState, weps: Sequence[Resource], nodes: Sequence[Resource],
          now: float, pools: Sequence[Resource] = (), version: str = "") -> CheckReport:
    """Everything `ipam check` reports, from one consistent read."""
    owners = index_owners(weps, nodes)
    problems: list[Problem] = []
    allocations: list[Allocation] = []
    actual: dict[str, Counter[str]] = defaultdict(Counter)  # handle -> block -> count
    blocks = {cidr: b for cidr, (b, _) in state.blocks.items() if not b.deleted}

    for cidr, block in sorted(blocks.items(), key=lambda kv: _net_key(kv[0])):
        invalid = validate_block(block)
        if invalid:
            problems.append(Problem("invalid-block", invalid, block=cidr, host=block.host))
        for alloc in block_allocations(block):
            allocations.append(classify(alloc, owners))
            if alloc.handle is not None:
                actual[alloc.handle][cidr] += 1

    for alloc in allocations:
        problems += _allocation_problems(alloc, state.handles)

    leaked_handles: list[LeakedHandle] = []
    for handle_id, (handle, revision) in sorted(state.handles.items()):
        if handle.deleted:
            continue
        counts = actual.get(handle_id, Counter())
        if not counts:
            leaked_handles.append(LeakedHandle(handle_id, revision))
            listed = ", ".join(sorted(handle.block)) or "no blocks"
            problems.append(Problem("handle-without-allocations",
                                    f"the handle lists {listed} but no block allocation "
                                    "carries it", handle=handle_id))
            continue
        for cidr in sorted(set(handle.block) | set(counts), key=_net_key):
            recorded, found = handle.block.get(cidr, 0), counts.get(cidr, 0)
            if recorded != found:
                problems.append(Problem("handle-count-mismatch",
                                        f"the handle records {recorded} in block {cidr}, "
                                        f"the block holds {found}", handle=handle_id, block=cidr))

    problems += _affinity_problems(state, blocks, owners.nodes)
    problems += _unallocated_workload_addresses(allocations, owners, _pool_networks(pools))
    live_handles = sum(1 for h, _ in state.handles.values() if not h.deleted)
    return CheckReport(state.revision, now, allocations, leaked_handles, problems,
                       blocks=len(blocks), handles=live_handles, version=version)


def _allocation_problems(alloc: Allocation, handles: Mapping[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    where = {"ip": alloc.ip, "block": alloc.block, "handle": alloc.handle}
    if alloc.status == LEAKED:
        tunnel_of = tunnel_node(alloc.handle, alloc.attrs)
        kind = "tunnel-address-of-missing-node" if tunnel_of else "leaked-allocation"
        out.append(Problem(kind, alloc.reason, host=tunnel_of or alloc.node or None, **where))
    elif alloc.status == UNVERIFIED:
        out.append(Problem("allocation-without-owner", alloc.reason, host=alloc.node or None,
                           **where))
    if alloc.handle is None:
        out.append(Problem("allocation-without-handle", "the allocation has no handle ID",
                           **where))
    elif alloc.handle not in handles or handles[alloc.handle][0].deleted:
        out.append(Problem("allocation-without-handle",
                           f"no handle record {alloc.handle} exists", **where))
    return out


def _affinity_problems(state: IPAMState, blocks: Mapping[str, Block],
                       nodes: set[str]) -> list[Problem]:
    out: list[Problem] = []
    confirmed = {key for key, (aff, _) in state.affinities.items()
                 if aff.state == "confirmed" and not getattr(aff, "deleted", False)}
    for cidr, block in sorted(blocks.items(), key=lambda kv: _net_key(kv[0])):
        if block.host and (block.host, cidr) not in confirmed:
            held = state.affinities.get((block.host, cidr))
            why = (f"its affinity record is {held[0].state}" if held
                   else "no affinity record exists")
            out.append(Problem("block-without-affinity",
                               f"the block is affine to host:{block.host} but {why}",
                               block=cidr, host=block.host))
    for (host, cidr), (aff, _) in sorted(state.affinities.items()):
        block = blocks.get(cidr)
        if block is None:
            why = (" (a claim in progress or interrupted)" if aff.state == "pending" else "")
            out.append(Problem("affinity-without-block",
                               f"{aff.state} affinity for a block that does not exist{why}",
                               block=cidr, host=host))
        elif block.host != host:
            owner = f"host:{block.host}" if block.host else "no host"
            out.append(Problem("affinity-without-block",
                               f"{aff.state} affinity, but the block is affine to {owner}",
                               block=cidr, host=host))
    hosts: dict[str, set[str]] = defaultdict(set)
    for (host, cidr) in state.affinities:
        hosts[host].add(cidr)
    for cidr, block in blocks.items():
        if block.host:
            hosts[block.host].add(cidr)
    for host in sorted(set(hosts) - nodes):
        cidrs = sorted(hosts[host], key=_net_key)
        out.append(Problem("host-without-node",
                           f"{len(cidrs)} block(s) or affinities ({', '.join(cidrs)}) belong to "
                           f"host {host}, which has no Node resource "
                           f"(`tabbyctl ipam release --node {host}` frees them)", host=host))
    return out


def _unallocated_workload_addresses(allocations: Sequence[Allocation], owners: Owners,
                                    pools: Sequence[Network]) -> list[Problem]:
    allocated = {a.ip for a in allocations}
    out = []
    for ip, label in owners.wep_ips:
        addr = ipaddress.ip_address(ip)
        if ip in allocated or not any(addr in net for net in pools):
            continue
        out.append(Problem("workload-address-not-allocated",
                           f"{label} uses it, it is in an active pool, IPAM has no allocation",
                           ip=ip))
    return out


def _net_key(cidr: str) -> tuple[int, int, int]:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return (9, 0, 0)
    return (net.version, int(net.network_address), net.prefixlen)


def find_block(blocks: Iterable[Block], ip: str) -> Block | None:
    addr = ipaddress.ip_address(ip)
    return next((b for b in blocks if not b.deleted and addr in b.network), None)


# ---- text output ----------------------------------------------------------------------------


def format_text(report: CheckReport, show_all_ips: bool = False,
                show_problem_ips: bool = False) -> str:
    """calicoctl's summary lines; every allocation or every problem on request."""
    s = report.summary()
    lines = [f"Checked IPAM at revision {report.revision}: {s['blocks']} blocks, "
             f"{s['allocations']} allocations, {s['handles']} handles."]
    if show_all_ips:
        for a in report.allocations:
            whom = ", ".join(a.owners) if a.owners else a.reason
            lines.append(f"  {a.ip} {a.status}; handle {a.handle or '<none>'}; {whom}")
    by_kind = Counter(p.kind for p in report.problems)
    lines.append(f"Found {s['inUse']} IPs in use, {s['leaked']} leaked "
                 "(allocated, no WorkloadEndpoint or Node owns them), "
                 f"{s['unverified']} without an identifiable owner.")
    for kind in PROBLEM_KINDS:
        if by_kind[kind]:
            lines.append(f"Found {by_kind[kind]} {kind}: {PROBLEM_KINDS[kind]}.")
            if show_problem_ips:
                lines += [f"  {p.line()}" for p in report.problems if p.kind == kind]
    lines.append(f"Check complete; found {len(report.problems)} problems.")
    return "\n".join(lines)


# ---- GC decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """Something gc may free: a leaked allocation (key = its IP) or handle (`handle/<id>`)."""

    key: str
    identity: Mapping[str, Any]  # must be unchanged between sightings (block/handle/seq, rev)
    reason: str

    @property
    def is_handle(self) -> bool:
        return self.key.startswith("handle/")


@dataclass(frozen=True)
class Sighting:
    """A candidate as first seen; stored by gc as JSON under /tabby/ipam/gc/<key>."""

    key: str
    identity: Mapping[str, Any]
    first_seen: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**self.identity, "firstSeen": rfc3339(self.first_seen), "reason": self.reason}

    @classmethod
    def from_json(cls, key: str, obj: Mapping[str, Any]) -> Sighting:
        identity = {k: v for k, v in obj.items() if k not in ("firstSeen", "reason")}
        return cls(key, identity, parse_rfc3339(obj["firstSeen"]), obj.get("reason", ""))


def candidates(report: CheckReport) -> list[Candidate]:
    """Leaked allocations and handles; unverified ones are never candidates."""
    out = [Candidate(a.ip, {"ip": a.ip, "block": a.block, "handle": a.handle,
                            "sequenceNumber": a.sequence_number}, a.reason)
           for a in report.leaked]
    out += [Candidate(f"handle/{h.id}", {"handle": h.id, "revision": h.revision},
                      "the handle has no allocations") for h in report.leaked_handles]
    return out


@dataclass
class GCPlan:
    release: list[Candidate] = field(default_factory=list)   # leaked on both scans, grace apart
    waiting: list[tuple[Candidate, float]] = field(default_factory=list)  # seconds still to wait
    record: list[Sighting] = field(default_factory=list)     # first seen on this scan
    forget: list[str] = field(default_factory=list)          # sightings no longer leaked


def plan_gc(found: Sequence[Candidate], seen: Mapping[str, Sighting], now: float,
            grace: float) -> GCPlan:
    """Release only what an earlier scan, at least `grace` ago, saw leaked in the same state.

    A changed identity (re-allocated address, new sequence number, rewritten handle) starts
    the clock again, so a fresh allocation never inherits an old sighting. A first sighting is
    never released, even with grace 0: every release needs two scans.
    """
    plan = GCPlan()
    for c in found:
        old = seen.get(c.key)
        if old is None or dict(old.identity) != dict(c.identity) or old.first_seen > now:
            plan.record.append(Sighting(c.key, dict(c.identity), now, c.reason))
        elif now - old.first_seen >= grace:
            plan.release.append(c)
        else:
            plan.waiting.append((c, grace - (now - old.first_seen)))
    current = {c.key for c in found}
    plan.forget = sorted(k for k in seen if k not in current)
    return plan


def same_allocation(identity: Mapping[str, Any], block: Block | None) -> tuple[
        Allocation | None, str]:
    """The allocation `identity` describes if the block still holds exactly it (same handle and
    sequence number), else None and why not."""
    ip = identity["ip"]
    if block is None or block.deleted or block.cidr != identity["block"]:
        return None, f"block {identity['block']} no longer holds it"
    alloc = next((a for a in block_allocations(block) if a.ip == ip), None)
    if alloc is None:
        return None, "it is no longer allocated"
    if alloc.handle != identity["handle"] or alloc.sequence_number != identity["sequenceNumber"]:
        return None, f"it was re-allocated (handle {alloc.handle or '<none>'})"
    return alloc, ""


def recheck_allocation(identity: Mapping[str, Any], block: Block | None,
                       owners: Owners) -> str | None:
    """Just before release: None if the address is still the same leaked allocation, else why
    it must be kept."""
    alloc, why = same_allocation(identity, block)
    if alloc is None:
        return why
    classify(alloc, owners)
    if alloc.status != LEAKED:
        return ("owned by " + ", ".join(alloc.owners)) if alloc.owners else alloc.reason
    return None


def recheck_handle(identity: Mapping[str, Any], state: IPAMState) -> str | None:
    """Just before deleting a handle: None if it is unchanged and still carried by no block."""
    held = state.handles.get(identity["handle"])
    if held is None:
        return "it no longer exists"
    if held[1] != identity["revision"]:
        return "it changed since it was seen"
    for block, _ in state.blocks.values():
        if not block.deleted and any(a.handle == identity["handle"]
                                     for a in block_allocations(block)):
            return f"block {block.cidr} now carries it"
    return None

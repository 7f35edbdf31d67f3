"""`tabbyctl ipam show`: pool and block utilisation, borrowed addresses, one address (pure).

Numbers follow calicoctl's `ipam show`: IN USE counts allocated addresses, RESERVED counts
addresses an IPReservation covers, FREE counts those that are neither (an address allocated
before it was reserved is in both, so the percentages need not add up to 100).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ipam.check import _net_key, block_allocations, find_block

if TYPE_CHECKING:
    from ipam.block import Block
    from ipam.records import IPAMConfig
    from ipam.state import IPAMState

Resource = dict[str, Any]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Use:
    grouping: str          # "IP Pool" | "Block"
    cidr: str
    total: int
    in_use: int
    reserved: int
    free: int
    host: str = ""          # blocks: the affinity host ("" when unaffine)
    borrowed: int = 0       # blocks: allocations made by another node
    blocks: list[Use] = field(default_factory=list)  # pools: their blocks


def _networks(texts: Iterable[Any]) -> list[Network]:
    out = []
    for text in texts:
        try:
            out.append(ipaddress.ip_network(str(text), strict=False))
        except ValueError:
            continue
    return out


def reserved_networks(reservations: Iterable[Resource]) -> list[Network]:
    nets = [n for r in reservations for n in _networks((r.get("spec") or {}).get(
        "reservedCIDRs") or [])]
    # collapse so overlapping reservations are not counted twice
    return [*ipaddress.collapse_addresses(n for n in nets if n.version == 4),
            *ipaddress.collapse_addresses(n for n in nets if n.version == 6)]


def _overlap(net: Network, reserved: Sequence[Network]) -> int:
    total = 0
    for r in reserved:
        if r.version != net.version or not r.overlaps(net):
            continue
        total += (net if net.subnet_of(r) else r).num_addresses  # type: ignore[arg-type]
    return total


def _is_reserved(ip: str, reserved: Sequence[Network]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in r for r in reserved)


def block_use(block: Block, reserved: Sequence[Network]) -> Use:
    allocs = block_allocations(block)
    total, in_use = block.network.num_addresses, len(allocs)
    n_reserved = _overlap(block.network, reserved)
    both = sum(1 for a in allocs if _is_reserved(a.ip, reserved))
    return Use("Block", block.cidr, total, in_use, n_reserved, total - in_use - n_reserved + both,
               host=block.host or "", borrowed=sum(1 for a in allocs if a.borrowed))


def utilization(state: IPAMState, pools: Sequence[Resource],
                reservations: Sequence[Resource]) -> list[Use]:
    """One Use per pool (with its blocks), then a group without a pool row for blocks no pool
    contains (their pool was deleted), as calicoctl shows them."""
    reserved = reserved_networks(reservations)
    blocks = sorted((b for b, _ in state.blocks.values() if not b.deleted),
                    key=lambda b: _net_key(b.cidr))
    uses: list[Use] = []
    claimed: set[str] = set()
    for pool in sorted(pools, key=lambda p: _net_key((p.get("spec") or {}).get("cidr", ""))):
        nets = _networks([(pool.get("spec") or {}).get("cidr", "")])
        if not nets:
            continue
        net = nets[0]
        mine = [block_use(b, reserved) for b in blocks
                if b.network.version == net.version and b.network.subnet_of(net)]  # type: ignore[arg-type]
        claimed |= {u.cidr for u in mine}
        in_use = sum(u.in_use for u in mine)
        # addresses both allocated and reserved, counted once (all lie in some block)
        both = sum(u.free - u.total + u.in_use + u.reserved for u in mine)
        n_reserved = _overlap(net, reserved)
        uses.append(Use("IP Pool", str(net), net.num_addresses, in_use, n_reserved,
                        net.num_addresses - in_use - n_reserved + both, blocks=mine))
    orphans = [block_use(b, reserved) for b in blocks if b.cidr not in claimed]
    if orphans:
        uses.append(Use("", "", 0, 0, 0, 0, blocks=orphans))
    return uses


def _num(n: int) -> str:
    return f"{n:.5g}"  # calicoctl prints %.5g: exact for small pools, 1.8447e+19 for a /64


def _pct(n: int, total: int) -> str:
    return f"{_num(n)} ({100 * n / total:.0f}%)" if total else _num(n)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Iterable[int] = ()) -> str:
    """Columns as `tabbyctl get` prints them; numeric columns right-aligned."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    right = set(right)
    return "\n".join("   ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                     for r in table)


def format_utilization(uses: Sequence[Use], show_blocks: bool) -> str:
    header = ["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS RESERVED", "IPS FREE"]
    if show_blocks:
        header += ["HOST", "BORROWED"]

    def row(u: Use) -> list[str]:
        cells = [u.grouping, u.cidr, _num(u.total), _pct(u.in_use, u.total),
                 _pct(u.reserved, u.total), _pct(u.free, u.total)]
        if show_blocks:
            cells += [u.host or ("-" if u.grouping == "IP Pool" else "<none>"),
                      str(u.borrowed) if u.grouping == "Block" else ""]
        return cells

    rows = []
    for u in uses:
        if u.grouping:  # the orphan group has no pool row, as in calicoctl
            rows.append(row(u))
        if show_blocks:
            rows += [row(b) for b in u.blocks]
    return render_table(header, rows, right=(2, 3, 4, 5, 7))


def format_borrowed(state: IPAMState) -> str:
    """calicoctl's `--show-borrowed`: addresses handed out from another host's block."""
    rows = []
    for block in sorted((b for b, _ in state.blocks.values() if not b.deleted),
                        key=lambda b: _net_key(b.cidr)):
        for a in block_allocations(block):
            if not a.borrowed:
                continue
            kind = "pod" if a.attrs.get("pod") else a.attrs.get("type", "")
            to = f"{a.attrs.get('namespace', '')}/{a.attrs['pod']}" if a.attrs.get("pod") else ""
            rows.append([a.ip, a.attrs["node"], a.block, a.host or "", kind, to])
    return render_table(["IP", "BORROWING-NODE", "BLOCK", "BLOCK OWNER", "TYPE", "ALLOCATED-TO"],
                        rows)


def describe_ip(state: IPAMState, pools: Sequence[Resource], ip: str) -> str:
    """calicoctl's `ipam show --ip`, plus the pool and block the address lies in."""
    addr = ipaddress.ip_address(ip)
    pool = next((p for p in pools for n in _networks([(p.get("spec") or {}).get("cidr", "")])
                 if addr.version == n.version and addr in n), None)
    where = []
    if pool is not None:
        where.append(f"Pool: {pool['metadata']['name']} ({pool['spec']['cidr']})")
    block = find_block((b for b, _ in state.blocks.values()), ip)
    if block is not None:
        where.append(f"Block: {block.cidr} "
                     f"({'affinity host:' + block.host if block.host else 'no affinity'})")
    alloc = next((a for a in block_allocations(block) if a.ip == str(addr)), None) if block \
        else None
    if alloc is None:
        if pool is None:
            where.append("(not in any IP pool)")
        return "\n".join([f"{addr} is not assigned", *where])
    lines = [f"IP {addr} is in use", *where, f"Handle ID: {alloc.handle or '<none>'}",
             f"Sequence number: {alloc.sequence_number}"]
    if alloc.attrs:
        lines.append("Active Owner Attributes:")
        lines += [f"  {k}: {v}" for k, v in sorted(alloc.attrs.items())]
    else:
        lines.append("No Active Owner attributes defined")
    return "\n".join(lines)


def format_config(config: IPAMConfig) -> str:
    rows = [["StrictAffinity", str(config.strict_affinity).lower()],
            ["AutoAllocateBlocks", str(config.auto_allocate_blocks).lower()],
            ["MaxBlocksPerHost", f"{config.max_blocks_per_host}"
             + ("" if config.max_blocks_per_host else f" ({config.effective_max_blocks})")]]
    return render_table(["PROPERTY", "VALUE"], rows)

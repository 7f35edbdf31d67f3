"""`tabbyctl ipam`: calicoctl's ipam verbs (show, check, release, configure) plus gc, and the
IPAM release that `tabbyctl delete node` performs.

Arguments are validated before etcd is contacted; a refused request changes nothing and says why
in one line (a TabbyError, printed by `ctl.main.main`).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from datastore.errors import InputError, TabbyError

if TYPE_CHECKING:
    from ctl.main import Context
    from datastore.etcd import Datastore
    from datastore.store import ResourceStore
    from ipam.check import CheckReport


class ReleaseRefused(InputError):
    """A release that would free an address in use, or one that is not assigned."""


class NodeIPAMNotReleased(TabbyError):
    """The Node was deleted but its addresses, blocks or affinities could not be released."""


def _version() -> str:
    from importlib.metadata import version

    return f"tabby {version('tabby')}"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise InputError(f"{text!r} is not an IP address") from None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """`15m`, `1h30m`, `90s`, `500ms` or plain seconds -> seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InputError(f"{text!r} is not a duration (e.g. 15m, 1h30m, 90s)")
    return sum(float(n) * _UNIT[u] for n, u in parts)


class Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except InputError as e:
            self.fail(str(e), param, ctx)


@click.group()
def ipam() -> None:
    """IP address management: show, check, release, configure, gc."""


# ---- show -----------------------------------------------------------------------------------

@ipam.command("show")
@click.option("--show-blocks", is_flag=True, help="One row per block, with host and borrowing.")
@click.option("--show-borrowed", is_flag=True,
              help="Addresses handed out from another host's block.")
@click.option("--ip", "ip", default=None, metavar="ADDR", help="Who holds this address.")
@click.option("--show-configuration", is_flag=True, help="The IPAM configuration.")
@click.pass_obj
def show_cmd(ctx: Context, show_blocks: bool, show_borrowed: bool, ip: str | None,
             show_configuration: bool) -> None:
    """Pool and block utilisation, one address, or the IPAM configuration."""
    from ipam import show

    address = _address(ip) if ip is not None else None

    async def go(st: ResourceStore) -> str:
        from ipam.gc import load_inputs

        if show_configuration:
            from ipam.allocator import IPAM

            return show.format_config(await IPAM(st.ds).get_config())
        inputs = await load_inputs(st.ds)
        if address is not None:
            return show.describe_ip(inputs.state, inputs.pools, address)
        if show_borrowed:
            return show.format_borrowed(inputs.state)
        return show.format_utilization(
            show.utilization(inputs.state, inputs.pools, inputs.reservations), show_blocks)

    click.echo(ctx.run(go))


# ---- check ----------------------------------------------------------------------------------

@ipam.command("check")
@click.option("-o", "--output", "out_file", default=None, metavar="FILE",
              help="Also write the machine-readable report (JSON) here.")
@click.option("--show-all-ips", is_flag=True, help="List every allocation and its owner.")
@click.option("--show-problem-ips", is_flag=True, help="List every problem found.")
@click.pass_obj
def check_cmd(ctx: Context, out_file: str | None, show_all_ips: bool,
              show_problem_ips: bool) -> None:
    """Find leaked addresses, orphaned handles and blocks, and inconsistencies."""
    from ipam.check import format_text
    from ipam.gc import run_check

    version = _version()
    report: CheckReport = ctx.run(lambda st: run_check(st.ds, version))
    click.echo(format_text(report, show_all_ips, show_problem_ips))
    if out_file:
        with open(out_file, "w") as f:
            json.dump(report.to_json(), f, indent=2)
            f.write("\n")
        click.echo(f"Report written to {out_file}: {_n(len(report.leaked), 'leaked address')}, "
                   f"{_n(len(report.leaked_handles), 'leaked handle')}; "
                   f"`tabbyctl ipam release --from-report {out_file}` releases them.")


# ---- release --------------------------------------------------------------------------------

@ipam.command("release")
@click.option("--ip", "ips", multiple=True, metavar="ADDR",
              help="Release this address (repeatable).")
@click.option("--from-report", "report_file", default=None, metavar="FILE",
              help="Release what an `ipam check -o` report lists as leaked and still is.")
@click.option("--node", "node", default=None, metavar="NAME",
              help="Release everything of a node that has no Node resource any more.")
@click.option("--force", is_flag=True,
              help="Release even if an owner exists now (never an address re-allocated since).")
@click.pass_obj
def release_cmd(ctx: Context, ips: tuple[str, ...], report_file: str | None, node: str | None,
                force: bool) -> None:
    """Release addresses by hand: `--ip ADDR`, `--from-report FILE` or `--node NAME`."""
    if sum(map(bool, (ips, report_file, node))) != 1:
        raise click.UsageError("give one of --ip ADDR..., --from-report FILE or --node NAME")
    if ips:
        addresses = list(dict.fromkeys(_address(ip) for ip in ips))
        lines = ctx.run(lambda st: _release_ips(st.ds, addresses, force))
    elif report_file:
        leaked, handles = _read_report(report_file)
        lines = ctx.run(lambda st: _release_from_report(st.ds, leaked, handles, force))
    else:
        assert node is not None
        lines = ctx.run(lambda st: _release_node(st, node, force))
    click.echo("\n".join(lines))


async def _release_ips(ds: Datastore, addresses: Sequence[str], force: bool) -> list[str]:
    """All or nothing: every address must be assigned and (unless forced) unowned."""
    from ipam.check import block_allocations, classify, find_block, index_owners
    from ipam.gc import load_inputs, release_allocation

    inputs = await load_inputs(ds)
    owners = index_owners(inputs.weps, inputs.nodes)
    blocks = [b for b, _ in inputs.state.blocks.values()]
    refused: list[str] = []
    in_use = False
    chosen: list[dict[str, Any]] = []
    for ip in addresses:
        block = find_block(blocks, ip)
        alloc = next((a for a in block_allocations(block) if a.ip == ip), None) if block \
            else None
        if alloc is None:
            refused.append(f"{ip} is not assigned")
            continue
        classify(alloc, owners)
        if alloc.owners and not force:
            refused.append(f"{ip} is in use by {', '.join(alloc.owners)}")
            in_use = True
            continue
        chosen.append({"ip": ip, "block": alloc.block, "handle": alloc.handle,
                       "sequenceNumber": alloc.sequence_number})
    if refused:
        hint = " (--force releases addresses in use)" if in_use else ""
        raise ReleaseRefused("nothing released: " + "; ".join(refused) + hint)
    lines = []
    for identity in chosen:
        why = await release_allocation(ds, identity, check_owner=False)
        lines.append(f"released {identity['ip']}" if why is None
                     else f"not released {identity['ip']}: {why}")
    return lines


def _read_report(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The leaked allocations and handles a report lists (Tabby's or calicoctl's)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise InputError(f"{path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("allocations"), dict):
        raise InputError(f"{path} is not an `ipam check -o` report (no allocations map)")
    leaked: list[dict[str, Any]] = []
    for entries in doc["allocations"].values():
        for a in entries if isinstance(entries, list) else []:
            # calicoctl's reports have no status: not in use and not cooling down means leaked
            status = a.get("status") or ("in-use" if a.get("inUse") or a.get("coolingDown")
                                         else "leaked")
            if status != "leaked":
                continue
            try:
                leaked.append({"ip": _address(a["ip"]), "block": str(a["block"]),
                               "handle": a.get("handle") or None,
                               "sequenceNumber": int(a.get("sequenceNumber") or 0)})
            except (KeyError, TypeError, ValueError, InputError):
                raise InputError(f"{path}: allocation entry {a!r} is malformed") from None
    handles = []
    for h in doc.get("leakedHandles") or []:
        try:
            handles.append({"handle": str(h["ID"]), "revision": int(h["Revision"])})
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: leaked handle entry {h!r} is malformed") from None
    return leaked, handles


async def _release_from_report(ds: Datastore, leaked: Sequence[dict[str, Any]],
                               handles: Sequence[dict[str, Any]], force: bool) -> list[str]:
    from ipam.gc import delete_handle, release_allocation

    lines = []
    for identity in leaked:
        why = await release_allocation(ds, identity, check_owner=not force)
        lines.append(f"released {identity['ip']}" if why is None
                     else f"skipped {identity['ip']}: {why}")
    for identity in handles:
        why = await delete_handle(ds, identity)
        lines.append(f"deleted handle {identity['handle']}" if why is None
                     else f"skipped handle {identity['handle']}: {why}")
    released = sum(1 for line in lines if not line.startswith("skipped"))
    lines.append(f"Released {released} of the {len(leaked) + len(handles)} leaked items the "
                 "report lists" + (" (forced)" if force else "; the others changed since"))
    return lines


async def _release_node(st: ResourceStore, name: str, force: bool) -> list[str]:
    from datastore.kinds import kind_for

    if await st.ds.get(kind_for("Node").key(name, None)) is not None and not force:
        raise ReleaseRefused(f"node {name} still exists; delete it (`tabbyctl delete node "
                             f"{name}` releases its IPAM) or use --force")
    return await release_removed_nodes(st.ds, [name])


async def release_removed_nodes(ds: Datastore, node_names: Sequence[str]) -> list[str]:
    """After Node objects are deleted: release their blocks, affinities and tunnel addresses."""
    from ipam.allocator import IPAM

    lines = []
    for name in node_names:
        try:
            released = await IPAM(ds).release_host(name)
        except TabbyError as e:
            raise NodeIPAMNotReleased(
                f"node {name} is deleted but its IPAM was not released: {e}; "
                f"retry with `tabbyctl ipam release --node {name}`") from e
        lines.append(f"released IPAM of node {name}: {_n(len(released), 'address')}, "
                     "its block affinities and empty blocks")
    return lines


async def release_pool_blocks(ds: Datastore, cidrs: Sequence[str]) -> list[str]:
    """After IPPools are deleted: their empty blocks are no longer affine to any node."""
    from ipam.allocator import IPAM

    lines = []
    for cidr in cidrs:
        for host, block in await IPAM(ds).release_pool_affinities(cidr):
            lines.append(f"released block {block} of deleted pool {cidr} from node {host}")
    return lines


# ---- configure ------------------------------------------------------------------------------

@ipam.command("configure")
@click.option("--strictaffinity", type=click.Choice(["true", "false"], case_sensitive=False),
              default=None, help="Only hand out addresses from a node's own blocks.")
@click.option("--max-blocks-per-host", type=click.IntRange(min=0), default=None, metavar="N",
              help="Blocks one node may claim (0 = the default 20); needs strict affinity.")
@click.pass_obj
def configure_cmd(ctx: Context, strictaffinity: str | None,
                  max_blocks_per_host: int | None) -> None:
    """Change the IPAM configuration (/calico/ipam/v2/config)."""
    if strictaffinity is None and max_blocks_per_host is None:
        raise click.UsageError("give --strictaffinity true|false and/or --max-blocks-per-host N")

    async def go(st: ResourceStore) -> list[str]:
        from dataclasses import replace

        from ipam.allocator import IPAM

        allocator = IPAM(st.ds)
        config = await allocator.get_config()
        lines = []
        if strictaffinity is not None:
            config = replace(config, strict_affinity=strictaffinity.lower() == "true")
            lines.append(f"Successfully set StrictAffinity to: {strictaffinity.lower()}")
        if max_blocks_per_host is not None:
            config = replace(config, max_blocks_per_host=max_blocks_per_host)
            lines.append(f"Successfully set MaxBlocksPerHost to: {max_blocks_per_host}")
        await allocator.set_config(config)  # validated there; refused means unchanged
        return lines

    click.echo("\n".join(ctx.run(go)))


# ---- gc -------------------------------------------------------------------------------------

@ipam.command("gc")
@click.option("--grace", type=Duration(), default="15m", show_default=True,
              help="How long an address must stay leaked (two scans this far apart).")
@click.option("--dry-run", is_flag=True, help="Say what would happen; write nothing.")
@click.pass_obj
def gc_cmd(ctx: Context, grace: float, dry_run: bool) -> None:
    """Release leaked addresses seen leaked on two runs at least --grace apart."""
    from ipam.gc import format_result, run_gc

    result = ctx.run(lambda st: run_gc(st.ds, grace=grace, dry_run=dry_run))
    click.echo(format_result(result))

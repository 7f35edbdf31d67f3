"""tabbyctl: calicoctl's verbs over Tabby's etcd store, plus policy simulate / explain."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ctl import output
from ctl.ipam_cmd import ipam, release_pool_blocks, release_removed_nodes
from ctl.lab_cmd import lab
from ctl.manifests import ManifestError, read_manifests
from ctl.node_cmd import node
from ctl.patch import apply_labels, apply_patch
from datastore import resources
from datastore.errors import TabbyError
from datastore.kinds import Kind, kind_from_cli

if TYPE_CHECKING:  # the store pulls in grpc; offline commands never load it
    from datastore.store import ResourceStore

T = TypeVar("T")


class Context:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path

    @asynccontextmanager
    async def store(self) -> AsyncIterator[ResourceStore]:
        from datastore.config import load_config
        from datastore.etcd import Datastore
        from datastore.store import ResourceStore

        config = load_config(self.config_path)
        async with Datastore(config) as ds:
            yield ResourceStore(ds)

    def run(self, fn: Callable[[ResourceStore], Awaitable[T]]) -> T:
        async def go() -> T:
            async with self.store() as st:
                return await fn(st)
        return asyncio.run(go())


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", envvar="TABBY_CONFIG", default=None,
              help="calicoctl-style config file (default /etc/tabby/tabbyctl.cfg, "
                   "or ETCD_ENDPOINTS and ETCD_*_FILE from the environment).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Manage Tabby (Calico-compatible) resources in etcd."""
    ctx.obj = Context(config_path)


# ---- apply / create / replace / delete -----------------------------------------------------

def _file_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("-f", "--filename", required=True, help="File, directory or - for stdin.")(fn)
    fn = click.option("-R", "--recursive", is_flag=True, help="Read directories recursively.")(fn)
    fn = click.option("-n", "--namespace", default="default", show_default=True,
                      help="Namespace for namespaced objects that name none.")(fn)
    return fn


def _write(ctx: Context, mode: str, filename: str, recursive: bool, namespace: str,
           skip_exists: bool = False) -> None:
    objs = resources.kinds_in_order(read_manifests(filename, recursive))
    if not objs:
        raise ManifestError(f"{filename}: no resources found")
    resources.validate_all(objs, namespace)  # fail before connecting: nothing is written
    results = ctx.run(lambda st: st.write(objs, mode, skip_exists, namespace))
    for r in results:
        kind, name, ns = resources.identify(r.obj)
        click.echo(f"{r.action} {resources.describe(kind, name, ns)}")


@cli.command()
@_file_options
@pass_ctx
def apply(ctx: Context, filename: str, recursive: bool, namespace: str) -> None:
    """Create or update the resources in a file (all or nothing)."""
    _write(ctx, "apply", filename, recursive, namespace)


@cli.command()
@_file_options
@click.option("--skip-exists", is_flag=True, help="Skip resources that already exist.")
@pass_ctx
def create(ctx: Context, filename: str, recursive: bool, namespace: str,
           skip_exists: bool) -> None:
    """Create the resources in a file; fails if one exists (all or nothing)."""
    _write(ctx, "create", filename, recursive, namespace, skip_exists)


@cli.command()
@_file_options
@pass_ctx
def replace(ctx: Context, filename: str, recursive: bool, namespace: str) -> None:
    """Replace existing resources (guarded by resourceVersion when given)."""
    _write(ctx, "replace", filename, recursive, namespace)


@cli.command()
@click.argument("kind", required=False)
@click.argument("names", nargs=-1)
@click.option("-f", "--filename", default=None, help="Delete the resources named in a file.")
@click.option("-R", "--recursive", is_flag=True)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--skip-not-exists", is_flag=True, help="Do not fail on missing resources.")
@pass_ctx
def delete(ctx: Context, kind: str | None, names: tuple[str, ...], filename: str | None,
           recursive: bool, namespace: str, skip_not_exists: bool) -> None:
    """Delete resources: `delete KIND NAME...` or `delete -f FILE`."""
    targets: list[tuple[Kind, str, str | None, str | None]] = []
    if filename:
        if kind:
            raise click.UsageError("give either -f FILE or KIND NAME, not both")
        for obj in resources.validate_all(read_manifests(filename, recursive), namespace):
            k, name, ns = resources.identify(obj)
            targets.append((k, name, ns, None))
    else:
        if not kind or not names:
            raise click.UsageError("give KIND NAME... or -f FILE")
        k = kind_from_cli(kind)
        targets = [(k, name, namespace if k.namespaced else None, None) for name in names]
    deleted = ctx.run(lambda st: st.delete_many(targets, skip_missing=skip_not_exists))
    for obj in deleted:
        k, name, ns = resources.identify(obj)
        click.echo(f"deleted {resources.describe(k, name, ns)}")
    # a deleted pool's empty blocks lose their affinities (Calico's IPPool delete does this)
    pools = [o["spec"]["cidr"] for o in deleted
             if o.get("kind") == "IPPool" and (o.get("spec") or {}).get("cidr")]
    if pools:
        for line in ctx.run(lambda st: release_pool_blocks(st.ds, pools)):
            click.echo(line)
    # a deleted node's blocks, affinities and tunnel addresses go with it (Calico's node GC)
    nodes = [name for k, name, _ in map(resources.identify, deleted) if k.name == "Node"]
    if nodes:
        for line in ctx.run(lambda st: release_removed_nodes(st.ds, nodes)):
            click.echo(line)


# ---- get / patch / label --------------------------------------------------------------------

@cli.command()
@click.argument("kind")
@click.argument("names", nargs=-1)
@click.option("-n", "--namespace", default=None, help="Namespace (default: default).")
@click.option("-A", "--all-namespaces", is_flag=True, help="List across all namespaces.")
@click.option("-o", "--output", "fmt", default="ps", show_default=True,
              type=click.Choice(["ps", "wide", "yaml", "json"]))
@pass_ctx
def get(ctx: Context, kind: str, names: tuple[str, ...], namespace: str | None,
        all_namespaces: bool, fmt: str) -> None:
    """Show resources: `get KIND [NAME...] [-n NS | -A] [-o ps|wide|yaml|json]`."""
    k = kind_from_cli(kind)
    ns = None if (all_namespaces and not names) else (namespace or "default")

    async def fetch(st: ResourceStore) -> list[dict[str, Any]]:
        if names:
            return [await st.get(k, n, ns if k.namespaced else None) for n in names]
        items = await st.list(k, ns if k.namespaced else None)
        return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""),
                                            o["metadata"]["name"]))

    items = ctx.run(fetch)
    click.echo(output.render(k, items, fmt, single=len(names) == 1,
                             all_namespaces=all_namespaces or ns is None))


async def _modify(st: ResourceStore, kind: Kind, name: str, namespace: str | None,
                  change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Read, change, write back guarded by the revision read (no lost updates)."""
    current = await st.get(kind, name, namespace)
    changed = change(current)
    changed.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
    return (await st.write([changed], "replace", default_namespace=namespace or "default"))[0].obj


@cli.command()
@click.argument("kind")
@click.argument("name")
@click.option("-p", "--patch", "patch_text", required=True, help="The patch, as JSON or YAML.")
@click.option("--type", "patch_type", default="strategic", show_default=True,
              type=click.Choice(["strategic", "merge", "json"]))
@click.option("-n", "--namespace", default="default", show_default=True)
@pass_ctx
def patch(ctx: Context, kind: str, name: str, patch_text: str, patch_type: str,
          namespace: str) -> None:
    """Patch a resource: `patch ippool pool1 -p '{"spec":{"natOutgoing":true}}'`."""
    import yaml

    k = kind_from_cli(kind)
    try:
        body = yaml.safe_load(patch_text)
    except yaml.YAMLError as e:
        raise ManifestError(f"the patch is not valid JSON/YAML: {e}") from e
    ns = namespace if k.namespaced else None
    ctx.run(lambda st: _modify(st, k, name, ns, lambda obj: apply_patch(obj, body, patch_type)))
    click.echo(f"patched {resources.describe(k, name, ns)}")


@cli.command()
@click.argument("kind")
@click.argument("name")
@click.argument("labels", nargs=-1, required=True)
@click.option("--overwrite", is_flag=True, help="Allow changing an existing label's value.")
@click.option("--remove", is_flag=True, help="Remove the named labels.")
@click.option("-n", "--namespace", default="default", show_default=True)
@pass_ctx
def label(ctx: Context, kind: str, name: str, labels: tuple[str, ...], overwrite: bool,
          remove: bool, namespace: str) -> None:
    """Set or remove labels: `label wep NAME k=v [--overwrite]`, `label ... k --remove`."""
    k = kind_from_cli(kind)
    ns = namespace if k.namespaced else None

    def change(obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta["labels"] = apply_labels(meta.get("labels") or {}, list(labels), overwrite, remove)
        return obj

    ctx.run(lambda st: _modify(st, k, name, ns, change))
    click.echo(f"labelled {resources.describe(k, name, ns)}")


# ---- policy ---------------------------------------------------------------------------------

@cli.group()
def policy() -> None:
    """Simulate and explain policy decisions."""


@policy.command()
@click.argument("filename")
@click.option("-o", "--output", "fmt", default="text", show_default=True,
              type=click.Choice(["text", "json"]))
@click.option("--check", is_flag=True, help="Compare with the scenario's expectations.")
def simulate(filename: str, fmt: str, check: bool) -> None:
    """Evaluate a scenario file offline (no etcd needed)."""
    from felix import scenario

    results = scenario.run_file(filename)
    if fmt == "json":
        click.echo(json.dumps(scenario.to_json(results), indent=2))
    else:
        click.echo(scenario.format_text(results))
    if check:
        report = scenario.check(results)
        click.echo(scenario.format_check(report))
        if report.failed:
            sys.exit(1)


@policy.command()
@click.option("--from", "src", required=True, help="NS/POD, a WorkloadEndpoint name or an IP.")
@click.option("--to", "dst", required=True, help="NS/POD, a WorkloadEndpoint name or an IP.")
@click.option("--port", default=None, help="PORT[/PROTOCOL], e.g. 80/TCP or 53/UDP.")
@click.option("--protocol", default=None, help="Protocol when --port has none (default TCP).")
@click.option("--icmp-type", type=int, default=None)
@click.option("--icmp-code", type=int, default=None)
@click.option("-o", "--output", "fmt", default="text", type=click.Choice(["text", "json"]))
@pass_ctx
def explain(ctx: Context, src: str, dst: str, port: str | None, protocol: str | None,
            icmp_type: int | None, icmp_code: int | None, fmt: str) -> None:
    """Say whether a flow is allowed by the live store's policies, and which rule decided."""
    from datastore.kinds import kind_for
    from felix import explain as explain_mod

    flow = explain_mod.parse_flow(src, dst, port, protocol, icmp_type, icmp_code)

    async def go(st: ResourceStore) -> Any:
        snapshot = await st.snapshot()
        explain_mod.add_pod_endpoints(snapshot, await st.list(kind_for("Pod", "v1")))
        return explain_mod.explain(snapshot, flow)

    verdict = ctx.run(go)
    if fmt == "json":
        click.echo(json.dumps(explain_mod.verdict_json(flow, verdict), indent=2))
    else:
        click.echo(explain_mod.format_verdict(flow, verdict))


cli.add_command(ipam)
cli.add_command(lab)
cli.add_command(node)


@cli.command()
def version() -> None:
    """Print the client version."""
    from importlib.metadata import version as pkg_version

    click.echo(f"tabbyctl {pkg_version('tabby')}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (TabbyError, OSError) as e:  # meant for a person: one line, exit 1
        if os.environ.get("TABBY_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

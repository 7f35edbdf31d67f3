"""`tabbyctl lab`: a Tabby cluster in network namespaces (up, status, pod add/del, exec, down)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lab.state import DEFAULT_NAME, Lab


def _lab_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--name", "lab_name", envvar="TABBY_LAB", default=DEFAULT_NAME,
                      show_default=True, help="Lab name (several labs can coexist).")(fn)
    fn = click.option("--state-dir", envvar="TABBY_LAB_STATE_DIR", default=None,
                      help="Where labs keep their state (default /run/tabby-lab).")(fn)
    return fn


def _lab(lab_name: str, state_dir: str | None) -> Lab:
    return Lab(lab_name, state_dir)


@click.group()
def lab() -> None:
    """A cluster in network namespaces on this machine: etcd, nodes running tabby-node, pods."""


@lab.command()
@click.option("--nodes", type=int, default=2, show_default=True, help="How many nodes.")
@click.option("--pool", default="10.244.0.0/16", show_default=True, help="The pod IPPool.")
@click.option("--encap", default="none", type=click.Choice(["none", "vxlan"]), show_default=True,
              help="none: BGP (exabgp) routes between nodes; vxlan: VXLAN from the store.")
@click.option("--bird", is_flag=True,
              help="Add a BIRD 2 router the nodes peer with as their route reflector.")
@_lab_options
def up(nodes: int, pool: str, encap: str, bird: bool, lab_name: str,
       state_dir: str | None) -> None:
    """Build the lab: underlay bridge, etcd, NODES nodes each running tabby-node."""
    from lab import cluster

    cluster.up(_lab(lab_name, state_dir), nodes, pool, say=click.echo, encap=encap, bird=bird)
    click.echo(f"lab {lab_name} is up with {nodes} node(s)")


@lab.command("bgp")
@click.argument("node_name", required=False)
@_lab_options
def bgp(node_name: str | None, lab_name: str, state_dir: str | None) -> None:
    """`tabbyctl node status` of each lab node (or NODE); with --bird, BIRD's protocols too."""
    from bgp.status import read_status, render_table
    from lab import bird

    state = _lab(lab_name, state_dir).require()
    for name, n in state["nodes"].items():
        if node_name and name != node_name:
            continue
        path = os.path.join(n["dir"], "run", "bgp-status.json")
        click.echo(f"== {name} ({n['ip']})")
        try:
            click.echo(render_table(read_status(Path(path))))
        except (OSError, ValueError) as e:
            click.echo(f"no routing status yet ({e})\n")
    if state.get("bird") and not node_name:
        click.echo("== BIRD route reflector")
        click.echo(bird.birdc(state, "show", "protocols"))


@lab.command()
@click.option("-o", "--output", "fmt", default="text", type=click.Choice(["text", "json"]))
@_lab_options
def status(fmt: str, lab_name: str, state_dir: str | None) -> None:
    """Nodes, pods and their addresses."""
    from lab import cluster

    info = cluster.status(_lab(lab_name, state_dir))
    if fmt == "json":
        click.echo(json.dumps(info, indent=2))
        return
    etcd = info["etcd"]
    click.echo(f"lab {info['lab']}  ({info['state']})")
    click.echo(f"underlay {info['underlay']['ns']}: {info['underlay']['bridge']} "
               f"{info['underlay']['gateway']} ({info['underlay']['cidr']})")
    click.echo(f"etcd     {etcd['ns']}: {etcd['endpoint']}  pid {etcd['pid']} "
               f"{_up(etcd['running'])}  datastore: {info.get('datastore', '-')}")
    click.echo("")
    _table(["NODE", "NAMESPACE", "ADDRESS", "TABBY-NODE", "CNI SOCKET"],
           [[n["name"], n["ns"], n["ip"], f"pid {n['pid']} {_up(n['running'])}", n["socket"]]
            for n in info["nodes"]])
    click.echo("")
    _table(["POD", "NODE", "IPS", "INTERFACE", "WORKLOADENDPOINT", "LABELS"],
           [[p["pod"], p["node"], ",".join(p["ips"]) or p["phase"], p["interface"] or "-",
             p["wep"] or "-", _labels(p["labels"])] for p in info["pods"]])
    if info["stray_namespaces"]:
        click.echo(f"\nnamespaces not in the state: {', '.join(info['stray_namespaces'])}")


def _up(running: bool) -> str:
    return "running" if running else "DOWN"


def _labels(labels: dict[str, str] | None) -> str:
    if labels is None:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())
                    if not k.startswith("projectcalico.org/")) or "-"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@lab.group()
def pod() -> None:
    """Add and delete pods (through the node's real CNI conflist)."""


@pod.command("add")
@click.argument("ref")
@click.option("--node", default=None, help="Node to run on (default: the nodes in turn).")
@click.option("--labels", default=None, help="k=v,k2=v2")
@click.option("--port", "ports", multiple=True, help="Named port [NAME:]PORT[/PROTO]; repeat.")
@click.option("--ip", default=None, help="Ask for this address (CNI_ARGS IP=).")
@_lab_options
def pod_add(ref: str, node: str | None, labels: str | None, ports: tuple[str, ...],
            ip: str | None, lab_name: str, state_dir: str | None) -> None:
    """Create pod NS/NAME: apply the Pod, make its namespace, run CNI ADD."""
    from lab import pods

    created = pods.add(_lab(lab_name, state_dir), pods.parse_ref(ref), node,
                       pods.parse_labels(labels), [pods.parse_port(p) for p in ports], ip)
    click.echo(f"pod {ref} on {created['node']}: {', '.join(created['ips'])} "
               f"(netns {created['netns']})")


@pod.command("del")
@click.argument("ref")
@_lab_options
def pod_del(ref: str, lab_name: str, state_dir: str | None) -> None:
    """Delete pod NS/NAME: CNI DEL (in reverse order), then its namespace and Pod."""
    from lab import pods

    gone = pods.delete(_lab(lab_name, state_dir), pods.parse_ref(ref))
    click.echo(f"pod {ref} deleted from {gone['node']}")


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("ref")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED, required=True)
@_lab_options
def exec_(ref: str, cmd: tuple[str, ...], lab_name: str, state_dir: str | None) -> None:
    """Run CMD in pod NS/POD's network namespace: `lab exec default/web -- ip addr`."""
    from lab import pods

    argv = pods.exec_argv(_lab(lab_name, state_dir), pods.parse_ref(ref), cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # the command's exit status is ours


@lab.command()
@_lab_options
def down(lab_name: str, state_dir: str | None) -> None:
    """Remove the lab: processes, namespaces, files (also after a crash)."""
    from lab import cluster

    done = cluster.down(_lab(lab_name, state_dir), say=click.echo)
    click.echo(f"lab {lab_name} is down" if done else f"lab {lab_name}: nothing to remove")


@lab.command("run")
@click.argument("filename", type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Compare with the scenario's expectations; exit 1 "
              "on a mismatch (pairs not probed, e.g. SCTP, are counted apart).")
@click.option("--simulate", is_flag=True, help="Also run the simulator on the same state and "
              "list every pair where kernel and simulator disagree (exit 1 if any).")
@click.option("-o", "--output", "fmt", default="text", type=click.Choice(["text", "json"]))
@_lab_options
def run(filename: str, check: bool, simulate: bool, fmt: str, lab_name: str,
        state_dir: str | None) -> None:
    """Run scenario FILE with real packets: pods, policies, a probe of every pair per step.

    Uses lab NAME; when it does not exist, brings it up with 3 nodes and takes it down after.
    Everything the run creates is removed at the end, even on failure. Progress goes to stderr.
    """
    from lab import scenario_run

    report = scenario_run.run(_lab(lab_name, state_dir), filename, simulate,
                              say=scenario_run.stderr_say)
    failed = False
    if fmt == "json":
        click.echo(json.dumps(scenario_run.to_json(report), indent=2))
    else:
        click.echo(scenario_run.format_text(report))
    if check:
        verdict = scenario_run.check(report)
        click.echo(scenario_run.format_check(verdict))
        failed = failed or verdict.report.failed > 0
    if simulate:
        found = scenario_run.disagreements(report)
        if fmt == "text" or check:
            click.echo(scenario_run.format_disagreements(found))
        failed = failed or bool(found)
    if failed:
        sys.exit(1)

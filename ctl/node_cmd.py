"""`tabbyctl node status`: the BGP peer table, as `calicoctl node status` prints it."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def node() -> None:
    """This node's routing: BGP peers of the running speaker."""


@node.command()
@click.option("--status-file", default=None, type=click.Path(dir_okay=False),
              help="The routing agent's status (default /run/tabby/bgp-status.json).")
def status(status_file: str | None) -> None:
    """The node's BGP peers: address, type, state, since when, info."""
    from bgp.status import DEFAULT_STATUS_FILE, read_status, render_table

    path = Path(status_file or DEFAULT_STATUS_FILE)
    try:
        info = read_status(path)
    except FileNotFoundError:
        raise click.ClickException(
            f"{path} does not exist: is tabby-node running here with a networking backend "
            "(not --networking-backend none)?") from None
    except ValueError as e:
        raise click.ClickException(f"{path}: unreadable status ({e})") from None
    click.echo(render_table(info), nl=False)

"""The routing agent's status file and `tabbyctl node status`'s table (rendering is pure).

The agent rewrites `<run dir>/bgp-status.json` (atomically) whenever a peer changes state or its
routes change: the speaker (address, AS, pid), every configured peer with its state and when it
last changed, how many routes it sent, what this node announces and which routes it programmed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DEFAULT_STATUS_FILE = "/run/tabby/bgp-status.json"
PEER_TYPES = {"mesh": "node-to-node mesh", "global": "global", "node": "node specific"}


def write_status(path: Path, status: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(status, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def render_table(status: dict[str, Any]) -> str:
    """calicoctl node status's shape: process line, then the IPv4 BGP peer table."""
    lines: list[str] = []
    agent_ok = _process_alive(status.get("agent_pid"))
    speaker = status.get("speaker") or {}
    if status.get("backend") == "vxlan":
        lines.append("Tabby routing agent is running (VXLAN, no BGP)." if agent_ok
                     else "Tabby routing agent is not running.")
        return "\n".join(lines) + "\n"
    if agent_ok and _process_alive(speaker.get("pid")):
        lines.append("Tabby process is running.")
    elif agent_ok:
        lines.append("Tabby routing agent is running; its BGP speaker (exabgp) is not.")
    else:
        lines.append("Tabby process is not running.")
    lines += ["", "IPv4 BGP status"]
    rows = [["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"]]
    for peer in status.get("peers") or []:
        since = peer.get("since")
        rows.append([peer["address"], PEER_TYPES.get(peer.get("kind", ""), peer.get("kind", "")),
                     "up" if peer.get("state") == "up" else "start",
                     time.strftime("%H:%M:%S", time.localtime(since)) if since else "-",
                     peer.get("info", "")])
    if len(rows) == 1:
        lines.append("No IPv4 peers found.")
    else:
        lines.append(_table(rows))
    lines += ["", "IPv6 BGP status", "No IPv6 peers found."]
    return "\n".join(lines) + "\n"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule, "|" + "|".join(f" {c.center(w)} " for c, w in zip(rows[0], widths, strict=True))
           + "|", rule]
    for row in rows[1:]:
        out.append("|" + "|".join(f" {c.ljust(w)} " for c, w in zip(row, widths, strict=True))
                   + "|")
    out.append(rule)
    return "\n".join(out)

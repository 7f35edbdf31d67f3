"""Processes the lab starts (etcd, tabby-node): started detached, recorded by pid + start time,
stopped only when that exact process is still the one we started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STOP_TIMEOUT = 5.0


def start_time(pid: int) -> int | None:
    """The kernel's start time of a pid (clock ticks since boot), None if it is gone: with the
    pid it identifies one process, so a recycled pid is never mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces or parentheses: fields start after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def start(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> dict[str, Any]:
    """Start a daemon in its own session (it outlives the CLI); returns its state record."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=dict(env) if env is not None else None, cwd=cwd,
                                start_new_session=True)
    return {"pid": proc.pid, "start": start_time(proc.pid), "argv": list(argv), "log": str(log)}


def alive(record: Mapping[str, Any]) -> bool:
    pid = int(record.get("pid") or 0)
    if pid <= 0:
        return False
    now = start_time(pid)
    if now is None or (record.get("start") is not None and now != record["start"]):
        return False
    return not _zombie(pid)  # a zombie child of ours counts as gone


def stop(record: Mapping[str, Any], timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM then SIGKILL the recorded process, if it is still the one we started."""
    if not alive(record):
        _reap(int(record.get("pid") or 0))
        return False
    return kill_pid(int(record["pid"]), timeout)


def kill_pid(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop one process by pid (the caller has established it is a lab process)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if start_time(pid) is None or _zombie(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    for _ in range(100):
        _reap(pid)
        if start_time(pid) is None or _zombie(pid):
            break
        time.sleep(0.02)
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    """Collect the exit status when the daemon is our own child (same CLI process)."""
    if pid <= 0:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)

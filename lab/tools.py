"""Tabby's own executables as the lab runs them, and the lab's datastore access."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab import LabError, netns

STORE_TIMEOUT = 60.0


def venv_bin() -> Path:
    """The bin dir of the Python environment running the lab (the Tabby venv)."""
    return Path(sys.prefix) / "bin"


def python() -> str:
    exe = venv_bin() / "python"
    return str(exe) if exe.exists() else sys.executable


def tool(script: str, module: str) -> list[str]:
    """argv for a console script of the venv; `python -m module` when the venv's scripts
    predate it (an editable install only regenerates scripts on reinstall)."""
    exe = venv_bin() / script
    if exe.exists() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [python(), "-m", module]


def store(etcd_ns: str, endpoint: str, ops: Sequence[dict[str, Any]]) -> list[Any]:
    """Run datastore ops inside the lab (only its namespaces can reach its etcd)."""
    argv = netns.nsenter(etcd_ns, [python(), "-m", "lab.storeops"])
    request = json.dumps({"endpoint": endpoint, "ops": list(ops)})
    try:
        done = subprocess.run(argv, input=request, capture_output=True, text=True,
                              timeout=STORE_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"datastore ops timed out after {STORE_TIMEOUT:g} s") from e
    try:
        reply = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LabError(f"datastore ops failed (exit {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-800:]}") from None
    if "error" in reply:
        raise LabError(f"datastore: {reply['error']}")
    return reply["results"]

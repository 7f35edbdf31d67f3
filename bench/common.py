"""What every benchmark shares: a production-like environment and where results are written."""

from __future__ import annotations

import compileall
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datastore", "ctl", "felix", "ipam", "cni", "node", "lab", "bgp")


def production_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the programs being measured, with a bytecode cache as on a real
    node: this sandbox sets PYTHONDONTWRITEBYTECODE, which makes every start recompile."""
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def precompile() -> None:
    """Write .pyc files for Tabby and its dependencies once, before anything is timed."""
    sys.dont_write_bytecode = False
    for package in PACKAGES:
        compileall.compile_dir(str(ROOT / package), quiet=1)
    for path in sys.path:
        if path.endswith("site-packages"):
            compileall.compile_dir(path, quiet=1)


def write_section(begin: str, end: str, body: str) -> None:
    """Replace this benchmark's marked section in bench/RESULTS.md and the README."""
    for path, header in ((ROOT / "bench" / "RESULTS.md", "# Benchmark results\n"),
                         (ROOT / "README.md", "")):
        text = path.read_text() if path.exists() else header
        if begin in text:
            text = text[:text.index(begin)] + body + text[text.index(end) + len(end):]
        elif "BENCH_TABLE" in text:
            text = text.replace("BENCH_TABLE", body)
        else:
            text = text.rstrip() + "\n\n" + body + "\n"
        path.write_text(text)

"""tabbyctl against its anchor, Go's etcdctl, on one etcd in one run.

What a user waits for: a whole command, process start included. Each case runs the Tabby
command and the etcdctl command that stores or reads the same bytes, alternately, N times;
medians and the ratio go to bench/RESULTS.md (between the markers of this benchmark) and the
README's table.

    .venv/bin/python bench/bench_tabbyctl.py [--runs 21]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import precompile, production_env, write_section  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402

TABBYCTL = str(Path(sys.executable).parent / "tabbyctl")
GNP_PREFIX = "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/"
BEGIN, END = "<!-- bench_tabbyctl:begin -->", "<!-- bench_tabbyctl:end -->"


def policy(i: int) -> dict:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": f"bench-{i}"},
            "spec": {"order": 100 + i, "selector": f"app == 'svc-{i}'", "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "source": {"selector": "role == 'client'"},
                                  "destination": {"ports": [80, 443]}}]}}


def timed(cmd: list[str], env: dict[str, str], stdin: str | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}...: {proc.stderr.strip()}")
    return elapsed


def compare(runs: int, tabby: Callable[[], float], anchor: Callable[[], float]) -> tuple[float,
                                                                                      float]:
    tabby(), anchor()  # warm the page cache for both
    t, a = [], []
    for _ in range(runs):  # alternate so drift hits both equally
        t.append(tabby())
        a.append(anchor())
    return statistics.median(t), statistics.median(a)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    rows: list[tuple[str, str, str, float, float]] = []
    precompile()
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(Path(tmp) / "etcd")
        server.start()
        try:
            env = {k: v for k, v in production_env().items() if not k.startswith("ETCD")}
            env.update(ETCD_ENDPOINTS=server.endpoint, ETCDCTL_API="3")
            etcdctl = ["etcdctl", "--endpoints", server.endpoint]
            rows.append(("start-up only (no etcd request)", "tabbyctl --help",
                         "etcdctl version", *compare(
                             args.runs, lambda: timed([TABBYCTL, "--help"], env),
                             lambda: timed([*etcdctl, "version"], env))))
            one = Path(tmp) / "one.json"
            one.write_text(json.dumps(policy(0)))
            stored = json.dumps(policy(0), separators=(",", ":"))
            rows.append(("apply one GlobalNetworkPolicy", "tabbyctl apply -f one.json",
                         "etcdctl put KEY JSON", *compare(
                             args.runs,
                             lambda: timed([TABBYCTL, "apply", "-f", str(one)], env),
                             lambda: timed([*etcdctl, "put", GNP_PREFIX + "bench-0", stored],
                                           env))))
            many = Path(tmp) / "many.yaml"
            many.write_text("\n---\n".join(json.dumps(policy(i)) for i in range(100)))
            puts = "\n".join(f"put {GNP_PREFIX}bench-{i} "
                             f"'{json.dumps(policy(i), separators=(',', ':'))}'"
                             for i in range(100))
            rows.append(("apply 100 policies (one file)", "tabbyctl apply -f many.yaml",
                         "etcdctl txn (100 puts)", *compare(
                             max(5, args.runs // 3),
                             lambda: timed([TABBYCTL, "apply", "-f", str(many)], env),
                             lambda: timed([*etcdctl, "txn"], env, f"\n\n{puts}\n\n"))))
            rows.append(("list 100 policies", "tabbyctl get gnp -o json",
                         "etcdctl get --prefix -w json", *compare(
                             args.runs,
                             lambda: timed([TABBYCTL, "get", "gnp", "-o", "json"], env),
                             lambda: timed([*etcdctl, "get", "--prefix", GNP_PREFIX, "-w",
                                            "json"], env))))
        finally:
            server.stop()
    write_results(rows, args.runs)


def write_results(rows: list[tuple[str, str, str, float, float]], runs: int) -> None:
    table = ["| case | Tabby | anchor (Go etcdctl) | Tabby median | anchor median | ratio |",
             "|---|---|---|---|---|---|"]
    for case, tabby, anchor, t, a in rows:
        table.append(f"| {case} | `{tabby}` | `{anchor}` | {t * 1000:.0f} ms | "
                     f"{a * 1000:.0f} ms | {t / a:.1f}x |")
    stamp = time.strftime("%Y-%m-%d")
    etcd_version = subprocess.run(["etcd", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    body = "\n".join([
        BEGIN,
        "### tabbyctl against etcdctl (whole commands, process start included)",
        "",
        f"Measured {stamp} on {platform.node()} ({os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {etcd_version}, one local etcd, fsync on); "
        "bytecode cache on, as on a node; "
        f"median of {runs} alternating runs ({max(5, runs // 3)} for the 100-policy case). "
        "Tabby validates, defaults and stamps every object and writes the whole file in one "
        "transaction; etcdctl only moves bytes. Reproduce: "
        "`.venv/bin/python bench/bench_tabbyctl.py`.",
        "",
        *table,
        "",
        f"Start-up (interpreter and imports) is {rows[0][3] * 1000:.0f} ms of every tabbyctl "
        f"command; each further policy in a file costs "
        f"{(rows[2][3] - rows[1][3]) / 99 * 1000:.1f} ms (validation, defaulting, one read).",
        END,
    ])
    write_section(BEGIN, END, body)
    print("\n".join(table))


if __name__ == "__main__":
    main()

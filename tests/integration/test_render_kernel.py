"""The rendered dataplane is accepted by the real kernel, for every scenario and both families.

Each case loads the full rendering into a fresh network namespace made here (`ipset restore`,
then `iptables-restore` / `ip6tables-restore` per table) and reads it back: every rendered rule
must be there with its hash comment. The root namespace is never touched; the namespace is
deleted in `finally`.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from felix import scenario
from felix.calc import PolicyIndex
from felix.model import Dataplane
from felix.render import render_with_report
from felix.render_config import Pool, RenderConfig
from felix.render_text import dataplane_text, ipset_restore_text
from felix.rules import parse_net
from tests.conftest import require_binary

pytestmark = pytest.mark.netns

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))
NODE = "sim-node"
CONFIG = RenderConfig(pools=(Pool(parse_net("10.244.0.0/16"), nat_outgoing=True),
                             Pool(parse_net("fd00:244::/64"), nat_outgoing=True)))

# Every rule feature at once, with IPv6 pods, so both families get blocks, sets and LOG.
RICH: dict[str, Any] = {
    "name": "rich",
    "namespaces": {"app": {"env": "prod"}},
    "pods": {
        "app/a": {"ip": "10.244.1.1", "labels": {"app": "a"},
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        "app/b": {"ip": "fd00:244::2", "labels": {"app": "b"},
                  "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]},
    },
    "steps": [{"apply": [
        {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
         "metadata": {"name": "world", "labels": {"role": "world"}},
         "spec": {"nets": ["0.0.0.0/0", "::/0"]}},
        {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
         "metadata": {"name": "everything"},
         "spec": {"selector": "all()", "types": ["Ingress", "Egress"], "ingress": [
             {"action": "Log"},
             {"action": "Allow", "protocol": "TCP",
              "source": {"nets": ["10.0.0.0/8", "192.168.0.0/16"],
                         "notNets": ["10.1.0.0/16"], "selector": "app == 'a'",
                         "notSelector": "app == 'b'"},
              "destination": {"ports": [*range(1, 20), "100:200", "http"],
                              "notPorts": [*range(300, 320)]}},
             {"action": "Allow", "protocol": "UDP", "source": {"nets": ["fd00::/8", "fd01::/16"]},
              "destination": {"nets": ["fd00:244::/64", "fd00:245::/64"], "ports": [53]}},
             {"action": "Pass", "protocol": 132, "destination": {"ports": ["http"]}},
             {"action": "Deny", "protocol": "ICMP", "icmp": {"type": 8, "code": 0}},
             {"action": "Deny", "protocol": "ICMPv6", "notICMP": {"type": 128}},
             {"action": "Allow", "notProtocol": "UDP", "ipVersion": 6,
              "source": {"selector": "role == 'world'"}},
             {"action": "Allow", "protocol": "UDPLite"},
         ], "egress": [
             {"action": "Allow", "destination": {"notNets": ["10.0.0.0/8", "172.16.0.0/12"],
                                                 "nets": ["0.0.0.0/0"]}},
             {"action": "Deny", "protocol": "TCP", "source": {"notPorts": ["http", 22]}},
         ]}},
    ]}],
}


def _snapshots() -> Iterator[tuple[str, Any]]:
    for path in SCENARIOS:
        data = scenario.load_file(str(path))
        for n, (state, _) in enumerate(scenario.steps_of(data, path.parent)):
            yield f"{path.stem}-{n}", scenario.snapshot_of(state)
    for n, (state, _) in enumerate(scenario.steps_of(RICH)):
        yield f"rich-{n}", scenario.snapshot_of(state)


CASES = list(_snapshots())


def _run(ns: str, *cmd: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed: {proc.stderr}\n--- input ---\n{stdin}"
    return proc.stdout


def _load(ns: str, dataplane: Dataplane) -> None:
    _run(ns, "ipset", "restore", stdin=ipset_restore_text(list(dataplane.ipsets.values())))
    for family, restore in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        for text in dataplane_text(dataplane, family).values():
            _run(ns, restore, stdin=text)
        for (fam, table_name), table in dataplane.tables.items():
            if fam != family:
                continue
            saved = _run(ns, restore.replace("restore", "save"), "-t", table_name)
            for chain in table.chains.values():
                count = saved.count(f"-A {chain.name} ")
                assert count == len(chain.rules), f"v{family} {chain.name}: {count} rules"
            kernel_lines = sum(saved.count(f"-A {c} ") for c in {h.chain for h in table.hooks})
            assert kernel_lines == len(table.hooks)
            assert saved.count('--comment "cali:') >= sum(len(c.rules) for c in
                                                          table.chains.values())


@pytest.fixture
def netns() -> Iterator[str]:
    for tool in ("ip", "ipset", "iptables-restore", "ip6tables-restore"):
        require_binary(tool)
    name = "tabby-render-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def test_there_are_cases() -> None:
    assert len(SCENARIOS) >= 3 and len(CASES) > len(SCENARIOS)


@pytest.mark.parametrize(("label", "snapshot"), CASES, ids=[c[0] for c in CASES])
def test_kernel_accepts_rendering(netns: str, label: str, snapshot: Any) -> None:
    result = render_with_report(PolicyIndex(snapshot), NODE, CONFIG)
    assert not result.problems, result.problems
    assert any(t.chains for t in result.dataplane.tables.values())
    _load(netns, result.dataplane)

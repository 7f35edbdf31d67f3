"""`tabbyctl lab run`: a scenario with real packets on a 2-node lab, then nothing left behind.

Each lab here has its own name and state dir. The felix agent (tabby-node starts it on every
node) enforces policy, so the verdicts are the kernel's and must match the scenario and the
simulator. The e2e part runs every scenario of tests/scenarios the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import cluster, netns
from lab.state import Lab
from tests.conftest import require_binary

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

TABBYCTL = str(Path(sys.prefix) / "bin" / "tabbyctl")
SCENARIOS = sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml"))

SCENARIO = """
name: lab-run-small
namespaces:
  a: {team: a}
  b: {team: b}
serviceAccounts:
  a/api: {role: api}
pods:
  a/web: {ip: 10.244.7.10, labels: {app: web}, ports: [{name: http, port: 80, protocol: TCP}]}
  a/client: {ip: 10.244.7.11, labels: {app: client}, serviceAccount: api}
  b/other: {ip: 172.16.4.8, labels: {app: other}}
externals:
  net/office: {ip: 192.0.2.10}
steps:
  - name: no policy - everything reaches everything
    probes:
      - port: 80
        protocol: TCP
        hosts: true
        expect:
          a/client: {a/web: allow, b/other: allow}
          b/other: {a/web: allow}
          net/office: {a/web: allow}
          host: {a/web: allow}
      - {port: 53, protocol: UDP, expect: {b/other: {a/web: allow}}}
      - {protocol: ICMP, icmp: {type: 8, code: 0}, expect: {b/other: {a/client: allow}}}
      - {port: 3868, protocol: SCTP, expect: {a/client: {a/web: allow}}}
  - name: deny ingress in a
    apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-ingress, namespace: a}
        spec: {podSelector: {}, policyTypes: [Ingress]}
    probes:
      port: 80
      protocol: TCP
      expect:
        a/client: {a/web: deny}
        b/other: {a/web: deny}
        net/office: {a/web: deny}
        a/web: {b/other: allow}
  - name: the api service account may reach web on 80
    apply:
      - apiVersion: projectcalico.org/v3
        kind: NetworkPolicy
        metadata: {name: api-to-web, namespace: a}
        spec:
          selector: app == 'web'
          ingress:
          - {action: Allow, protocol: TCP, source: {serviceAccounts: {selector: role == 'api'}},
             destination: {ports: [80]}}
          - {action: Allow, protocol: TCP, source: {namespaceSelector: team == 'x'}}
    probes:
      port: 80
      protocol: TCP
      expect:
        a/client: {a/web: allow}
        b/other: {a/web: deny}
  - name: relabelling namespace b lets its pods in
    relabel:
      namespaces: {b: {team: x}}
    probes:
      port: 80
      protocol: TCP
      expect:
        b/other: {a/web: allow}
"""


class LabCli:
    def __init__(self, name: str, state_dir: Path) -> None:
        self.name, self.state_dir = name, state_dir
        self.lab = Lab(name, state_dir)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TABBYCTL, "lab", *args, "--name", self.name,
                               "--state-dir", str(self.state_dir)],
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCli]:
    require_binary("nsenter")
    require_binary("sysctl")
    require_binary("/usr/lib/cni/portmap")
    cli = LabCli(f"r{os.getpid()}", tmp_path_factory.mktemp("labrun"))
    try:
        done = cli.run("up", "--nodes", "3")  # pods spread over 3 nodes: BGP between them
        assert done.returncode == 0, done.stdout + done.stderr
        yield cli
    finally:
        cli.run("down")


def split_output(stdout: str) -> tuple[dict[str, Any], list[str]]:
    """`-o json --check`: the JSON document, then the check's lines."""
    doc, end = json.JSONDecoder().raw_decode(stdout)
    return doc, stdout[end:].strip().splitlines()


def leftovers(cli: LabCli) -> dict[str, Any]:
    state = cli.lab.require()
    pools, policies = cluster.store(state, [
        {"op": "list", "kind": "IPPool"},
        {"op": "list", "kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1"}])
    routes = netns.ip(state["underlay"]["ns"], "route").stdout
    return {"pods": sorted(state["pods"]),
            "ext": [n for n in netns.names_with_prefix(cli.lab.prefix) if "-ext" in n],
            "pools": sorted(p["spec"]["cidr"] for p in pools),
            "policies": [p["metadata"]["name"] for p in policies],
            "routes": [r for r in routes.splitlines() if r.startswith(("10.244.", "172.16.",
                                                                       "192.0.2."))]}


def test_run_probes_every_step_and_cleans_up(lab: LabCli, tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SCENARIO)
    done = lab.run("run", str(path), "-o", "json", "--check", "--simulate")
    doc, lines = split_output(done.stdout)

    assert doc["name"] == "lab-run-small"
    assert [(s["step"], s["protocol"], s["port"]) for s in doc["steps"]] == [
        (1, "TCP", 80), (1, "UDP", 53), (1, "ICMP", None), (1, "SCTP", 3868),
        (2, "TCP", 80), (3, "TCP", 80), (4, "TCP", 80)]
    assert doc["steps"][2]["icmp"] == {"type": 8, "code": 0}
    # no policy yet: every probed pair of step 1 is allowed, over every protocol, the host's too
    for s in doc["steps"][:3]:
        cells = [v for row in s["matrix"].values() for v in row.values()]
        assert cells and set(cells) == {"allow"}, s
    assert doc["steps"][0]["matrix"]["host"] == {"a/web": "allow", "a/client": "allow",
                                                 "b/other": "allow"}
    assert "net/office" in doc["steps"][0]["matrix"]["a/web"]  # pods reach the external too
    # SCTP: not probed, listed, never passed
    assert doc["steps"][3]["matrix"] == {}
    assert len(doc["notProbed"]) == 12
    assert {n["protocol"] for n in doc["notProbed"]} == {"SCTP"}
    assert all(c["stable"] for c in doc["convergence"]), doc["convergence"]
    check_line = next(x for x in lines if " passed, " in x)

    assert done.returncode == 0, done.stdout + done.stderr
    assert check_line == "14 passed, 0 failed, 1 not probed"
    assert doc["disagreements"] == []
    assert lines[-1] == "kernel and simulator agree on every probed pair"
    assert [c["wait"] for c in doc["convergence"]] == ["agents"] * 4
    step2 = doc["steps"][4]["matrix"]
    assert step2["a/client"]["a/web"] == step2["b/other"]["a/web"] == "deny"
    assert step2["a/web"]["b/other"] == "allow"
    assert doc["steps"][5]["matrix"]["a/client"]["a/web"] == "allow"  # service account
    assert doc["steps"][6]["matrix"]["b/other"]["a/web"] == "allow"  # namespace relabel

    assert leftovers(lab) == {"pods": [], "ext": [], "pools": ["10.244.0.0/16"],
                              "policies": [], "routes": []}


def test_text_output_and_check(lab: LabCli, tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SCENARIO)
    done = lab.run("run", str(path), "--check")
    out = done.stdout
    assert out.startswith("scenario lab-run-small: rows are sources, columns destinations")
    assert "step 1, TCP/80:" in out and "step 4, TCP/80:" in out
    assert "step 1 SCTP/3868: 12 pair(s), not probed: no SCTP sockets" in out
    assert "step 1 SCTP/3868: a/client -> a/web: expected allow, not probed" in out
    assert done.returncode == 0, out + done.stderr
    assert out.splitlines()[-1] == "14 passed, 0 failed, 1 not probed"
    assert "IPPool tabby-lab-run-172-16-0-0-16 172.16.0.0/16" in done.stderr
    assert leftovers(lab)["pods"] == []


def test_a_failed_run_leaves_nothing(lab: LabCli, tmp_path: Path) -> None:
    path = tmp_path / "clash.yaml"
    path.write_text(SCENARIO.replace("ip: 10.244.7.11", "ip: 10.244.7.10"))  # two pods, one IP
    done = lab.run("run", str(path), "--check")
    assert done.returncode == 1
    assert "error:" in done.stderr and "creating pods failed" in done.stderr
    assert leftovers(lab) == {"pods": [], "ext": [], "pools": ["10.244.0.0/16"],
                              "policies": [], "routes": []}


def test_a_broken_scenario_fails_before_touching_the_lab(lab: LabCli, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(SCENARIO.replace("a/client: {a/web: deny}", "a/nobody: {a/web: deny}"))
    done = lab.run("run", str(path))
    assert done.returncode == 1
    assert "unknown source 'a/nobody'" in done.stderr
    assert "IPPool" not in done.stderr


def test_run_brings_up_a_missing_lab_and_takes_it_down(tmp_path: Path) -> None:
    cli = LabCli(f"n{os.getpid()}", tmp_path / "state")
    path = tmp_path / "tiny.yaml"
    path.write_text("""
name: tiny
pods:
  x/a: {ip: 10.244.9.10, labels: {app: a}}
  x/b: {ip: 10.244.9.11, labels: {app: b}}
steps:
  - probes: {port: 80, protocol: TCP, expect: {x/a: {x/b: allow}, x/b: {x/a: allow}}}
""")
    try:
        done = cli.run("run", str(path), "--check")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "bringing it up with 3 nodes" in done.stderr
        # x/b borrows from the block x/a's node claimed: that node blackholes the block until
        # BGP brings it x/b's /32, and the run waits for it before probing
        assert "every node routes every pod after" in done.stderr
        assert done.stdout.splitlines()[-1] == "2 passed, 0 failed"
        assert cli.lab.load() is None
        assert netns.names_with_prefix(cli.lab.prefix) == []
    finally:
        cli.run("down")


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_scenario_passes_with_real_packets(lab: LabCli, path: Path) -> None:
    """Issue 5's e2e acceptance: real packets agree with the expectations and the simulator."""
    done = lab.run("run", str(path), "-o", "json", "--check", "--simulate", timeout=600)
    doc, lines = split_output(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert doc["disagreements"] == []
    check_line = next(x for x in lines if " passed, " in x)
    passed, failed = (int(check_line.split()[i]) for i in (0, 2))
    assert failed == 0 and passed >= 10, check_line
    assert leftovers(lab)["pods"] == []

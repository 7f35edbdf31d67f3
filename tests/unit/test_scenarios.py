"""Every scenario in tests/scenarios passes `policy simulate --check`; format errors are clear."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ctl.main import cli
from felix import scenario

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))


def test_there_are_scenarios() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"seed-001-walkthrough", "seed-003-global-policies",
            "seed-004-test-network-policy"} <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_passes_check(path: Path) -> None:
    report = scenario.check(scenario.run_file(str(path)))
    assert report.failed == 0, "\n".join(report.mismatches)
    assert report.passed >= 10  # a scenario that checks almost nothing is a defect


def test_cli_check_and_json(tmp_path: Path) -> None:
    path = str(SCENARIOS[0])
    runner = CliRunner()
    checked = runner.invoke(cli, ["policy", "simulate", "--check", path])
    assert checked.exit_code == 0, checked.output
    assert checked.output.rstrip().splitlines()[-1].endswith("passed, 0 failed")
    as_json = runner.invoke(cli, ["policy", "simulate", "-o", "json", path])
    doc = json.loads(as_json.output)
    assert doc["name"] and doc["steps"]
    step = doc["steps"][0]
    assert {"protocol", "port", "matrix"} <= set(step)
    assert all(v in ("allow", "deny") for row in step["matrix"].values() for v in row.values())


def _minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "pods": {"x/a": {"ip": "10.244.1.1"}, "x/b": {"ip": "10.244.1.2"}},
        "steps": [{"probes": {"port": 80, "protocol": "TCP",
                              "expect": {"x/a": {"x/b": "allow"}}}}],
    }
    data.update(extra)
    return data


def test_a_wrong_expectation_fails_with_the_deciding_policy() -> None:
    data = _minimal(steps=[{
        "apply": [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "deny", "namespace": "x"},
                   "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}],
        "probes": {"port": 80, "protocol": "TCP", "expect": {"x/a": {"x/b": "allow"}}}}])
    report = scenario.check(scenario.run(data))
    assert (report.passed, report.failed) == (0, 1)
    assert "x/a -> x/b: expected allow, got deny" in report.mismatches[0]
    assert "knp.default.deny" in report.mismatches[0]


def test_self_pairs_are_ignored() -> None:
    data = _minimal(steps=[{"probes": {"port": 80, "protocol": "TCP",
                                       "expect": {"x/a": {"x/a": "deny", "x/b": "allow"}}}}])
    report = scenario.check(scenario.run(data))
    assert (report.passed, report.failed) == (1, 0)


@pytest.mark.parametrize(("change", "message"), [
    ({"steps": []}, "non-empty list of steps"),
    ({"podz": {}}, "unknown field(s) podz"),
    ({"pods": {"a": {"ip": "10.0.0.1"}}}, "must be written NAMESPACE/NAME"),
    ({"pods": {"x/a": {"labels": {}}}}, "needs an ip"),
    ({"steps": [{"probes": {"port": 80, "expect": {"x/zz": {"x/a": "allow"}}}}]},
     "unknown source 'x/zz'"),
    ({"steps": [{"probes": {"port": 80, "expect": {"x/a": {"x/b": "maybe"}}}}]},
     "'maybe' is not allow/deny"),
    ({"steps": [{"probes": {"protocol": "TCP", "expect": {}}}]}, "TCP probes need a port"),
    ({"steps": [{"delete": [{"kind": "GlobalNetworkPolicy", "name": "nope"}]}]},
     "was never applied"),
    ({"steps": [{"apply": [{"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                            "metadata": {"name": "p"},
                            "spec": {"ingress": [{"action": "Maybe"}]}}]}]},
     "spec.ingress[0].action"),
])
def test_format_errors_are_clear(change: dict[str, Any], message: str) -> None:
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.run(_minimal(**change))
    assert message in str(e.value)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_verdicts_do_not_depend_on_object_order(path: Path) -> None:
    """As Calico's calc-graph tests do: the same state in another order gives the same result."""
    import random

    from felix.calc import PolicyIndex
    from felix.simulate import simulate

    data = scenario.load_file(str(path))
    rng = random.Random(path.stem)
    for state, probes in scenario.steps_of(data, path.parent):
        for probe in probes:
            expected = scenario.evaluate(state, probe).matrix
            snap = scenario.snapshot_of(state)
            for field_name in snap.FIELDS.values():
                items = getattr(snap, field_name)
                items.reverse()
                rng.shuffle(items)
            index = PolicyIndex(snap)
            for src, dst in scenario.pairs(state, probe):
                verdict = simulate(index, scenario.flow_for(state, probe, src, dst))
                assert ("allow" if verdict.allowed else "deny") == expected[src][dst], (src, dst)

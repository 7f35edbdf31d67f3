"""The felix agent's pure parts: coalescing and sync doctrine, the store mirror, its config,
metrics text, and the agent loop driven by a scripted watch (no etcd, no kernel)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

import felix.agent as agent_mod
from datastore.etcd import KV, Event, Resync
from datastore.snapshot import Resource
from felix.agent import FelixAgent
from felix.agent_config import merged_felix_spec, render_config
from felix.calc import PolicyIndex
from felix.metrics import Metrics, parse_text
from felix.mirror import StoreMirror
from felix.render import render_with_report
from felix.sync_state import SyncState

PREFIX = "/calico/resources/v3/projectcalico.org/"


# --- SyncState ----------------------------------------------------------------------------------


def test_nothing_is_due_before_the_first_listing() -> None:
    s = SyncState(window=0.05)
    s.changed(1.0)
    assert s.due_at() is None
    s.loaded(2.0)
    assert s.due_at() == pytest.approx(2.0)  # then at once


def test_a_change_after_a_quiet_spell_is_written_at_once() -> None:
    s = SyncState(window=0.05)
    s.loaded(0.0)
    s.start(0.0)
    s.succeeded(0.01, swept=False)
    s.start(0.05)  # the sweeping write
    s.succeeded(0.06, swept=True)
    s.changed(1.0)
    assert s.due_at() == pytest.approx(1.0)  # not held back for company


def test_a_burst_joins_the_next_write_a_window_after_the_last() -> None:
    s = SyncState(window=0.05)
    s.loaded(0.0)
    assert s.start(0.0) is False  # the first write never sweeps
    assert s.due_at() is None
    for t in (0.001, 0.01, 0.04):  # during and just after the write: one burst
        s.changed(t)
    assert s.due_at() == pytest.approx(0.05)  # a window after the write started
    s.changed(0.045)
    assert s.due_at() == pytest.approx(0.05)  # measured from the write: no starvation


def test_writes_are_spaced_by_the_window() -> None:
    s = SyncState(window=0.05)
    s.loaded(0.0)
    s.start(0.0)
    s.succeeded(0.001, swept=False)
    # the first success schedules the sweeping write, a window after the first started
    assert s.due_at() == pytest.approx(0.05)
    assert s.start(0.05) is True
    s.succeeded(0.06, swept=True)
    assert s.due_at() is None and s.in_sync
    s.changed(0.07)
    assert s.due_at() == pytest.approx(0.10)


def test_failures_back_off_and_a_success_resets() -> None:
    s = SyncState(window=0.05, backoff_start=0.5, backoff_max=2.0)
    s.loaded(0.0)
    s.start(0.05)
    assert s.failed(0.1) == 0.5
    assert s.due_at() == pytest.approx(0.6)
    s.start(0.6)
    assert s.failed(0.7) == 1.0
    s.start(1.7)
    assert s.failed(1.8) == 2.0
    s.start(3.8)
    assert s.failed(3.9) == 2.0  # capped
    assert not s.applied_once and not s.in_sync
    s.start(5.9)
    s.succeeded(6.0, swept=False)
    assert s.failures == 0 and s.applied_once
    assert s.due_at() == pytest.approx(6.0)  # the sweeping write: a window after 5.9 passed


# --- StoreMirror --------------------------------------------------------------------------------


def kv(key: str, obj: Any, rev: int) -> KV:
    return KV(key, json.dumps(obj).encode(), rev, rev, 1)


def gnp(name: str, spec: dict[str, Any]) -> Resource:
    return {"kind": "GlobalNetworkPolicy", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": name}, "spec": spec}


def wep(name: str, node: str, iface: str, ip: str, labels: dict[str, str]) -> Resource:
    return {"kind": "WorkloadEndpoint", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": name, "namespace": "dev", "labels": labels},
            "spec": {"node": node, "interfaceName": iface, "ipNetworks": [f"{ip}/32"],
                     "pod": name, "endpoint": "eth0", "orchestrator": "k8s",
                     "profiles": ["projectcalico-default-allow"]}}


GNP_KEY = PREFIX + "globalnetworkpolicies/"
WEP_KEY = PREFIX + "workloadendpoints/dev/"


def test_mirror_resync_events_and_revision() -> None:
    m = StoreMirror()
    m.resync([kv(GNP_KEY + "a", gnp("a", {"selector": "all()"}), 5),
              kv(PREFIX + "not-a-kind/x", {}, 6),
              KV(GNP_KEY + "junk", b"{not json", 7, 7, 1)], 9)
    assert m.synced and m.revision == 9 and list(m.objects) == [GNP_KEY + "a"]
    assert m.objects[GNP_KEY + "a"]["metadata"]["resourceVersion"] == "5"
    assert m.event(Event("put", GNP_KEY + "b", json.dumps(gnp("b", {})).encode(), 10))
    assert m.event(Event("delete", GNP_KEY + "a", None, 11))
    assert not m.event(Event("delete", GNP_KEY + "a", None, 12))  # already gone
    assert not m.event(Event("put", "/calico/ipam/v2/x", b"{}", 13))  # not a resource
    assert list(m.objects) == [GNP_KEY + "b"] and m.revision == 13
    m.resync([], 20)  # a compaction's listing replaces everything
    assert m.objects == {} and m.revision == 20


def test_snapshot_adds_the_default_allow_profile() -> None:
    m = StoreMirror()
    m.resync([], 1)
    snap, problems = m.snapshot()
    assert [p["metadata"]["name"] for p in snap.profiles] == ["projectcalico-default-allow"]
    assert problems == []


def test_an_uncompilable_policy_becomes_deny_for_its_endpoints() -> None:
    bad = gnp("broken", {"selector": "app == 'x'", "types": ["Ingress"],
                         "ingress": [{"action": "Allow", "source": {"selector": "nope ("}}]})
    m = StoreMirror()
    m.resync([kv(GNP_KEY + "broken", bad, 2),
              kv(WEP_KEY + "x", wep("x", "n1", "calix", "10.0.0.1", {"app": "x"}), 3),
              kv(WEP_KEY + "y", wep("y", "n1", "caliy", "10.0.0.2", {"app": "y"}), 4)], 4)
    snap, problems = m.snapshot()
    assert [str(p).split(":")[0] for p in problems] == ["GlobalNetworkPolicy broken"]
    policy = snap.global_network_policies[0]["spec"]
    assert policy["selector"] == "app == 'x'"
    assert policy["ingress"] == [{"action": "Deny"}] and policy["egress"] == [{"action": "Deny"}]
    index = PolicyIndex(snap)
    dp = render_with_report(index, "n1", agent_mod.RenderConfig(ip_versions=(4,))).dataplane
    chains = dp.tables[(4, "filter")].chains
    deny = [c for name, c in chains.items() if name.startswith("cali-pi-")]
    assert len(deny) == 1 and any("DROP" in r.action for r in deny[0].rules)


def test_a_policy_with_an_unusable_selector_denies_its_whole_scope() -> None:
    bad = gnp("worse", {"selector": "(((", "ingress": [{"action": "Allow"}]})
    m = StoreMirror()
    m.resync([kv(GNP_KEY + "worse", bad, 2)], 2)
    snap, problems = m.snapshot()
    assert snap.global_network_policies[0]["spec"]["selector"] == "all()"
    assert "deny-all for all()" in str(problems[0])


def test_a_bad_endpoint_is_left_out() -> None:
    broken = wep("z", "n1", "caliz", "10.0.0.3", {})
    broken["spec"]["ipNetworks"] = ["not-an-ip"]
    m = StoreMirror()
    m.resync([kv(WEP_KEY + "z", broken, 2)], 2)
    snap, problems = m.snapshot()
    assert snap.workload_endpoints == [] and "left out" in str(problems[0])


# --- config and metrics -------------------------------------------------------------------------


def test_felix_configuration_node_overrides_default() -> None:
    configs = [{"metadata": {"name": "default"},
                "spec": {"logPrefix": "x", "ipv6Support": False, "vxlanPort": 1}},
               {"metadata": {"name": "node.n1"}, "spec": {"vxlanPort": 2}},
               {"metadata": {"name": "node.n2"}, "spec": {"vxlanPort": 3}}]
    spec = merged_felix_spec(configs, "n1")
    pools = [{"spec": {"cidr": "10.244.0.0/16", "natOutgoing": True}}]
    cfg = render_config(pools, spec)
    assert (cfg.log_prefix, cfg.ip_versions, cfg.vxlan_port) == ("x", (4,), 2)
    assert [str(p.cidr) for p in cfg.pools] == ["10.244.0.0/16"] and cfg.pools[0].nat_outgoing
    assert render_config([], {"iptablesMarkMask": "bad"}).mark_mask == 0xFFFF0000


def test_metrics_text_round_trips() -> None:
    m = Metrics()
    m.inc("felix_syncs_total")
    m.set("felix_last_sync_seconds", 0.25)
    text = m.text()
    assert "# TYPE felix_syncs_total counter" in text
    values = parse_text(text)
    assert values["felix_syncs_total"] == 1 and values["felix_last_sync_seconds"] == 0.25


# --- the agent loop with a scripted watch -------------------------------------------------------


class Script:
    """A watch that yields what the test queues, then waits."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | Resync] = asyncio.Queue()

    async def watch(self) -> AsyncIterator[Event | Resync]:
        while True:
            yield await self.queue.get()


async def _settle(agent: FelixAgent, seconds: float = 0.15) -> None:
    await asyncio.sleep(seconds)


def test_agent_loop_first_sync_then_sweep_and_coalescing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, bool]] = []
    fail = {"next": False}

    def fake_sync(objects: Mapping[str, Resource], node: str, state: object, base: object, *,
                  sweep: bool) -> agent_mod.SyncResult:
        if fail["next"]:
            fail["next"] = False
            raise RuntimeError("iptables-restore exited 1")
        calls.append((len(objects), sweep))
        return agent_mod.SyncResult(agent_mod.ApplyStats(), 0, 0, 0, 0, (), 0.0)

    monkeypatch.setattr(agent_mod, "sync_once", fake_sync)
    monkeypatch.setattr(agent_mod, "DRIFT_TICK", 3600.0)

    async def scenario() -> None:
        script = Script()
        agent = FelixAgent("n1", script.watch, dataplane=None,  # type: ignore[arg-type]
                           window=0.02)
        task = asyncio.create_task(agent.run())
        try:
            await script.queue.put(Event("put", GNP_KEY + "early", b"{}", 1))
            await _settle(agent)
            assert calls == []  # nothing is written before the first listing
            await script.queue.put(Resync((kv(GNP_KEY + "a", gnp("a", {}), 2),), 2))
            await _settle(agent)
            assert calls == [(1, False), (1, True)]  # first sync, then the sweeping one
            for i in range(30):
                await script.queue.put(Event("put", GNP_KEY + f"b{i}",
                                             json.dumps(gnp(f"b{i}", {})).encode(), 3 + i))
            await _settle(agent)
            assert calls[2:] == [(31, True)]  # one write for the burst
            fail["next"] = True
            agent.sync.backoff_start = 0.01
            await script.queue.put(Event("delete", GNP_KEY + "a", None, 40))
            await _settle(agent, 0.3)
            assert calls[3:] == [(30, True)]  # retried after the failure
            assert agent.metrics.get("felix_sync_errors_total") == 1
            assert agent.metrics.get("felix_syncs_total") == 5
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_host_interfaces_from_ip_json_skip_pod_veths() -> None:
    from felix.host_interfaces import parse_ip_addr_json

    text = ('[{"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1"}]},'
            ' {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "198.18.0.11"},'
            ' {"family": "inet6", "local": "fe80::1"}]},'
            ' {"ifname": "cali0123456789a", "addr_info": []}]')
    assert parse_ip_addr_json(text) == {"lo": ["127.0.0.1"], "eth0": ["198.18.0.11", "fe80::1"]}

"""The agent's incremental path (IndexMemo + RenderCache) renders exactly what a render from
scratch renders, after every step of random sequences of store changes."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datastore.selector import parse
from felix.agent import SyncCaches, sync_once
from felix.calc import PolicyIndex
from felix.calc_memo import IndexMemo
from felix.dataplane.apply import DataplaneState
from felix.dataplane.backend import Backend
from felix.mirror import build_snapshot
from felix.render import RenderResult, render_with_report
from felix.render_cache import RenderCache
from felix.render_config import Pool, RenderConfig
from felix.render_text import dataplane_text
from felix.rules import parse_net
from tests.unit.test_calc import global_netset, gnp, namespaces, netset, np, pod, tier
from tests.unit.test_calc_index_equivalence import random_labels, random_selector

NODE = "node1"
NSS = ["n1", "n2", "n3"]
CONFIG = RenderConfig(pools=(Pool(parse_net("10.0.0.0/16"), True),),
                      host_interfaces={"eth1": ["10.9.9.1"]})

Store = dict[str, dict[str, Any]]


# --- random store objects ------------------------------------------------------------------


def _ports(rng: random.Random) -> list[int | str]:
    return rng.choice([[80], [8000 + rng.randrange(20)], [80, 443], ["8000:8010", 9000],
                       ["http"], [80, "http"], list(range(7000, 7020))])


def random_rule(rng: random.Random) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": rng.choice(["Allow", "Allow", "Deny", "Pass", "Log"])}
    shape = rng.random()
    if shape < 0.6:  # the common case: a protocol and destination ports (guarded)
        rule["protocol"] = rng.choice(["TCP", "TCP", "UDP"])
        rule["destination"] = {"ports": _ports(rng)}
    elif shape < 0.7:
        rule.update(protocol="ICMP", icmp={"type": 8})
    elif shape < 0.8:
        rule["protocol"] = "TCP"
        rule["source"] = {"ports": [1000 + rng.randrange(5)]}
    if rng.random() < 0.4:
        rule.setdefault("source", {})["selector"] = random_selector(rng, 1)
    if rng.random() < 0.15:
        rule.setdefault("source", {})["nets"] = rng.choice(
            [["10.0.1.0/24"], ["10.0.1.0/24", "fd00::/64"], ["192.168.0.0/16"]])
    if rng.random() < 0.1:
        rule.setdefault("destination", {})["notSelector"] = random_selector(rng, 1)
    if rng.random() < 0.1:
        rule["ipVersion"] = rng.choice([4, 6])
    if rng.random() < 0.03:  # unrenderable: the whole policy fails closed
        rule.update(protocol="TCP", destination={"ports": ["70000"]})
    return rule


def random_policy(rng: random.Random, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": random_selector(rng, 1),
        "order": rng.choice([None, 1, 2, 3, 10]),
        "tier": rng.choice(["default", "default", "t1", "t2", "ghost"]),
        "ingress": [random_rule(rng) for _ in range(rng.randint(0, 3))],
        "egress": [random_rule(rng) for _ in range(rng.randint(0, 2))],
    }
    if spec["order"] is None:
        del spec["order"]
    if rng.random() < 0.5:  # ports only: guarded, and grouped with its neighbours
        spec["ingress"] = [{"action": rng.choice(["Allow", "Deny", "Log", "Pass"]),
                            "protocol": "TCP", "destination": {"ports": _ports(rng)}}
                           for _ in range(rng.randint(1, 2))]
        spec["selector"] = rng.choice(["all()", "has(app)", spec["selector"]])
    if rng.random() < 0.3:
        spec["types"] = rng.sample(["Ingress", "Egress"], rng.randint(1, 2))
    if rng.random() < 0.05:
        spec["selector"] = "app == "  # does not parse: a deny-all stand-in
    if rng.random() < 0.5:
        return np(rng.choice(NSS), name, **spec)
    if rng.random() < 0.15:
        spec.update(rng.choice([{"doNotTrack": True, "applyOnForward": True},
                                {"preDNAT": True, "applyOnForward": True, "egress": []},
                                {"applyOnForward": True}, {"preDNAT": True}]))
    return gnp(name, **spec)


def random_pod(rng: random.Random, name: str) -> dict[str, Any]:
    ports = [{"name": rng.choice(["http", "dns"]), "port": rng.choice([80, 53, 8080]),
              "protocol": rng.choice(["TCP", "UDP"])} for _ in range(rng.randint(0, 2))]
    obj = pod(rng.choice(NSS), name, f"10.0.{rng.randrange(4)}.{rng.randrange(1, 250)}",
              random_labels(rng), node=rng.choice([NODE, NODE, "node2"]), ports=ports)
    if rng.random() < 0.05:
        obj["spec"]["interfaceName"] = ""  # not rendered, reported
    if rng.random() < 0.05:
        obj["spec"]["profiles"] = [*obj["spec"]["profiles"], "kns.gone"]  # missing profile
    return obj


def random_hep(rng: random.Random, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"node": NODE, "expectedIPs": [rng.choice(["10.9.9.1", "10.9.9.2"])]}
    iface = rng.choice(["eth0", "eth1", "*", None])
    if iface is not None:
        spec["interfaceName"] = iface
    return {"kind": "HostEndpoint", "apiVersion": "projectcalico.org/v3",
            "metadata": {"name": name, "labels": random_labels(rng)}, "spec": spec}


def random_netset(rng: random.Random, name: str) -> dict[str, Any]:
    nets = [f"192.168.{rng.randrange(4)}.0/24", rng.choice(["fd00::1/128", "172.16.0.0/12"])]
    if rng.random() < 0.5:
        return netset(rng.choice(NSS), name, nets, **random_labels(rng))
    return global_netset(name, nets, **random_labels(rng))


def random_tier(rng: random.Random, name: str) -> dict[str, Any]:
    return tier(name, rng.choice([None, 5, 50, 2_000_000]), rng.choice([None, "Pass"]))


def random_namespace(rng: random.Random, ns: str) -> list[dict[str, Any]]:
    return namespaces(**{ns: random_labels(rng)})


# --- changes: each returns a new store; objects are replaced, never mutated -----------------

Change = Callable[[random.Random, Store], Store]
MAKERS: dict[str, Callable[[random.Random, str], dict[str, Any]]] = {
    "pod": random_pod, "policy": random_policy, "hep": random_hep, "netset": random_netset,
    "tier": random_tier,
}
POOL_SIZES = {"pod": 12, "policy": 16, "hep": 3, "netset": 4, "tier": 2}


def _put(kind: str) -> Change:
    def change(rng: random.Random, store: Store) -> Store:
        n = rng.randrange(POOL_SIZES[kind])
        name = f"t{n + 1}" if kind == "tier" else f"{kind}{n}"
        return {**store, f"{kind}/{n}": MAKERS[kind](rng, name)}
    return change


def _delete(rng: random.Random, store: Store) -> Store:
    keys = [k for k in store if not k.startswith("ns/")]
    if not keys:
        return store
    gone = rng.choice(keys)
    return {k: v for k, v in store.items() if k != gone}


def _relabel_namespace(rng: random.Random, store: Store) -> Store:
    ns = rng.choice(NSS)
    profiles = random_namespace(rng, ns)
    if rng.random() < 0.2:
        profiles = profiles[1:]  # kns.<ns> deleted: its pods name a missing profile
    out = {k: v for k, v in store.items() if not k.startswith(f"ns/{ns}/")}
    out.update({f"ns/{ns}/{i}": p for i, p in enumerate(profiles)})
    return out


def _copy_one(rng: random.Random, store: Store) -> Store:
    """The same value as a new object (a watch event that changed nothing)."""
    key = rng.choice(sorted(store))
    return {**store, key: copy.deepcopy(store[key])}


def _burst(rng: random.Random, store: Store) -> Store:
    """Many changes in one sync (a resync, a namespace of pods starting at once)."""
    for _ in range(rng.randint(5, 40)):
        store = rng.choice([*PUTS, _delete])(rng, store)
    return store


PUTS = [_put(kind) for kind in MAKERS for _ in range(2 if kind in ("pod", "policy") else 1)]
CHANGES: dict[str, Change] = {
    **{f"put-{kind}": _put(kind) for kind in MAKERS},
    "delete": _delete, "relabel-namespace": _relabel_namespace, "copy": _copy_one,
    "burst": _burst,
}


def initial_store(seed: int) -> Store:
    rng = random.Random(seed)
    store: Store = {}
    for ns in NSS:
        store.update({f"ns/{ns}/{i}": p for i, p in enumerate(random_namespace(rng, ns))})
    for _ in range(20):
        store = rng.choice(PUTS)(rng, store)
    return store


# --- the comparison ------------------------------------------------------------------------


class Incremental:
    """What the agent keeps between syncs, driven the way sync_once drives it."""

    def __init__(self, memo: IndexMemo) -> None:
        self.memo = memo
        self.render = RenderCache()

    def sync(self, store: Store) -> tuple[RenderResult, list[Any], PolicyIndex]:
        snapshot, problems = build_snapshot(store, self.memo.cache)
        index = self.memo.index(snapshot)
        return render_with_report(index, NODE, CONFIG, self.render), problems, index


def from_scratch(store: Store) -> tuple[RenderResult, list[Any], PolicyIndex]:
    snapshot, problems = build_snapshot(copy.deepcopy(store))
    index = PolicyIndex(snapshot)
    return render_with_report(index, NODE, CONFIG), problems, index


def assert_same_rendering(inc: Incremental, store: Store) -> PolicyIndex:
    got, got_problems, index = inc.sync(store)
    want, want_problems, _ = from_scratch(store)
    assert got_problems == want_problems
    assert got.problems == want.problems
    for family in (4, 6):  # the text first: a readable diff, chain order included
        assert dataplane_text(got.dataplane, family) == dataplane_text(want.dataplane, family)
    assert got.dataplane == want.dataplane
    return index


def assert_same_answers(index: PolicyIndex, store: Store) -> None:
    """Every question the renderer (or anyone) may ask, answered as from scratch."""
    _, _, plain = from_scratch(store)
    by_name = {(e.kind, e.namespace, e.name): e for e in plain.endpoints}
    for ep in index.endpoints:
        ref = by_name[(ep.kind, ep.namespace, ep.name)]
        for d in ("ingress", "egress"):
            assert index.tiers_for(ep, d) == plain.tiers_for(ref, d)
            if ep.is_host:
                for kind in ("normal", "forward", "untracked", "prednat"):
                    assert index.host_tiers_for(ep, d, kind) == plain.host_tiers_for(ref, d, kind)
    selectors = {p.selector for p in plain.policies} | {parse("has(app)"), parse("all()")}
    for s in selectors:
        assert index.selector_members(s) == plain.selector_members(s)
        for proto in (None, 6, 17):
            assert (index.named_port_members(s, "http", proto)
                    == plain.named_port_members(s, "http", proto))


MEMOS = {
    "default": lambda: IndexMemo(),
    "always-update": lambda: IndexMemo(scan_limit=10_000, small_change=10_000),
    "always-rebuild": lambda: IndexMemo(scan_limit=0, small_change=0),
}


@pytest.mark.parametrize("memo", sorted(MEMOS))
@pytest.mark.parametrize("seed", range(6))
def test_random_walk_renders_and_answers_as_from_scratch(seed: int, memo: str) -> None:
    rng = random.Random(seed)
    store = initial_store(seed)
    inc = Incremental(MEMOS[memo]())
    for step in range(25):
        index = assert_same_rendering(inc, store)
        if step % 6 == 5:  # asking about everything is slow; the renderer's questions suffice
            assert_same_answers(index, store)
        store = CHANGES[rng.choice(sorted(CHANGES))](rng, store)


@pytest.mark.parametrize("memo", sorted(MEMOS))
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.lists(
    st.tuples(st.sampled_from(sorted(CHANGES)), st.integers(0, 2**32)), min_size=1, max_size=15))
def test_change_sequences_render_as_from_scratch(memo: str, seed: int,
                                                 steps: list[tuple[str, int]]) -> None:
    store = initial_store(seed)
    inc = Incremental(MEMOS[memo]())
    assert_same_rendering(inc, store)
    for change, change_seed in steps:
        store = CHANGES[change](random.Random(change_seed), store)
        assert_same_rendering(inc, store)


def test_unchanged_store_reuses_every_piece() -> None:
    store = initial_store(1)
    inc = Incremental(IndexMemo())
    first, _, _ = inc.sync(store)
    again, _, _ = inc.sync(dict(store))
    for key, table in first.dataplane.tables.items():
        for name, chain in table.chains.items():
            assert again.dataplane.tables[key].chains[name] is chain, name
    for name, ipset in first.dataplane.ipsets.items():
        assert again.dataplane.ipsets[name] is ipset, name


def test_a_failed_update_leaves_no_half_state(monkeypatch: pytest.MonkeyPatch) -> None:
    store = initial_store(2)
    memo = IndexMemo()
    inc = Incremental(memo)
    inc.sync(store)

    def boom(*_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(memo, "_advance_policies", boom)
    changed = _put("policy")(random.Random(7), store)
    with pytest.raises(RuntimeError):
        inc.sync(changed)
    monkeypatch.undo()
    assert_same_rendering(inc, changed)


class RecordingRunner:
    """Answers every dataplane command with empty output, and remembers them."""

    prefix: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(self, argv: list[str], *, stdin: str | None = None, check: bool = True,
            timeout: float | None = None) -> Any:
        from felix.dataplane.runner import Result

        self.commands.append(list(argv))
        return Result(0, "", "")


def desired_after_sync(store: Store, caches: SyncCaches | None) -> tuple[Any, list[list[str]]]:
    runner = RecordingRunner()
    state = DataplaneState(runner, backend=Backend("nft"))  # type: ignore[arg-type]
    sync_once(store, NODE, state, RenderConfig(), sweep=True, cache=caches)
    return {k: t.last_desired for k, t in state.tables.items()}, runner.commands


def test_sync_once_with_caches_applies_what_a_fresh_sync_applies() -> None:
    rng = random.Random(5)
    store = initial_store(5)
    caches = SyncCaches()
    for _ in range(8):
        got, _ = desired_after_sync(store, caches)
        want, _ = desired_after_sync(store, None)
        assert got == want
        store = CHANGES[rng.choice(sorted(CHANGES))](rng, store)


def test_host_interfaces_are_read_only_for_a_local_host_endpoint_without_interface() -> None:
    base = {k: v for k, v in initial_store(3).items() if not k.startswith("hep/")}
    read = ["ip", "-j", "addr", "show"]
    _, commands = desired_after_sync(base, SyncCaches())
    assert read not in commands
    hep = random_hep(random.Random(0), "h")
    hep["spec"].pop("interfaceName", None)
    _, commands = desired_after_sync({**base, "hep/x": hep}, SyncCaches())
    assert read in commands

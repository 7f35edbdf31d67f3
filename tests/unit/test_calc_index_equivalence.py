"""PolicyIndex's label index, memos and candidate narrowing, and the compiled selector
closures, give exactly the plain scan's results."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from typing import Any

import pytest

from datastore.selector import parse
from felix.calc import CompileCache, PolicyIndex, TierPolicies, compile_policy, compile_profile
from felix.mirror import build_snapshot
from tests.unit.test_calc import (
    global_netset,
    gnp,
    hep,
    namespaces,
    netset,
    np,
    pod,
    snapshot,
    tier,
)

KEYS = ["app", "role", "env", "x"]
VALUES = ["a", "b", "c", "ab"]
NSS = ["n1", "n2", "n3"]


def _term(rng: random.Random) -> str:
    k, v, w = rng.choice(KEYS), rng.choice(VALUES), rng.choice(VALUES)
    return rng.choice([
        f"{k} == '{v}'", f"{k} != '{v}'", f"has({k})", f"!has({k})", f"{k} in {{'{v}', '{w}'}}",
        f"{k} not in {{'{v}'}}", f"{k} contains '{v}'", f"{k} starts with '{v}'",
        f"{k} ends with '{v}'", "all()", f"projectcalico.org/namespace == '{rng.choice(NSS)}'",
    ])


def random_selector(rng: random.Random, depth: int = 2) -> str:
    if depth == 0 or rng.random() < 0.3:
        return _term(rng)
    parts = [random_selector(rng, depth - 1) for _ in range(rng.randint(2, 3))]
    shape = rng.random()
    if shape < 0.5:
        return " && ".join(f"({p})" for p in parts)
    if shape < 0.8:
        return " || ".join(f"({p})" for p in parts)
    return f"!({parts[0]})"


def random_labels(rng: random.Random) -> dict[str, str]:
    return {k: rng.choice(VALUES) for k in KEYS if rng.random() < 0.6}


def world(seed: int) -> tuple[list[dict[str, Any]], random.Random]:
    rng = random.Random(seed)
    objs: list[dict[str, Any]] = [*namespaces(*NSS), tier("t1", 10), tier("t2", 5, "Pass")]
    for j in range(40):
        ports = [{"name": rng.choice(["http", "dns"]), "port": 80 + j % 3,
                  "protocol": rng.choice(["TCP", "UDP"])} for _ in range(rng.randint(0, 2))]
        objs.append(pod(rng.choice(NSS), f"p{j}", f"10.0.{j // 200}.{j % 200 + 1}",
                        random_labels(rng), node=rng.choice(["node1", "node2"]), ports=ports))
    for j in range(6):
        objs.append(netset(rng.choice(NSS), f"s{j}", [f"192.168.{j}.0/24", f"fd00::{j}/128"],
                           **random_labels(rng)))
        objs.append(global_netset(f"g{j}", [f"172.16.{j}.0/24"], **random_labels(rng)))
        objs.append(hep(f"h{j}", "node1", [f"10.9.0.{j + 1}"], random_labels(rng)))
    for i in range(30):
        spec: dict[str, Any] = {"selector": random_selector(rng), "order": rng.choice([1, 2, 3]),
                                "tier": rng.choice(["default", "t1", "t2"]),
                                "ingress": [{"action": "Allow"}], "egress": [{"action": "Deny"}]}
        if rng.random() < 0.3:
            spec["types"] = [rng.choice(["Ingress", "Egress"])]
        if rng.random() < 0.2:
            spec.update(rng.choice([{"doNotTrack": True, "applyOnForward": True},
                                    {"preDNAT": True, "applyOnForward": True},
                                    {"applyOnForward": True}]))
            objs.append(gnp(f"g{i}", **spec))
        elif rng.random() < 0.5:
            objs.append(gnp(f"g{i}", **spec))
        else:
            objs.append(np(rng.choice(NSS), f"p{i}", **spec))
    return objs, rng


@pytest.mark.parametrize("seed", range(30))
def test_compiled_selector_matches_tree_walk(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        s = parse(random_selector(rng, 3))
        for _ in range(20):
            labels = random_labels(rng)
            assert s.matches(labels) == s._root.ev(labels), (s, labels)


@pytest.mark.parametrize("text,required", [
    ("a == 'x'", (("a", "x"),)),
    ("has(a)", (("a", None),)),
    ("a == 'x' && has(b) && c != 'y'", (("a", "x"), ("b", None))),
    ("(a == 'x' && b == 'y') && has(c)", (("a", "x"), ("b", "y"), ("c", None))),
    ("a == 'x' || b == 'y'", ()),
    ("!has(a)", ()),
    ("a in {'x'}", ()),
    ("all()", ()),
])
def test_required_labels(text: str, required: tuple[Any, ...]) -> None:
    assert parse(text).required_labels == required


def plain_members(idx: PolicyIndex, selector: Any) -> frozenset[Any]:
    return frozenset(net for c in [*idx.endpoints, *idx.network_sets]
                     if selector.matches(c.labels) for net in c.nets)


def plain_named(idx: PolicyIndex, selector: Any, name: str, proto: int | None) -> frozenset[Any]:
    return frozenset((net.network_address, p.protocol, p.port)
                     for ep in idx.endpoints if selector.matches(ep.labels)
                     for p in ep.ports if p.name == name and proto in (None, p.protocol)
                     for net in ep.nets)


def plain_tiers(idx: PolicyIndex, ep: Any, direction: str, kind: str | None) -> list[Any]:
    out = []
    for t in idx.tiers:
        chosen = [p for p in sorted(idx.policies, key=lambda p: p.sort_key) if p.tier == t.name
                  and not p.staged and direction in p.types and p.selector.matches(ep.labels)
                  and ((kind is None and not (p.pre_dnat or p.do_not_track))
                       or (kind is not None and _host_kind_plain(p, kind)))]
        if chosen:
            if kind in ("untracked", "prednat"):
                t = replace(t, default_action="Pass")
            out.append(TierPolicies(t, tuple(chosen)))
    return out


def _host_kind_plain(p: Any, kind: str) -> bool:
    if kind == "untracked":
        return p.do_not_track
    if kind == "prednat":
        return p.pre_dnat and not p.do_not_track
    if p.pre_dnat or p.do_not_track:
        return False
    return kind == "normal" or p.apply_on_forward


@pytest.mark.parametrize("seed", range(12))
def test_index_answers_equal_plain_scan(seed: int) -> None:
    objs, rng = world(seed)
    idx = PolicyIndex(snapshot(*objs))
    selectors = [parse(random_selector(rng)) for _ in range(40)]
    selectors += [p.selector for p in idx.policies]
    for s in selectors:
        for _ in range(2):  # the second call is answered by the memo
            assert idx.selector_members(s) == plain_members(idx, s), s
            for name in ("http", "dns", "none"):
                for proto in (None, 6, 17):
                    assert idx.named_port_members(s, name, proto) == plain_named(
                        idx, s, name, proto), (s, name, proto)
    for ep in idx.endpoints:
        for d in ("ingress", "egress"):
            assert idx.tiers_for(ep, d) == plain_tiers(idx, ep, d, None), (ep.name, d)
            if ep.is_host:
                for kind in ("normal", "forward", "untracked", "prednat"):
                    assert idx.host_tiers_for(ep, d, kind) == plain_tiers(idx, ep, d, kind)


@pytest.mark.parametrize("seed", range(4))
def test_compile_cache_gives_the_same_index(seed: int) -> None:
    objs, _ = world(seed)
    objs.append(np("n1", "bad", selector="app == ", ingress=[{"action": "Allow"}]))
    store = {str(i): o for i, o in enumerate(objs)}
    cache = CompileCache()
    plain_snap, plain_problems = build_snapshot(store)
    for _ in range(2):  # cold, then every object's compile reused
        snap, problems = build_snapshot(store, cache)
        assert snap == plain_snap and problems == plain_problems
        assert PolicyIndex(snap, cache).policies == PolicyIndex(plain_snap).policies
        assert PolicyIndex(snap, cache).profiles == PolicyIndex(plain_snap).profiles
    pol = next(o for o in objs if o["kind"] == "NetworkPolicy")
    assert cache.policy(pol) is cache.policy(pol) == compile_policy(pol)
    prof = next(o for o in objs if o["kind"] == "Profile")
    assert cache.profile(prof) == compile_profile(prof)
    changed = {**pol, "spec": {**pol["spec"], "order": 99}}  # replaced: compiled afresh
    assert cache.policy(changed).order == 99
    cache.retain([pol])
    assert len(cache) == 2  # its compiled policy and the mirror's check of it


def test_label_index_skips_non_str_values() -> None:
    idx = PolicyIndex(snapshot(*namespaces("n1"), pod("n1", "p", "10.0.0.1", {"a": "x"})))
    assert idx.selector_members(parse("a == 'x'")) == {ipaddress.ip_network("10.0.0.1/32")}
    assert idx.selector_members(parse("a == 'y'")) == frozenset()

"""Denied packets per policy, read from the kernel's rule counters (pure parsing + a small reader).

Every rule Tabby writes carries `-m comment --comment "cali:<hash>"` (`felix.model.rule_hashes`),
so the DROP rules of the last rendering can be found again in `iptables-save -c`:

* a policy chain (`cali-pi-*` / `cali-po-*`) opens with the comment "<Kind> <[ns/]name>
  <direction>"; each of its DROP/REJECT rules is a Deny rule of that policy (kind "rule"), or, for
  a policy that could not be rendered, its single fail-closed DROP (kind "unrenderable");
* a profile chain (`cali-pri-*` / `cali-pro-*`) likewise, with the comment "Profile <name> <dir>"
  (kind "profile", no tier);
* an endpoint chain (`cali-tw-`/`cali-fh*` ingress, `cali-fw-`/`cali-th*` egress) has per tier a
  "Start of tier T" rule, jumps to the tier's policy chains, directly or through a group chain
  (`cali-gi-`/`cali-go-`, a run of guarded jumps), which tells each policy chain its tier, and
  the end-of-tier DROP commented "End of tier T. ..." (kind "end-of-tier"), counted
  for the policies of that tier the endpoint jumped to, joined by "," in order: a deny-all
  Kubernetes policy has no Deny rule, its drops are the end of its tier.

`DenyIndex` maps (family, table) -> hash -> `DenyKey`; `denied_totals` sums the packet and byte
counters of those rules over every save; `DeniedCounters` indexes what a `DataplaneState` last
applied and reads the kernel at most once per `ttl` seconds.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from felix.dataplane.apply import DataplaneState
from felix.model import Chain, Rule, Table, rule_hashes
from felix.render_names import (
    FROM_HOST,
    FROM_WORKLOAD,
    GROUP_IN,
    GROUP_OUT,
    POLICY_IN,
    POLICY_OUT,
    PROFILE_IN,
    PROFILE_OUT,
    TO_HOST,
    TO_WORKLOAD,
)

DENY_ACTIONS = ("-j DROP", "-j REJECT")
TIER_START, TIER_END = "Start of tier ", "End of tier "
# (chain prefix, direction); cali-fh*/cali-th* also cover the forward chains cali-fhfw/thfw.
ENDPOINT_PREFIXES = ((TO_WORKLOAD, "ingress"), (FROM_WORKLOAD, "egress"),
                     (FROM_HOST, "ingress"), (TO_HOST, "egress"))
_COUNTED = re.compile(r'^\[(\d+):(\d+)\] -A \S+ .*?--comment "?cali:([A-Za-z0-9_-]+)"?')

LABELS = ("tier", "namespace", "policy", "direction", "kind")


@dataclass(frozen=True, order=True)
class DenyKey:
    tier: str  # "" for profiles, and for a policy chain no endpoint chain jumps to
    namespace: str  # "" for global policies and profiles
    policy: str  # the policy's name (a KNP's is "knp.default.<name>"); end-of-tier: "a,b"
    direction: str  # ingress | egress
    kind: str  # rule | end-of-tier | unrenderable | profile

    def labels(self) -> str:
        return ",".join(f'{k}="{_escape(getattr(self, k))}"' for k in LABELS)


DenyIndex = dict[tuple[int, str], dict[str, DenyKey]]
Totals = dict[DenyKey, tuple[int, int]]  # -> (packets, bytes)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _is_deny(action: str) -> bool:
    return any(action == a or action.startswith(a + " ") for a in DENY_ACTIONS)


def _endpoint_direction(name: str) -> str | None:
    for prefix, direction in ENDPOINT_PREFIXES:
        if name.startswith(prefix):
            return direction
    return None


def _owner(chain: Chain) -> tuple[str, str, str, str] | None:
    """(kind, namespace, name, direction) from a policy/profile chain's opening comment."""
    if not chain.rules:
        return None
    parts = chain.rules[0].comment.split(" ")
    if len(parts) != 3 or parts[2] not in ("ingress", "egress"):
        return None
    kind, where, direction = parts
    namespace, _, name = where.rpartition("/") if kind != "Profile" else ("", "", where)
    return kind, namespace, name, direction


def _policy_owners(chains: Iterable[Chain]) -> dict[str, tuple[str, str, str, str]]:
    return {c.name: owner for c in chains if c.name.startswith((POLICY_IN, POLICY_OUT))
            and (owner := _owner(c)) is not None}


Groups = dict[str, list[str]]  # group chain -> the policy chains it jumps to, in order


def _groups(chains: Iterable[Chain]) -> Groups:
    """Each group chain's policy chains, through the groups it holds (a tree: a group's name
    hashes its rules, so it cannot hold itself)."""
    direct = {c.name: [r.action.removeprefix("-j ") for r in c.rules]
              for c in chains if c.name.startswith((GROUP_IN, GROUP_OUT))}
    flat: Groups = {}

    def expand(name: str) -> list[str]:
        if name not in flat:
            flat[name] = [p for t in direct[name]
                          for p in (expand(t) if t in direct else [t])
                          if p.startswith((POLICY_IN, POLICY_OUT))]
        return flat[name]

    for name in direct:
        expand(name)
    return flat


def _policy_targets(rule: Rule, groups: Groups) -> list[str]:
    """The policy chains a rule of an endpoint chain jumps to (through a group or not)."""
    target = rule.action.removeprefix("-j ")
    if target.startswith((POLICY_IN, POLICY_OUT)):
        return [target]
    return groups.get(target, [])


def _tiers_of_policy_chains(chains: Iterable[Chain], groups: Groups) -> dict[str, str]:
    tiers: dict[str, str] = {}
    for chain in chains:
        if _endpoint_direction(chain.name) is None:
            continue
        tier = ""
        for rule in chain.rules:
            if rule.comment.startswith(TIER_START):
                tier = rule.comment[len(TIER_START):]
            if tier:
                tiers.update((target, tier) for target in _policy_targets(rule, groups))
    return tiers


def _end_of_tier_key(tier: str, jumped: list[str], direction: str,
                     owners: Mapping[str, tuple[str, str, str, str]]) -> DenyKey:
    """The policies of the tier that applied to this endpoint ("a,b", in order) and their
    namespace when they share one: the policies that did not allow what was dropped."""
    named = [owners[c] for c in jumped if c in owners]
    names = ",".join(dict.fromkeys(o[2] for o in named))
    namespaces = {o[1] for o in named}
    namespace = namespaces.pop() if len(namespaces) == 1 else ""
    return DenyKey(tier, namespace, names, direction, "end-of-tier")


def _endpoint_denies(chain: Chain, direction: str,
                     owners: Mapping[str, tuple[str, str, str, str]],
                     groups: Groups) -> dict[str, DenyKey]:
    out: dict[str, DenyKey] = {}
    hashes: list[str] | None = None
    jumped: list[str] = []
    for i, rule in enumerate(chain.rules):
        if rule.comment.startswith(TIER_START):
            jumped = []
        jumped += _policy_targets(rule, groups)
        if _is_deny(rule.action) and rule.comment.startswith(TIER_END):
            tier = rule.comment[len(TIER_END):].split(". ", 1)[0]
            hashes = hashes if hashes is not None else rule_hashes(chain)
            out[hashes[i]] = _end_of_tier_key(tier, jumped, direction, owners)
    return out


def _chain_denies(chain: Chain, tiers: Mapping[str, str]) -> dict[str, DenyKey]:
    """Deny rules of a policy or profile chain."""
    out: dict[str, DenyKey] = {}
    hashes: list[str] | None = None
    is_policy = chain.name.startswith((POLICY_IN, POLICY_OUT))
    is_profile = chain.name.startswith((PROFILE_IN, PROFILE_OUT))
    if not (is_policy or is_profile):
        return out
    owner = _owner(chain)
    for i, rule in enumerate(chain.rules):
        if not _is_deny(rule.action):
            continue
        key = None
        if is_policy and owner is not None:
            _, namespace, name, direction = owner
            key = DenyKey(tiers.get(chain.name, ""), namespace, name, direction, "rule")
        elif is_policy and rule.comment.startswith("Unrenderable"):
            direction = "ingress" if chain.name.startswith(POLICY_IN) else "egress"
            key = DenyKey(tiers.get(chain.name, ""), "", chain.name, direction, "unrenderable")
        elif is_profile and owner is not None:
            _, _, name, direction = owner
            key = DenyKey("", "", name, direction, "profile")
        if key is not None:
            hashes = hashes if hashes is not None else rule_hashes(chain)
            out[hashes[i]] = key
    return out


def table_denies(table: Table) -> dict[str, DenyKey]:
    """Rule hash -> what that DROP rule denies for, in one table."""
    chains = table.chains.values()
    owners = _policy_owners(chains)
    groups = _groups(chains)
    tiers = _tiers_of_policy_chains(chains, groups)
    found: dict[str, DenyKey] = {}
    for chain in chains:
        direction = _endpoint_direction(chain.name)
        if direction is not None:
            found.update(_endpoint_denies(chain, direction, owners, groups))
        else:
            found.update(_chain_denies(chain, tiers))
    return found


def deny_index(tables: Mapping[tuple[int, str], Table]) -> DenyIndex:
    """(family, table) -> rule hash -> DenyKey, for every table with a deny (`Dataplane.tables`)."""
    index: DenyIndex = {}
    for where, table in tables.items():
        found = table_denies(table)
        if found:
            index[where] = found
    return index


def parse_counters(text: str) -> dict[str, tuple[int, int]]:
    """`iptables-save -c` text -> rule hash -> (packets, bytes) (Tabby's rules only)."""
    out: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        m = _COUNTED.match(line)
        if m:
            pkts, nbytes = out.get(m[3], (0, 0))
            out[m[3]] = (pkts + int(m[1]), nbytes + int(m[2]))
    return out


def denied_totals(index: DenyIndex, saves: Mapping[tuple[int, str], str]) -> Totals:
    """Sum the counters of the indexed DROP rules; every key of the index appears (maybe 0)."""
    totals: Totals = {}
    for where, hashes in index.items():
        counters = parse_counters(saves.get(where, ""))
        for rule_hash, key in hashes.items():
            pkts, nbytes = counters.get(rule_hash, (0, 0))
            old_pkts, old_bytes = totals.get(key, (0, 0))
            totals[key] = (old_pkts + pkts, old_bytes + nbytes)
    return totals


def metrics_text(totals: Totals) -> str:
    """Prometheus text for felix_denied_packets_total / felix_denied_bytes_total."""
    lines: list[str] = []
    for name, i, text in (("felix_denied_packets_total", 0, "Packets dropped by Deny rules, "
                           "end-of-tier drops and unrenderable policies, per policy."),
                          ("felix_denied_bytes_total", 1, "Bytes of those packets.")):
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        lines += [f"{name}{{{key.labels()}}} {counts[i]}" for key, counts in sorted(totals.items())]
    return "\n".join(lines) + "\n"


class DeniedCounters:
    """Denied totals for the tables a `DataplaneState` last applied, read from the kernel at
    most once per `ttl` seconds (a scrape runs `iptables-save -c` per table with denies).

    The index follows each reconciler's `last_desired` table and is rebuilt only for a table
    that changed since the last read; nothing is read before the first apply.
    """

    def __init__(self, state: DataplaneState, ttl: float = 5.0) -> None:
        self.state = state
        self.ttl = ttl
        self._index: dict[tuple[int, str], tuple[Table, dict[str, DenyKey]]] = {}
        self._totals: Totals = {}
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    def _current_index(self) -> DenyIndex:
        index: DenyIndex = {}
        fresh = {}
        for where, reconciler in list(self.state.tables.items()):
            table = reconciler.last_desired
            if table is None:
                continue
            cached = self._index.get(where)
            hashes = cached[1] if cached and cached[0] is table else table_denies(table)
            fresh[where] = (table, hashes)
            if hashes:
                index[where] = hashes
        self._index = fresh
        return index

    def save(self, family: int, table: str) -> str:
        backend = self.state.backend
        if backend is None:
            return ""
        argv = [*backend.save_cmd(family, table), "-c"]
        result = self.state.runner.run(argv, check=False)
        return result.stdout if result.returncode == 0 else ""

    def totals(self, now: float | None = None) -> Totals:
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._read_at >= self.ttl:
                index = self._current_index()
                self._totals = denied_totals(index, {w: self.save(*w) for w in index})
                self._read_at = now
            return self._totals

    def metrics_text(self) -> str:
        return metrics_text(self.totals())

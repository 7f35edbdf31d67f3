"""PolicyIndex answers carried from one sync to the next, updated by what changed (pure).

The agent builds a fresh PolicyIndex for every sync, but most of its answers are the same as
the sync before: its CompileCache hands back the very same compiled policy, endpoint and network
set objects for unchanged store objects, so what changed is found by object identity.
`IndexMemo` keeps the answers and updates only what a change touches:

* IP set members: per selector (or named port), how many contributors give each member. A
  contributor that left is subtracted and one that came is added, where the selector matches
  it; a changed one is both. When a large share of contributors changed at once (a resync, a
  namespace's labels), the counts are dropped and recomputed on demand instead.
* Which policies' selectors match each endpoint asked about, in tier then policy order: a
  removed (or replaced) policy leaves the lists that hold it, a new one is inserted where its
  selector matches. A change of tiers, or two policies sharing a sort position, recomputes
  every list; a changed endpoint is a new endpoint.

Entries nobody asked for in a sync are dropped at the next one. `IncrementalIndex` is the
PolicyIndex that answers from the memo; its answers equal PolicyIndex's from scratch.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from datastore.selector import Selector
from datastore.snapshot import Snapshot
from felix.calc import (
    CompileCache,
    CompiledPolicy,
    Endpoint,
    HostPolicyKind,
    NamedPortKey,
    NamedPortMember,
    NetworkSet,
    PolicyIndex,
    Tier,
    TierPolicies,
    group_tiers,
    host_kind,
    host_tiers,
    matching_nets,
    matching_ports,
    workload_kind,
)
from felix.rules import Direction, IPNetwork

# Past this share of contributors changed, recomputing sets on demand beats updating them all.
LARGE_CHANGE = 0.25
SMALL_CHANGE = 32  # ... and never for fewer contributors than this
# More endpoints than this to match from scratch in one sync: narrow by the label index
# (costly to build) rather than testing every policy's selector against each.
SCAN_LIMIT = 16

Contributor = Endpoint | NetworkSet
_M = TypeVar("_M", bound=Hashable)
_K = TypeVar("_K", bound=Hashable)


class _Counted(Generic[_M]):
    """A set's members with how many contributors give each; `members` keeps its identity
    while nothing changes (renderers downstream reuse what they made of it)."""

    __slots__ = ("counts", "members")

    def __init__(self, members: Iterable[_M]) -> None:
        self.counts: Counter[_M] = Counter(members)
        self.members: frozenset[_M] = frozenset(self.counts)

    def update(self, gone: Iterable[_M], came: Iterable[_M]) -> None:
        counts = self.counts
        changed = False
        for m in came:  # before `gone`: a contributor that changed but kept its nets is no change
            counts[m] += 1
            changed = changed or counts[m] == 1
        for m in gone:
            counts[m] -= 1
            if counts[m] == 0:
                del counts[m]
                changed = True
        if changed:
            self.members = frozenset(counts)


class _Sets(Generic[_K, _M]):
    """Counted members per key, for the keys asked about since the previous sync."""

    def __init__(self, contribution: Callable[[_K, Iterable[Contributor]], Iterator[_M]]) -> None:
        self.contribution = contribution
        self.entries: dict[_K, _Counted[_M]] = {}
        self.used: set[_K] = set()

    def advance(self, gone: list[Contributor], came: list[Contributor], reset: bool) -> None:
        self.entries = {} if reset else {k: e for k, e in self.entries.items() if k in self.used}
        self.used = set()
        if gone or came:
            for key, entry in self.entries.items():
                entry.update(self.contribution(key, gone), self.contribution(key, came))

    def members(self, key: _K, contributors: Callable[[], Iterable[Contributor]]
                ) -> frozenset[_M]:
        self.used.add(key)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Counted(self.contribution(key, contributors()))
        return entry.members


def _policy_key(rank: dict[str, int], policy: CompiledPolicy) -> tuple[int, tuple[float, str]]:
    return rank[policy.tier], policy.sort_key


class _Matching:
    """The policies whose selector matches one endpoint, in tier then policy order, and the
    tier lists made of them (the same list object while the policies stay the same, which
    lets the renderer reuse what it made of it)."""

    __slots__ = ("answers", "endpoint", "keys", "policies")

    def __init__(self, endpoint: Endpoint, policies: list[CompiledPolicy],
                 rank: dict[str, int]) -> None:
        self.endpoint = endpoint
        self.policies = policies
        self.keys = [_policy_key(rank, p) for p in policies]
        self.answers: dict[tuple[str, ...], list[TierPolicies]] = {}

    def insert(self, policy: CompiledPolicy, rank: dict[str, int]) -> None:
        key = _policy_key(rank, policy)
        at = bisect.bisect(self.keys, key)
        self.keys.insert(at, key)
        self.policies.insert(at, policy)
        self.answers = {}

    def remove(self, policy: CompiledPolicy) -> None:
        for at, p in enumerate(self.policies):
            if p is policy:
                del self.keys[at], self.policies[at]
                self.answers = {}
                return

    def answer(self, question: tuple[str, ...],
               make: Callable[[list[CompiledPolicy]], list[TierPolicies]]) -> list[TierPolicies]:
        found = self.answers.get(question)
        if found is None:
            found = self.answers[question] = make(self.policies)
        return found


class IndexMemo:
    """What the agent's PolicyIndexes answered, kept across syncs (see the module doc)."""

    def __init__(self, *, scan_limit: int = SCAN_LIMIT, small_change: int = SMALL_CHANGE) -> None:
        self.scan_limit, self.small_change = scan_limit, small_change
        self.cache = CompileCache()
        self._clear()

    def _clear(self) -> None:
        self._contributors: dict[int, Contributor] = {}
        self._policies: dict[int, CompiledPolicy] = {}
        self._tiers: tuple[Tier, ...] | None = None
        self._rank: dict[str, int] = {}
        self._sort_keys: Counter[tuple[str, tuple[float, str]]] = Counter()
        self.nets: _Sets[Selector, IPNetwork] = _Sets(matching_nets)
        self.ports: _Sets[NamedPortKey, NamedPortMember] = _Sets(matching_ports)
        self._matching: dict[int, _Matching] = {}
        self._holders: dict[int, set[int]] = {}  # id(policy) -> ids of endpoints matching it
        self._misses = 0

    def index(self, snapshot: Snapshot) -> IncrementalIndex:
        """This sync's index; its answers update the memo."""
        index = IncrementalIndex(snapshot, self)
        try:
            self._advance(index)
        except BaseException:
            self._clear()  # a half-applied update must not outlive this sync
            raise
        return index

    # -- between syncs

    def _advance(self, index: PolicyIndex) -> None:
        contributors = {id(c): c for c in (*index.endpoints, *index.network_sets)}
        gone = [c for k, c in self._contributors.items() if k not in contributors]
        came = [c for k, c in contributors.items() if k not in self._contributors]
        reset = len(gone) + len(came) > max(self.small_change, LARGE_CHANGE * len(contributors))
        self.nets.advance(gone, came, reset)
        self.ports.advance(gone, came, reset)
        self._contributors = contributors
        self._misses = 0
        for endpoint in gone:
            if isinstance(endpoint, Endpoint):
                self._forget(id(endpoint))
        self._advance_policies(index)

    def _advance_policies(self, index: PolicyIndex) -> None:
        policies = {id(p): p for p in index.policies}
        gone = [p for k, p in self._policies.items() if k not in policies]
        came = [p for k, p in policies.items() if k not in self._policies]
        self._policies = policies
        for p in gone:
            self._sort_keys[(p.tier, p.sort_key)] -= 1
        for p in came:
            self._sort_keys[(p.tier, p.sort_key)] += 1
        self._sort_keys = +self._sort_keys  # drops the zero counts
        tied = len(self._sort_keys) != len(policies)
        if tied or index.tiers != self._tiers:
            # Orders are only comparable within unchanged tiers, and an insertion point is
            # only unique without ties: start over.
            self._tiers = index.tiers
            self._rank = {t.name: i for i, t in enumerate(index.tiers)}
            self._matching, self._holders = {}, {}
            return
        for p in gone:
            for eid in self._holders.pop(id(p), ()):
                self._matching[eid].remove(p)
        for p in came:
            holders = self._holders.setdefault(id(p), set())
            for eid, entry in self._matching.items():
                if p.selector.matches(entry.endpoint.labels):
                    entry.insert(p, self._rank)
                    holders.add(eid)

    def _forget(self, eid: int) -> None:
        entry = self._matching.pop(eid, None)
        if entry is not None:
            for p in entry.policies:
                self._holders.get(id(p), set()).discard(eid)

    # -- answers

    def matching(self, index: PolicyIndex, endpoint: Endpoint) -> _Matching:
        entry = self._matching.get(id(endpoint))
        if entry is None or entry.endpoint is not endpoint:
            self._misses += 1
            if self._misses > self.scan_limit:
                candidates = index._candidate_policies(endpoint.labels)
            else:
                candidates = index.ordered_policies()
            policies = [p for _, p in candidates if p.selector.matches(endpoint.labels)]
            entry = self._matching[id(endpoint)] = _Matching(endpoint, policies, self._rank)
            for p in policies:
                self._holders.setdefault(id(p), set()).add(id(endpoint))
        return entry

    def contributors(self, index: PolicyIndex, selector: Selector,
                     endpoints_only: bool) -> Iterable[Contributor]:
        """Where a set not in the memo gets its members: every candidate, narrowed by the
        label index only when several sets are computed in this sync (it is costly to build)."""
        self._misses += 1
        if self._misses > self.scan_limit:
            if endpoints_only:
                return index._endpoint_index().candidates(selector)
            return index._contributor_index().candidates(selector)
        return index.endpoints if endpoints_only else (*index.endpoints, *index.network_sets)


class IncrementalIndex(PolicyIndex):
    """A PolicyIndex answering from (and updating) an IndexMemo; the same answers."""

    def __init__(self, snapshot: Snapshot, memo: IndexMemo) -> None:
        super().__init__(snapshot, memo.cache)
        self.memo = memo
        self._tier_by_name = {t.name: t for t in self.tiers}

    def tiers_for(self, endpoint: Endpoint, direction: Direction) -> list[TierPolicies]:
        tiers = self._tier_by_name
        return self.memo.matching(self, endpoint).answer(("workload", direction), lambda ps: (
            group_tiers((tiers[p.tier], p) for p in ps if workload_kind(p, direction))))

    def host_tiers_for(self, endpoint: Endpoint, direction: Direction,
                       kind: HostPolicyKind) -> list[TierPolicies]:
        tiers = self._tier_by_name
        return self.memo.matching(self, endpoint).answer(("host", direction, kind), lambda ps: (
            host_tiers(group_tiers((tiers[p.tier], p) for p in ps
                                   if host_kind(p, direction, kind)), kind)))

    def selector_members(self, selector: Selector) -> frozenset[IPNetwork]:
        return self.memo.nets.members(
            selector, lambda: self.memo.contributors(self, selector, endpoints_only=False))

    def named_port_members(self, selector: Selector, name: str,
                           protocol: int | None) -> frozenset[NamedPortMember]:
        return self.memo.ports.members(
            (selector, name, protocol),
            lambda: self.memo.contributors(self, selector, endpoints_only=True))


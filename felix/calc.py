"""What applies to each endpoint: datastore state in, ordered tiers/policies/profiles out (pure).

This is Felix's calculation graph in one pass over a `Snapshot`: policies and profiles are
compiled the way Calico's update processors compile them (namespaced selectors, see
`felix.rules`), endpoints get their effective labels (own labels plus the `labelsToApply` of
their profiles), and `PolicyIndex` answers the questions both executors ask: which tiers and
policies apply to an endpoint in a direction, which profiles follow, and what an IP set holds.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Generic, Literal, TypeVar

from datastore.selector import Selector, parse
from datastore.snapshot import Resource, Snapshot
from felix.rules import (
    DIRECTIONS,
    NAMESPACE_LABEL,
    NAMESPACE_PREFIX,
    SERVICEACCOUNT_LABEL,
    SERVICEACCOUNT_PREFIX,
    CompiledRule,
    Direction,
    IPAddress,
    IPNetwork,
    compile_rules,
    parse_net,
    protocol_number,
)

DEFAULT_TIER = "default"
# Orders Calico gives its built-in tiers (api/.../tier.go).
BUILTIN_TIER_ORDERS: dict[str, float] = {
    "kube-admin": 1_000.0,
    DEFAULT_TIER: 1_000_000.0,
    "kube-baseline": 10_000_000.0,
}
KNP_PREFIX = "knp.default."
NAMESPACE_PROFILE_PREFIX = "kns."

_SHORT_KINDS = {
    "NetworkPolicy": "np",
    "GlobalNetworkPolicy": "gnp",
    "KubernetesNetworkPolicy": "knp",
    "StagedNetworkPolicy": "snp",
    "StagedGlobalNetworkPolicy": "sgnp",
    "StagedKubernetesNetworkPolicy": "sknp",
}
_NAMESPACED_KINDS = frozenset(
    {"NetworkPolicy", "KubernetesNetworkPolicy", "StagedNetworkPolicy",
     "StagedKubernetesNetworkPolicy"}
)


# --- policies and profiles -----------------------------------------------------------------


@dataclass(frozen=True)
class PolicyId:
    kind: str  # NetworkPolicy | GlobalNetworkPolicy | KubernetesNetworkPolicy | Staged...
    namespace: str | None
    name: str

    @property
    def short_kind(self) -> str:
        return _SHORT_KINDS.get(self.kind, self.kind)

    @cached_property
    def chain_id(self) -> str:
        """Felix's policy ID (`knp/ns/name`, `gnp/name`), the base of its chain names."""
        parts = [self.short_kind, self.namespace, self.name]
        return "/".join(p for p in parts if p)

    @property
    def sort_key(self) -> str:
        # Tie-break for equal orders: Felix's PolKVLess compares "name/namespace/kind".
        return f"{self.name}/{self.namespace or ''}/{self.kind}"

    def __str__(self) -> str:
        # knp.default.* and global names speak for themselves; Calico NPs carry their namespace.
        if self.kind == "NetworkPolicy" and self.namespace:
            return f"{self.namespace}/{self.name}"
        return self.name


@dataclass(frozen=True)
class CompiledPolicy:
    id: PolicyId
    tier: str
    order: float | None
    types: frozenset[Direction]
    selector: Selector  # namespaced: which endpoints the policy applies to
    ingress: tuple[CompiledRule, ...] = ()
    egress: tuple[CompiledRule, ...] = ()
    do_not_track: bool = False
    pre_dnat: bool = False
    apply_on_forward: bool = False
    staged: bool = False

    @property
    def namespace(self) -> str | None:
        return self.id.namespace

    @property
    def name(self) -> str:
        return self.id.name

    @property
    def sort_key(self) -> tuple[float, str]:
        return (math.inf if self.order is None else self.order, self.id.sort_key)

    def rules(self, direction: Direction) -> tuple[CompiledRule, ...]:
        return self.ingress if direction == "ingress" else self.egress


@dataclass(frozen=True)
class CompiledProfile:
    name: str
    ingress: tuple[CompiledRule, ...] = ()
    egress: tuple[CompiledRule, ...] = ()
    labels_to_apply: Mapping[str, str] = field(default_factory=dict, compare=False)
    missing: bool = False  # a stand-in for a profile the endpoint names but the store lacks

    def rules(self, direction: Direction) -> tuple[CompiledRule, ...]:
        return self.ingress if direction == "ingress" else self.egress


def _policy_kind(obj: Resource) -> str:
    kind = obj.get("kind", "NetworkPolicy")
    if kind == "NetworkPolicy" and obj["metadata"]["name"].startswith(KNP_PREFIX):
        return "KubernetesNetworkPolicy"
    return kind


def _default_types(spec: Mapping[str, Any]) -> frozenset[Direction]:
    # Calico's write-time defaulting: egress rules only -> [Egress]; both -> both; else [Ingress].
    if spec.get("egress"):
        return frozenset({"ingress", "egress"}) if spec.get("ingress") else frozenset({"egress"})
    return frozenset({"ingress"})


def _types(spec: Mapping[str, Any]) -> frozenset[Direction]:
    types = spec.get("types")
    if not types:
        return _default_types(spec)
    wanted = {t.lower() for t in types}
    return frozenset(d for d in DIRECTIONS if d in wanted)


def _and_prefixed(current: str, extra: str, prefix: str) -> str:
    """Calico's prefixAndAppendSelector: `(current) && <extra with prefixed labels>`."""
    if not extra:
        return current
    prefixed = parse(extra).with_label_prefix(prefix).canonical
    return f"({current}) && {prefixed}" if current else prefixed


def _namespaced_policy_selector(spec: Mapping[str, Any], namespace: str) -> str:
    selector = spec.get("selector") or ""
    clause = f"{NAMESPACE_LABEL} == '{namespace}'"
    selector = f"({selector}) && {clause}" if selector else clause
    return _and_prefixed(selector, spec.get("serviceAccountSelector") or "", SERVICEACCOUNT_PREFIX)


def _global_policy_selector(spec: Mapping[str, Any]) -> str:
    selector = spec.get("selector") or ""
    if spec.get("namespaceSelector"):
        selector = _and_prefixed(selector, spec["namespaceSelector"], NAMESPACE_PREFIX)
        # As Calico does, over the whole text: all() now means "any namespaced endpoint".
        selector = selector.replace("all()", f"has({NAMESPACE_LABEL})")
    if spec.get("serviceAccountSelector"):
        selector = _and_prefixed(selector, spec["serviceAccountSelector"], SERVICEACCOUNT_PREFIX)
        selector = selector.replace("all()", f"has({SERVICEACCOUNT_LABEL})")
    return selector


def compile_policy(obj: Resource) -> CompiledPolicy:
    """A (Global)NetworkPolicy as Felix enforces it. Raises SelectorError/ValueError if invalid."""
    kind = _policy_kind(obj)
    meta, spec = obj["metadata"], obj.get("spec") or {}
    namespace = meta.get("namespace") if kind in _NAMESPACED_KINDS else None
    if kind in _NAMESPACED_KINDS and not namespace:
        raise ValueError(f"{kind} {meta['name']} has no namespace")
    text = (_namespaced_policy_selector(spec, namespace) if namespace
            else _global_policy_selector(spec))
    order = spec.get("order")
    return CompiledPolicy(
        id=PolicyId(kind, namespace, meta["name"]),
        tier=spec.get("tier") or DEFAULT_TIER,
        order=float(order) if order is not None else None,
        types=_types(spec),
        selector=parse(text),
        ingress=compile_rules(spec.get("ingress"), namespace),
        egress=compile_rules(spec.get("egress"), namespace),
        do_not_track=bool(spec.get("doNotTrack")),
        pre_dnat=bool(spec.get("preDNAT")),
        apply_on_forward=bool(spec.get("applyOnForward")),
        staged=kind.startswith("Staged") or bool(spec.get("stagedAction")),
    )


def compile_profile(obj: Resource) -> CompiledProfile:
    spec = obj.get("spec") or {}
    return CompiledProfile(
        name=obj["metadata"]["name"],
        ingress=compile_rules(spec.get("ingress"), None),
        egress=compile_rules(spec.get("egress"), None),
        labels_to_apply=dict(spec.get("labelsToApply") or {}),
    )


_Deps = tuple[Any, ...]


class CompileCache:
    """Compiled forms of store objects, reused while the very same object is seen.

    Keyed by object identity (the object is held, so its id cannot be reused): only for
    callers whose objects are replaced, never mutated in place (the agent's StoreMirror).
    Endpoints and network sets also depend on the labels their profiles apply, which are
    compared by value. `retain` drops entries for objects no longer present. A compile that
    raises is not cached.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str], tuple[Resource, _Deps, Any]] = {}

    def memo(self, obj: Resource, what: str, compile_fn: Any, deps: _Deps = ()) -> Any:
        """`compile_fn(obj)`, or its earlier result for this very object and equal `deps`."""
        key = (id(obj), what)
        entry = self._entries.get(key)
        if entry is not None and entry[0] is obj and entry[1] == deps:
            return entry[2]
        compiled = compile_fn(obj)
        self._entries[key] = (obj, deps, compiled)
        return compiled

    def policy(self, obj: Resource) -> CompiledPolicy:
        compiled: CompiledPolicy = self.memo(obj, "policy", compile_policy)
        return compiled

    def profile(self, obj: Resource) -> CompiledProfile:
        compiled: CompiledProfile = self.memo(obj, "profile", compile_profile)
        return compiled

    def workload(self, obj: Resource, profiles: Mapping[str, CompiledProfile]) -> Endpoint:
        names = (obj.get("spec") or {}).get("profiles") or ()
        compiled: Endpoint = self.memo(obj, "workload", lambda o: workload_endpoint(o, profiles),
                                       _inherited(names, profiles))
        return compiled

    def host(self, obj: Resource, profiles: Mapping[str, CompiledProfile]) -> Endpoint:
        names = (obj.get("spec") or {}).get("profiles") or ()
        compiled: Endpoint = self.memo(obj, "host", lambda o: host_endpoint(o, profiles),
                                       _inherited(names, profiles))
        return compiled

    def network_set(self, obj: Resource, profiles: Mapping[str, CompiledProfile]) -> NetworkSet:
        namespace = obj["metadata"].get("namespace") if obj.get("kind") == "NetworkSet" else None
        names = (NAMESPACE_PROFILE_PREFIX + namespace,) if namespace else ()
        compiled: NetworkSet = self.memo(obj, "netset", lambda o: network_set(o, profiles),
                                         _inherited(names, profiles))
        return compiled

    def retain(self, objects: Iterable[Resource]) -> None:
        keep = {id(o) for o in objects}
        self._entries = {k: e for k, e in self._entries.items() if k[0] in keep}

    def __len__(self) -> int:
        return len(self._entries)


def _inherited(names: Iterable[str], profiles: Mapping[str, CompiledProfile]) -> _Deps:
    """What an object's labels take from its profiles: their labelsToApply, in order."""
    return tuple(p.labels_to_apply if (p := profiles.get(n)) is not None else None
                 for n in names)


def missing_profile(name: str) -> CompiledProfile:
    """What Felix programs for a profile it cannot find: deny both ways (fail closed)."""
    deny = compile_rules([{"action": "Deny"}], None)
    return CompiledProfile(name=name, ingress=deny, egress=deny, missing=True)


# --- tiers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    name: str
    order: float | None
    default_action: str = "Deny"  # Deny | Pass
    valid: bool = True  # False: named by a policy but absent from the store (sorted last)

    @property
    def sort_key(self) -> tuple[bool, bool, float, str]:
        # Felix's TierLess: valid first, then order (nil last), then name.
        return (not self.valid, self.order is None, self.order or 0.0, self.name)


@dataclass(frozen=True)
class TierPolicies:
    tier: Tier
    policies: tuple[CompiledPolicy, ...]


def _tier(obj: Resource) -> Tier:
    name = obj["metadata"]["name"]
    spec = obj.get("spec") or {}
    order = spec.get("order")
    return Tier(
        name=name,
        order=float(order) if order is not None else BUILTIN_TIER_ORDERS.get(name),
        default_action=spec.get("defaultAction") or "Deny",
    )


def _tiers(objs: Iterable[Resource], policies: Iterable[CompiledPolicy]) -> dict[str, Tier]:
    tiers = {t.name: t for t in map(_tier, objs)}
    # The default tier always exists in Calico even when nobody stored it.
    tiers.setdefault(DEFAULT_TIER, Tier(DEFAULT_TIER, BUILTIN_TIER_ORDERS[DEFAULT_TIER]))
    for policy in policies:
        # An unknown tier keeps its policies but ends in a drop: fail closed.
        tiers.setdefault(policy.tier, Tier(policy.tier, None, "Deny", valid=False))
    return tiers


# --- endpoints and network sets ------------------------------------------------------------


@dataclass(frozen=True)
class NamedPort:
    name: str
    protocol: int
    port: int


@dataclass(frozen=True)
class Endpoint:
    """A WorkloadEndpoint or HostEndpoint with what policy needs of it."""

    kind: str  # WorkloadEndpoint | HostEndpoint
    name: str  # metadata.name
    namespace: str | None
    node: str
    workload: str | None  # the pod's name, for WorkloadEndpoints
    interface: str
    labels: Mapping[str, str] = field(compare=False)  # own labels + inherited profile labels
    nets: tuple[IPNetwork, ...] = ()
    profiles: tuple[str, ...] = ()
    ports: tuple[NamedPort, ...] = ()

    @property
    def is_host(self) -> bool:
        return self.kind == "HostEndpoint"

    @property
    def display(self) -> str:
        if self.is_host:
            return f"host endpoint {self.name}"
        return f"{self.namespace}/{self.workload or self.name}"

    def addresses(self, version: int) -> list[IPAddress]:
        return [n.network_address for n in self.nets if n.version == version]


@dataclass(frozen=True)
class NetworkSet:
    kind: str  # NetworkSet | GlobalNetworkSet
    name: str
    namespace: str | None
    labels: Mapping[str, str] = field(compare=False)
    nets: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class EndpointRef:
    """Names an endpoint: (namespace, pod) for a pod, (None, name) for a HostEndpoint.

    The name may also be a WorkloadEndpoint's own name (`node-k8s-pod-eth0`).
    """

    namespace: str | None
    name: str

    @classmethod
    def parse(cls, text: str) -> EndpointRef:
        """`ns/pod` or a bare HostEndpoint/WorkloadEndpoint name."""
        namespace, sep, name = text.partition("/")
        return cls(namespace, name) if sep else cls(None, text)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


def effective_labels(own: Mapping[str, str], profiles: Iterable[str],
                     known: Mapping[str, CompiledProfile]) -> dict[str, str]:
    """Own labels win over inherited ones; among profiles, the earlier one wins."""
    labels: dict[str, str] = {}
    for name in reversed(list(profiles)):
        profile = known.get(name)
        if profile is not None:
            labels.update(profile.labels_to_apply)
    labels.update(own)
    return labels


def _endpoint_ports(ports: Iterable[Mapping[str, Any]]) -> tuple[NamedPort, ...]:
    # Only named ports matter to policy; unnamed ones cannot be referenced.
    return tuple(
        NamedPort(p["name"], protocol_number(p.get("protocol", "TCP")), int(p["port"]))
        for p in ports if p.get("name")
    )


def _workload_own_labels(obj: Resource) -> dict[str, str]:
    meta, spec = obj["metadata"], obj.get("spec") or {}
    # A pod cannot claim namespace/service-account labels: those only come from profiles.
    labels = {k: v for k, v in (meta.get("labels") or {}).items()
              if not k.startswith((NAMESPACE_PREFIX, SERVICEACCOUNT_PREFIX))}
    if spec.get("serviceAccountName"):
        labels[SERVICEACCOUNT_LABEL] = spec["serviceAccountName"]
    labels.setdefault(NAMESPACE_LABEL, meta["namespace"])
    return labels


def workload_endpoint(obj: Resource, profiles: Mapping[str, CompiledProfile]) -> Endpoint:
    meta, spec = obj["metadata"], obj.get("spec") or {}
    profile_names = tuple(spec.get("profiles") or ())
    return Endpoint(
        kind="WorkloadEndpoint",
        name=meta["name"],
        namespace=meta["namespace"],
        node=spec.get("node", ""),
        workload=spec.get("pod") or spec.get("workload"),
        interface=spec.get("interfaceName", ""),
        labels=effective_labels(_workload_own_labels(obj), profile_names, profiles),
        nets=tuple(parse_net(n) for n in spec.get("ipNetworks") or ()),
        profiles=profile_names,
        ports=_endpoint_ports(spec.get("ports") or ()),
    )


def host_endpoint(obj: Resource, profiles: Mapping[str, CompiledProfile]) -> Endpoint:
    meta, spec = obj["metadata"], obj.get("spec") or {}
    profile_names = tuple(spec.get("profiles") or ())
    return Endpoint(
        kind="HostEndpoint",
        name=meta["name"],
        namespace=None,
        node=spec.get("node", ""),
        workload=None,
        interface=spec.get("interfaceName", ""),
        labels=effective_labels(meta.get("labels") or {}, profile_names, profiles),
        nets=tuple(parse_net(ip) for ip in spec.get("expectedIPs") or ()),
        profiles=profile_names,
        ports=_endpoint_ports(spec.get("ports") or ()),
    )


def network_set(obj: Resource, profiles: Mapping[str, CompiledProfile]) -> NetworkSet:
    meta, spec = obj["metadata"], obj.get("spec") or {}
    namespace = meta.get("namespace") if obj.get("kind") == "NetworkSet" else None
    labels = dict(meta.get("labels") or {})
    parents: tuple[str, ...] = ()
    if namespace:
        # Calico labels a NetworkSet with its namespace and parents it on kns.<ns>, so
        # same-namespace selectors and namespaceSelectors reach it.
        labels[NAMESPACE_LABEL] = namespace
        parents = (NAMESPACE_PROFILE_PREFIX + namespace,)
    return NetworkSet(
        kind=obj.get("kind", "GlobalNetworkSet"),
        name=meta["name"],
        namespace=namespace,
        labels=effective_labels(labels, parents, profiles),
        nets=tuple(parse_net(n) for n in spec.get("nets") or ()),
    )


# --- the index -----------------------------------------------------------------------------

NamedPortMember = tuple[IPAddress, int, int]  # (ip, protocol number, port)


def workload_kind(policy: CompiledPolicy, direction: Direction) -> bool:
    """Whether the policy is of the kind `tiers_for` lists in `direction` (selector aside)."""
    if policy.staged or direction not in policy.types:
        return False
    # preDNAT and doNotTrack policies live in the raw/mangle tables, which this model omits
    # (and which never apply to workloads).
    return not (policy.pre_dnat or policy.do_not_track)


def _applies(policy: CompiledPolicy, endpoint: Endpoint, direction: Direction) -> bool:
    return workload_kind(policy, direction) and policy.selector.matches(endpoint.labels)


# Which of a host endpoint's policy lists (Felix's tierInfoToProtoTierInfo): normal filter policy,
# its applyOnForward subset, doNotTrack (raw) and preDNAT (mangle) policy.
HostPolicyKind = Literal["normal", "forward", "untracked", "prednat"]


def _host_kind(policy: CompiledPolicy, kind: HostPolicyKind) -> bool:
    if kind == "untracked":
        return policy.do_not_track
    if kind == "prednat":
        return policy.pre_dnat and not policy.do_not_track
    if policy.pre_dnat or policy.do_not_track:
        return False
    return kind == "normal" or policy.apply_on_forward


def host_kind(policy: CompiledPolicy, direction: Direction, kind: HostPolicyKind) -> bool:
    """Whether the policy is in a host endpoint's `kind` list in `direction` (selector aside)."""
    return _host_kind(policy, kind) and not policy.staged and direction in policy.types


def host_tiers(tiers: list[TierPolicies], kind: HostPolicyKind) -> list[TierPolicies]:
    """Untracked and preDNAT tiers never end in a drop (the filter table still decides), so
    they carry defaultAction Pass, as Felix gives them."""
    if kind in ("untracked", "prednat"):
        return [TierPolicies(replace(tp.tier, default_action="Pass"), tp.policies)
                for tp in tiers]
    return tiers


def group_tiers(chosen: Iterable[tuple[Tier, CompiledPolicy]]) -> list[TierPolicies]:
    """Consecutive (tier, policy) pairs, in order, as one TierPolicies per tier."""
    out: list[TierPolicies] = []
    tier: Tier | None = None
    policies: list[CompiledPolicy] = []
    for t, p in chosen:
        if t is not tier:
            if tier is not None:
                out.append(TierPolicies(tier, tuple(policies)))
            tier, policies = t, []
        policies.append(p)
    if tier is not None:
        out.append(TierPolicies(tier, tuple(policies)))
    return out


_Labelled = TypeVar("_Labelled", Endpoint, NetworkSet, Endpoint | NetworkSet)


class _LabelIndex(Generic[_Labelled]):
    """label key -> value -> items (in their order), to narrow a selector's candidates.

    `candidates(selector)` is every item that could match, in the items' order: for a
    selector whose top level is a conjunction with a `k == "v"` or `has(k)` term, the items
    satisfying its rarest such term; otherwise all of them. Callers still check the selector.
    """

    def __init__(self, items: Sequence[_Labelled]) -> None:
        self.items = items
        self.by_value: dict[tuple[str, str], list[int]] = {}
        self.by_key: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            for k, v in item.labels.items():
                self.by_key.setdefault(k, []).append(i)
                if isinstance(v, str):
                    self.by_value.setdefault((k, v), []).append(i)

    def positions(self, term: tuple[str, str | None]) -> list[int]:
        key, value = term
        if value is None:
            return self.by_key.get(key, [])
        return self.by_value.get((key, value), [])

    def candidates(self, selector: Selector) -> Sequence[_Labelled]:
        terms = selector.required_labels
        if not terms:
            return self.items
        rarest = min((self.positions(t) for t in terms), key=len)
        return [self.items[i] for i in rarest]


class _PolicyBuckets:
    """Policies (in order) filed under one required label term each, to skip, per endpoint,
    those whose selector cannot match; policies with no such term are always candidates."""

    def __init__(self, ordered: list[tuple[Tier, CompiledPolicy]],
                 endpoints: _LabelIndex[Endpoint]) -> None:
        self.ordered = ordered
        self.always: list[int] = []
        self.by_value: dict[tuple[str, str], list[int]] = {}
        self.by_key: dict[str, list[int]] = {}
        for i, (_tier, policy) in enumerate(ordered):
            terms = policy.selector.required_labels
            if not terms:
                self.always.append(i)
                continue
            key, value = min(terms, key=lambda t: len(endpoints.positions(t)))
            if value is None:
                self.by_key.setdefault(key, []).append(i)
            else:
                self.by_value.setdefault((key, value), []).append(i)

    def candidates(self, labels: Mapping[str, str]) -> list[tuple[Tier, CompiledPolicy]]:
        found = list(self.always)
        for k, v in labels.items():
            found += self.by_key.get(k, ())
            if isinstance(v, str):
                found += self.by_value.get((k, v), ())
        found.sort()
        return [self.ordered[i] for i in found]


class PolicyIndex:
    """The cluster's policy state, compiled once; answers per-endpoint questions."""

    def __init__(self, snapshot: Snapshot, cache: CompileCache | None = None) -> None:
        """`cache`, when given, supplies (and keeps) the compiled policies and profiles."""
        self.profiles: dict[str, CompiledProfile] = {
            p.name: p for p in map(cache.profile if cache is not None else compile_profile,
                                   snapshot.profiles)
        }
        self.policies: tuple[CompiledPolicy, ...] = tuple(
            map(cache.policy if cache is not None else compile_policy,
                [*snapshot.global_network_policies, *snapshot.network_policies])
        )
        tiers = _tiers(snapshot.tiers, self.policies)
        self.tiers: tuple[Tier, ...] = tuple(sorted(tiers.values(), key=lambda t: t.sort_key))
        wep, hep, netset = ((cache.workload, cache.host, cache.network_set) if cache is not None
                            else (workload_endpoint, host_endpoint, network_set))
        self.endpoints: tuple[Endpoint, ...] = (
            *(wep(w, self.profiles) for w in snapshot.workload_endpoints),
            *(hep(h, self.profiles) for h in snapshot.host_endpoints),
        )
        self.network_sets: tuple[NetworkSet, ...] = tuple(
            netset(s, self.profiles)
            for s in [*snapshot.network_sets, *snapshot.global_network_sets]
        )
        self._by_tier: dict[str, list[CompiledPolicy]] = {t.name: [] for t in self.tiers}
        for policy in sorted(self.policies, key=lambda p: p.sort_key):
            self._by_tier[policy.tier].append(policy)
        self._members: dict[Selector, frozenset[IPNetwork]] = {}
        self._named: dict[tuple[Selector, str, int | None], frozenset[NamedPortMember]] = {}
        self._labels: _LabelIndex | None = None
        self._endpoint_labels: _LabelIndex | None = None
        self._policy_buckets: _PolicyBuckets | None = None

    # -- candidate narrowing (results are always those of the plain scan)

    def _contributor_index(self) -> _LabelIndex:
        if self._labels is None:
            self._labels = _LabelIndex([*self.endpoints, *self.network_sets])
        return self._labels

    def _endpoint_index(self) -> _LabelIndex:
        if self._endpoint_labels is None:
            self._endpoint_labels = _LabelIndex(self.endpoints)
        return self._endpoint_labels

    def _candidate_policies(self, labels: Mapping[str, str]) -> list[tuple[Tier, CompiledPolicy]]:
        """(tier, policy) in tier then policy order: a superset of those whose selector
        matches `labels` (each policy with a required label term is left out unless
        `labels` satisfies that term)."""
        if self._policy_buckets is None:
            self._policy_buckets = _PolicyBuckets(self.ordered_policies(),
                                                  self._endpoint_index())
        return self._policy_buckets.candidates(labels)

    def ordered_policies(self) -> list[tuple[Tier, CompiledPolicy]]:
        """Every (tier, policy), in tier then policy order."""
        return [(t, p) for t in self.tiers for p in self._by_tier[t.name]]

    # -- what applies to an endpoint

    def tiers_for(self, endpoint: Endpoint, direction: Direction) -> list[TierPolicies]:
        """Tiers in order, each with its ordered policies that apply; tiers with none omitted."""
        return group_tiers(
            (tier, p) for tier, p in self._candidate_policies(endpoint.labels)
            if _applies(p, endpoint, direction))

    def host_tiers_for(self, endpoint: Endpoint, direction: Direction,
                       kind: HostPolicyKind) -> list[TierPolicies]:
        """A host endpoint's tiers of one kind; "normal" is `tiers_for` (see `host_tiers`)."""
        return host_tiers(group_tiers(
            (tier, p) for tier, p in self._candidate_policies(endpoint.labels)
            if host_kind(p, direction, kind) and p.selector.matches(endpoint.labels)), kind)

    def profiles_for(self, endpoint: Endpoint) -> list[CompiledProfile]:
        return [self.profiles.get(n) or missing_profile(n) for n in endpoint.profiles]

    # -- finding endpoints

    def find_endpoint(self, ref: EndpointRef) -> Endpoint | None:
        for ep in self.endpoints:
            if ref.namespace is None and ep.name == ref.name:
                return ep
            if ep.namespace == ref.namespace and ref.name in (ep.workload, ep.name):
                return ep
        return None

    def endpoint_for_ip(self, ip: IPAddress) -> Endpoint | None:
        """The endpoint owning `ip`; a workload wins over a host endpoint listing it."""
        owners = [ep for ep in self.endpoints if any(ip in n for n in ep.nets)]
        owners.sort(key=lambda ep: ep.is_host)
        return owners[0] if owners else None

    # -- IP sets

    def selector_members(self, selector: Selector) -> frozenset[IPNetwork]:
        """What Felix's IP set for `selector` holds: nets of every matching endpoint/network set."""
        members = self._members.get(selector)
        if members is None:
            members = frozenset(matching_nets(selector,
                                              self._contributor_index().candidates(selector)))
            self._members[selector] = members
        return members

    def named_port_members(self, selector: Selector, name: str,
                           protocol: int | None) -> frozenset[NamedPortMember]:
        """(ip, protocol, port) for each matching endpoint exposing port `name`.

        `protocol` is the rule's; None means the named port of any protocol.
        """
        key = (selector, name, protocol)
        members = self._named.get(key)
        if members is None:
            members = frozenset(matching_ports(
                key, self._endpoint_index().candidates(selector)))
            self._named[key] = members
        return members


NamedPortKey = tuple[Selector, str, int | None]  # (selector, port name, rule's protocol)


def matching_nets(selector: Selector,
                  contributors: Iterable[Endpoint | NetworkSet]) -> Iterator[IPNetwork]:
    """The nets a selector's IP set gets from these contributors (repeats included)."""
    return (net for c in contributors if selector.matches(c.labels) for net in c.nets)


def matching_ports(key: NamedPortKey, endpoints: Iterable[Endpoint | NetworkSet]
                   ) -> Iterator[NamedPortMember]:
    """The members a named-port IP set gets from these endpoints (network sets have none)."""
    selector, name, protocol = key
    return ((net.network_address, port.protocol, port.port)
            for ep in endpoints if isinstance(ep, Endpoint) and selector.matches(ep.labels)
            for port in ep.ports
            if port.name == name and (protocol is None or port.protocol == protocol)
            for net in ep.nets)


def ip_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None

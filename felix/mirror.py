"""The agent's in-memory copy of the store's Calico objects, fed by one watch (pure).

`StoreMirror` holds key -> object for everything under the Calico resource prefix: a `Resync`
replaces the whole map, an `Event` puts or deletes one key. From it the agent builds the
policy model's `Snapshot` (with the synthesised default-allow profile, as the store's reads
add it) and the IPPools and FelixConfigurations the renderer is configured from.

Objects the policy model cannot compile are made fail-closed here, so one bad object never
stops a sync: a policy becomes "deny both ways" for the endpoints it selects (all of its
namespace's, or all, when even its selector is unusable); a bad profile is left out (an
endpoint naming a missing profile is denied); a bad endpoint is left out (traffic on an
interface without an endpoint is dropped by the dispatch chains).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from datastore.kinds import CALICO_PREFIX, kind_for_key
from datastore.snapshot import Resource, Snapshot
from felix.calc import (
    CompileCache,
    compile_policy,
    compile_profile,
    host_endpoint,
    workload_endpoint,
)

log = logging.getLogger(__name__)

WATCH_PREFIX = CALICO_PREFIX
DEFAULT_ALLOW_PROFILE: Resource = {  # = datastore.store.DEFAULT_ALLOW_PROFILE
    "kind": "Profile",
    "apiVersion": "projectcalico.org/v3",
    "metadata": {"name": "projectcalico-default-allow"},
    "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]},
}
POLICY_KINDS = ("NetworkPolicy", "GlobalNetworkPolicy")


class KVLike(Protocol):
    key: str
    value: bytes
    mod_revision: int


class EventLike(Protocol):
    type: str
    key: str
    value: bytes | None
    mod_revision: int


def decode(key: str, value: bytes, revision: int) -> Resource | None:
    """A stored Calico object with resourceVersion = its mod revision; None if unusable."""
    if kind_for_key(key) is None:
        return None
    try:
        obj = json.loads(value)
    except ValueError as e:
        log.warning("ignoring %s: not JSON (%s)", key, e)
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        log.warning("ignoring %s: not a resource", key)
        return None
    obj["metadata"]["resourceVersion"] = str(revision)
    return obj


@dataclass(frozen=True)
class Problem:
    what: str  # "NetworkPolicy ns/name"
    reason: str

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


@dataclass
class StoreMirror:
    objects: dict[str, Resource] = field(default_factory=dict)
    revision: int = 0
    synced: bool = False  # a full listing has been loaded

    def resync(self, items: Iterable[KVLike], revision: int) -> None:
        objects = {}
        for kv in items:
            obj = decode(kv.key, kv.value, kv.mod_revision)
            if obj is not None:
                objects[kv.key] = obj
        self.objects, self.revision, self.synced = objects, revision, True

    def event(self, ev: EventLike) -> bool:
        """Apply one watch event; True when it changed something the agent keeps."""
        self.revision = max(self.revision, ev.mod_revision)
        if ev.type == "delete":
            return self.objects.pop(ev.key, None) is not None
        obj = decode(ev.key, ev.value or b"", ev.mod_revision)
        if obj is None:
            return self.objects.pop(ev.key, None) is not None
        self.objects[ev.key] = obj
        return True

    def of_kind(self, kind: str) -> list[Resource]:
        return [o for o in self.objects.values() if o.get("kind") == kind]

    def snapshot(self) -> tuple[Snapshot, list[Problem]]:
        return build_snapshot(self.objects)


def build_snapshot(objects: Mapping[str, Resource], cache: CompileCache | None = None
                   ) -> tuple[Snapshot, list[Problem]]:
    """The policy model's view, with every uncompilable object made fail-closed.

    With `cache` (objects replaced, never mutated in place), the policies and profiles
    compiled to check them are kept there for PolicyIndex, and reused on later calls."""
    snap = Snapshot()
    problems: list[Problem] = []
    has_default_allow = False
    for obj in objects.values():
        if (obj.get("kind") == "Profile"
                and obj["metadata"].get("name") == DEFAULT_ALLOW_PROFILE["metadata"]["name"]):
            has_default_allow = True
        fixed = _fail_closed(obj, problems, cache)
        if fixed is not None:
            snap.add(fixed)
    if not has_default_allow:
        snap.add(copy.deepcopy(DEFAULT_ALLOW_PROFILE))
    return snap, problems


def _describe(obj: Resource) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{obj.get('kind', '?')} {ns + '/' if ns else ''}{name}"


def _fail_closed(obj: Resource, problems: list[Problem],
                 cache: CompileCache | None = None) -> Resource | None:
    if cache is None:
        fixed, problem = _checked(obj, None)
    else:  # the same object gets the same verdict (and the same stand-in) as last time
        fixed, problem = cache.memo(obj, "checked", lambda o: _checked(o, cache))
    if problem is not None:
        problems.append(problem)
    return fixed


def _checked(obj: Resource, cache: CompileCache | None) -> tuple[Resource | None,
                                                                  Problem | None]:
    kind = obj.get("kind", "")
    try:
        if kind in POLICY_KINDS:
            cache.policy(obj) if cache is not None else compile_policy(obj)
        elif kind == "Profile":
            cache.profile(obj) if cache is not None else compile_profile(obj)
        elif kind == "WorkloadEndpoint":
            workload_endpoint(obj, {})
        elif kind == "HostEndpoint":
            host_endpoint(obj, {})
        return obj, None
    except Exception as e:  # any compile error: this object must not open traffic
        reason = f"{type(e).__name__}: {e}"
    if kind not in POLICY_KINDS:
        return None, Problem(_describe(obj), f"{reason}; left out (its traffic is denied)")
    deny = _deny_policy(obj)
    scope = deny["spec"].get("selector") or "all()"
    return deny, Problem(_describe(obj), f"{reason}; enforced as deny-all for {scope}")


def _deny_policy(obj: Resource) -> Resource:
    """The same policy (name, tier, order, selector) denying everything both ways."""
    spec = obj.get("spec") or {}
    kept = {k: spec[k] for k in ("tier", "order", "selector") if k in spec}
    deny: dict[str, Any] = {**kept, "types": ["Ingress", "Egress"],
                            "ingress": [{"action": "Deny"}], "egress": [{"action": "Deny"}]}
    out = {**obj, "spec": deny}
    try:
        compile_policy(out)
    except Exception:  # the selector (or order, tier) is unusable: deny its whole scope
        for k in ("order", "tier"):
            deny.pop(k, None)
        deny["selector"] = "all()"
    return out

"""Resources in etcd: validate, stamp metadata, write atomically, read back (I/O edge).

Calico objects are stored exactly as Calico's etcdv3 backend stores them: the whole v3 object as
compact JSON without `resourceVersion`, which is the key's mod_revision when read. Kubernetes
objects are kept as the user wrote them (under `/tabby/k8s/`) and, in the same transaction, the
Calico objects Calico's kube-controllers would derive from them are written (`kns.*` / `ksa.*`
profiles, `knp.default.*` policies), so any Calico-model reader sees what Calico would.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from datastore import etcd, k8s, validation
from datastore.errors import TabbyError
from datastore.kinds import CALICO_PREFIX, Kind, kind_for, kind_for_key
from datastore.resources import (
    describe,
    encode,
    identify,
    validate_all,
    validate_any,
)
from datastore.snapshot import Resource, Snapshot

# Synthesised on every read of profiles, never stored (as Calico's etcd backend does).
DEFAULT_ALLOW_PROFILE: Resource = {
    "kind": "Profile",
    "apiVersion": "projectcalico.org/v3",
    "metadata": {"name": "projectcalico-default-allow"},
    "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]},
}
APPLY_RETRIES = 5
# etcd's default --max-txn-ops is 128; keep a margin.
MAX_TXN_OPS = 120


class StoreError(TabbyError):
    """A resource operation failed; str() is one line a person can act on."""


class NotFoundError(StoreError):
    pass


class AlreadyExistsError(StoreError):
    pass


class ConflictError(StoreError):
    pass


def decode(kv: etcd.KV) -> Resource:
    obj = json.loads(kv.value)
    obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
    return obj


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(obj: Resource, previous: Resource | None) -> Resource:
    """uid and creationTimestamp: kept from the stored object, new on create."""
    meta = obj.setdefault("metadata", {})
    meta.pop("resourceVersion", None)
    if previous is not None:
        old = previous.get("metadata", {})
        meta["uid"] = old.get("uid") or meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = old.get("creationTimestamp") or _now()
    else:
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
    return obj


class ResourceStore:
    """Typed operations on Tabby's resources over a connected `etcd.Datastore`."""

    def __init__(self, ds: etcd.Datastore) -> None:
        self.ds = ds

    # ---- reads -------------------------------------------------------------------------

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Resource:
        kv = await self.ds.get(kind.key(name, namespace))
        if kv is None:
            if kind.name == "Profile" and name == DEFAULT_ALLOW_PROFILE["metadata"]["name"]:
                return copy.deepcopy(DEFAULT_ALLOW_PROFILE)
            raise NotFoundError(f"{describe(kind, name, namespace)} not found")
        return decode(kv)

    async def list(self, kind: Kind, namespace: str | None = None) -> list[Resource]:
        """All objects of a kind, in one namespace or (namespace None) all of them."""
        kvs, _ = await self.ds.list(kind.list_prefix(namespace))
        items = [decode(kv) for kv in kvs if kind_for_key(kv.key)]
        if kind.name == "Profile":
            items.append(copy.deepcopy(DEFAULT_ALLOW_PROFILE))
        return items

    async def snapshot(self) -> Snapshot:
        """Every Calico object the policy model needs, read at one revision."""
        kvs, _ = await self.ds.list(CALICO_PREFIX)
        snap = Snapshot()
        for kv in kvs:
            if kind_for_key(kv.key):
                snap.add(decode(kv))
        snap.add(copy.deepcopy(DEFAULT_ALLOW_PROFILE))
        return snap

    # ---- writes ------------------------------------------------------------------------

    async def create(self, obj: Resource) -> Resource:
        return (await self.write([obj], "create"))[0].obj

    async def replace(self, obj: Resource) -> Resource:
        return (await self.write([obj], "replace"))[0].obj

    async def apply(self, obj: Resource) -> Resource:
        return (await self.write([obj], "apply"))[0].obj

    async def write(self, objs: Sequence[Any], mode: str, skip_existing: bool = False,
                    default_namespace: str = "default") -> list[WriteResult]:
        """Create, replace or apply many manifests as ONE etcd transaction: all or nothing.

        Every manifest is validated before anything is read or written. `replace` is guarded by
        the resourceVersion the user gave (else the current one); `apply` upserts and retries
        when someone else wrote in between.
        """
        if mode not in WRITE_MODES:
            raise ValueError(f"mode must be one of {WRITE_MODES}")
        valid = validate_all(objs, default_namespace)
        for _ in range(APPLY_RETRIES):
            plan = await self._plan(valid, mode, skip_existing)
            if not plan.ops():
                return plan.results
            try:
                rev = await self._commit_in_batches(plan.ops())
            except etcd.Conflict as e:
                if mode == "apply":
                    continue  # a concurrent writer won; re-read and plan again
                raise ConflictError(f"{self._who(e.key)} changed since it was read "
                                    "(stale resourceVersion); re-read it and retry") from e
            except etcd.AlreadyExists as e:
                if mode == "apply":
                    continue
                raise AlreadyExistsError(f"{self._who(e.key)} already exists") from e
            except etcd.NotFound as e:
                if mode == "apply":
                    continue
                raise NotFoundError(f"{self._who(e.key)} not found") from e
            for r in plan.results:
                if r.action != "skipped":
                    r.obj["metadata"]["resourceVersion"] = str(rev)
            return plan.results
        raise ConflictError("the objects kept changing while applying; retry")

    async def delete(self, kind: Kind, name: str, namespace: str | None = None,
                     resource_version: str | None = None) -> Resource:
        return (await self.delete_many([(kind, name, namespace, resource_version)]))[0]

    async def delete_many(self, targets: Sequence[tuple[Kind, str, str | None, str | None]],
                          skip_missing: bool = False) -> list[Resource]:
        """Delete several objects (and what was derived from them) in one transaction."""
        ops: list[etcd.Op] = []
        deleted: list[Resource] = []
        for kind, name, namespace, rv in targets:
            if kind.namespaced and not namespace:
                namespace = "default"
            key = kind.key(name, namespace)
            kv = await self.ds.get(key)
            if kv is None:
                if skip_missing:
                    continue
                raise NotFoundError(f"{describe(kind, name, namespace)} not found")
            current = decode(kv)
            ops.append(etcd.Delete(key, int(rv) if rv else kv.mod_revision))
            ops += [etcd.Purge(k) for k in self._derived_keys(current)]
            deleted.append(current)
        if ops:
            try:
                await self._commit_in_batches(_dedupe(ops))
            except etcd.Conflict as e:
                raise ConflictError(f"{self._who(e.key)} changed since it was read "
                                    "(stale resourceVersion); re-read it and retry") from e
            except etcd.NotFound as e:
                raise NotFoundError(f"{self._who(e.key)} not found") from e
        return deleted

    # ---- internals ---------------------------------------------------------------------

    async def _commit_in_batches(self, ops: list[etcd.Op]) -> int:
        """One transaction, unless etcd's per-transaction limit forces several (huge files)."""
        rev = 0
        for start in range(0, len(ops), MAX_TXN_OPS):
            rev = await self.ds.commit(ops[start:start + MAX_TXN_OPS])
        return rev

    async def _plan(self, objs: list[Resource], mode: str, skip_existing: bool) -> _Plan:
        plan = _Plan()
        for obj in objs:
            obj = copy.deepcopy(obj)
            kind, name, ns = identify(obj)
            key = kind.key(name, ns)
            given_rv = obj["metadata"].get("resourceVersion")
            kv = await self.ds.get(key)
            current = decode(kv) if kv else None
            if kv is None and mode == "replace":
                raise NotFoundError(f"{describe(kind, name, ns)} not found; use create or apply")
            if kv is not None and mode == "create":
                if skip_existing:
                    plan.results.append(WriteResult(current or obj, "skipped"))
                    continue
                raise AlreadyExistsError(f"{describe(kind, name, ns)} already exists; "
                                         "use apply or replace")
            _stamp(obj, current)
            if kv is None:
                plan.primary.append(etcd.Create(key, encode(obj)))
                plan.results.append(WriteResult(obj, "created"))
            else:
                guard = int(given_rv) if (given_rv and mode == "replace") else kv.mod_revision
                plan.primary.append(etcd.Update(key, encode(obj), guard))
                plan.results.append(WriteResult(obj, "configured"))
            plan.secondary += self._derived_ops(obj)
            plan.secondary += await self._default_service_account_ops(obj)
            plan.secondary += await self._pod_relabel_ops(obj)
        return plan

    def _derived_ops(self, obj: Resource) -> list[etcd.Op]:
        """Calico objects implied by a Kubernetes object, written unconditionally (we own them)."""
        ops: list[etcd.Op] = []
        for derived in k8s.derived_objects(obj):
            d = validation.validate(derived)
            dkind, dname, dns = identify(d)
            _stamp(d, None)
            ops.append(etcd.Put(dkind.key(dname, dns), encode(d)))
        return ops

    def _derived_keys(self, obj: Resource) -> list[str]:
        derived = k8s.derived_objects(obj)
        if _is_k8s(obj, "Namespace"):
            derived += k8s.derived_objects(_default_service_account(obj["metadata"]["name"]))
        keys = []
        for d in derived:
            dkind, dname, dns = identify(d)
            keys.append(dkind.key(dname, dns))
        return keys

    async def _default_service_account_ops(self, obj: Resource) -> list[etcd.Op]:
        """Every namespace has a `default` ServiceAccount; its profile is created with the
        namespace unless it exists already (a user's own `default` SA labels are kept)."""
        if not _is_k8s(obj, "Namespace"):
            return []
        sa = validate_any(_default_service_account(obj["metadata"]["name"]))
        ops = self._derived_ops(sa)
        return [op for op in ops if await self.ds.get(op.key) is None]

    async def _pod_relabel_ops(self, obj: Resource) -> list[etcd.Op]:
        """A (re)labelled Pod relabels its WorkloadEndpoints (kube-controllers' pod controller)."""
        if not _is_k8s(obj, "Pod"):
            return []
        wep_kind = kind_for("WorkloadEndpoint")
        ns = obj["metadata"]["namespace"]
        ops: list[etcd.Op] = []
        for wep in await self.list(wep_kind, ns):
            spec = wep["spec"]
            if spec.get("pod") != obj["metadata"]["name"]:
                continue
            rev = int(wep["metadata"]["resourceVersion"])
            fresh = k8s.workload_endpoint_for_pod(
                obj, spec["node"], spec.get("ipNetworks", []),
                container_id=spec.get("containerID", ""),
                interface_name=spec.get("interfaceName"),
                mac=spec.get("mac", ""), endpoint=spec.get("endpoint", "eth0"))
            wep["metadata"]["labels"] = fresh["metadata"]["labels"]
            for field_name in ("profiles", "serviceAccountName", "ports"):
                if field_name in fresh["spec"]:
                    spec[field_name] = fresh["spec"][field_name]
            ops.append(etcd.Update(wep_kind.key(wep["metadata"]["name"], ns), encode(wep), rev))
        return ops

    @staticmethod
    def _who(key: str) -> str:
        found = kind_for_key(key)
        if found is None:
            return key
        kind, ns, name = found
        return describe(kind, name, ns)


WRITE_MODES = ("create", "replace", "apply")


def _is_k8s(obj: Resource, kind: str) -> bool:
    return obj.get("kind") == kind and obj.get("apiVersion") == "v1"


def _default_service_account(namespace: str) -> Resource:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": namespace}}


@dataclass
class WriteResult:
    obj: Resource
    action: str  # created | configured | skipped


@dataclass
class _Plan:
    primary: list[etcd.Op] = field(default_factory=list)
    secondary: list[etcd.Op] = field(default_factory=list)
    results: list[WriteResult] = field(default_factory=list)

    def ops(self) -> list[etcd.Op]:
        return _dedupe(self.primary + self.secondary)


def _dedupe(ops: list[etcd.Op]) -> list[etcd.Op]:
    """etcd refuses a txn that names a key twice; the user's own objects win over derived ones."""
    seen: dict[str, etcd.Op] = {}
    for op in ops:
        seen.setdefault(op.key, op)
    return list(seen.values())

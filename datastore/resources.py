"""Manifests as Tabby's resources: validation of any kind, identity, stored form (pure).

The pure half of the store: the I/O half (`datastore.store`) and offline users (the policy
simulator, tabbyctl's checks before it connects) share these.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from datastore import k8s, validation
from datastore.errors import ValidationError
from datastore.kinds import ALL_KINDS, Kind, UnknownKind, kind_for
from datastore.snapshot import Resource


def describe(kind: Kind, name: str, namespace: str | None) -> str:
    return f"{kind.name} {namespace}/{name}" if kind.namespaced else f"{kind.name} {name}"


def identify(obj: Resource) -> tuple[Kind, str, str | None]:
    """(kind, name, namespace) of a validated object."""
    kind = kind_for(obj["kind"], obj.get("apiVersion"))
    meta = obj.get("metadata", {})
    return kind, meta["name"], meta.get("namespace") if kind.namespaced else None


def validate_any(obj: Any, default_namespace: str = "default") -> Resource:
    """Validate and default a manifest of any kind Tabby knows; raises ValidationError."""
    if not isinstance(obj, dict):
        raise ValidationError([("", "a resource must be a mapping (kind, apiVersion, metadata)")])
    if not obj.get("kind") or not obj.get("apiVersion"):
        raise ValidationError([("kind" if not obj.get("kind") else "apiVersion", "is required")])
    kind = kind_for(str(obj["kind"]), str(obj["apiVersion"]))
    if kind.is_calico:
        return validation.validate(obj, default_namespace=default_namespace)
    return k8s.validate_k8s(obj, default_namespace=default_namespace)


def encode(obj: Resource) -> bytes:
    """Stored form: compact JSON, no resourceVersion (it is the key's mod revision)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "resourceVersion" in meta:  # copies only what changes
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
    return json.dumps(obj, separators=(",", ":")).encode()


def validate_all(objs: Sequence[Any], default_namespace: str = "default") -> list[Resource]:
    """Validate every manifest; one ValidationError naming each bad document, or the list."""
    valid: list[Resource] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, obj in enumerate(objs):
        where = f"document {i + 1}" if len(objs) > 1 else ""
        try:
            v = validate_any(obj, default_namespace)
        except (ValidationError, UnknownKind) as e:
            problems.append((where, str(e)))
            continue
        kind, name, ns = identify(v)
        key = kind.key(name, ns)
        if key in seen:
            problems.append((where, f"{describe(kind, name, ns)} is also document {seen[key]}"))
        seen[key] = i + 1
        valid.append(v)
    if problems:
        raise ValidationError(problems)
    return valid


def kinds_in_order(objs: Sequence[Resource]) -> list[Resource]:
    """Order manifests so that what others refer to is written first (tiers before policies,
    namespaces before pods), as `kubectl apply` users expect a multi-document file to work."""
    rank = {k.name: i for i, k in enumerate(ALL_KINDS)}
    first = {"Tier": -3, "Namespace": -2, "ServiceAccount": -1}
    return sorted(objs, key=lambda o: first.get(o.get("kind", ""), rank.get(o.get("kind", ""), 99)))

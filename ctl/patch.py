"""Patching an object as `calicoctl patch` / `kubectl patch` do (pure)."""

from __future__ import annotations

import copy
from typing import Any

from datastore.errors import InputError


class PatchError(InputError):
    pass


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise PatchError(f"path {path} does not exist")
    return doc


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for i, op in enumerate(operations):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"operation {i}: needs 'op' and 'path'")
        doc = _apply_one(doc, op)
    return doc


def _apply_one(doc: Any, op: dict[str, Any]) -> Any:
    kind, path = op["op"], op["path"]
    parts = _pointer(path)
    if kind == "test":
        if _walk(doc, parts, path) != op.get("value"):
            raise PatchError(f"test failed at {path}")
        return doc
    if kind in ("move", "copy"):
        from_parts = _pointer(op.get("from", ""))
        value = copy.deepcopy(_walk(doc, from_parts, op.get("from", "")))
        if kind == "move":
            doc = _apply_one(doc, {"op": "remove", "path": op["from"]})
        return _apply_one(doc, {"op": "add", "path": path, "value": value})
    if not parts:
        if kind in ("add", "replace"):
            return copy.deepcopy(op.get("value"))
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, parts[:-1], path)
    last = parts[-1]
    if kind == "add":
        if isinstance(parent, list):
            index = len(parent) if last == "-" else _index(last, len(parent) + 1, path)
            parent.insert(index, copy.deepcopy(op.get("value")))
        elif isinstance(parent, dict):
            parent[last] = copy.deepcopy(op.get("value"))
        else:
            raise PatchError(f"cannot add at {path}")
    elif kind in ("remove", "replace"):
        if isinstance(parent, list):
            index = _index(last, len(parent), path)
        elif isinstance(parent, dict) and last in parent:
            index = last  # type: ignore[assignment]
        else:
            raise PatchError(f"path {path} does not exist")
        if kind == "remove":
            del parent[index]
        else:
            parent[index] = copy.deepcopy(op.get("value"))
    else:
        raise PatchError(f"unknown patch operation {kind!r}")
    return doc


def _index(part: str, limit: int, path: str) -> int:
    if not part.isdigit() or int(part) >= limit:
        raise PatchError(f"path {path}: bad list index {part!r}")
    return int(part)


def apply_patch(target: dict[str, Any], patch: Any, patch_type: str) -> dict[str, Any]:
    """`strategic` is treated as a merge patch: Calico resources have no strategic merge keys."""
    if patch_type in ("merge", "strategic"):
        if not isinstance(patch, dict):
            raise PatchError("a merge patch must be a JSON object")
        return merge_patch(target, patch)
    if patch_type == "json":
        return json_patch(target, patch)
    raise PatchError(f"unknown patch type {patch_type!r} (merge, strategic or json)")


def apply_labels(labels: dict[str, str], assignments: list[str], overwrite: bool,
                 remove: bool) -> dict[str, str]:
    """calicoctl label: `k=v` sets (needs --overwrite to change a value), --remove with `k`."""
    result = dict(labels)
    for item in assignments:
        if remove:
            key = item.split("=", 1)[0]
            if key not in result:
                raise PatchError(f"label {key!r} is not set")
            del result[key]
            continue
        if "=" not in item:
            raise PatchError(f"label {item!r} must be key=value (or use --remove)")
        key, value = item.split("=", 1)
        if key in result and result[key] != value and not overwrite:
            raise PatchError(f"label {key!r} is already {result[key]!r}; use --overwrite")
        result[key] = value
    return result

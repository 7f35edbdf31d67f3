"""The validation walker: typed accessors that record problems with their field paths, and
the checks every kind shares (kind/apiVersion, metadata, protocol)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from datastore.errors import Problems, ValidationError
from datastore.k8s._common import _PROTOCOLS
from datastore.k8s._syntax import _dns_label_problem, _label_key_problem, _label_value_problem


class _Walk:
    """Problems plus small typed accessors that record what is wrong and where."""

    def __init__(self) -> None:
        self.problems = Problems()

    def add(self, path: str, reason: str) -> None:
        self.problems.add(path, reason)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...] | None = None,
                hint: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        """A dict (None for null/absent); unknown keys are reported, since a typo such as
        `ingres:` or `matchLabel:` would otherwise silently widen a policy."""
        if value is None:
            return None
        if not isinstance(value, dict):
            self.add(path, f"must be a mapping, not {type(value).__name__}")
            return None
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    extra = (hint or {}).get(key)
                    reason = f"unknown field {key!r}; expected one of: {', '.join(allowed)}"
                    self.add(_join(path, str(key)), f"{reason} ({extra})" if extra else reason)
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.add(path, f"must be a list, not {type(value).__name__}")
            return []
        return value

    def string(self, value: Any, path: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            # YAML reads `v: 1` or `v: true` as a number/bool; quoting is the fix.
            hint = " (quote it)" if isinstance(value, int | float) else ""
            self.add(path, f"must be a string, not {type(value).__name__} {value!r}{hint}")
            return None
        return value

    def labels(self, value: Any, path: str, what: str = "label") -> dict[str, str]:
        raw = self.mapping(value, path)
        out: dict[str, str] = {}
        for key, val in (raw or {}).items():
            kpath = f'{path}["{key}"]'
            if not isinstance(key, str):
                self.add(kpath, f"{what} key must be a string")
                continue
            reason = _label_key_problem(key)
            if reason:
                self.add(kpath, reason)
            sval = self.string(val, kpath)
            if sval is None:
                if val is None:
                    self.add(kpath, f"{what} value must be a string, not null")
                continue
            if what == "label":
                reason = _label_value_problem(sval)
                if reason:
                    self.add(kpath, reason)
            out[key] = sval
        return out

    def raise_if_any(self, subject: str) -> None:
        self.problems.raise_if_any(subject)


def _join(path: str, child: str) -> str:
    return f"{path}.{child}" if path else child


def _check_kind(obj: Any, kind: str, apis: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The object as a dict and the apiVersion to store; a missing apiVersion is filled in."""
    if not isinstance(obj, dict):
        raise ValidationError([("", f"a {kind} must be a mapping, not {type(obj).__name__}")])
    if obj.get("kind", kind) != kind:
        raise ValidationError([("kind", f"expected {kind}, got {obj.get('kind')!r}")])
    api = obj.get("apiVersion") or apis[0]
    if api not in apis:
        raise ValidationError([("apiVersion", f"{kind} is {apis[0]}, not {api!r}")])
    return obj, apis[0]


def _metadata(w: _Walk, obj: dict[str, Any], *, namespaced: bool, default_namespace: str,
              name_rule: Callable[[str], str | None]) -> dict[str, Any]:
    meta = w.mapping(obj.get("metadata"), "metadata")
    out = copy.deepcopy(meta) if meta else {}
    name = w.string(out.get("name"), "metadata.name")
    if not name:
        if out.get("name") in (None, ""):
            w.add("metadata.name", "required")
    else:
        reason = name_rule(name)
        if reason:
            w.add("metadata.name", reason)
    if namespaced:
        ns = w.string(out.get("namespace"), "metadata.namespace") or default_namespace
        reason = _dns_label_problem(ns)
        if reason:
            w.add("metadata.namespace", reason)
        out["namespace"] = ns
    else:
        # The API server drops a namespace given for a cluster-scoped object.
        out.pop("namespace", None)
    if out.get("labels") is not None:
        out["labels"] = w.labels(out["labels"], "metadata.labels")
    else:
        out.pop("labels", None)
    if out.get("annotations") is not None:
        out["annotations"] = w.labels(out["annotations"], "metadata.annotations", "annotation")
    else:
        out.pop("annotations", None)
    return out


def _subject(kind: str, meta: Mapping[str, Any]) -> str:
    name = meta.get("name") if isinstance(meta.get("name"), str) else "?"
    ns = meta.get("namespace")
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def _protocol(w: _Walk, value: Any, path: str) -> str:
    if value is None:
        return "TCP"  # the Kubernetes default for NetworkPolicyPort and ContainerPort
    text = w.string(value, path)
    if text is None:
        return "TCP"
    if text.upper() not in _PROTOCOLS:
        w.add(path, f"{text!r} is not supported; use one of: {', '.join(_PROTOCOLS)}")
        return text
    return text.upper()

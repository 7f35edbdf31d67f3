"""`validate_k8s`: dispatch a Kubernetes object to its kind's validator, and the
validate-and-default step the converters run first."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from datastore.errors import ValidationError
from datastore.k8s._common import Obj
from datastore.k8s.validate_core import (
    _validate_namespace,
    _validate_pod,
    _validate_secret,
    _validate_serviceaccount,
)
from datastore.k8s.validate_networkpolicy import _validate_network_policy

_VALIDATORS: dict[str, Callable[[Any, str], Obj]] = {
    "NetworkPolicy": _validate_network_policy,
    "Namespace": _validate_namespace,
    "Pod": _validate_pod,
    "ServiceAccount": _validate_serviceaccount,
    "Secret": _validate_secret,
}


def validate_k8s(obj: dict[str, Any], default_namespace: str = "default") -> dict[str, Any]:
    """Check a Kubernetes object as the API server would and return it defaulted.

    Handles networking.k8s.io/v1 NetworkPolicy and v1 Namespace, Pod, ServiceAccount and
    Secret.
    Namespaced objects without `metadata.namespace` get `default_namespace` (kubectl's `-n`).
    Raises ValidationError listing every problem with its field path.
    """
    if not isinstance(obj, dict):
        raise ValidationError([("", f"expected a mapping, not {type(obj).__name__}")])
    kind = obj.get("kind")
    validator = _VALIDATORS.get(kind) if isinstance(kind, str) else None
    if validator is None:
        raise ValidationError(
            [("kind", f"{kind!r} is not a Kubernetes kind Tabby handles; expected one of: "
                      + ", ".join(_VALIDATORS))])
    return validator(obj, default_namespace)


def _normalised(obj: Mapping[str, Any], kind: str) -> Obj:
    """Validate-and-default for the converters, which may be handed stored or partial objects."""
    obj = {**obj, "kind": obj.get("kind", kind)}
    if kind == "Pod":
        return _validate_pod(obj, "default", complete=False)
    return _VALIDATORS[kind](obj, "default")

"""The Profiles kube-controllers keeps for namespaces (`kns.<ns>`) and service accounts
(`ksa.<ns>.<sa>`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datastore.k8s._common import (
    NAME_LABEL,
    NAMESPACE_LABEL_PREFIX,
    NAMESPACE_PROFILE_PREFIX,
    SERVICEACCOUNT_LABEL_PREFIX,
    SERVICEACCOUNT_PROFILE_PREFIX,
    Obj,
)
from datastore.k8s.validate import _normalised
from datastore.kinds import CALICO_API


def _profile(name: str, spec: Obj) -> Obj:
    return {"kind": "Profile", "apiVersion": CALICO_API, "metadata": {"name": name},
            "spec": spec}


def _prefixed_labels(prefix: str, labels: Mapping[str, str], name: str) -> dict[str, str]:
    out = {prefix + key: value for key, value in labels.items()}
    out[prefix + NAME_LABEL] = name
    return dict(sorted(out.items()))


def namespace_profile(ns: dict[str, Any]) -> dict[str, Any]:
    """Profile `kns.<ns>`: allow-all rules (the verdict when no policy decides) and the
    namespace's labels as `pcns.*` plus `pcns.projectcalico.org/name`."""
    ns = _normalised(ns, "Namespace")
    name = ns["metadata"]["name"]
    labels = _prefixed_labels(NAMESPACE_LABEL_PREFIX, ns["metadata"].get("labels", {}), name)
    return _profile(NAMESPACE_PROFILE_PREFIX + name, {
        "ingress": [{"action": "Allow"}],
        "egress": [{"action": "Allow"}],
        "labelsToApply": labels,
    })


def serviceaccount_profile(sa: dict[str, Any]) -> dict[str, Any]:
    """Profile `ksa.<ns>.<sa>`: no rules, only the SA's labels as `pcsa.*` plus
    `pcsa.projectcalico.org/name`."""
    sa = _normalised(sa, "ServiceAccount")
    meta = sa["metadata"]
    labels = _prefixed_labels(SERVICEACCOUNT_LABEL_PREFIX, meta.get("labels", {}), meta["name"])
    return _profile(_sa_profile_name(meta["namespace"], meta["name"]),
                    {"labelsToApply": labels})


def _sa_profile_name(namespace: str, sa: str) -> str:
    return f"{SERVICEACCOUNT_PROFILE_PREFIX}{namespace}.{sa}"

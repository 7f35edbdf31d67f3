"""Kubernetes objects a user applies, and the Calico objects Calico derives from them (pure).

Tabby plays two parts of a Calico etcd-mode cluster here:

* the Kubernetes API server: `validate_k8s` checks and defaults NetworkPolicy, Namespace, Pod and
  ServiceAccount the way the API server would (field paths, DNS-1123 names, label syntax,
  `policyTypes` and `protocol` defaulting, the `kubernetes.io/metadata.name` namespace label);
* Calico's kube-controllers and CNI plugin: `convert_network_policy` (`knp.default.<name>`),
  `namespace_profile` (`kns.<ns>`), `serviceaccount_profile` (`ksa.<ns>.<sa>`) and
  `workload_endpoint_for_pod` build the `projectcalico.org/v3` objects exactly as Calico stores
  them in etcd (same names, selector strings, rule expansion, field names and omitted fields).

Selectors are emitted un-namespaced, as Calico stores them: the `projectcalico.org/namespace`
clause and the `pcns.` prefix are added later by the policy calculation, not here.

Every function takes and returns plain dicts and never mutates its arguments.

Modules: `validate` (`validate_k8s`; per kind in `validate_networkpolicy` and `validate_core`,
on the `_walk` accessors and `_syntax` checks), `networkpolicy` (KNP conversion), `profiles`,
`endpoints` (WorkloadEndpoints, veth names) and `_common` (shared names and labels). This
package re-exports their public names and adds `derived_objects`.
"""

from __future__ import annotations

from typing import Any

from datastore.errors import ValidationError
from datastore.k8s._common import (
    DEFAULT_TIER,
    KNP_ORDER,
    KNP_PREFIX,
    LABEL_NAMESPACE,
    LABEL_ORCHESTRATOR,
    LABEL_SERVICEACCOUNT,
    LABEL_TIER,
    NAME_LABEL,
    NAMESPACE_LABEL_PREFIX,
    NAMESPACE_NAME_LABEL,
    NAMESPACE_PROFILE_PREFIX,
    SERVICEACCOUNT_LABEL_PREFIX,
    SERVICEACCOUNT_PROFILE_PREFIX,
)
from datastore.k8s._common import ORCHESTRATOR_K8S as ORCHESTRATOR_K8S
from datastore.k8s._common import Obj as Obj
from datastore.k8s.endpoints import (
    parse_workload_endpoint_name,
    refresh_workload_endpoint,
    veth_name,
    workload_endpoint_for_pod,
    workload_endpoint_name,
)
from datastore.k8s.networkpolicy import convert_network_policy
from datastore.k8s.profiles import namespace_profile, serviceaccount_profile
from datastore.k8s.validate import _normalised, validate_k8s
from datastore.kinds import CALICO_API

__all__ = [
    "DEFAULT_TIER",
    "KNP_ORDER",
    "KNP_PREFIX",
    "LABEL_NAMESPACE",
    "LABEL_ORCHESTRATOR",
    "LABEL_SERVICEACCOUNT",
    "LABEL_TIER",
    "NAMESPACE_LABEL_PREFIX",
    "NAMESPACE_NAME_LABEL",
    "NAMESPACE_PROFILE_PREFIX",
    "NAME_LABEL",
    "SERVICEACCOUNT_LABEL_PREFIX",
    "SERVICEACCOUNT_PROFILE_PREFIX",
    "convert_network_policy",
    "derived_objects",
    "namespace_profile",
    "parse_workload_endpoint_name",
    "refresh_workload_endpoint",
    "serviceaccount_profile",
    "validate_k8s",
    "veth_name",
    "workload_endpoint_for_pod",
    "workload_endpoint_name",
]


def derived_objects(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The Calico objects Calico's controllers keep for a Kubernetes object.

    Namespace -> [kns profile]; ServiceAccount -> [ksa profile]; KNP -> [knp.default policy];
    Pod -> [] (its endpoint is written by the CNI plugin once the pod has an IP); Secret -> []
    (the routing agent reads BGP passwords from it). Calico's own kinds imply nothing.
    """
    if obj.get("apiVersion") == CALICO_API:
        return []
    kind = obj.get("kind")
    if kind == "Namespace":
        return [namespace_profile(obj)]
    if kind == "ServiceAccount":
        return [serviceaccount_profile(obj)]
    if kind == "NetworkPolicy":
        return [convert_network_policy(obj)]
    if kind in ("Pod", "Secret"):
        _normalised(obj, kind)
        return []
    raise ValidationError([("kind", f"{kind!r} is not a Kubernetes kind Tabby handles")])

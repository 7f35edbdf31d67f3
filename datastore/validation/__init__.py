"""Validation and defaulting of projectcalico.org/v3 resources (pure: no I/O).

`validate(obj)` checks a manifest the way Calico's API layer does in etcd mode (libcalico-go's
v3 validator, the CEL rules and defaults of the CRD schemas, and the client's write-time
defaulting) and returns a new, normalised copy with Calico's defaults filled in. Every problem is
reported at once with the path of the field that holds it, so one `apply` shows all that is
wrong with a manifest.

Normalisations (what Calico stores, so readers see one form): IPPool CIDRs in canonical form,
numeric strings in protocol/port/AS-number fields as integers, `"80:80"` as `80`, endpoint-port
protocol names in Calico's case, JSON nulls dropped (Go's decoder ignores them).

The checks live in modules of one job each: `names` (name and label formats), `_checks` (the
field checkers they share), `rules`, `policies`, `networking`, `endpoints`, `cluster` and
`felix_configuration` (each kind's spec); this module dispatches by kind, checks metadata and
re-exports the public names.
"""

from __future__ import annotations

import copy
from typing import Any

# Imports written `X as X` (and parse_selector) re-export the former single module's public names.
from datastore.errors import Problems as Problems
from datastore.errors import ValidationError
from datastore.kinds import CALICO_API as CALICO_API
from datastore.kinds import CALICO_KINDS as CALICO_KINDS
from datastore.kinds import Kind as Kind
from datastore.selector import SelectorError as SelectorError
from datastore.selector import parse as parse_selector  # noqa: F401 (re-exported)
from datastore.validation._checks import LABEL_NAMESPACE as LABEL_NAMESPACE
from datastore.validation._checks import LABEL_ORCHESTRATOR as LABEL_ORCHESTRATOR
from datastore.validation._checks import LABEL_TIER as LABEL_TIER
from datastore.validation._checks import Check as Check
from datastore.validation._checks import IPAddr as IPAddr
from datastore.validation._checks import IPNet as IPNet
from datastore.validation._checks import SpecCheck as SpecCheck
from datastore.validation._checks import (
    _anything,
    _check_annotations,
    _check_labels,
    _Ctx,
    _fields,
    _has_problem,
    _is_int,
    _string,
    _struct,
    _suggest,
    _type_name,
)
from datastore.validation._checks import is_mac as is_mac
from datastore.validation._checks import parse_cidr as parse_cidr
from datastore.validation._checks import parse_ip as parse_ip
from datastore.validation.cluster import (
    _NODE_STATUS,
    _bgp_configuration,
    _bgp_peer,
    _cluster_information,
    _node,
)
from datastore.validation.cluster import community_problem as community_problem
from datastore.validation.cluster import split_peer_ip as split_peer_ip
from datastore.validation.endpoints import _host_endpoint, _workload_endpoint
from datastore.validation.endpoints import workload_endpoint_name as workload_endpoint_name
from datastore.validation.felix_configuration import _felix_configuration
from datastore.validation.felix_configuration import (
    openstack_region_problem as openstack_region_problem,
)
from datastore.validation.names import _GNP_NAME_RE, _NP_NAME_RE
from datastore.validation.names import MAX_ANNOTATIONS_BYTES as MAX_ANNOTATIONS_BYTES
from datastore.validation.names import MAX_LABEL as MAX_LABEL
from datastore.validation.names import MAX_NAME as MAX_NAME
from datastore.validation.names import dns_label_problem as dns_label_problem
from datastore.validation.names import dns_subdomain_problem as dns_subdomain_problem
from datastore.validation.names import label_value_problem as label_value_problem
from datastore.validation.names import port_name_problem as port_name_problem
from datastore.validation.names import qualified_name_problem as qualified_name_problem
from datastore.validation.networking import _ip_pool, _ip_reservation, _network_set
from datastore.validation.policies import DEFAULT_TIER as DEFAULT_TIER
from datastore.validation.policies import DEFAULT_TIER_ORDER as DEFAULT_TIER_ORDER
from datastore.validation.policies import (
    _global_network_policy,
    _network_policy,
    _profile,
    _tier,
)
from datastore.validation.policies import default_policy_types as default_policy_types
from datastore.validation.rules import PORT_PROTOCOLS as PORT_PROTOCOLS
from datastore.validation.rules import PROTOCOL_NAMES as PROTOCOL_NAMES
from datastore.validation.rules import is_named_port as is_named_port
from datastore.validation.rules import validate_entity_rule as validate_entity_rule
from datastore.validation.rules import validate_rule as validate_rule

__all__ = [
    "ValidationError",
    "default_policy_types",
    "validate",
    "validate_entity_rule",
    "validate_rule",
]

DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"


# ---- metadata -----------------------------------------------------------------------------------

_META_FIELDS: dict[str, Check] = {
    "name": _string,
    "namespace": _string,
    "labels": _anything,
    "annotations": _anything,
    "uid": _string,
    "creationTimestamp": _string,
    "resourceVersion": _anything,
    # Kubernetes bookkeeping that Calico's clients carry through and Tabby ignores.
    "generation": _anything,
    "finalizers": _anything,
    "ownerReferences": _anything,
    "managedFields": _anything,
    "deletionTimestamp": _anything,
    "deletionGracePeriodSeconds": _anything,
}


def _name_problem(kind: str, name: str) -> str | None:
    """Calico's per-kind name rules."""
    if kind == "Tier":
        return dns_label_problem(name)
    if why := dns_subdomain_problem(name):
        return why
    if kind == "NetworkPolicy" and not _NP_NAME_RE.fullmatch(name):
        return (f"{name!r}: a NetworkPolicy name is a DNS label with at most one '.'"
                " (or a knp.default./ossg.default. name)")
    if kind == "GlobalNetworkPolicy" and not _GNP_NAME_RE.fullmatch(name):
        return f"{name!r}: a GlobalNetworkPolicy name is a DNS label with at most one '.'"
    if kind == "ClusterInformation" and name != "default":
        return f"{name!r}: the only ClusterInformation is named 'default'"
    if kind == "Profile" and name == DEFAULT_ALLOW_PROFILE:
        return f"{name!r} is built in (allow all) and cannot be written"
    return None


def _check_metadata(meta: dict[str, Any], kind: Kind, default_ns: str, p: Problems) -> None:
    """Check `meta` in place: names, namespace scope, labels and annotations."""
    name = meta.get("name")
    if isinstance(name, str) and name:
        if why := _name_problem(kind.name, name):
            p.add("metadata.name", why)
    elif kind.name != "WorkloadEndpoint" and not _has_problem(p, "metadata.name"):
        p.add("metadata.name", "required")
    _check_namespace(meta, kind, default_ns, p)
    if "labels" in meta:
        _check_labels(meta["labels"], "metadata.labels", p)
    if "annotations" in meta:
        _check_annotations(meta["annotations"], "metadata.annotations", p)
    if _is_int(meta.get("resourceVersion")):
        meta["resourceVersion"] = str(meta["resourceVersion"])


def _check_namespace(meta: dict[str, Any], kind: Kind, default_ns: str, p: Problems) -> None:
    ns = meta.get("namespace")
    if not kind.namespaced:
        if ns:
            p.add("metadata.namespace", f"{kind.name} is cluster-scoped: remove the namespace")
        meta.pop("namespace", None)
        return
    if not ns:
        meta["namespace"] = ns = default_ns
    if isinstance(ns, str) and (why := dns_label_problem(ns)):
        p.add("metadata.namespace", why)


# ---- the entry point ----------------------------------------------------------------------------

_SPECS: dict[str, SpecCheck] = {
    "IPPool": _ip_pool,
    "IPReservation": _ip_reservation,
    "NetworkPolicy": _network_policy,
    "GlobalNetworkPolicy": _global_network_policy,
    "NetworkSet": _network_set,
    "GlobalNetworkSet": _network_set,
    "HostEndpoint": _host_endpoint,
    "WorkloadEndpoint": _workload_endpoint,
    "Profile": _profile,
    "Tier": _tier,
    "Node": _node,
    "BGPConfiguration": _bgp_configuration,
    "BGPPeer": _bgp_peer,
    "FelixConfiguration": _felix_configuration,
    "ClusterInformation": _cluster_information,
}

# Kinds that carry a status Calico writes; passed through.
_STATUS: dict[str, Check] = {"IPPool": _struct({"conditions": _anything}), "Node": _NODE_STATUS}

_KINDS_BY_NAME = {k.name: k for k in CALICO_KINDS}


def _resolve_kind(obj: dict[str, Any], p: Problems) -> Kind | None:
    api, kind_name = obj.get("apiVersion"), obj.get("kind")
    if api != CALICO_API:
        got = "missing" if api is None else repr(api)
        p.add("apiVersion", f"must be {CALICO_API} ({got})")
    if not isinstance(kind_name, str) or not kind_name:
        p.add("kind", "required")
        return None
    kind = _KINDS_BY_NAME.get(kind_name)
    if kind is None:
        p.add("kind", f"unknown kind {kind_name!r}{_suggest(kind_name, _KINDS_BY_NAME)}; known: "
              + ", ".join(sorted(_KINDS_BY_NAME)))
    return kind


def _subject(kind_name: str, meta: Any) -> str:
    meta = meta if isinstance(meta, dict) else {}
    name, ns = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        return kind_name
    return f"{kind_name} {ns}/{name}" if ns else f"{kind_name} {name}"


def validate(obj: Any, default_namespace: str = "default") -> dict[str, Any]:
    """Validate a projectcalico.org/v3 object; return a normalised copy with defaults applied.

    Raises ValidationError listing every problem as (field path, reason). `obj` is never changed.
    """
    if not isinstance(obj, dict):
        raise ValidationError([("", f"a resource must be a mapping, not {_type_name(obj)}")])
    p = Problems()
    kind = _resolve_kind(obj, p)
    subject = _subject(str(obj.get("kind") or "resource"), obj.get("metadata"))
    if kind is None:
        raise ValidationError(p.items, subject)
    out = _validate_known(obj, kind, default_namespace, p)
    p.raise_if_any(_subject(kind.name, out.get("metadata")))
    return out


def _validate_known(obj: dict[str, Any], kind: Kind, default_ns: str,
                    p: Problems) -> dict[str, Any]:
    fields: dict[str, Check] = {"apiVersion": _anything, "kind": _anything,
                                "metadata": _struct(_META_FIELDS), "spec": _anything}
    if kind.name in _STATUS:
        fields["status"] = _STATUS[kind.name]
    out = _fields(copy.deepcopy(obj), fields, "", p) or {}
    meta = out.get("metadata")
    if not isinstance(meta, dict):
        meta = out["metadata"] = {}
    _check_metadata(meta, kind, default_ns, p)
    spec = _SPECS[kind.name](out.get("spec", {}), _Ctx(kind, meta), p)
    if spec is not None:
        out["spec"] = spec
    return out

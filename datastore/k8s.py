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
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from datastore.errors import Problems, ValidationError
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

Obj = dict[str, Any]

# Names and labels Calico uses (libcalico-go k8s/conversion constants, api v3 label names).
KNP_PREFIX = "knp.default."
NAMESPACE_PROFILE_PREFIX = "kns."
SERVICEACCOUNT_PROFILE_PREFIX = "ksa."
NAMESPACE_LABEL_PREFIX = "pcns."
SERVICEACCOUNT_LABEL_PREFIX = "pcsa."
NAME_LABEL = "projectcalico.org/name"
LABEL_NAMESPACE = "projectcalico.org/namespace"
LABEL_ORCHESTRATOR = "projectcalico.org/orchestrator"
LABEL_SERVICEACCOUNT = "projectcalico.org/serviceaccount"
LABEL_TIER = "projectcalico.org/tier"
ORCHESTRATOR_K8S = "k8s"
DEFAULT_TIER = "default"
KNP_ORDER = 1000
# The API server stamps every namespace with this label (Kubernetes >= 1.21).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

_NP_API = "networking.k8s.io/v1"
# Removed from Kubernetes in 1.16 but still in old notes; same schema, so we upgrade it.
_NP_LEGACY_APIS = ("extensions/v1beta1",)
_CORE_API = "v1"

_PROTOCOLS = ("TCP", "UDP", "SCTP")
_POLICY_TYPES = ("Ingress", "Egress")
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PORT_NAME_RE = re.compile(r"[-a-z0-9]+")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}")


# --- syntax checks (each returns the reason a value is bad, or None) -----------------------


def _dns_label_problem(value: str) -> str | None:
    if len(value) > 63:
        return f"{value!r} is longer than 63 characters"
    if not _DNS_LABEL_RE.fullmatch(value):
        return (f"{value!r} is not a valid DNS-1123 label: use lower-case letters, digits and "
                "'-', starting and ending with a letter or digit")
    return None


def _dns_subdomain_problem(value: str) -> str | None:
    if len(value) > 253:
        return f"{value!r} is longer than 253 characters"
    if not _DNS_SUBDOMAIN_RE.fullmatch(value):
        return (f"{value!r} is not a valid DNS-1123 subdomain: use lower-case letters, digits, "
                "'-' and '.', starting and ending with a letter or digit")
    return None


def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return f"label key {key!r} has an empty prefix before '/'"
    if slash:
        reason = _dns_subdomain_problem(prefix)
        if reason:
            return f"label key {key!r}: prefix {reason}"
    if not name:
        return f"label key {key!r} has an empty name"
    if len(name) > 63:
        return f"label key {key!r}: name part is longer than 63 characters"
    if not _LABEL_NAME_RE.fullmatch(name):
        return (f"label key {key!r} is not valid: the name part must be letters, digits, '-', "
                "'_' or '.', starting and ending with a letter or digit")
    return None


def _label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return f"label value {value!r} is longer than 63 characters"
    if value and not _LABEL_NAME_RE.fullmatch(value):
        return (f"label value {value!r} is not valid: use letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit")
    return None


def _port_name_problem(name: str) -> str | None:
    # Kubernetes IANA_SVC_NAME rules for named ports.
    if not 1 <= len(name) <= 15:
        return f"port name {name!r} must be 1-15 characters"
    if not _PORT_NAME_RE.fullmatch(name):
        return f"port name {name!r} may only contain lower-case letters, digits and '-'"
    if not re.search(r"[a-z]", name):
        return f"port name {name!r} must contain at least one letter"
    if "--" in name:
        return f"port name {name!r} must not contain consecutive '-'"
    if name.startswith("-") or name.endswith("-"):
        return f"port name {name!r} must not begin or end with '-'"
    return None


def _is_int(value: Any) -> bool:
    # YAML `true` is a Python int; it is never a valid port.
    return isinstance(value, int) and not isinstance(value, bool)


def _port_number_problem(value: Any) -> str | None:
    if not _is_int(value):
        return f"{value!r} is not a port number"
    if not 1 <= value <= 65535:
        return f"{value} is out of range (1-65535)"
    return None


def _parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if "/" not in text:
        return None
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


# --- validation walker --------------------------------------------------------------------


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


# --- NetworkPolicy ------------------------------------------------------------------------

_SELECTOR_FIELDS = ("matchLabels", "matchExpressions")
_EXPRESSION_FIELDS = ("key", "operator", "values")
_PEER_FIELDS = ("podSelector", "namespaceSelector", "ipBlock")
_PORT_FIELDS = ("protocol", "port", "endPort")


def _label_selector(w: _Walk, value: Any, path: str) -> dict[str, Any] | None:
    raw = w.mapping(value, path, _SELECTOR_FIELDS)
    if raw is None:
        return None
    out: dict[str, Any] = {}
    labels = w.labels(raw.get("matchLabels"), _join(path, "matchLabels"))
    if labels:
        out["matchLabels"] = labels
    exprs = []
    for i, item in enumerate(w.sequence(raw.get("matchExpressions"),
                                        _join(path, "matchExpressions"))):
        epath = f"{path}.matchExpressions[{i}]"
        expr = w.mapping(item, epath, _EXPRESSION_FIELDS)
        if expr is None:
            w.add(epath, "must be a mapping with key and operator")
            continue
        key = w.string(expr.get("key"), _join(epath, "key"))
        if not key:
            w.add(_join(epath, "key"), "required")
        else:
            reason = _label_key_problem(key)
            if reason:
                w.add(_join(epath, "key"), reason)
        op_raw = w.string(expr.get("operator"), _join(epath, "operator"))
        op = next((o for o in _OPERATORS if op_raw and o.lower() == op_raw.lower()), None)
        if op is None and expr.get("operator") is None:
            w.add(_join(epath, "operator"), "required")
        elif op is None and op_raw is not None:
            w.add(_join(epath, "operator"),
                  f"{op_raw!r} is not a valid operator; use one of: {', '.join(_OPERATORS)}")
        values: list[str] = []
        for j, val in enumerate(w.sequence(expr.get("values"), _join(epath, "values"))):
            vpath = f"{epath}.values[{j}]"
            sval = w.string(val, vpath)
            if sval is None:
                if val is None:
                    w.add(vpath, "must be a string, not null")
                continue
            reason = _label_value_problem(sval)
            if reason:
                w.add(vpath, reason)
            values.append(sval)
        if op in ("In", "NotIn") and not values:
            w.add(_join(epath, "values"), f"must be non-empty for operator {op}")
        if op in ("Exists", "DoesNotExist") and expr.get("values"):
            w.add(_join(epath, "values"), f"must be empty for operator {op}")
        norm: dict[str, Any] = {"key": key or "", "operator": op or op_raw or ""}
        if op in ("In", "NotIn"):
            norm["values"] = values
        exprs.append(norm)
    if exprs:
        out["matchExpressions"] = exprs
    return out


def _ip_block(w: _Walk, value: Any, path: str) -> dict[str, Any] | None:
    raw = w.mapping(value, path, ("cidr", "except"))
    if raw is None:
        return None
    cidr_text = w.string(raw.get("cidr"), _join(path, "cidr"))
    cidr = None
    if not cidr_text:
        if raw.get("cidr") in (None, ""):
            w.add(_join(path, "cidr"), "required")
    else:
        cidr = _parse_network(cidr_text)
        if cidr is None:
            w.add(_join(path, "cidr"),
                  f"{cidr_text!r} is not a valid CIDR (e.g. 10.9.8.0/24 or 2001:db8::/64)")
    out: dict[str, Any] = {"cidr": cidr_text or ""}
    excepts: list[str] = []
    for i, item in enumerate(w.sequence(raw.get("except"), _join(path, "except"))):
        epath = f"{path}.except[{i}]"
        text = w.string(item, epath)
        if text is None:
            if item is None:
                w.add(epath, "must be a CIDR, not null")
            continue
        excepts.append(text)
        net = _parse_network(text)
        if net is None:
            w.add(epath, f"{text!r} is not a valid CIDR (e.g. 10.9.8.0/24 or 2001:db8::/64)")
        elif cidr is not None and not (
            net.version == cidr.version
            and net.prefixlen > cidr.prefixlen
            and net.subnet_of(cidr)  # type: ignore[arg-type]
        ):
            w.add(epath, f"{text} must be a strict subset of cidr {cidr_text}")
    if excepts:
        out["except"] = excepts
    return out


def _peer(w: _Walk, value: Any, path: str) -> dict[str, Any] | None:
    raw = w.mapping(value, path, _PEER_FIELDS)
    if raw is None:
        w.add(path, "must be a mapping with podSelector, namespaceSelector or ipBlock")
        return None
    out: dict[str, Any] = {}
    for key, parse in (("podSelector", _label_selector), ("namespaceSelector", _label_selector),
                       ("ipBlock", _ip_block)):
        parsed = parse(w, raw.get(key), _join(path, key))
        if parsed is not None:
            out[key] = parsed
    if not out:
        w.add(path, "must specify a peer: podSelector, namespaceSelector or ipBlock")
    elif "ipBlock" in out and len(out) > 1:
        w.add(path, "may not specify both ipBlock and another peer")
    return out


def _np_port(w: _Walk, value: Any, path: str) -> dict[str, Any] | None:
    raw = w.mapping(value, path, _PORT_FIELDS)
    if raw is None:
        w.add(path, "must be a mapping with protocol, port and endPort")
        return None
    out: dict[str, Any] = {"protocol": _protocol(w, raw.get("protocol"),
                                                  _join(path, "protocol"))}
    port = raw.get("port")
    end = raw.get("endPort")
    if port is not None:
        if _is_int(port):
            reason = _port_number_problem(port)
            if reason:
                w.add(_join(path, "port"), reason)
        elif isinstance(port, str):
            reason = _port_name_problem(port)
            if reason and port.isdigit():
                reason += f" (write {port} without quotes for a port number)"
            if reason:
                w.add(_join(path, "port"), reason)
        else:
            w.add(_join(path, "port"), f"{port!r} must be a port number or a port name")
        out["port"] = port
    if end is not None:
        epath = _join(path, "endPort")
        if port is None:
            w.add(epath, "may not be specified when port is not specified")
        elif not _is_int(port):
            w.add(epath, "may not be specified when port is a named port")
        reason = _port_number_problem(end)
        if reason:
            w.add(epath, reason)
        elif _is_int(port) and end < port:
            w.add(epath, f"{end} must be greater than or equal to port {port}")
        out["endPort"] = end
    return out


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


def _np_rules(w: _Walk, value: Any, path: str, peers_key: str) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    wrong = "to" if peers_key == "from" else "from"
    hint = {wrong: f"{path.rsplit('.', 1)[-1]} rules use {peers_key!r}"}
    rules = []
    for i, item in enumerate(w.sequence(value, path)):
        rpath = f"{path}[{i}]"
        raw = w.mapping(item, rpath, (peers_key, "ports"), hint)
        if raw is None and item is not None:
            continue
        raw = raw or {}
        rule: dict[str, Any] = {}
        peers = [_peer(w, p, f"{rpath}.{peers_key}[{j}]")
                 for j, p in enumerate(w.sequence(raw.get(peers_key), _join(rpath, peers_key)))]
        if peers:
            rule[peers_key] = [p for p in peers if p is not None]
        ports = [_np_port(w, p, f"{rpath}.ports[{j}]")
                 for j, p in enumerate(w.sequence(raw.get("ports"), _join(rpath, "ports")))]
        if ports:
            rule["ports"] = [p for p in ports if p is not None]
        rules.append(rule)
    return rules


def _validate_network_policy(obj: Any, default_namespace: str) -> Obj:
    obj, api = _check_kind(obj, "NetworkPolicy", (_NP_API, *_NP_LEGACY_APIS))
    w = _Walk()
    w.mapping(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = _metadata(w, obj, namespaced=True, default_namespace=default_namespace,
                     name_rule=_dns_subdomain_problem)
    raw = w.mapping(obj.get("spec"), "spec", ("podSelector", "policyTypes", "ingress", "egress"),
                    {"ingres": "did you mean 'ingress'?", "egres": "did you mean 'egress'?"})
    raw = raw or {}
    # An absent/null podSelector is the empty selector (all pods in the namespace), as in Go.
    spec: dict[str, Any] = {
        "podSelector": _label_selector(w, raw.get("podSelector"), "spec.podSelector") or {},
    }
    ingress = _np_rules(w, raw.get("ingress"), "spec.ingress", "from")
    egress = _np_rules(w, raw.get("egress"), "spec.egress", "to")
    if ingress is not None:
        spec["ingress"] = ingress
    if egress is not None:
        spec["egress"] = egress
    types: list[str] = []
    for i, item in enumerate(w.sequence(raw.get("policyTypes"), "spec.policyTypes")):
        tpath = f"spec.policyTypes[{i}]"
        text = w.string(item, tpath)
        canon = next((t for t in _POLICY_TYPES if text and t.lower() == text.lower()), None)
        if canon is None:
            if text is not None or item is None:
                w.add(tpath, f"{item!r} is not supported; use Ingress and/or Egress")
        elif canon in types:
            w.add(tpath, f"duplicate policy type {canon}")
        else:
            types.append(canon)
    if not types:
        # Kubernetes defaulting: Ingress always, Egress only when there are egress rules.
        types = ["Ingress"] + (["Egress"] if egress else [])
    spec["policyTypes"] = types
    w.raise_if_any(_subject(f"NetworkPolicy.{_NP_API.split('/')[0]}", meta))
    return {"apiVersion": api, "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


# --- Namespace, ServiceAccount, Pod -------------------------------------------------------


def _validate_namespace(obj: Any, default_namespace: str) -> Obj:
    obj, api = _check_kind(obj, "Namespace", (_CORE_API,))
    w = _Walk()
    meta = _metadata(w, obj, namespaced=False, default_namespace=default_namespace,
                     name_rule=_dns_label_problem)
    if isinstance(meta.get("name"), str):
        # The API server always (re)writes this label to the namespace's name.
        meta["labels"] = {**meta.get("labels", {}), NAMESPACE_NAME_LABEL: meta["name"]}
    w.raise_if_any(_subject("Namespace", meta))
    out = copy.deepcopy(obj)
    out.update(apiVersion=api, kind="Namespace", metadata=meta)
    return out


def _validate_serviceaccount(obj: Any, default_namespace: str) -> Obj:
    obj, api = _check_kind(obj, "ServiceAccount", (_CORE_API,))
    w = _Walk()
    meta = _metadata(w, obj, namespaced=True, default_namespace=default_namespace,
                     name_rule=_dns_subdomain_problem)
    w.raise_if_any(_subject("ServiceAccount", meta))
    out = copy.deepcopy(obj)
    out.update(apiVersion=api, kind="ServiceAccount", metadata=meta)
    return out


def _container_ports(w: _Walk, value: Any, path: str) -> list[dict[str, Any]]:
    out = []
    seen: set[str] = set()
    for i, item in enumerate(w.sequence(value, path)):
        ppath = f"{path}[{i}]"
        raw = w.mapping(item, ppath)
        if raw is None:
            w.add(ppath, "must be a mapping with containerPort")
            continue
        port = copy.deepcopy(raw)
        if raw.get("containerPort") is None:
            w.add(_join(ppath, "containerPort"), "required")
        else:
            reason = _port_number_problem(raw["containerPort"])
            if reason:
                w.add(_join(ppath, "containerPort"), reason)
        name = w.string(raw.get("name"), _join(ppath, "name"))
        if name:
            reason = _port_name_problem(name)
            if reason:
                w.add(_join(ppath, "name"), reason)
            elif name in seen:
                w.add(_join(ppath, "name"), f"duplicate port name {name!r}")
            seen.add(name)
        elif "name" in port:
            del port["name"]
        if raw.get("hostPort") not in (None, 0):
            reason = _port_number_problem(raw["hostPort"])
            if reason:
                w.add(_join(ppath, "hostPort"), reason)
        host_ip = w.string(raw.get("hostIP"), _join(ppath, "hostIP"))
        if host_ip:
            try:
                ipaddress.ip_address(host_ip)
            except ValueError:
                w.add(_join(ppath, "hostIP"), f"{host_ip!r} is not a valid IP address")
        port["protocol"] = _protocol(w, raw.get("protocol"), _join(ppath, "protocol"))
        out.append(port)
    return out


def _validate_pod(obj: Any, default_namespace: str, complete: bool = True) -> Obj:
    """`complete=False` accepts a pod without containers: callers building endpoints often
    hold only the parts of a pod that matter to networking."""
    obj, api = _check_kind(obj, "Pod", (_CORE_API,))
    w = _Walk()
    meta = _metadata(w, obj, namespaced=True, default_namespace=default_namespace,
                     name_rule=_dns_subdomain_problem)
    spec = copy.deepcopy(w.mapping(obj.get("spec"), "spec") or {})
    if obj.get("spec") is None and complete:
        w.add("spec", "required")
    # The ServiceAccount admission plugin fills in "default"; `serviceAccount` is the old alias.
    sa = w.string(spec.get("serviceAccountName") or spec.get("serviceAccount"),
                  "spec.serviceAccountName") or "default"
    reason = _dns_subdomain_problem(sa)
    if reason:
        w.add("spec.serviceAccountName", reason)
    spec["serviceAccountName"] = sa
    node = w.string(spec.get("nodeName"), "spec.nodeName")
    if node:
        reason = _dns_subdomain_problem(node)
        if reason:
            w.add("spec.nodeName", reason)
    if not isinstance(spec.get("hostNetwork", False), bool):
        w.add("spec.hostNetwork", "must be true or false")
    names: set[str] = set()
    for field in ("containers", "initContainers"):
        containers = w.sequence(spec.get(field), f"spec.{field}")
        if field == "containers" and not containers and complete and spec:
            w.add("spec.containers", "must have at least one container")
        normalised = []
        for i, item in enumerate(containers):
            cpath = f"spec.{field}[{i}]"
            raw = w.mapping(item, cpath)
            if raw is None:
                w.add(cpath, "must be a mapping")
                continue
            container = copy.deepcopy(raw)
            cname = w.string(raw.get("name"), _join(cpath, "name"))
            if not cname:
                if raw.get("name") in (None, ""):
                    w.add(_join(cpath, "name"), "required")
            else:
                reason = _dns_label_problem(cname)
                if reason:
                    w.add(_join(cpath, "name"), reason)
                elif cname in names:
                    w.add(_join(cpath, "name"), f"duplicate container name {cname!r}")
                names.add(cname)
            if raw.get("ports") is not None:
                container["ports"] = _container_ports(w, raw["ports"], _join(cpath, "ports"))
            normalised.append(container)
        if spec.get(field) is not None:
            spec[field] = normalised
    status = w.mapping(obj.get("status"), "status")
    if status:
        _pod_status_ips(w, status)
    w.raise_if_any(_subject("Pod", meta))
    out = copy.deepcopy(obj)
    out.update(apiVersion=api, kind="Pod", metadata=meta, spec=spec)
    return out


def _pod_status_ips(w: _Walk | None, status: Mapping[str, Any]) -> list[str]:
    """The pod's IPs from status.podIPs (or podIP); problems go to `w` when given."""
    def bad(path: str, reason: str) -> None:
        if w is not None:
            w.add(path, reason)

    ips: list[str] = []
    for i, item in enumerate(status.get("podIPs") or []):
        ip = item.get("ip") if isinstance(item, dict) else None
        if not isinstance(ip, str):
            bad(f"status.podIPs[{i}].ip", "required")
            continue
        ips.append(ip)
    single = status.get("podIP")
    if not ips and isinstance(single, str) and single:
        ips.append(single)
    elif isinstance(single, str) and single and ips and single != ips[0]:
        bad("status.podIP", f"{single!r} must equal status.podIPs[0].ip {ips[0]!r}")
    good = []
    families: set[int] = set()
    for i, ip in enumerate(ips):
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            bad(f"status.podIPs[{i}].ip", f"{ip!r} is not a valid IP address")
            continue
        if addr.version in families:
            bad(f"status.podIPs[{i}].ip", "at most one IP per address family")
        families.add(addr.version)
        good.append(str(addr))
    return good


_VALIDATORS: dict[str, Callable[[Any, str], Obj]] = {
    "NetworkPolicy": _validate_network_policy,
    "Namespace": _validate_namespace,
    "Pod": _validate_pod,
    "ServiceAccount": _validate_serviceaccount,
}


def validate_k8s(obj: dict[str, Any], default_namespace: str = "default") -> dict[str, Any]:
    """Check a Kubernetes object as the API server would and return it defaulted.

    Handles networking.k8s.io/v1 NetworkPolicy and v1 Namespace, Pod and ServiceAccount.
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


# --- KNP -> Calico NetworkPolicy ----------------------------------------------------------


def _calico_selector(sel: Mapping[str, Any] | None, *, pods: bool) -> str:
    """Calico's string for a K8s label selector: matchLabels by sorted key, then
    matchExpressions in the order given. A pod selector always starts with the orchestrator
    clause; an empty namespace selector means all namespaces."""
    terms = [f"{LABEL_ORCHESTRATOR} == '{ORCHESTRATOR_K8S}'"] if pods else []
    if sel is None:
        return " && ".join(terms)
    labels = sel.get("matchLabels") or {}
    exprs = sel.get("matchExpressions") or []
    if not pods and not labels and not exprs:
        return "all()"
    terms += [f"{key} == '{labels[key]}'" for key in sorted(labels)]
    for expr in exprs:
        key, op = expr["key"], expr["operator"]
        members = "', '".join(expr.get("values") or [])
        if op == "In":
            terms.append(f"{key} in {{ '{members}' }}")
        elif op == "NotIn":
            terms.append(f"{key} not in {{ '{members}' }}")
        elif op == "Exists":
            terms.append(f"has({key})")
        elif op == "DoesNotExist":
            terms.append(f"! has({key})")
    return " && ".join(terms)


def _peer_entity(peer: Mapping[str, Any] | None) -> dict[str, Any]:
    """EntityRule fields for one peer (None = no constraint)."""
    if peer is None:
        return {}
    block = peer.get("ipBlock")
    if block is not None:
        # Calico stores the network address (10.1.2.3/16 -> 10.1.0.0/16).
        out: dict[str, Any] = {"nets": [str(_parse_network(block["cidr"]))]}
        not_nets = [str(_parse_network(e)) for e in block.get("except") or []]
        if not_nets:
            out["notNets"] = not_nets
        return out
    out = {"selector": _calico_selector(peer.get("podSelector"), pods=True)}
    ns_sel = _calico_selector(peer.get("namespaceSelector"), pods=False)
    if ns_sel:
        out["namespaceSelector"] = ns_sel
    return out


_PortItem = tuple[int, int] | str


def _port_items(port: Mapping[str, Any]) -> list[_PortItem] | None:
    """The Calico ports for one K8s port entry; None means every port of the protocol."""
    value = port.get("port")
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [(value, port.get("endPort", value))]


def _simplify_ports(items: list[_PortItem]) -> list[_PortItem]:
    """Merge numeric ports into the fewest ranges (Calico's SimplifyPorts): named ports first in
    their given order, then ranges ascending; unchanged unless there are two or more numbers."""
    if len(items) <= 1:
        return items
    named = [p for p in items if isinstance(p, str)]
    ranges = sorted(p for p in items if not isinstance(p, str))
    if sum(hi - lo + 1 for lo, hi in ranges) <= 1:
        return items
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return [*named, *merged]


def _port_json(item: _PortItem) -> int | str:
    if isinstance(item, str):
        return item
    lo, hi = item
    return lo if lo == hi else f"{lo}:{hi}"


# EntityRule JSON field order in Calico's API types.
_ENTITY_ORDER = ("nets", "selector", "namespaceSelector", "ports", "notNets")


def _calico_rules(rule: Mapping[str, Any], *, ingress: bool) -> list[Obj]:
    """One K8s rule -> Calico Allow rules: one per protocol (sorted) x one per peer."""
    peers: list[Mapping[str, Any] | None] = list(rule.get("from" if ingress else "to") or [])
    ports = rule.get("ports") or []
    by_protocol: dict[str, list[_PortItem] | None] = {}
    if not ports:
        by_protocol[""] = None
    for port in ports:
        proto = port.get("protocol") or "TCP"
        items = _port_items(port)
        if items is None:
            by_protocol[proto] = None  # "all ports" wins over any listed ports
        elif proto not in by_protocol or by_protocol[proto]:
            by_protocol[proto] = [*(by_protocol.get(proto) or []), *items]
    rules = []
    for proto in sorted(by_protocol):
        listed = by_protocol[proto]
        port_json = [_port_json(p) for p in _simplify_ports(listed)] if listed else []
        for peer in peers or [None]:
            entity = _peer_entity(peer)
            out: Obj = {"action": "Allow"}
            if proto:
                out["protocol"] = proto
            if ingress:
                if entity:
                    out["source"] = entity
                if port_json:
                    out["destination"] = {"ports": port_json}
            else:
                fields = {**entity, "ports": port_json} if port_json else entity
                dest = {k: fields[k] for k in _ENTITY_ORDER if k in fields}
                if dest:
                    out["destination"] = dest
            rules.append(out)
    return rules


def convert_network_policy(knp: dict[str, Any]) -> dict[str, Any]:
    """The `knp.default.<name>` Calico NetworkPolicy that kube-controllers stores for a KNP.

    The input is validated and defaulted first (as the API server would have done before
    Calico ever saw it), so an absent `policyTypes` with egress rules yields Ingress+Egress.
    """
    knp = _normalised(knp, "NetworkPolicy")
    meta, spec = knp["metadata"], knp["spec"]
    ingress = [r for rule in spec.get("ingress") or [] for r in _calico_rules(rule, ingress=True)]
    egress = [r for rule in spec.get("egress") or [] for r in _calico_rules(rule, ingress=False)]
    out_spec: Obj = {"tier": DEFAULT_TIER, "order": KNP_ORDER}
    if ingress:
        out_spec["ingress"] = ingress
    if egress:
        out_spec["egress"] = egress
    out_spec["selector"] = _calico_selector(spec["podSelector"], pods=True)
    # Calico keeps the types in Ingress, Egress order whatever order policyTypes used.
    out_spec["types"] = [t for t in _POLICY_TYPES if t in spec["policyTypes"]]
    return {
        "kind": "NetworkPolicy",
        "apiVersion": CALICO_API,
        "metadata": {
            "name": KNP_PREFIX + meta["name"],
            "namespace": meta["namespace"],
            # Calico's write-path defaulting stamps the tier label; nothing else points back.
            "labels": {LABEL_TIER: DEFAULT_TIER},
        },
        "spec": out_spec,
    }


# --- Profiles -----------------------------------------------------------------------------


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


# --- Workload endpoints -------------------------------------------------------------------


def veth_name(namespace: str, pod: str, prefix: str = "cali") -> str:
    """Host-side veth name: prefix + first 11 hex digits of SHA-1("<namespace>.<pod>").
    Felix recomputes the same name, so this must never change."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode(), usedforsecurity=False).hexdigest()
    return prefix + digest[:11]


def _workload_field(orchestrator: str) -> str:
    return {"k8s": "pod", "cni": "containerID"}.get(orchestrator, "workload")


def workload_endpoint_name(node: str, orchestrator: str, workload: str, endpoint: str) -> str:
    """`<node>-<orchestrator>-<workload>-<endpoint>` with each '-' inside a part doubled, so
    the name splits back unambiguously (`node-1`,`k8s`,`web-7d9f`,`eth0` ->
    `node--1-k8s-web--7d9f-eth0`). Calico's libnetwork names repeat the orchestrator."""
    if orchestrator == "libnetwork":
        workload = orchestrator
    parts = (("node", node), ("orchestrator", orchestrator),
             (_workload_field(orchestrator), workload), ("endpoint", endpoint))
    problems = []
    for field, value in parts:
        if not value:
            problems.append((field, "field should be assigned"))
        elif value.startswith("-") or value.endswith("-"):
            problems.append((field, f"{value!r} must not begin or end with '-'"))
    if problems:
        raise ValidationError(problems, "WorkloadEndpoint name")
    return "-".join(value.replace("-", "--") for _, value in parts)


def parse_workload_endpoint_name(name: str) -> list[str]:
    """Split a WorkloadEndpoint name back into its parts, undoing the dash doubling."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(name):
        char = name[i]
        # A '-' in first position can only be data: names never start with a separator.
        if char == "-" and i > 0:
            if i + 1 < len(name) and name[i + 1] == "-":
                current.append("-")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _host_network(text: str, path: str) -> str:
    """An endpoint address as Calico records it: the bare IP with a full-length mask."""
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise ValidationError([(path, f"{text!r} is not an IP address or CIDR")]) from None
    return f"{iface.ip}/{iface.max_prefixlen}"


def _endpoint_labels(pod: Obj) -> dict[str, str]:
    meta = pod["metadata"]
    sa = pod["spec"]["serviceAccountName"]
    labels = dict(meta.get("labels") or {})
    labels[LABEL_NAMESPACE] = meta["namespace"]
    labels[LABEL_ORCHESTRATOR] = ORCHESTRATOR_K8S
    if sa and len(sa) < 63:
        # Calico only sets it below 63 characters (a label value's limit), for compatibility.
        labels[LABEL_SERVICEACCOUNT] = sa
    return dict(sorted(labels.items()))


def _endpoint_ports(pod: Obj) -> list[Obj]:
    """Named ports and host ports of all containers, then init containers."""
    ports = []
    for field in ("containers", "initContainers"):
        for container in pod["spec"].get(field) or []:
            for port in container.get("ports") or []:
                number = port.get("containerPort") or 0
                name = port.get("name") or ""
                host_port = port.get("hostPort") or 0
                if not number or not (name or host_port):
                    continue
                # Calico's WorkloadEndpointPort has no omitempty: all five fields are written.
                ports.append({
                    "name": name,
                    "protocol": (port.get("protocol") or "TCP").lower(),
                    "port": number,
                    "hostPort": host_port,
                    "hostIP": port.get("hostIP") or "",
                })
    return ports


def workload_endpoint_for_pod(
    pod: dict[str, Any],
    node: str,
    ip_networks: list[str],
    container_id: str = "",
    interface_name: str | None = None,
    mac: str = "",
    endpoint: str = "eth0",
) -> dict[str, Any]:
    """The WorkloadEndpoint Calico's CNI plugin writes for a pod on `node`.

    `ip_networks` are the IPAM results (bare IPs or CIDRs; stored as /32 or /128); when empty the
    pod's status IPs are used, as Calico's KDD conversion does. Empty optional fields are left
    out, as Calico's JSON omits them.
    """
    pod = _normalised(pod, "Pod")
    meta, spec = pod["metadata"], pod["spec"]
    if spec.get("hostNetwork"):
        raise ValidationError([("spec.hostNetwork", "host-networked pods get no endpoint")],
                              _subject("Pod", meta))
    ns, name, sa = meta["namespace"], meta["name"], spec["serviceAccountName"]
    nets = [_host_network(n, f"ip_networks[{i}]") for i, n in enumerate(ip_networks)]
    if not nets:
        nets = [_host_network(ip, "status.podIPs") for ip in
                _pod_status_ips(None, pod.get("status") or {})]
    if mac:
        if not _MAC_RE.fullmatch(mac):
            raise ValidationError([("mac", f"{mac!r} is not a MAC address")])
        mac = mac.lower().replace("-", ":")
    out_meta: Obj = {
        "name": workload_endpoint_name(node, ORCHESTRATOR_K8S, name, endpoint),
        "namespace": ns,
        "labels": _endpoint_labels(pod),
    }
    if meta.get("generateName"):
        out_meta["generateName"] = meta["generateName"]
    profiles = [NAMESPACE_PROFILE_PREFIX + ns]
    if sa:
        profiles.append(_sa_profile_name(ns, sa))
    # Field order follows Calico's WorkloadEndpointSpec; empty values are omitted like its JSON.
    candidates: list[tuple[str, Any]] = [
        ("orchestrator", ORCHESTRATOR_K8S),
        ("node", node),
        ("containerID", container_id),
        ("pod", name),
        ("endpoint", endpoint),
        ("serviceAccountName", sa),
        ("ipNetworks", nets),
        ("profiles", profiles),
        ("interfaceName", interface_name or veth_name(ns, name)),
        ("mac", mac),
        ("ports", _endpoint_ports(pod)),
    ]
    return {
        "kind": "WorkloadEndpoint",
        "apiVersion": CALICO_API,
        "metadata": out_meta,
        "spec": {key: value for key, value in candidates if value},
    }


def refresh_workload_endpoint(wep: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    """A copy of `wep` with the labels and service account of the pod's current state.

    This is all Calico's pod controller syncs when a pod changes after its endpoint was
    written (profiles, IPs and ports are the CNI plugin's and stay as they are).
    """
    pod = _normalised(pod, "Pod")
    out = copy.deepcopy(wep)
    out.setdefault("metadata", {})["labels"] = _endpoint_labels(pod)
    spec = out.setdefault("spec", {})
    if pod["spec"]["serviceAccountName"]:
        spec["serviceAccountName"] = pod["spec"]["serviceAccountName"]
    else:
        spec.pop("serviceAccountName", None)
    return out


# --- What a Kubernetes object implies -----------------------------------------------------


def derived_objects(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The Calico objects Calico's controllers keep for a Kubernetes object.

    Namespace -> [kns profile]; ServiceAccount -> [ksa profile]; KNP -> [knp.default policy];
    Pod -> [] (its endpoint is written by the CNI plugin once the pod has an IP). Calico's own
    kinds imply nothing.
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
    if kind == "Pod":
        _normalised(obj, "Pod")
        return []
    raise ValidationError([("kind", f"{kind!r} is not a Kubernetes kind Tabby handles")])

"""KNP -> Calico NetworkPolicy: the `knp.default.<name>` policy kube-controllers stores, with
Calico's selector strings, rule expansion and port simplification."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datastore.k8s._common import (
    _POLICY_TYPES,
    DEFAULT_TIER,
    KNP_ORDER,
    KNP_PREFIX,
    LABEL_ORCHESTRATOR,
    LABEL_TIER,
    ORCHESTRATOR_K8S,
    Obj,
    _parse_network,
)
from datastore.k8s.validate import _normalised
from datastore.kinds import CALICO_API


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

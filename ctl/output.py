"""Rendering resources as calicoctl does: a table (ps / wide), YAML or JSON (pure)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml

from datastore.kinds import Kind

Resource = dict[str, Any]
Column = tuple[str, Callable[[Resource], str]]


def _spec(field: str, default: str = "") -> Callable[[Resource], str]:
    def get(obj: Resource) -> str:
        value: Any = obj.get("spec", {})
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return default
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)
    return get


def _name(obj: Resource) -> str:
    return obj["metadata"]["name"]


def _labels(obj: Resource) -> str:
    labels = obj.get("metadata", {}).get("labels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def _pod_selector(obj: Resource) -> str:
    sel = obj.get("spec", {}).get("podSelector") or {}
    labels = sel.get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


# kind name -> (ps columns, extra wide columns); NAME (and NAMESPACE) come first always.
COLUMNS: dict[str, tuple[list[Column], list[Column]]] = {
    "IPPool": ([("CIDR", _spec("cidr")), ("SELECTOR", _spec("nodeSelector", "all()"))],
               [("NAT", _spec("natOutgoing", "false")), ("IPIPMODE", _spec("ipipMode", "Never")),
                ("VXLANMODE", _spec("vxlanMode", "Never")),
                ("DISABLED", _spec("disabled", "false")),
                ("DISABLEBGPEXPORT", _spec("disableBGPExport", "false"))]),
    "IPReservation": ([("CIDRS", _spec("reservedCIDRs"))], []),
    "WorkloadEndpoint": ([("WORKLOAD", _spec("pod")), ("NODE", _spec("node")),
                          ("NETWORKS", _spec("ipNetworks")), ("INTERFACE", _spec("interfaceName"))],
                         [("PROFILES", _spec("profiles")), ("NATS", _spec("ipNATs"))]),
    "HostEndpoint": ([("NODE", _spec("node"))],
                     [("INTERFACE", _spec("interfaceName")), ("IPS", _spec("expectedIPs")),
                      ("PROFILES", _spec("profiles"))]),
    "Node": ([], [("ASN", _spec("bgp.asNumber", "(64512)")), ("IPV4", _spec("bgp.ipv4Address")),
                  ("IPV6", _spec("bgp.ipv6Address"))]),
    "NetworkPolicy": ([], [("TIER", _spec("tier", "default")), ("ORDER", _spec("order")),
                           ("SELECTOR", _spec("selector", "all()"))]),
    "GlobalNetworkPolicy": ([], [("TIER", _spec("tier", "default")), ("ORDER", _spec("order")),
                                 ("SELECTOR", _spec("selector", "all()"))]),
    "Tier": ([("ORDER", _spec("order"))], [("DEFAULTACTION", _spec("defaultAction", "Deny"))]),
    "BGPPeer": ([("PEERIP", _spec("peerIP")), ("NODE", _spec("node", "(global)")),
                 ("ASN", _spec("asNumber"))], []),
    "NetworkSet": ([], [("NETS", _spec("nets"))]),
    "GlobalNetworkSet": ([], [("NETS", _spec("nets"))]),
    "Pod": ([("LABELS", _labels)], []),
    "Namespace": ([("LABELS", _labels)], []),
}
K8S_POLICY_COLUMNS: list[Column] = [("POD-SELECTOR", _pod_selector)]


def table(kind: Kind, items: list[Resource], wide: bool, all_namespaces: bool) -> str:
    columns: list[Column] = [("NAME", _name)]
    if kind.namespaced and all_namespaces:
        columns.insert(0, ("NAMESPACE", lambda o: o["metadata"].get("namespace", "")))
    if kind.name == "NetworkPolicy" and not kind.is_calico:
        columns += K8S_POLICY_COLUMNS
    else:
        basic, extra = COLUMNS.get(kind.name, ([], []))
        columns += basic + (extra if wide else [])
    rows = [[head for head, _ in columns]]
    rows += [[render(obj) for _, render in columns] for obj in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def as_document(kind: Kind, items: list[Resource], single: bool) -> Any:
    """One object for `get KIND NAME`; a `<Kind>List` for listings, as calicoctl prints."""
    if single and len(items) == 1:
        return items[0]
    return {"apiVersion": kind.api_version, "kind": f"{kind.name}List", "items": items}


def render(kind: Kind, items: list[Resource], fmt: str, single: bool,
           all_namespaces: bool) -> str:
    if fmt in ("ps", "wide"):
        return table(kind, items, fmt == "wide", all_namespaces)
    doc = as_document(kind, items, single)
    if fmt == "json":
        return json.dumps(doc, indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False).rstrip()
    raise ValueError(f"unknown output format {fmt!r} (ps, wide, yaml, json)")

"""NetworkPolicy, GlobalNetworkPolicy, Tier and Profile specs, and policy type defaulting (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datastore.errors import Problems
from datastore.validation._checks import (
    _SELECTOR,
    LABEL_TIER,
    Check,
    _anything,
    _boolean,
    _check_labels,
    _Ctx,
    _enum,
    _fields,
    _items,
    _list,
    _named,
    _number,
)
from datastore.validation.names import dns_label_problem
from datastore.validation.rules import _rules

DEFAULT_TIER = "default"
DEFAULT_TIER_ORDER = 1_000_000


def default_policy_types(spec: Mapping[str, Any]) -> list[str]:
    """The policy's `types`: as given, or Calico's default from which rules it has.

    No egress rules → [Ingress] (even with no ingress rules either); egress only → [Egress];
    both → [Ingress, Egress].
    """
    if isinstance(spec.get("types"), list) and spec["types"]:
        return list(spec["types"])
    if not spec.get("egress"):
        return ["Ingress"]
    if not spec.get("ingress"):
        return ["Egress"]
    return ["Ingress", "Egress"]


def _policy_fields(global_policy: bool) -> dict[str, Check]:
    fields: dict[str, Check] = {
        "tier": _named(dns_label_problem),
        "order": _number,
        "ingress": _rules("ingress", global_policy=global_policy),
        "egress": _rules("egress", global_policy=global_policy),
        "selector": _SELECTOR,
        "types": _list(_enum("Ingress", "Egress"), unique=True),
        "serviceAccountSelector": _SELECTOR,
        "performanceHints": _list(_enum("AssumeNeededOnEveryNode"), unique=True),
    }
    if global_policy:
        fields |= {"doNotTrack": _boolean, "preDNAT": _boolean, "applyOnForward": _boolean,
                   "namespaceSelector": _SELECTOR}
    return fields


_NP_FIELDS = _policy_fields(False)
_GNP_FIELDS = _policy_fields(True)
_GNP_ONLY = " (only a GlobalNetworkPolicy has it)"
_NP_HINTS = {k: _GNP_ONLY for k in ("doNotTrack", "preDNAT", "applyOnForward",
                                     "namespaceSelector")}


def _policy_defaults(out: dict[str, Any], ctx: _Ctx) -> None:
    if not out.get("tier"):
        out["tier"] = DEFAULT_TIER
    out["types"] = default_policy_types(out)
    if isinstance(out["tier"], str):
        ctx.set_label(LABEL_TIER, out["tier"])


def _network_policy(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _NP_FIELDS, "spec", p, _NP_HINTS)
    if out is not None:
        _policy_defaults(out, ctx)
    return out


def _global_network_policy(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _GNP_FIELDS, "spec", p)
    if out is None:
        return None
    _policy_defaults(out, ctx)
    _check_host_policy_flags(out, p)
    return out


def _check_host_policy_flags(spec: dict[str, Any], p: Problems) -> None:
    """preDNAT / doNotTrack policies run outside the normal filter path (raw / mangle tables)."""
    pre_dnat, untracked = spec.get("preDNAT") is True, spec.get("doNotTrack") is True
    if pre_dnat and untracked:
        p.add("spec.preDNAT", "preDNAT and doNotTrack cannot both be true")
    if (pre_dnat or untracked) and spec.get("applyOnForward") is not True:
        which = "preDNAT" if pre_dnat else "doNotTrack"
        p.add("spec.applyOnForward", f"must be true when {which} is true")
    if pre_dnat and spec.get("egress"):
        p.add("spec.egress", "a preDNAT policy cannot have egress rules")
    if pre_dnat and "Egress" in _items(spec.get("types")):
        p.add("spec.types", "a preDNAT policy cannot have type Egress")


def _tier(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, {"order": _number, "defaultAction": _enum("Deny", "Pass")}, "spec", p)
    if out is None:
        return None
    out.setdefault("order", DEFAULT_TIER_ORDER)
    out.setdefault("defaultAction", "Deny")
    _check_builtin_tier(ctx.name, out, p)
    return out


# Calico's built-in tiers keep their place and default action.
_BUILTIN_TIERS = {"kube-admin": (1_000, "Pass"), "default": (DEFAULT_TIER_ORDER, "Deny"),
                  "kube-baseline": (10_000_000, "Pass")}


def _check_builtin_tier(name: str, spec: dict[str, Any], p: Problems) -> None:
    if name not in _BUILTIN_TIERS:
        return
    order, action = _BUILTIN_TIERS[name]
    if spec["order"] != order:
        p.add("spec.order", f"the {name!r} tier's order must be {order}")
    if spec["defaultAction"] != action:
        p.add("spec.defaultAction", f"the {name!r} tier's defaultAction must be {action}")


def _profile(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    fields = {"ingress": _rules("ingress"), "egress": _rules("egress"), "labelsToApply": _anything}
    out = _fields(spec, fields, "spec", p)
    if out is not None and "labelsToApply" in out:
        _check_labels(out["labelsToApply"], "spec.labelsToApply", p)
    return out

"""IPPool, IPReservation, NetworkSet and GlobalNetworkSet specs (pure)."""

from __future__ import annotations

import ipaddress
from typing import Any

from datastore.errors import Problems
from datastore.validation._checks import (
    LABEL_NAMESPACE,
    Check,
    IPNet,
    _boolean,
    _cidr,
    _Ctx,
    _enum,
    _fields,
    _has_problem,
    _integer,
    _key,
    _list,
    _selector,
    _string,
    parse_cidr,
)

_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))

_IPPOOL_FIELDS: dict[str, Check] = {
    "cidr": _string,
    "vxlanMode": _enum("Never", "Always", "CrossSubnet"),
    "ipipMode": _enum("Never", "Always", "CrossSubnet"),
    "natOutgoing": _boolean,
    "disabled": _boolean,
    "disableBGPExport": _boolean,
    "blockSize": _integer(0, 128),
    "nodeSelector": _selector("global() is not valid in an IPPool selector"),
    "namespaceSelector": _selector("global() is not valid in an IPPool selector"),
    "allowedUses": _list(_enum("Workload", "Tunnel", "LoadBalancer"), max_items=10, unique=True),
    "assignmentMode": _enum("Automatic", "Manual"),
}


def _ip_pool(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _IPPOOL_FIELDS, "spec", p)
    if out is None:
        return None
    net = _ip_pool_cidr(out, p)
    _ip_pool_defaults(out, net)
    if net is not None:
        _check_block_size(out, net, p)
    _check_encapsulation(out, net, p)
    _check_allowed_uses(out, p)
    return out


def _ip_pool_cidr(spec: dict[str, Any], p: Problems) -> IPNet | None:
    """Parse, check and normalise spec.cidr as Calico's client does: strictly masked."""
    cidr = spec.get("cidr")
    if not cidr:
        if not _has_problem(p, "spec.cidr"):
            p.add("spec.cidr", "required: the pool's CIDR, e.g. 10.65.0.0/16")
        return None
    parsed = parse_cidr(cidr)
    if parsed is None:
        if not _has_problem(p, "spec.cidr"):
            p.add("spec.cidr", f"{cidr!r} is not a valid CIDR such as 10.65.0.0/16")
        return None
    ip, net = parsed
    if ip != net.network_address:
        p.add("spec.cidr", f"{cidr!r} is not strictly masked (did you mean {net}?)")
    for ll in _LINK_LOCAL:
        if net.version == ll.version and net.overlaps(ll):
            p.add("spec.cidr", f"{cidr!r} overlaps the link-local range {ll}")
    spec["cidr"] = str(net)
    return net


def _ip_pool_defaults(spec: dict[str, Any], net: IPNet | None) -> None:
    if not spec.get("blockSize") and net is not None:
        spec["blockSize"] = 26 if net.version == 4 else 122
    for mode in ("ipipMode", "vxlanMode"):
        if not spec.get(mode):
            spec[mode] = "Never"
    if not spec.get("nodeSelector"):
        spec["nodeSelector"] = "all()"
    if not spec.get("allowedUses"):
        spec["allowedUses"] = ["Workload", "Tunnel"]
    spec.setdefault("assignmentMode", "Automatic")


def _check_block_size(spec: dict[str, Any], net: IPNet, p: Problems) -> None:
    size = spec["blockSize"]
    if _has_problem(p, "spec.blockSize"):
        return
    lo, hi = (20, 32) if net.version == 4 else (116, 128)
    if not lo <= size <= hi:
        p.add("spec.blockSize", f"{size} is out of range {lo}..{hi} for an IPv{net.version} pool")
    elif net.prefixlen > size and spec.get("disabled") is not True:
        p.add("spec.blockSize", f"the pool /{net.prefixlen} is smaller than one /{size} block;"
              " use a larger pool or a smaller block")


def _check_encapsulation(spec: dict[str, Any], net: IPNet | None, p: Problems) -> None:
    if _has_problem(p, "spec.ipipMode") or _has_problem(p, "spec.vxlanMode"):
        return
    ipip, vxlan = spec.get("ipipMode"), spec.get("vxlanMode")
    if ipip != "Never" and vxlan != "Never":
        p.add("spec.vxlanMode", "ipipMode and vxlanMode cannot both be enabled")
    if net is not None and net.version == 6 and ipip != "Never":
        p.add("spec.ipipMode", "IPIP is not supported on IPv6 pools (use vxlanMode)")


def _check_allowed_uses(spec: dict[str, Any], p: Problems) -> None:
    if _has_problem(p, "spec.allowedUses"):
        return
    uses = spec["allowedUses"]
    if "Tunnel" in uses and spec.get("namespaceSelector"):
        p.add("spec.namespaceSelector", "a pool with allowed use Tunnel cannot have one")
    if "LoadBalancer" not in uses:
        return
    if {"Workload", "Tunnel"} & set(uses):
        p.add("spec.allowedUses", "LoadBalancer cannot be combined with Workload or Tunnel")
    if spec.get("ipipMode") != "Never" or spec.get("vxlanMode") != "Never":
        p.add("spec.allowedUses", "a LoadBalancer pool cannot have IPIP or VXLAN enabled")
    if spec.get("disableBGPExport") is True:
        p.add("spec.disableBGPExport", "a LoadBalancer pool cannot disable BGP export")
    if spec.get("nodeSelector") != "all()":
        p.add("spec.nodeSelector", "a LoadBalancer pool must select all() nodes")


def _ip_reservation(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    cidrs = _list(_cidr(strict=False, bare_ip=False), unique=True)
    return _fields(spec, {"reservedCIDRs": cidrs}, "spec", p)


def _network_set(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    labels = ctx.meta.get("labels")
    if isinstance(labels, dict) and LABEL_NAMESPACE in labels:
        p.add(_key("metadata.labels", LABEL_NAMESPACE), "is reserved: Calico sets it itself")
    nets = _list(_cidr(strict=False, bare_ip=True))
    return _fields(spec, {"nets": nets}, "spec", p)

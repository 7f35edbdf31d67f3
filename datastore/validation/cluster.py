"""Node, BGPConfiguration, BGPPeer and ClusterInformation specs, and BGP AS numbers (pure)."""

from __future__ import annotations

import re
from typing import Any

from datastore.errors import Problems
from datastore.validation._checks import (
    _DIGITS_RE,
    _GO_DURATION,
    _NAME,
    _NAME_LIST,
    _STR_LIST,
    Check,
    IPAddr,
    _at,
    _boolean,
    _cidr,
    _Ctx,
    _enum,
    _fields,
    _has_problem,
    _idx,
    _integer,
    _ip,
    _is_int,
    _items,
    _list,
    _mac,
    _named,
    _pattern,
    _selector,
    _string,
    _struct,
    parse_ip,
)

# ---- AS numbers ---------------------------------------------------------------------------------


def _as_number(lo: int) -> Check:
    """A BGP AS number: 32-bit integer or "a.b" asdot; stored as an integer."""
    def check(value: Any, path: str, p: Problems) -> Any:
        n = _parse_as_number(value)
        if n is None:
            p.add(path, f"{value!r} is not an AS number (an integer or asdot such as 1.10)")
            return value
        if not lo <= n <= 0xFFFFFFFF:
            p.add(path, f"AS number {n} is out of range {lo}..4294967295")
        return n
    return check


def _parse_as_number(value: Any) -> int | None:
    if _is_int(value):
        return value
    if not isinstance(value, str):
        return None
    if _DIGITS_RE.fullmatch(value):
        return int(value)
    hi, dot, lo = value.partition(".")
    asdot = dot and _DIGITS_RE.fullmatch(hi) and _DIGITS_RE.fullmatch(lo)
    if asdot and int(hi) <= 0xFFFF and int(lo) <= 0xFFFF:
        return (int(hi) << 16) + int(lo)
    return None


# ---- nodes and BGP ------------------------------------------------------------------------------

_NODE_BGP_FIELDS: dict[str, Check] = {
    "asNumber": _as_number(1),
    "ipv4Address": _cidr(strict=False, bare_ip=True, version=4),
    "ipv6Address": _cidr(strict=False, bare_ip=True, version=6),
    "ipv4IPIPTunnelAddr": _ip(4),
    "routeReflectorClusterID": _ip(4),
}

_NODE_FIELDS: dict[str, Check] = {
    "bgp": _struct(_NODE_BGP_FIELDS),
    "ipv4VXLANTunnelAddr": _ip(4),
    "vxlanTunnelMACAddr": _mac,
    "ipv6VXLANTunnelAddr": _ip(6),
    "vxlanTunnelMACAddrV6": _mac,
    "orchRefs": _list(_struct({"nodeName": _string, "orchestrator": _string})),
    "wireguard": _struct({"interfaceIPv4Address": _ip(4), "interfaceIPv6Address": _ip(6)}),
    "addresses": _list(_struct({
        "address": _cidr(strict=True, bare_ip=True),
        "type": _enum("CalicoNodeIP", "InternalIP", "ExternalIP"),
    })),
    "interfaces": _list(_struct({"name": _NAME, "addresses": _STR_LIST})),
}

_NODE_STATUS = _struct({"wireguardPublicKey": _string, "wireguardPublicKeyV6": _string,
                        "podCIDRs": _STR_LIST})


def _node(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _NODE_FIELDS, "spec", p)
    if out is not None and out.get("bgp") == {}:
        p.add("spec.bgp", "must not be empty (remove it, or set ipv4Address/ipv6Address)")
    return out


def _secret_ref(value: Any, path: str, p: Problems) -> Any:
    ref = {"name": _string, "key": _string, "optional": _boolean}
    return _struct({"secretKeyRef": _struct(ref)})(value, path, p)


_SERVICE_CIDRS = _list(_struct({"cidr": _cidr(strict=True, bare_ip=True)}))
_STANDARD_COMMUNITY = re.compile(r"([0-9]+):([0-9]+)")
_LARGE_COMMUNITY = re.compile(r"([0-9]+):([0-9]+):([0-9]+)")


def community_problem(value: str) -> str | None:
    """Why `value` is not a BGP community (`aa:nn` 16-bit or `aa:nn:mm` 32-bit parts), or None."""
    if m := _STANDARD_COMMUNITY.fullmatch(value):
        bits = 16
    elif m := _LARGE_COMMUNITY.fullmatch(value):
        bits = 32
    else:
        return f"{value!r} is not a community such as 65001:100 or 65001:100:200"
    if any(int(g) >= 1 << bits for g in m.groups()):
        return f"{value!r}: each part must fit in {bits} bits"
    return None


_BGP_CONFIG_FIELDS: dict[str, Check] = {
    "logSeverityScreen": _enum("Trace", "Debug", "Info", "Warning", "Error", "Fatal", ci=True),
    "nodeToNodeMeshEnabled": _boolean,
    "asNumber": _as_number(1),
    "serviceLoadBalancerIPs": _SERVICE_CIDRS,
    "serviceExternalIPs": _SERVICE_CIDRS,
    "serviceClusterIPs": _SERVICE_CIDRS,
    "serviceLoadBalancerAggregation": _enum("Enabled", "Disabled"),
    "communities": _list(_struct({"name": _NAME, "value": _named(community_problem)}),
                         max_items=500),
    "prefixAdvertisements": _list(_struct({"cidr": _cidr(strict=True, bare_ip=True),
                                           "communities": _STR_LIST}), max_items=500),
    "listenPort": _integer(1, 65535),
    "nodeMeshPassword": _secret_ref,
    "nodeMeshMaxRestartTime": _GO_DURATION,
    "bindMode": _enum("None", "NodeIP"),
    "ignoredInterfaces": _list(_pattern(re.compile(r"[a-zA-Z0-9_.*-]{1,15}"),
                                        "an interface name or pattern")),
    "localWorkloadPeeringIPV4": _ip(4),
    "localWorkloadPeeringIPV6": _ip(6),
    "programClusterRoutes": _enum("Enabled", "Disabled", "EnabledIPIPOnly", "EnabledNoEncapOnly"),
    "ipv4NormalRoutePriority": _integer(1, 2147483646),
    "ipv6NormalRoutePriority": _integer(1, 2147483646),
}

# Cluster-wide settings that only the BGPConfiguration named "default" may carry.
_BGP_DEFAULT_ONLY = ("nodeToNodeMeshEnabled", "asNumber", "serviceLoadBalancerIPs",
                     "serviceExternalIPs", "serviceClusterIPs", "nodeMeshPassword",
                     "nodeMeshMaxRestartTime")


def _bgp_configuration(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _BGP_CONFIG_FIELDS, "spec", p)
    if out is None:
        return None
    out.setdefault("logSeverityScreen", "Info")
    out.setdefault("serviceLoadBalancerAggregation", "Enabled")
    if ctx.name != "default":
        for key in _BGP_DEFAULT_ONLY:
            if out.get(key) not in (None, []):
                p.add(_at("spec", key), "can only be set on the BGPConfiguration named 'default'")
    if out.get("nodeToNodeMeshEnabled") is False:
        for key in ("nodeMeshPassword", "nodeMeshMaxRestartTime"):
            if key in out:
                p.add(_at("spec", key), "cannot be set when nodeToNodeMeshEnabled is false")
    _check_communities(out, p)
    return out


def _check_communities(spec: dict[str, Any], p: Problems) -> None:
    communities = _items(spec.get("communities"))
    if communities and not spec.get("prefixAdvertisements"):
        p.add("spec.communities", "defined but not used by any prefixAdvertisements")
    names = {c["name"] for c in communities
             if isinstance(c, dict) and isinstance(c.get("name"), str)}
    for i, adv in enumerate(_items(spec.get("prefixAdvertisements"))):
        if not isinstance(adv, dict):
            continue
        path = _idx("spec.prefixAdvertisements", i)
        for key in ("cidr", "communities"):
            if not adv.get(key) and not _has_problem(p, _at(path, key)):
                p.add(_at(path, key), "required")
        for j, value in enumerate(_items(adv.get("communities"))):
            if isinstance(value, str) and value not in names and community_problem(value):
                p.add(_idx(_at(path, "communities"), j),
                      f"{value!r} is neither a community value nor a name in spec.communities")


def _peer_ip(value: Any, path: str, p: Problems) -> Any:
    if split_peer_ip(value) is None:
        p.add(path, f"{value!r} is not an IP, IPv4:port or [IPv6]:port")
    return value


def split_peer_ip(value: Any) -> tuple[IPAddr, int | None] | None:
    """(address, port or None) of a BGPPeer peerIP, or None if malformed."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"([0-9.]+):([0-9]+)|\[([0-9a-fA-F:.]+)\]:([0-9]+)", value)
    if not m:
        ip = parse_ip(value)
        return (ip, None) if ip else None
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    ip = parse_ip(host)
    if ip is None or not 1 <= int(port) <= 65535 or (m.group(1) and ip.version != 4):
        return None
    return ip, int(port)


_BGP_PEER_FIELDS: dict[str, Check] = {
    "node": _NAME,
    "nodeSelector": _selector("global() is not valid in a BGPPeer selector"),
    "peerIP": _peer_ip,
    "asNumber": _as_number(0),
    "localASNumber": _as_number(1),
    "peerSelector": _selector("global() is not valid in a BGPPeer selector"),
    "keepOriginalNextHop": _boolean,
    "nextHopMode": _enum("Auto", "Self", "Keep"),
    "password": _secret_ref,
    "sourceAddress": _enum("UseNodeIP", "None"),
    "maxRestartTime": _GO_DURATION,
    "keepaliveTime": _GO_DURATION,
    "numAllowedLocalASNumbers": _integer(0, 2147483647),
    "ttlSecurity": _integer(0, 255),
    "reachableBy": _ip(),
    "filters": _NAME_LIST,
    "localWorkloadSelector": _selector("global() is not valid in a BGPPeer selector"),
    "reversePeering": _enum("Auto", "Manual"),
}

# (a, b, reason): fields that cannot both be set.
_BGP_PEER_EXCLUSIVE = (
    ("node", "nodeSelector", "node and nodeSelector cannot both be set"),
    ("peerIP", "peerSelector", "peerIP and peerSelector cannot both be set"),
    ("peerSelector", "asNumber", "asNumber must be empty when peerSelector is set"),
    ("localWorkloadSelector", "peerIP", "peerIP must be empty when localWorkloadSelector is set"),
    ("localWorkloadSelector", "peerSelector",
     "peerSelector must be empty when localWorkloadSelector is set"),
    ("keepOriginalNextHop", "nextHopMode",
     "keepOriginalNextHop is deprecated: use nextHopMode alone"),
)


def _bgp_peer(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _BGP_PEER_FIELDS, "spec", p)
    if out is None:
        return None
    for a, b, reason in _BGP_PEER_EXCLUSIVE:
        if out.get(a) and out.get(b):
            p.add(_at("spec", b), reason)
    if out.get("localWorkloadSelector") and not out.get("asNumber"):
        p.add("spec.asNumber", "required when localWorkloadSelector is set")
    if out.get("reachableBy"):
        _check_reachable_by(out, p)
    return out


def _check_reachable_by(spec: dict[str, Any], p: Problems) -> None:
    peer = split_peer_ip(spec.get("peerIP"))
    gateway = parse_ip(spec["reachableBy"])
    if not spec.get("peerIP"):
        p.add("spec.reachableBy", "must be empty when peerIP is empty")
    elif peer and gateway and peer[0].version != gateway.version:
        p.add("spec.reachableBy", "reachableBy and peerIP must be the same IP version")


def _cluster_information(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    fields = {"clusterGUID": _string, "clusterType": _string, "calicoVersion": _string,
              "datastoreReady": _boolean, "variant": _string}
    return _fields(spec, fields, "spec", p)

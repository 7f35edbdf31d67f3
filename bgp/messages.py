"""exabgp API lines in and out (pure, standard library only: the API relay imports it).

In: with ``encoder json`` exabgp writes one JSON object per line to the API process's stdin,
interleaved with the plain acks ``done`` / ``error`` for the commands it wrote. Shapes seen
from exabgp 5.0.15 (noise fields such as time, host, pid and counter left out):

    {"type": "state", "neighbor": {"address": {"local": L, "peer": P}, ..., "state": "up"}}
    ("connected" when TCP is up but BGP is not yet; "down" carries a "reason")
    {"type": "update", "neighbor": {..., "direction": "receive", "message": {"update": {
        "attribute": {...}, "announce": {"ipv4 unicast": {NEXT_HOP: [{"nlri": PREFIX}]}},
        "withdraw": {"ipv4 unicast": [{"nlri": PREFIX}]}}}}}
    {"type": "update", "neighbor": {..., "message": {"eor": {"afi": "ipv4", "safi": "unicast"}}}}

An NLRI is ``{"nlri": PREFIX, ...}`` (more keys with add-path) or a bare ``PREFIX`` string
(``exabgp.api.compact``); both are read.

Out: commands are single lines; the caller writes them followed by a newline to exabgp
through the API process's stdout. Without ``neighbor <ip>`` a command applies to every
neighbor bound to the process; ``next-hop self`` resolves per session.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["EndOfRib", "PeerState", "Update", "announce", "parse_line", "withdraw"]

_FAMILIES = ("ipv4 unicast", "ipv6 unicast")  # plain-prefix families; others are ignored


@dataclass(frozen=True)
class PeerState:
    peer: str
    up: bool  # True only for "up" (established); "connected" and "down" are not up


@dataclass(frozen=True)
class Update:
    peer: str
    announced: dict[str, str]  # prefix -> next hop
    withdrawn: tuple[str, ...]
    originator: str | None = None  # ORIGINATOR_ID (a reflected route)
    cluster_list: tuple[str, ...] = ()  # CLUSTER_LIST (a reflected route)


@dataclass(frozen=True)
class EndOfRib:
    peer: str


def parse_line(line: str) -> PeerState | Update | EndOfRib | None:
    """One line from exabgp as a message, or None for acks, other message types, updates we
    sent, families other than IPv4/IPv6 unicast, and anything malformed. Never raises.

    A prefix announced with several next hops (add-path) keeps the first one listed; a prefix
    both announced and withdrawn in one message counts as announced; prefixes and next hops
    that are not IP prefixes / addresses are skipped."""
    try:
        obj = json.loads(line)
    except (ValueError, TypeError, RecursionError):
        return None
    try:
        return _message(obj)
    except (AttributeError, TypeError, KeyError, ValueError):
        return None


def announce(prefix: str, next_hop: str = "self", neighbor: str | None = None,
             originator: str | None = None, cluster_list: tuple[str, ...] = ()) -> str:
    """`announce route PREFIX next-hop NH [originator-id O cluster-list [ C ... ]]`, for one
    neighbor when given. Raises ValueError for anything that is not an IP prefix / address (so
    nothing can smuggle in a newline)."""
    hop = next_hop if next_hop == "self" else str(ipaddress.ip_address(next_hop))
    line = f"{_prefix(neighbor)}announce route {_network(prefix)} next-hop {hop}"
    if originator is not None:
        line += f" originator-id {ipaddress.IPv4Address(originator)}"
    if cluster_list:
        ids = " ".join(str(ipaddress.IPv4Address(c)) for c in cluster_list)
        line += f" cluster-list [ {ids} ]"
    return line


def withdraw(prefix: str, neighbor: str | None = None) -> str:
    """`withdraw route PREFIX`, for one neighbor when given."""
    return f"{_prefix(neighbor)}withdraw route {_network(prefix)}"


def _prefix(neighbor: str | None) -> str:
    return "" if neighbor is None else f"neighbor {ipaddress.ip_address(neighbor)} "


def _network(prefix: str) -> str:
    return str(ipaddress.ip_network(prefix, strict=True))


def _message(obj: Any) -> PeerState | Update | EndOfRib | None:
    if not isinstance(obj, dict):
        return None
    kind = obj.get("type")
    neighbor = obj.get("neighbor")
    if not isinstance(neighbor, dict):
        return None
    peer = neighbor["address"]["peer"]
    if not isinstance(peer, str):
        return None
    if kind == "state":
        state = neighbor.get("state")
        return PeerState(peer, state == "up") if isinstance(state, str) else None
    if kind != "update" or neighbor.get("direction", "receive") != "receive":
        return None
    message = neighbor["message"]
    if not isinstance(message, dict):
        return None
    if "eor" in message:
        return EndOfRib(peer)
    update = message.get("update")
    if not isinstance(update, dict):
        return None
    withdrawn = _withdrawn(update.get("withdraw") or {})
    announced = _announced(update.get("announce") or {})
    if not announced and not withdrawn:
        return None
    attributes = update.get("attribute") or {}
    originator = attributes.get("originator-id")
    clusters = attributes.get("cluster-list") or []
    return Update(peer, announced, tuple(p for p in withdrawn if p not in announced),
                  originator if _is_ipv4(originator) else None,
                  tuple(c for c in clusters if _is_ipv4(c)) if isinstance(clusters, list) else ())


def _announced(by_family: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for family in _FAMILIES:
        by_next_hop = by_family.get(family) or {}
        if not isinstance(by_next_hop, dict):
            raise ValueError(family)
        for next_hop, nlris in by_next_hop.items():
            if not _is_address(next_hop):  # exabgp writes "null" for "no next hop"
                continue
            for prefix in _prefixes(nlris):
                out.setdefault(prefix, next_hop)
    return out


def _withdrawn(by_family: dict[str, Any]) -> list[str]:
    out: dict[str, None] = {}  # ordered, without repeats
    for family in _FAMILIES:
        out.update(dict.fromkeys(_prefixes(by_family.get(family) or [])))
    return list(out)


def _prefixes(nlris: Any) -> list[str]:
    """The prefixes of a list of NLRIs ({"nlri": P, ...} or bare P); anything that is not an
    IP prefix is skipped, so callers can hand the result to the kernel."""
    if not isinstance(nlris, list):
        raise ValueError("NLRIs are not a list")
    out = []
    for nlri in nlris:
        prefix = nlri.get("nlri") if isinstance(nlri, dict) else nlri
        if isinstance(prefix, str) and _is_network(prefix):
            out.append(prefix)
    return out


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ipv4(value: Any) -> bool:
    """ORIGINATOR_ID and cluster IDs are 4-byte IDs, written as dotted quads."""
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return isinstance(value, str)


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text)
    except ValueError:
        return False
    return True

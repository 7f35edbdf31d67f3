"""The routes this node has heard over BGP, per peer (pure).

Fed with exabgp's parsed messages (`bgp.messages`): an announce sets prefix -> next hop for
that peer, a withdraw removes it, a session going down drops everything the peer sent (exabgp
does not send withdraws for a dead session). `learned()` merges the peers: when several
announce one prefix, the lowest next hop wins, so every node picks the same one and the
choice does not flap with message order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from bgp.reflect import Path


class Rib:
    def __init__(self) -> None:
        self._by_peer: dict[str, dict[str, Path]] = {}

    def announce(self, peer: str, routes: Mapping[str, str | Path]) -> bool:
        """prefix -> next hop, or -> Path when the route reflector needs its attributes."""
        table = self._by_peer.setdefault(peer, {})
        changed = False
        for prefix, route in routes.items():
            path = route if isinstance(route, Path) else Path(route)
            if table.get(prefix) != path:
                table[prefix] = path
                changed = True
        return changed

    def withdraw(self, peer: str, prefixes: tuple[str, ...] | list[str]) -> bool:
        table = self._by_peer.get(peer, {})
        return bool([table.pop(p) for p in prefixes if p in table])

    def drop_peer(self, peer: str) -> bool:
        return bool(self._by_peer.pop(peer, None))

    def peer_count(self, peer: str) -> int:
        return len(self._by_peer.get(peer, {}))

    def learned(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for table in self._by_peer.values():
            for prefix, path in table.items():
                have = merged.get(prefix)
                if have is None or _key(path.next_hop) < _key(have):
                    merged[prefix] = path.next_hop
        return merged

    def paths(self) -> dict[str, dict[str, Path]]:
        """Every peer's routes with their attributes (what a route reflector passes on)."""
        return {peer: dict(table) for peer, table in self._by_peer.items()}


def _key(address: str) -> tuple[int, int | str]:
    try:
        return 0, int(ipaddress.ip_address(address))
    except ValueError:
        return 1, address

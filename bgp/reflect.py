"""Route reflection for a node with `spec.bgp.routeReflectorClusterID` (pure).

exabgp never passes routes between its peers, so the agent does what BIRD's `rr client` does
for Calico (RFC 4456), from the routes each peer sent (`bgp.rib`): a route learned from a
client goes to every other iBGP peer, one learned from a non-client goes to the clients only,
never back to its sender; the next hop is kept, ORIGINATOR_ID is the sender's (unless it carried
one) and our cluster ID goes in front of CLUSTER_LIST. A route whose CLUSTER_LIST already holds
our cluster ID, or whose ORIGINATOR_ID is our router ID, has looped and is dropped on receipt
(`looped`). Where several peers sent one prefix, each target gets the one with the lowest next
hop, as `Rib.learned` picks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Path:
    next_hop: str
    originator: str | None = None  # ORIGINATOR_ID as received
    cluster_list: tuple[str, ...] = ()  # CLUSTER_LIST as received


class PeerLike(Protocol):
    address: str
    peer_as: int
    local_as: int
    rr_client: bool


Reflections = dict[str, dict[str, Path]]  # target peer -> prefix -> path to send it


def looped(path: Path, router_id: str, cluster_id: str | None) -> bool:
    return path.originator == router_id or (cluster_id is not None
                                            and cluster_id in path.cluster_list)


def reflections(cluster_id: str | None, peers: Sequence[PeerLike],
                paths_by_peer: Mapping[str, Mapping[str, Path]],
                own: frozenset[str] = frozenset()) -> Reflections:
    """What to announce to each iBGP peer on behalf of the others; {} unless we reflect.
    `own`: prefixes this node announces itself (never reflected over them)."""
    if not cluster_id:
        return {}
    ibgp = {p.address: p for p in peers if p.peer_as == p.local_as}
    clients = {a for a, p in ibgp.items() if p.rr_client}
    out: Reflections = {address: {} for address in ibgp}
    for source in sorted(paths_by_peer):
        if source not in ibgp:
            continue  # eBGP routes are not reflected
        targets = (set(ibgp) if source in clients else clients) - {source}
        for prefix, path in paths_by_peer[source].items():
            if prefix in own:
                continue
            sent = Path(path.next_hop, path.originator or source,
                        (cluster_id, *path.cluster_list))
            for target in targets:
                if target == path.next_hop:
                    continue  # its own route: it has it
                have = out[target].get(prefix)
                if have is None or _key(sent.next_hop) < _key(have.next_hop):
                    out[target][prefix] = sent
    return {target: routes for target, routes in out.items() if routes}


def changes(before: Reflections, after: Reflections
            ) -> tuple[list[tuple[str, str, Path]], list[tuple[str, str]]]:
    """(announce: (peer, prefix, path), withdraw: (peer, prefix)) to go from before to after."""
    announce = [(peer, prefix, path) for peer, routes in sorted(after.items())
                for prefix, path in sorted(routes.items())
                if before.get(peer, {}).get(prefix) != path]
    withdraw = [(peer, prefix) for peer, routes in sorted(before.items())
                for prefix in sorted(routes) if prefix not in after.get(peer, {})]
    return announce, withdraw


def _key(address: str) -> tuple[int, int | str]:
    try:
        return 0, int(ipaddress.ip_address(address))
    except ValueError:
        return 1, address

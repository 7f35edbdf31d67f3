"""bgp.reflect: which routes a route-reflecting node passes to which peer (RFC 4456), and the
exabgp lines and parsed attributes it relies on (bgp.messages, bgp.rib)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from bgp import messages, rib
from bgp.reflect import Path, changes, looped, reflections

CLUSTER = "224.0.0.1"


@dataclass(frozen=True)
class P:
    address: str
    rr_client: bool = True
    peer_as: int = 64512
    local_as: int = 64512


def test_clients_get_each_others_routes_non_clients_only_clients_routes() -> None:
    peers = [P("10.0.0.2"), P("10.0.0.3"), P("10.0.0.9", rr_client=False),
             P("192.0.2.1", peer_as=65000)]  # eBGP: neither reflected to nor from
    paths = {"10.0.0.2": {"10.244.2.0/26": Path("10.0.0.2")},
             "10.0.0.9": {"10.244.9.0/26": Path("10.0.0.9", "10.0.0.8", ("224.0.0.7",))},
             "192.0.2.1": {"203.0.113.0/24": Path("192.0.2.1")}}
    got = reflections(CLUSTER, peers, paths)
    from_client = Path("10.0.0.2", "10.0.0.2", (CLUSTER,))
    from_non_client = Path("10.0.0.9", "10.0.0.8", (CLUSTER, "224.0.0.7"))
    assert got == {
        "10.0.0.3": {"10.244.2.0/26": from_client, "10.244.9.0/26": from_non_client},
        "10.0.0.9": {"10.244.2.0/26": from_client},  # a client's route goes to everyone
        "10.0.0.2": {"10.244.9.0/26": from_non_client},  # never back to the sender
    }
    assert reflections(None, peers, paths) == {}  # not a route reflector: nothing
    # our own prefixes are announced by us, never reflected
    assert "10.244.2.0/26" not in reflections(CLUSTER, peers, paths,
                                              own=frozenset({"10.244.2.0/26"})).get("10.0.0.3",
                                                                                    {})


def test_lowest_next_hop_wins_and_no_route_to_its_own_next_hop() -> None:
    peers = [P("10.0.0.2"), P("10.0.0.3"), P("10.0.0.4")]
    paths = {"10.0.0.3": {"10.244.0.0/26": Path("10.0.0.3")},
             "10.0.0.4": {"10.244.0.0/26": Path("10.0.0.4")}}
    got = reflections(CLUSTER, peers, paths)
    assert got["10.0.0.2"]["10.244.0.0/26"].next_hop == "10.0.0.3"
    assert got["10.0.0.4"]["10.244.0.0/26"].next_hop == "10.0.0.3"
    # a sender gets the other path, never its own back
    assert got["10.0.0.3"]["10.244.0.0/26"].next_hop == "10.0.0.4"


def test_changes_and_loops() -> None:
    a, b = Path("10.0.0.2", "10.0.0.2", (CLUSTER,)), Path("10.0.0.5", "10.0.0.5", (CLUSTER,))
    before = {"10.0.0.3": {"p1": a, "p2": a}}
    after = {"10.0.0.3": {"p1": a, "p2": b}, "10.0.0.4": {"p1": a}}
    announce, withdraw = changes(before, after)
    assert announce == [("10.0.0.3", "p2", b), ("10.0.0.4", "p1", a)]
    assert withdraw == []
    assert changes(after, {}) == ([], [("10.0.0.3", "p1"), ("10.0.0.3", "p2"),
                                       ("10.0.0.4", "p1")])
    assert looped(Path("x", "10.0.0.1"), "10.0.0.1", None)  # our own route came back
    assert looped(Path("x", "10.0.0.7", ("1.1.1.1", CLUSTER)), "10.0.0.1", CLUSTER)
    assert not looped(Path("x", "10.0.0.7", ("1.1.1.1",)), "10.0.0.1", CLUSTER)


def test_exabgp_lines_and_attributes() -> None:
    assert messages.announce("10.244.2.0/26", "10.0.0.2", neighbor="10.0.0.3",
                             originator="10.0.0.2", cluster_list=(CLUSTER, "1.0.0.1")) == (
        "neighbor 10.0.0.3 announce route 10.244.2.0/26 next-hop 10.0.0.2 "
        "originator-id 10.0.0.2 cluster-list [ 224.0.0.1 1.0.0.1 ]")
    line = json.dumps({"type": "update", "neighbor": {
        "address": {"local": "10.0.0.3", "peer": "10.0.0.1"}, "direction": "receive",
        "message": {"update": {
            "attribute": {"origin": "igp", "originator-id": "10.0.0.2",
                          "cluster-list": [CLUSTER]},
            "announce": {"ipv4 unicast": {"10.0.0.2": [{"nlri": "10.244.2.0/26"}]}}}}}})
    msg = messages.parse_line(line)
    assert isinstance(msg, messages.Update)
    assert (msg.originator, msg.cluster_list) == ("10.0.0.2", (CLUSTER,))
    r = rib.Rib()
    r.announce(msg.peer, {p: Path(h, msg.originator, msg.cluster_list)
                          for p, h in msg.announced.items()})
    r.announce("10.0.0.4", {"10.244.4.0/26": "10.0.0.4"})  # plain next hops still work
    assert r.learned() == {"10.244.2.0/26": "10.0.0.2", "10.244.4.0/26": "10.0.0.4"}
    assert r.paths()["10.0.0.1"]["10.244.2.0/26"].cluster_list == (CLUSTER,)


def test_attributes_that_are_not_ids_are_ignored() -> None:
    line = json.dumps({"type": "update", "neighbor": {
        "address": {"local": "10.0.0.3", "peer": "10.0.0.1"}, "direction": "receive",
        "message": {"update": {
            "attribute": {"originator-id": "fd00::1", "cluster-list": ["1.0.0.1", 7, "x"]},
            "announce": {"ipv4 unicast": {"10.0.0.2": [{"nlri": "10.244.2.0/26"}]}}}}}})
    msg = messages.parse_line(line)
    assert isinstance(msg, messages.Update)
    assert (msg.originator, msg.cluster_list) == (None, ("1.0.0.1",))

"""bgp.messages: exabgp 5.0.15 JSON lines in, API commands out.

The REAL_* lines were recorded verbatim from exabgp 5.0.15 by
tests/integration/test_exabgp_speakers.py (two exabgp speakers, and exabgp with BIRD 2).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bgp.messages import EndOfRib, PeerState, Update, announce, parse_line, withdraw

_HEAD = ('{ "exabgp": "5.0.0", "time": 1795339537.7584631, "host" : "vm", "pid" : 1184, '
         '"ppid" : 1174, ')
_NEIGHBOR = ('"neighbor": { "address": { "local": "198.18.0.1", "peer": "198.18.0.2" }, '
             '"asn": { "local": 64512, "peer": 64512 }, "router-id": "198.18.0.1" , ')

REAL_CONNECTED = (_HEAD + '"counter": 1, "type": "state", ' + _NEIGHBOR
                  + '"state": "connected" } }')
REAL_UP = _HEAD + '"counter": 2, "type": "state", ' + _NEIGHBOR + '"state": "up" } }'
REAL_DOWN = (_HEAD + '"counter": 6, "type": "state", ' + _NEIGHBOR
             + '"state": "down", "reason": "closing connection" } }')
REAL_ANNOUNCE = (_HEAD + '"counter": 4, "type": "update", ' + _NEIGHBOR
                 + '"direction": "receive", "message": { "update": { "attribute": { '
                 '"origin": "igp", "local-preference": 100 }, "announce": { "ipv4 unicast": '
                 '{ "198.18.0.2": [ { "nlri": "10.244.2.0/26" } ] } } } } } }')
REAL_WITHDRAW = (_HEAD + '"counter": 5, "type": "update", ' + _NEIGHBOR
                 + '"direction": "receive", "message": { "update": { "withdraw": { '
                 '"ipv4 unicast": [ { "nlri": "10.244.2.0/26" } ] } } } } }')
REAL_EOR = (_HEAD + '"counter": 3, "type": "update", ' + _NEIGHBOR
            + '"direction": "receive", "message": { "eor": { "afi" : "ipv4", '
            '"safi" : "unicast" } } } }')
REAL_SHUTDOWN = _HEAD + '"type": "notification", "notification": "shutdown" }'
# From BIRD (eBGP): the AS path is there, and the next hop is BIRD's address.
REAL_FROM_BIRD = (
    '{ "exabgp": "5.0.0", "time": 1795339538.5336068, "host" : "vm", "pid" : 1206, '
    '"ppid" : 1174, "counter": 3, "type": "update", "neighbor": { "address": { '
    '"local": "198.18.0.1", "peer": "198.18.0.3" }, "asn": { "local": 64512, "peer": 64513 }, '
    '"router-id": "198.18.0.1" , "direction": "receive", "message": { "update": { "attribute": '
    '{ "origin": "igp", "as-path": {"0": {"element": "as-sequence", "value": [64513]}} }, '
    '"announce": { "ipv4 unicast": { "198.18.0.3": [ { "nlri": "10.244.3.0/26" } ] } } } } } }')


def test_real_lines() -> None:
    assert parse_line(REAL_CONNECTED) == PeerState("198.18.0.2", False)
    assert parse_line(REAL_UP) == PeerState("198.18.0.2", True)
    assert parse_line(REAL_DOWN) == PeerState("198.18.0.2", False)
    assert parse_line(REAL_ANNOUNCE) == Update("198.18.0.2", {"10.244.2.0/26": "198.18.0.2"}, ())
    assert parse_line(REAL_WITHDRAW) == Update("198.18.0.2", {}, ("10.244.2.0/26",))
    assert parse_line(REAL_EOR) == EndOfRib("198.18.0.2")
    assert parse_line(REAL_FROM_BIRD) == Update("198.18.0.3", {"10.244.3.0/26": "198.18.0.3"},
                                                ())
    assert parse_line(REAL_SHUTDOWN) is None


@pytest.mark.parametrize("line", ["done", "error", "done\n", "", "\n", "shutdown"])
def test_acks_and_plain_text_are_not_messages(line: str) -> None:
    assert parse_line(line) is None


def update(update_body: dict[str, Any], direction: str = "receive",
           peer: str = "192.0.2.9") -> str:
    return json.dumps({"type": "update", "neighbor": {
        "address": {"local": "192.0.2.1", "peer": peer}, "direction": direction,
        "message": {"update": update_body}}})


def test_several_next_hops_and_families() -> None:
    line = update({"announce": {
        "ipv4 unicast": {"192.0.2.9": [{"nlri": "10.0.0.0/26"}, {"nlri": "10.0.1.0/26"}],
                         "192.0.2.10": [{"nlri": "10.0.2.0/26"}]},
        "ipv6 unicast": {"2001:db8::9": [{"nlri": "fd00::/64"}]},
        "ipv4 flow": {"no-nexthop": [{"destination-ipv4": ["10.0.0.1/32"]}]}}})
    assert parse_line(line) == Update("192.0.2.9", {
        "10.0.0.0/26": "192.0.2.9", "10.0.1.0/26": "192.0.2.9", "10.0.2.0/26": "192.0.2.10",
        "fd00::/64": "2001:db8::9"}, ())


def test_add_path_keeps_the_first_next_hop_and_reads_extra_keys() -> None:
    line = update({"announce": {"ipv4 unicast": {
        "192.0.2.9": [{"nlri": "10.0.0.0/26", "path-information": "0.0.0.1"}],
        "192.0.2.10": [{"nlri": "10.0.0.0/26", "path-information": "0.0.0.2"}]}}})
    assert parse_line(line) == Update("192.0.2.9", {"10.0.0.0/26": "192.0.2.9"}, ())


def test_compact_nlris_are_bare_strings() -> None:
    line = update({"announce": {"ipv4 unicast": {"192.0.2.9": ["10.0.0.0/26"]}},
                   "withdraw": {"ipv4 unicast": ["10.0.1.0/26", "10.0.1.0/26"]}})
    assert parse_line(line) == Update("192.0.2.9", {"10.0.0.0/26": "192.0.2.9"},
                                      ("10.0.1.0/26",))


def test_announce_and_withdraw_of_one_prefix_in_one_message_is_an_announce() -> None:
    line = update({"announce": {"ipv4 unicast": {"192.0.2.9": [{"nlri": "10.0.0.0/26"}]}},
                   "withdraw": {"ipv4 unicast": [{"nlri": "10.0.0.0/26"},
                                                 {"nlri": "10.0.3.0/26"}]}})
    assert parse_line(line) == Update("192.0.2.9", {"10.0.0.0/26": "192.0.2.9"},
                                      ("10.0.3.0/26",))


@pytest.mark.parametrize("body", [
    {"attribute": {"origin": "igp"}},  # attributes only
    {"announce": {"ipv4 unicast": {"null": [{"nlri": "10.0.0.0/26"}]}}},  # no next hop
    {"announce": {"ipv4 unicast": {"192.0.2.9": [{"nlri": "bogus"}]}}},
    {"withdraw": {"ipv4 flow": [{"destination-ipv4": ["10.0.0.1/32"]}]}},  # other family
])
def test_updates_without_usable_routes_are_ignored(body: dict[str, Any]) -> None:
    assert parse_line(update(body)) is None


def test_updates_we_sent_are_ignored() -> None:
    body = {"announce": {"ipv4 unicast": {"192.0.2.1": [{"nlri": "10.0.0.0/26"}]}}}
    assert parse_line(update(body, direction="send")) is None


@pytest.mark.parametrize("line", [
    "{", "[]", "null", "42", '"up"', '{"type": "state"}', '{"type": "state", "neighbor": 1}',
    '{"type": "state", "neighbor": {"address": "x", "state": "up"}}',
    '{"type": "state", "neighbor": {"address": {"peer": 7}, "state": "up"}}',
    '{"type": "state", "neighbor": {"address": {"peer": "p"}, "state": ["up"]}}',
    '{"type": "update", "neighbor": {"address": {"peer": "p"}, "message": "eor"}}',
    '{"type": "update", "neighbor": {"address": {"peer": "p"}, "message": {"update": []}}}',
    '{"type": "update", "neighbor": {"address": {"peer": "p"}, "message": {"update": '
    '{"announce": {"ipv4 unicast": [1]}}}}}',
    '{"type": "update", "neighbor": {"address": {"peer": "p"}, "message": {"update": '
    '{"withdraw": {"ipv4 unicast": {"a": 1}}}}}}',
    "[" * 100_000,
])
def test_malformed_lines_are_ignored(line: str) -> None:
    assert parse_line(line) is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["type", "neighbor", "address", "peer", "state",
                                       "message", "update", "announce", "withdraw", "eor",
                                       "ipv4 unicast", "nlri", "direction", "x"]),
                      inner, max_size=4),
    max_leaves=20)


@given(_json)
def test_never_raises_on_json_garbage(value: Any) -> None:
    result = parse_line(json.dumps(value))
    assert result is None or isinstance(result, PeerState | Update | EndOfRib)


@given(st.text())
def test_never_raises_on_text_garbage(text: str) -> None:
    parse_line(text)


def test_commands() -> None:
    assert announce("10.244.1.0/26") == "announce route 10.244.1.0/26 next-hop self"
    assert announce("10.244.1.0/26", "198.18.0.1") == \
        "announce route 10.244.1.0/26 next-hop 198.18.0.1"
    assert announce(ipaddress.IPv4Network("10.244.1.0/26"), neighbor="198.18.0.2") == \
        "neighbor 198.18.0.2 announce route 10.244.1.0/26 next-hop self"  # type: ignore[arg-type]
    assert withdraw("10.244.1.0/26") == "withdraw route 10.244.1.0/26"
    assert withdraw("10.244.1.0/26", "198.18.0.2") == \
        "neighbor 198.18.0.2 withdraw route 10.244.1.0/26"


@pytest.mark.parametrize(("prefix", "next_hop", "neighbor"), [
    ("10.244.1.1/26", "self", None),  # host bits set
    ("10.244.1.0/26\nshutdown", "self", None),
    ("10.244.1.0/26", "self\nshutdown", None),
    ("10.244.1.0/26", "peer", None),
    ("10.244.1.0/26", "self", "all"),
])
def test_commands_refuse_anything_but_addresses(prefix: str, next_hop: str,
                                                neighbor: str | None) -> None:
    with pytest.raises(ValueError):
        announce(prefix, next_hop, neighbor)
    if next_hop == "self":
        with pytest.raises(ValueError):
            withdraw(prefix, neighbor)

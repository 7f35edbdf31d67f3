"""node.autodetect.choose: every method, on made-up interfaces (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from node.autodetect import AutodetectError, HostInterface, choose, explicit

IFACES = [
    HostInterface("lo", (ipaddress.IPv4Interface("127.0.0.1/8"),)),
    HostInterface("docker0", (ipaddress.IPv4Interface("172.17.0.1/16"),)),
    HostInterface("cali1234567890a", (ipaddress.IPv4Interface("169.254.1.1/32"),)),
    HostInterface("eth0", (ipaddress.IPv4Interface("198.18.0.11/24"),)),
    HostInterface("eth1", (ipaddress.IPv4Interface("10.0.5.7/16"),
                           ipaddress.IPv4Interface("10.0.5.8/16"))),
    HostInterface("eth2", (ipaddress.IPv4Interface("192.168.9.9/24"),), up=False),
]


def _route(target: str) -> ipaddress.IPv4Interface | None:
    return ipaddress.IPv4Interface("10.0.5.7/16") if target.startswith("10.") else None


def pick(method: str, default: str | None = "eth0") -> str:
    return str(choose(method, IFACES, default, _route))


def test_default_route_interface() -> None:
    assert pick("default-route") == "198.18.0.11/24"
    assert pick("", default="eth1") == "10.0.5.7/16"  # empty = the default method


def test_default_route_missing_says_what_to_do() -> None:
    with pytest.raises(AutodetectError, match="IP_AUTODETECTION_METHOD"):
        pick("default-route", default=None)


def test_first_found_skips_virtual_and_down_interfaces() -> None:
    assert pick("first-found") == "198.18.0.11/24"


def test_interface_regex_list_and_skip() -> None:
    assert pick("interface=eth1") == "10.0.5.7/16"
    assert pick("interface=nope.*,eth[01]") == "198.18.0.11/24"
    assert pick("skip-interface=eth0") == "10.0.5.7/16"
    with pytest.raises(AutodetectError, match="no matching interface"):
        pick("interface=eth2")  # down
    with pytest.raises(AutodetectError, match="bad regex"):
        pick("interface=(")


def test_cidr_and_can_reach() -> None:
    assert pick("cidr=10.0.0.0/8") == "10.0.5.7/16"
    assert pick("can-reach=10.1.2.3") == "10.0.5.7/16"
    with pytest.raises(AutodetectError, match="no route"):
        pick("can-reach=8.8.8.8")
    with pytest.raises(AutodetectError, match="not an IPv4 address"):
        pick("can-reach=example.com")


def test_explicit_addresses() -> None:
    assert pick("198.18.0.99/24") == "198.18.0.99/24"
    assert str(explicit("198.18.0.99")) == "198.18.0.99/32"
    with pytest.raises(AutodetectError, match="neither an IPv4 address"):
        pick("bogus")
    with pytest.raises(AutodetectError, match="only IPv4"):
        explicit("fd00::1/64")

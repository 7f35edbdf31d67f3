"""Calico's IPAM annotations, parsed with the precedence Calico uses (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from cni import annotations as ann
from cni.spec import INVALID_CONFIG, CNIError


def test_pod_annotation_wins_over_namespace() -> None:
    pod = {ann.IPV4_POOLS: '["pod-pool"]'}
    ns = {ann.IPV4_POOLS: '["ns-pool"]'}
    assert ann.pools(pod, ns, ann.IPV4_POOLS, "p/w", "p") == ("pod-pool",)
    assert ann.pools({}, ns, ann.IPV4_POOLS, "p/w", "p") == ("ns-pool",)
    assert ann.pools({}, {}, ann.IPV4_POOLS, "p/w", "p") is None


def test_requested_addresses() -> None:
    got = ann.requested_addresses({ann.IP_ADDRS: '["10.0.0.5", "fd00::5"]'}, "p/w")
    assert got == (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("fd00::5"))
    assert ann.requested_addresses({}, "p/w") == ()


@pytest.mark.parametrize(("annotations", "needle"), [
    ({ann.IP_ADDRS: "10.0.0.5"}, "must be a JSON list"),
    ({ann.IP_ADDRS: '["10.0.0.5", "10.0.0.6"]'}, "two IPv4 addresses"),
    ({ann.IP_ADDRS: '["nope"]'}, "'nope' is not an IP address"),
    ({ann.IP_ADDRS: '["10.0.0.5"]', ann.IPV4_POOLS: '["p"]'}, "both"),
])
def test_bad_annotations_are_config_errors(annotations: dict[str, str], needle: str) -> None:
    with pytest.raises(CNIError) as e:
        ann.requested_addresses(annotations, "prod/web")
    assert e.value.code == INVALID_CONFIG and needle in e.value.msg and "prod/web" in e.value.msg


def test_addresses_without_ipam() -> None:
    """ipAddrsNoIpam parses as ipAddrs does; pools annotations beside it are fine (it wins, as
    in Calico), ipAddrs beside it is not."""
    got = ann.addresses_without_ipam({ann.IP_ADDRS_NO_IPAM: '["fd00::7", "10.9.0.7"]',
                                      ann.IPV4_POOLS: '["p"]'}, "p/w")
    assert got == (ipaddress.ip_address("10.9.0.7"), ipaddress.ip_address("fd00::7"))
    assert ann.addresses_without_ipam({ann.IP_ADDRS: '["10.0.0.5"]'}, "p/w") == ()


@pytest.mark.parametrize(("annotations", "needle"), [
    ({ann.IP_ADDRS_NO_IPAM: '["10.0.0.5"]', ann.IP_ADDRS: '["10.0.0.6"]'}, "has both"),
    ({ann.IP_ADDRS_NO_IPAM: '["fd00::1", "fd00::2"]'}, "two IPv6 addresses"),
    ({ann.IP_ADDRS_NO_IPAM: '"10.0.0.5"'}, "must be a JSON list"),
])
def test_bad_no_ipam_annotations(annotations: dict[str, str], needle: str) -> None:
    with pytest.raises(CNIError) as e:
        ann.addresses_without_ipam(annotations, "prod/web")
    assert e.value.code == INVALID_CONFIG and needle in e.value.msg and "prod/web" in e.value.msg

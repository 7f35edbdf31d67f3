"""tunl0 for IPIP pools, in a namespace: configured where the kernel has IPIP; where it has not
(this machine's kernel), a clear error naming the missing module and the way out (VXLAN).
Which routes go through tunl0 is tested without the kernel in tests/unit/test_bgp_routes.py."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Callable

import pytest

from bgp.ipip import IpipDevice, IpipError, ensure_ipip, ipip_device
from bgp.model import NodeRecord
from cni import netns as nslib

pytestmark = pytest.mark.netns


def test_device_settings_are_calicos() -> None:
    node = NodeRecord("n1", ipip_ip=ipaddress.IPv4Address("10.244.7.1"))
    assert ipip_device(node, 1500) == IpipDevice("10.244.7.1", 1480)
    assert ipip_device(NodeRecord("n2"), 9000) == IpipDevice(None, 8980)


def test_tunl0_is_configured_or_the_missing_module_is_named(
        make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    device = IpipDevice("10.244.7.1", 1480)
    try:
        done = nslib.run_in_netns(ns, ensure_ipip, device)
    except IpipError as e:
        assert "no IPIP support (module ipip)" in str(e) and "vxlanMode" in str(e)
        links = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link"], capture_output=True,
                                          text=True, check=True).stdout)
        assert [link["ifname"] for link in links] == ["lo"]  # nothing half-made
        return
    assert "address 10.244.7.1/32" in done
    out = subprocess.run(["ip", "-n", ns, "-d", "addr", "show", "tunl0"], capture_output=True,
                         text=True, check=True).stdout
    assert "mtu 1480" in out and "inet 10.244.7.1/32" in out and ",UP" in out
    assert nslib.run_in_netns(ns, ensure_ipip, device) == []  # idempotent

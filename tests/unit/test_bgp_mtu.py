"""bgp.mtu: the pod MTU the IPPools' encapsulation leaves, and the file the CNI reads."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from bgp.model import PoolRecord
from bgp.mtu import pod_mtu, write_mtu_file


def pool(cidr: str = "10.244.0.0/16", **kw: object) -> PoolRecord:
    return PoolRecord(ipaddress.IPv4Network(cidr), **kw)  # type: ignore[arg-type]


def test_overhead_of_the_encapsulations_in_use() -> None:
    assert pod_mtu(1500, []) == 1500
    assert pod_mtu(1500, [pool()]) == 1500  # plain routing
    assert pod_mtu(1500, [pool(ipip_mode="Always")]) == 1480
    assert pod_mtu(1500, [pool(ipip_mode="CrossSubnet")]) == 1480
    assert pod_mtu(9000, [pool(vxlan_mode="Always")]) == 8950
    # the largest overhead wins: every pod must fit whichever tunnel it ends up in
    assert pod_mtu(1500, [pool(ipip_mode="Always"),
                          pool("10.245.0.0/16", vxlan_mode="CrossSubnet")]) == 1450
    assert pod_mtu(1500, [pool(vxlan_mode="Always", disabled=True)]) == 1500
    assert pod_mtu(80, [pool(vxlan_mode="Always")]) == 68


def test_write_is_atomic_and_only_on_change(tmp_path: Path) -> None:
    f = tmp_path / "lib" / "calico" / "mtu"
    assert write_mtu_file(f, 1450) is True
    assert f.read_text() == "1450\n"
    before = f.stat().st_mtime_ns
    assert write_mtu_file(f, 1450) is False
    assert f.stat().st_mtime_ns == before
    assert write_mtu_file(f, 1480) is True
    assert f.read_text() == "1480\n"
    assert sorted(p.name for p in f.parent.iterdir()) == ["mtu"]  # no temporary left
    f.write_text("garbage")
    assert write_mtu_file(f, 1480) is True

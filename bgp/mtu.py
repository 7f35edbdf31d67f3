"""The pod MTU the encapsulation in use leaves, written where the CNI plugin reads it.

As Calico's Felix does (`/var/lib/calico/mtu`): the uplink's MTU minus the largest overhead of
the encapsulations the enabled IPPools use (IPIP 20, VXLAN 50 bytes), so a pod never sends a
packet that only fits before it is wrapped. The CNI takes this file when the netconf's `mtu` is
0 or absent (cni.netconf). `pod_mtu` is pure; the file is replaced atomically, and only when
the value changes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from bgp.model import PoolRecord
from bgp.routes import VXLAN_OVERHEAD

DEFAULT_MTU_FILE = Path("/var/lib/calico/mtu")  # = cni.netconf.DEFAULT_MTU_FILE
IPIP_OVERHEAD = 20
MIN_MTU = 68  # IPv4's minimum: an uplink this small is misconfigured, not ours to fix
_ENCAP = ("Always", "CrossSubnet")


def pod_mtu(uplink_mtu: int, pools: Sequence[PoolRecord]) -> int:
    overhead = 0
    for pool in pools:
        if pool.disabled:
            continue
        if pool.vxlan_mode in _ENCAP:
            overhead = max(overhead, VXLAN_OVERHEAD)
        if pool.ipip_mode in _ENCAP:
            overhead = max(overhead, IPIP_OVERHEAD)
    return max(uplink_mtu - overhead, MIN_MTU)


def write_mtu_file(path: Path, mtu: int) -> bool:
    """Write `mtu` unless the file already says so; True when it was written."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == mtu:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{mtu}\n")
    os.replace(tmp, path)  # a reader sees the old value or the new one, never half of one
    return True

"""Named network namespaces, veths onto the lab's underlay bridge, and running code inside them.

Every function here refuses a namespace whose name does not start with `tabby-lab-`: the lab
never creates links, addresses or routes in the root namespace (links are created with `ip -n`
inside a lab namespace and their peer is moved straight into another lab namespace).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from lab import LabError

NETNS_DIR = Path("/run/netns")
PREFIX = "tabby-lab-"
CLONE_NEWNET = 0x40000000
IP_TIMEOUT = 30.0

T = TypeVar("T")


def _guard(name: str) -> str:
    if not name.startswith(PREFIX) or "/" in name or name in (PREFIX, ""):
        raise LabError(f"refusing to touch namespace {name!r}: lab namespaces start with {PREFIX}")
    return name


def path(name: str) -> str:
    return str(NETNS_DIR / _guard(name))


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip -n NS ...`: always inside a lab namespace, never the root one."""
    argv = ["ip", "-n", _guard(ns), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def add(name: str) -> None:
    """Create the namespace with loopback up (a leftover one of the same name is reused)."""
    if not exists(name):
        done = subprocess.run(["ip", "netns", "add", _guard(name)], capture_output=True,
                              text=True, timeout=IP_TIMEOUT)
        if done.returncode != 0 and not exists(name):
            raise LabError(f"ip netns add {name} failed: {done.stderr.strip()}")
    ip(name, "link", "set", "lo", "up")


def delete(name: str) -> bool:
    """Remove the namespace's name (and with its last user, its links and routes)."""
    if not exists(name):
        return False
    done = subprocess.run(["ip", "netns", "del", _guard(name)], capture_output=True, text=True,
                          timeout=IP_TIMEOUT)
    if done.returncode != 0 and exists(name):
        raise LabError(f"ip netns del {name} failed: {done.stderr.strip()}")
    return True


def names_with_prefix(prefix: str) -> list[str]:
    """Namespaces whose name starts with `prefix` (found even when no state file knows them)."""
    _guard(prefix)
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is this one (they keep it alive after `netns del`)."""
    if not exists(name):
        return []
    done = subprocess.run(["ip", "netns", "pids", _guard(name)], capture_output=True, text=True,
                          timeout=IP_TIMEOUT)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def make_bridge(ns: str, bridge: str, address: str) -> None:
    """The underlay: a bridge holding the gateway address, inside the underlay namespace."""
    if ip(ns, "link", "show", bridge, check=False).returncode != 0:
        ip(ns, "link", "add", bridge, "type", "bridge")
    ip(ns, "addr", "replace", address, "dev", bridge)
    ip(ns, "link", "set", bridge, "up")


def plug(bridge_ns: str, bridge: str, port: str, peer_ns: str, address: str, gateway: str,
         peer_ifname: str = "eth0", mtu: int = 1500) -> None:
    """A veth from the bridge (port `port`, in `bridge_ns`) to `peer_ifname` in `peer_ns`,
    which gets `address` and a default route via `gateway` (an address on the bridge)."""
    _guard(peer_ns)
    ip(bridge_ns, "link", "del", port, check=False)  # a leftover from a crashed `up`
    ip(peer_ns, "link", "del", peer_ifname, check=False)
    # created inside the bridge's namespace, the peer goes straight to its own: never root
    ip(bridge_ns, "link", "add", port, "mtu", str(mtu), "type", "veth", "peer", "name",
       peer_ifname, "mtu", str(mtu), "netns", path(peer_ns))
    ip(bridge_ns, "link", "set", port, "master", bridge, "up")
    ip(peer_ns, "addr", "add", address, "dev", peer_ifname)
    ip(peer_ns, "link", "set", peer_ifname, "up")
    ip(peer_ns, "route", "replace", "default", "via", gateway, "dev", peer_ifname)


def nsenter(name: str, argv: Sequence[str]) -> list[str]:
    """argv run in the namespace's network stack only (mount namespace untouched)."""
    return ["nsenter", f"--net={path(name)}", *argv]


_libc = ctypes.CDLL(None, use_errno=True)


def call_in(name: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run fn in a fresh thread that has joined the namespace (setns is per thread), so
    sockets it opens live there; the calling thread never leaves its own namespace."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            with open(path(name), "rb") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=body, name=f"in-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise LabError(f"timed out after {timeout:g} s inside namespace {name}")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]

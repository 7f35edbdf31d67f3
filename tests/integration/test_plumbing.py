"""cni.plumbing against the kernel, in network namespaces the tests create.

Both the "host" and the pods are namespaces made here (`host_netns=` is passed to every call),
so the test process stays in the root namespace and touches nothing there. What setup() did is
read back with `ip -j` and `cat /proc/sys/...` inside the namespaces, not through the module.
Traffic is a TCP connect from a pod to a listener on the host namespace's uplink address.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from cni import netns as nslib
from cni import plumbing
from cni.plumbing import PlumbingError, PodInterface
from datastore.k8s.endpoints import veth_name

pytestmark = pytest.mark.netns

UPLINK_MTU = 1450
HOST_V4, HOST_V6 = "192.0.2.1", "2001:db8:ff::1"
HOST_LL = "fe80::ecee:eeff:feee:eeee"
MTU = 1400


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(ip("-n", ns, "-j", *args) or "[]")


def sysctls(ns: str, *keys: str) -> list[str]:
    """Read in the namespace by `ip netns exec`, independent of cni.netns."""
    files = [f"/proc/sys/{k.replace('.', '/')}" for k in keys]
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", *files], check=True,
                         capture_output=True, text=True).stdout
    return out.split()


@pytest.fixture
def host(make_ns: Callable[[], str]) -> str:
    """A "node": an uplink veth (MTU 1450) with v4/v6 addresses and default routes over it,
    which proxy ARP needs (it answers only for destinations routed out another interface)."""
    ns = make_ns()
    for cmd in (["link", "add", "up0", "mtu", str(UPLINK_MTU), "type", "veth",
                 "peer", "name", "up1"],
                ["link", "set", "up0", "up"], ["link", "set", "up1", "up"],
                ["addr", "add", f"{HOST_V4}/24", "dev", "up0"],
                ["addr", "add", f"{HOST_V6}/64", "dev", "up0", "nodad"],
                ["route", "add", "default", "via", "192.0.2.2", "dev", "up0"],
                ["-6", "route", "add", "default", "via", "2001:db8:ff::2", "dev", "up0"]):
        ip("-n", ns, *cmd)
    return ns


def pod_if(ns: str, n: int, v6: bool = True, **kw: Any) -> PodInterface:
    addrs: list[Any] = [ipaddress.ip_interface(f"10.65.{n // 200}.{n % 200 + 2}/32")]
    if v6:
        addrs.append(ipaddress.ip_interface(f"fd00:65::{n + 2:x}/128"))
    return PodInterface(netns=f"/run/netns/{ns}", container_ifname="eth0",
                        host_ifname=veth_name("ns", f"pod-{n}"), addresses=tuple(addrs),
                        mtu=MTU, **kw)


def tcp_from_pod(host_ns: str, pod: PodInterface, host_ip: str) -> str:
    """Connect from the pod to a listener in the host netns; the address the host saw."""
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    server = nslib.run_in_netns(host_ns, partial(socket.create_server, family=family),
                                (host_ip, 0))
    with server:
        server.settimeout(5)
        port = server.getsockname()[1]
        client = nslib.run_in_netns(pod.netns, socket.create_connection, (host_ip, port), 5)
        with client:
            conn, peer = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    return str(peer[0])


# -- the mechanism ----------------------------------------------------------------------------


def test_run_in_netns_enters_the_target_and_leaves_the_caller(make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    before = os.readlink("/proc/thread-self/ns/net")
    seen = nslib.run_in_netns(ns, os.readlink, "/proc/thread-self/ns/net")
    assert seen == f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
    assert os.readlink("/proc/thread-self/ns/net") == before
    with pytest.raises(FileNotFoundError):
        nslib.run_in_netns("/run/netns/tabby-t-absent", os.getpid)


def test_entered_moves_this_thread_and_back_even_on_failure(
        make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    before = os.readlink("/proc/thread-self/ns/net")
    with nslib.open_netns(ns) as fd:
        with nslib.entered(fd):
            assert os.readlink("/proc/thread-self/ns/net") == \
                f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
        assert os.readlink("/proc/thread-self/ns/net") == before
        with pytest.raises(ZeroDivisionError), nslib.entered(fd):
            _ = 1 / 0
        assert os.readlink("/proc/thread-self/ns/net") == before
    with nslib.entered(None):  # None stays put
        assert os.readlink("/proc/thread-self/ns/net") == before


def test_netns_exists(make_ns: Callable[[], str], tmp_path: Path) -> None:
    ns = make_ns()
    assert nslib.exists(ns) and nslib.exists(f"/run/netns/{ns}")
    (tmp_path / "plain").write_text("")
    assert not any(nslib.exists(p) for p in ("", None, "/run/netns/tabby-t-absent",
                                             str(tmp_path / "plain")))


# -- setup ------------------------------------------------------------------------------------


def test_setup_plumbs_both_ends_as_calico(host: str, make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    pod = pod_if(ns, 1)
    done = plumbing.setup(pod, host_netns=host)
    v4, v6 = (str(a.ip) for a in pod.addresses)

    (eth0,) = ip_json(ns, "addr", "show", "dev", "eth0")
    assert eth0["mtu"] == MTU and eth0["address"] == done.container_mac
    assert "UP" in eth0["flags"] and eth0["link_netnsid"] is not None
    assert {(a["local"], a["prefixlen"]) for a in eth0["addr_info"]
            if a["scope"] == "global"} == {(v4, 32), (v6, 128)}
    pod_v4 = ip_json(ns, "route", "show")
    assert {"dst": "169.254.1.1", "dev": "eth0", "scope": "link"}.items() <= _one(
        pod_v4, dst="169.254.1.1").items()
    assert _one(pod_v4, dst="default")["gateway"] == "169.254.1.1"
    assert _one(ip_json(ns, "-6", "route", "show"), dst="default")["gateway"] == HOST_LL

    (cali,) = ip_json(host, "-d", "link", "show", "dev", pod.host_ifname)
    assert cali["address"] == "ee:ee:ee:ee:ee:ee" and cali["mtu"] == MTU
    assert cali["linkinfo"]["info_kind"] == "veth" and "UP" in cali["flags"]
    assert cali["num_tx_queues"] == 1
    route = _one(ip_json(host, "route", "show", "dev", pod.host_ifname), dst=v4)
    assert (route["protocol"], route["scope"]) == ("80", "link")
    assert _one(ip_json(host, "-6", "route", "show", "dev", pod.host_ifname),
                dst=v6)["protocol"] == "80"
    assert any(a["local"] == HOST_LL for a in ip_json(
        host, "-6", "addr", "show", "dev", pod.host_ifname)[0]["addr_info"])
    neigh = {n["dst"]: n for n in ip_json(host, "neigh", "show", "dev", pod.host_ifname)
             + ip_json(host, "-6", "neigh", "show", "dev", pod.host_ifname)}
    for addr in (v4, v6):
        assert neigh[addr]["lladdr"] == done.container_mac
        assert neigh[addr]["state"] == ["PERMANENT"]

    c = f"net.ipv4.conf.{pod.host_ifname}"
    c6 = f"net.ipv6.conf.{pod.host_ifname}"
    assert sysctls(host, f"{c}.proxy_arp", f"{c}.forwarding", f"{c}.route_localnet",
                   f"net.ipv4.neigh.{pod.host_ifname}.proxy_delay", f"{c6}.proxy_ndp",
                   f"{c6}.forwarding", f"{c6}.accept_dad", f"{c6}.accept_ra"
                   ) == ["1", "1", "1", "0", "1", "1", "0", "0"]
    assert sysctls(ns, "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
                   "net.ipv6.conf.eth0.accept_dad") == ["0", "0", "0"]
    assert plumbing.check(pod, host_netns=host) == []


def _one(items: list[dict[str, Any]], **match: str) -> dict[str, Any]:
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, items)
    return found[0]


def test_pod_reaches_the_host_over_v4_and_v6(host: str, make_ns: Callable[[], str]) -> None:
    pod = pod_if(make_ns(), 2)
    plumbing.setup(pod, host_netns=host)
    assert tcp_from_pod(host, pod, HOST_V4) == str(pod.addresses[0].ip)
    assert tcp_from_pod(host, pod, HOST_V6) == str(pod.addresses[1].ip)


def test_forwarding_and_mac_as_requested(host: str, make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    pod = pod_if(ns, 3, allow_ip_forwarding=True, mac="0A:58:0A:41:00:05")
    assert plumbing.setup(pod, host_netns=host).container_mac == "0a:58:0a:41:00:05"
    assert ip_json(ns, "link", "show", "dev", "eth0")[0]["address"] == "0a:58:0a:41:00:05"
    assert sysctls(ns, "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding") == ["1", "1"]
    # the pod's sysctls landed in the pod, not in the namespace the host side ran in
    assert sysctls(host, "net.ipv4.ip_forward") == ["0"]
    assert plumbing.check(pod, host_netns=host) == []


def test_two_phases_mac_chosen_late_and_abandon(host: str, make_ns: Callable[[], str]) -> None:
    """prepare() makes the pair with no address (ADD runs it beside the IPAM); finish() may
    switch the pod MAC (a Pod annotation read meanwhile); abandon() leaves nothing."""
    ns = make_ns()
    pod = pod_if(ns, 6, mac="0a:58:0a:41:00:06")
    prepared = plumbing.prepare(replace(pod, addresses=()), host_netns=host)
    assert ip_json(ns, "addr", "show", "dev", "eth0")[0]["addr_info"] == []
    assert ip_json(host, "link", "show", "dev", pod.host_ifname)[0]["address"] == \
        plumbing.HOST_MAC
    done = prepared.finish(pod.addresses, mac="0A:58:0A:41:00:66")
    assert done.container_mac == "0a:58:0a:41:00:66"
    assert ip_json(ns, "link", "show", "dev", "eth0")[0]["address"] == "0a:58:0a:41:00:66"
    assert plumbing.check(replace(pod, mac="0a:58:0a:41:00:66"), host_netns=host) == []
    with pytest.raises(PlumbingError, match="already finished"):
        prepared.finish(pod.addresses)
    prepared.close()
    prepared.abandon()  # after close: kept
    assert _exists(host, pod.host_ifname)

    # finished but not kept yet (ADD plumbs while etcd commits): abandon removes the pair
    again = make_ns()
    plumbed = plumbing.prepare(pod_if(again, 8), host_netns=host)
    plumbed.finish(pod_if(again, 8).addresses)
    assert _exists(again, "eth0")
    plumbed.abandon()
    assert not _exists(again, "eth0") and not _exists(host, pod_if(again, 8).host_ifname)

    other = make_ns()
    second = plumbing.prepare(pod_if(other, 7), host_netns=host)
    second.abandon()
    second.abandon()
    assert not _exists(other, "eth0") and not _exists(host, pod_if(other, 7).host_ifname)


def v4_addresses(ns: str) -> list[str]:
    info = ip_json(ns, "addr", "show", "dev", "eth0")[0]["addr_info"]
    return [a["local"] for a in info if a["family"] == "inet"]


def test_add_finishes_while_committing_and_replumbs_what_the_store_refused(
        host: str, make_ns: Callable[[], str]) -> None:
    """ADD's veth (cni.cmd_add._Veth): finished with the addresses of the transaction in
    flight; when the store refused them and the retry took others, the pod ends up with only
    the stored ones; a finish that failed is raised after the allocation."""
    import asyncio
    import logging
    from types import SimpleNamespace

    from cni.cmd_add import _Veth

    ctx: Any = SimpleNamespace(log=logging.getLogger("test"), host_netns=f"/run/netns/{host}")
    ns = make_ns()
    pod = pod_if(ns, 9, v6=False, mac="0a:58:0a:41:00:09")
    stored = [ipaddress.ip_interface("10.65.9.9/32")]
    refused = [ipaddress.ip_interface("10.65.9.8/26")]  # the allocator's block-masked form

    veth = _Veth(ctx, replace(pod, addresses=()))
    veth.prepare()  # made while etcd was read
    veth.while_committing(refused)
    assert v4_addresses(ns) == ["10.65.9.8"]
    veth.while_committing(stored)  # the retry's call: left for finished()
    done = asyncio.run(veth.finished(stored, pod.mac))
    veth.prepare().close()
    assert v4_addresses(ns) == ["10.65.9.9"]
    assert done.container_mac == "0a:58:0a:41:00:09"
    assert plumbing.check(replace(pod, addresses=tuple(stored)), host_netns=host) == []
    routes = ip_json(host, "route", "show", "dev", pod.host_ifname)
    assert [r["dst"] for r in routes] == ["10.65.9.9"]

    # no read made it earlier (remembered reads): made and finished while committing; the
    # same addresses as in flight: the early finish is the result, nothing redone
    other = make_ns()
    second = pod_if(other, 10, v6=False)
    veth = _Veth(ctx, replace(second, addresses=()))
    veth.while_committing(list(second.addresses))
    early = veth.plumbed
    assert early is not None and v4_addresses(other) == [str(second.addresses[0].ip)]
    assert asyncio.run(veth.finished(list(second.addresses), veth.mac)) is early
    veth.prepare().close()

    # finished meanwhile with one MAC, the Pod read again asks for another: a new pair
    fourth_ns = make_ns()
    fourth = pod_if(fourth_ns, 12, v6=False, mac="0a:58:0a:41:00:0c")
    veth = _Veth(ctx, replace(fourth, addresses=()))
    veth.while_committing(list(fourth.addresses))
    done = asyncio.run(veth.finished(list(fourth.addresses), "0A:58:0A:41:00:CD"))
    veth.prepare().close()
    assert done.container_mac == "0a:58:0a:41:00:cd"
    assert ip_json(fourth_ns, "link", "show", "dev", "eth0")[0]["address"] == \
        "0a:58:0a:41:00:cd"
    assert v4_addresses(fourth_ns) == [str(fourth.addresses[0].ip)]

    # a finish that fails (here: a MAC that is not one): the pair is gone and the error comes
    # out of finished(), after the allocation
    third_ns = make_ns()
    third = pod_if(third_ns, 11, v6=False)
    veth = _Veth(ctx, replace(third, addresses=()))
    veth.prepare()
    veth.mac = "zz"
    veth.while_committing(list(third.addresses))
    with pytest.raises(PlumbingError, match="MAC"):
        asyncio.run(veth.finished(list(third.addresses), "zz"))
    assert not _exists(host, third.host_ifname)


def test_setup_replaces_leftovers(host: str, make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    pod = pod_if(ns, 4, v6=False)
    v4 = str(pod.addresses[0].ip)
    # an earlier attempt: the host veth (peer still in the host netns), a stale route to the
    # pod's address elsewhere, and an eth0 already in the pod netns
    ip("-n", host, "link", "add", pod.host_ifname, "type", "veth", "peer", "name", "junk0")
    ip("-n", host, "route", "add", f"{v4}/32", "dev", "up0")
    ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "junk1")
    plumbing.setup(pod, host_netns=host)
    assert plumbing.check(pod, host_netns=host) == []
    (route,) = ip_json(host, "route", "show", f"{v4}/32")
    assert (route["dev"], route["protocol"]) == (pod.host_ifname, "80")
    assert not _exists(host, "junk0") and not _exists(ns, "junk1")  # went with the leftovers
    assert tcp_from_pod(host, pod, HOST_V4) == v4
    plumbing.setup(pod, host_netns=host)  # and over its own result
    assert plumbing.check(pod, host_netns=host) == []


def _exists(ns: str, dev: str) -> bool:
    return subprocess.run(["ip", "-n", ns, "link", "show", dev],
                          capture_output=True).returncode == 0


def test_setup_errors_leave_nothing(host: str) -> None:
    pod = pod_if("tabby-t-absent", 5)
    with pytest.raises(PlumbingError, match=r"pod netns .*tabby-t-absent.*CNI_NETNS"):
        plumbing.setup(pod, host_netns=host)
    assert not _exists(host, pod.host_ifname)
    bad = PodInterface(netns=pod.netns, container_ifname="eth0", host_ifname="x" * 16,
                       addresses=pod.addresses, mtu=10)
    with pytest.raises(PlumbingError, match=r"1-15 characters.*MTU 10"):
        plumbing.setup(bad, host_netns=host)


# -- teardown ---------------------------------------------------------------------------------


def test_teardown_removes_everything_and_is_idempotent(host: str,
                                                       make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    pod = pod_if(ns, 6)
    plumbing.setup(pod, host_netns=host)
    plumbing.teardown(pod.netns, "eth0", pod.host_ifname, host_netns=host)
    assert not _exists(host, pod.host_ifname) and not _exists(ns, "eth0")
    assert ip_json(host, "route", "show", "proto", "80") == []
    assert ip_json(host, "-6", "route", "show", "proto", "80") == []
    assert ip_json(host, "neigh", "show", "nud", "permanent") == []
    plumbing.teardown(pod.netns, "eth0", pod.host_ifname, host_netns=host)  # twice
    plumbing.teardown("", "eth0", pod.host_ifname, host_netns=host)  # empty CNI_NETNS
    plumbing.teardown(None, "eth0", None, host_netns=host)
    plumbing.teardown("/run/netns/tabby-t-absent", "eth0", pod.host_ifname, host_netns=host)
    assert plumbing.check(pod, host_netns=host)[0].startswith("host interface")


def test_teardown_without_netns_spares_a_newer_sandbox(host: str,
                                                       make_ns: Callable[[], str]) -> None:
    newer = pod_if(make_ns(), 7)
    plumbing.setup(newer, host_netns=host)
    # a late DEL of an older sandbox of the same pod: same cali name, its netns already gone
    plumbing.teardown("", "eth0", newer.host_ifname, host_netns=host)
    plumbing.teardown("/run/netns/tabby-t-absent", "eth0", newer.host_ifname, host_netns=host)
    assert plumbing.check(newer, host_netns=host) == []
    # a half-made pair (both ends in the host netns) is removed by name
    ip("-n", host, "link", "add", "calihalfmade", "type", "veth", "peer", "name", "junk2")
    plumbing.teardown("", "eth0", "calihalfmade", host_netns=host)
    assert not _exists(host, "calihalfmade")
    # GC of an attachment the runtime no longer lists: by name, whatever the peer
    plumbing.teardown(None, "eth0", newer.host_ifname, host_netns=host, force_host=True)
    assert not _exists(host, newer.host_ifname)
    assert ip_json(host, "route", "show", "proto", "80") == []


# -- check and MTU ----------------------------------------------------------------------------


def test_check_names_what_is_broken(host: str, make_ns: Callable[[], str]) -> None:
    ns = make_ns()
    pod = pod_if(ns, 8)
    plumbing.setup(pod, host_netns=host)
    v4 = str(pod.addresses[0].ip)
    ip("-n", host, "route", "del", f"{v4}/32")
    ip("-n", ns, "route", "del", "default")
    subprocess.run(["ip", "netns", "exec", host, "sh", "-c",
                    f"echo 0 > /proc/sys/net/ipv4/conf/{pod.host_ifname}/proxy_arp"], check=True)
    problems = plumbing.check(pod, host_netns=host)
    assert any(f"host route {v4}/32" in p for p in problems), problems
    assert any("default route via 169.254.1.1 missing" in p for p in problems), problems
    assert any("proxy_arp is 0, expected 1" in p for p in problems), problems
    assert len(problems) == 3, problems
    assert plumbing.check(pod_if("tabby-t-absent", 8), host_netns=host)[0].startswith(
        "pod netns /run/netns/tabby-t-absent")


def test_detect_mtu(host: str, make_ns: Callable[[], str]) -> None:
    assert plumbing.detect_mtu(50, host_netns=host) == UPLINK_MTU - 50
    assert plumbing.detect_mtu(host_netns=host) == UPLINK_MTU
    assert plumbing.detect_mtu(20, host_netns=make_ns()) == 1500 - 20  # no default route


# -- many pods --------------------------------------------------------------------------------


def test_30_pods_in_parallel(host: str, make_ns: Callable[[], str]) -> None:
    pods = [pod_if(make_ns(), 100 + n) for n in range(30)]
    with ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(lambda p: plumbing.setup(p, host_netns=host), pods))
    assert len({r.host_ifname for r in results}) == 30
    assert len({r.container_mac for r in results}) == 30
    links = {link["ifname"] for link in ip_json(host, "link", "show")}
    assert {p.host_ifname for p in pods} <= links
    with ThreadPoolExecutor(max_workers=30) as pool:
        assert all(p == [] for p in pool.map(lambda p: plumbing.check(p, host_netns=host),
                                             pods))
        seen = list(pool.map(lambda p: tcp_from_pod(host, p, HOST_V4), pods))
    assert seen == [str(p.addresses[0].ip) for p in pods]
    with ThreadPoolExecutor(max_workers=30) as pool:
        list(pool.map(lambda p: plumbing.teardown(p.netns, "eth0", p.host_ifname,
                                                  host_netns=host), pods))
    assert not any(link["ifname"].startswith("cali") for link in ip_json(host, "link", "show"))
    assert ip_json(host, "neigh", "show", "nud", "permanent") == []


def test_setup_and_teardown_latency(host: str, make_ns: Callable[[], str],
                                    record_property: Callable[[str, object], None]) -> None:
    """Median over 30 pods, one after another (v4 + v6, host_netns given, so both sides run
    in namespace threads). Printed for bench/; the bounds only catch gross regressions."""
    pods = [pod_if(make_ns(), 200 + n) for n in range(30)]
    setup_ms, teardown_ms = [], []
    for pod in pods:
        start = time.perf_counter()
        plumbing.setup(pod, host_netns=host)
        setup_ms.append((time.perf_counter() - start) * 1e3)
    for pod in pods:
        start = time.perf_counter()
        plumbing.teardown(pod.netns, "eth0", pod.host_ifname, host_netns=host)
        teardown_ms.append((time.perf_counter() - start) * 1e3)
    medians = statistics.median(setup_ms), statistics.median(teardown_ms)
    record_property("setup_median_ms", round(medians[0], 2))
    record_property("teardown_median_ms", round(medians[1], 2))
    print(f"plumbing medians over 30 pods: setup {medians[0]:.2f} ms, "
          f"teardown {medians[1]:.2f} ms")
    assert medians[0] < 50 and medians[1] < 500

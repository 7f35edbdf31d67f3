"""Pod and host plumbing the way Calico's CNI plugin does it (dataplane_linux.go), with pyroute2.

For one pod:

- a veth pair created with one netlink message: the host end `cali…` (MAC ee:ee:ee:ee:ee:ee)
  stays in the host namespace, the peer is born in the pod namespace as CNI_IFNAME; MTU and
  queue counts are set at creation;
- host end: proxy ARP, forwarding, route_localnet, proxy_delay=0, accept_ra=0 (IPv6: proxy_ndp,
  forwarding, no DAD, link-local fe80::ecee:eeff:feee:eeee), a `<ip>/32 dev cali… scope link
  proto 80` route per pod address (/128 for IPv6) and a permanent neighbour entry pod IP -> pod
  MAC;
- pod end: the /32 (and /128) addresses, `169.254.1.1 dev eth0 scope link`, default via
  169.254.1.1 (answered by proxy ARP on the host end), IPv6 default via the host end's link-local
  address, ip_forward per `allow_ip_forwarding`.

All functions are synchronous. Setup comes in two phases so ADD can make the veth while the
IPAM talks to etcd: prepare() (the pair, no address needed) and PreparedVeth.finish() (sysctls,
addresses, routes, neighbours). Work in another namespace either enters it on the calling
thread for a short block (`cni.netns.entered`: the hot path, which ADD runs on the daemon's
loop thread) or runs in a short-lived thread joined to it (teardown, check). Requests go out in
batches on one netlink socket per namespace (`cni.netns.Rtnl`, bodies packed by
`cni.rtnl_msgs`): setup is three round trips and ~1.5 ms. The pod MAC is chosen here (random,
locally administered, as the kernel would) unless requested, so the host side never waits for
the pod side. check() and detect_mtu() are not hot and read the kernel through pyroute2's
IPRoute.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from cni import netns as nslib
from cni import rtnl_msgs as msgs
from cni.netns import Answer, RequestFailed, Rtnl, link_index, read_sysctl, write_sysctl
from datastore.errors import TabbyError

HOST_MAC = "ee:ee:ee:ee:ee:ee"
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"  # EUI-64 link-local of HOST_MAC
ROUTE_PROTO = 80  # routes Tabby owns (Calico's number) so restarts can reconcile
DEFAULT_MTU = 1500

# kernel constants (linux/rtnetlink.h, if.h, neighbour.h, if_addr.h, errno.h)
RT_SCOPE_UNIVERSE, SCOPE_LINK = 0, 253
RTN_UNICAST, RTPROT_STATIC, MAIN_TABLE = 1, 4, 254
IFF_UP = 1
NUD_PERMANENT = 0x80
IFA_F_NODAD = 0x02
ESRCH, ENOENT, EEXIST, ENODEV, EADDRNOTAVAIL = 3, 2, 17, 19, 99
NEW = nslib.NLM_F_CREATE | nslib.NLM_F_EXCL  # create, fail if it exists
REPLACE = nslib.NLM_F_CREATE | nslib.NLM_F_REPLACE  # create or overwrite

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class PodInterface:
    netns: str  # pod netns path (/run/netns/x or /proc/<pid>/ns/net)
    container_ifname: str  # CNI_IFNAME, usually eth0
    host_ifname: str  # cali + 11 hex of sha1("<ns>.<pod>") (datastore.k8s.veth_name)
    addresses: tuple[IPInterface, ...]  # /32 and /128
    mtu: int
    mac: str | None = None  # requested pod MAC, else a random one
    allow_ip_forwarding: bool = False

    @property
    def has_v4(self) -> bool:
        return any(a.version == 4 for a in self.addresses)

    @property
    def has_v6(self) -> bool:
        return any(a.version == 6 for a in self.addresses)


@dataclass(frozen=True)
class Plumbed:
    host_ifname: str
    host_mac: str
    container_ifname: str
    container_mac: str
    mtu: int
    netns: str


class PlumbingError(TabbyError):
    """A plumbing step failed; str() names the step, the kernel's answer and what to do."""


@contextmanager
def _step(what: str, hint: str = "") -> Iterator[None]:
    """Turn kernel errors inside the block into a PlumbingError naming the step."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
        raise PlumbingError(f"{what}: {reason}" + (f"; {hint}" if hint else "")) from exc


def _ipr() -> IPRoute:
    # groups=0: request/response only, no multicast events queued behind our answers
    return IPRoute(groups=0)


def random_mac() -> str:
    """Random unicast, locally administered MAC, as the kernel's eth_random_addr() makes."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


# -- setup ------------------------------------------------------------------------------------


def setup(pod: PodInterface, host_netns: str | None = None) -> Plumbed:
    """Plumb the pod (see the module docstring). host_netns None = the caller's namespace.

    Idempotent: a leftover veth of the same name (host side or pod side) and stale routes are
    replaced. On failure nothing is left behind."""
    prepared = prepare(pod, host_netns)
    plumbed = prepared.finish(pod.addresses)
    prepared.close()
    return plumbed


def prepare(pod: PodInterface, host_netns: str | None = None) -> PreparedVeth:
    """Phase one of setup, which needs no address: the pair, both ends still down. ADD runs it
    while the IPAM works, then calls finish() with the addresses (pod.addresses is not read
    here). On failure nothing is left behind."""
    _validate(pod)
    mac = (pod.mac or random_mac()).lower()
    pod_fd = _open_netns(pod.netns, "pod")
    host_fd = None
    try:
        host_fd = None if host_netns is None else _open_netns(host_netns, "host")
        with nslib.entered(host_fd):
            host_nl, host_index, pod_nl, pod_index = _make_pair(pod, pod_fd, mac)
    except BaseException:
        for fd in (pod_fd, host_fd):
            if fd is not None:
                os.close(fd)
        raise
    return PreparedVeth(pod, mac, pod_fd, host_fd, host_nl, host_index, pod_nl, pod_index)


class PreparedVeth:
    """A veth pair made by prepare(): the host end in the host namespace, the peer in the
    pod's, no address, down. Holds both namespaces' fds and a netlink socket in each (a socket
    keeps its namespace, so phase two needs no new one) until close() or abandon(); abandon()
    removes the pair also after finish(), as long as close() has not kept it."""

    def __init__(self, pod: PodInterface, mac: str, pod_fd: int, host_fd: int | None,
                 host_nl: Rtnl, host_index: int, pod_nl: Rtnl, pod_index: int) -> None:
        self.pod, self.mac = pod, mac
        self._pod_fd, self._host_fd = pod_fd, host_fd
        self._host_nl, self._host_index = host_nl, host_index
        self._pod_nl, self._pod_index = pod_nl, pod_index
        self._open = True
        self._finished = False
        self._finished_mac: str | None = None

    def finish(self, addresses: tuple[IPInterface, ...] | list[IPInterface],
               mac: str | None = None) -> Plumbed:
        """Phase two: sysctls, addresses, links up, routes and neighbours. `mac` replaces the
        pod MAC chosen in phase one (one the Pod's annotation asks for, known only after the
        Pod was read). On failure the pair is removed."""
        if self._finished or not self._open:
            raise PlumbingError(f"{self.pod.host_ifname}: this veth was already finished")
        if mac is not None and not _MAC_RE.fullmatch(mac):
            self.abandon()
            raise PlumbingError(f"MAC {mac!r} is not six ':'-separated hex octets")
        pod = replace(self.pod, addresses=tuple(addresses), mac=(mac or self.mac).lower())
        try:
            with nslib.entered(self._host_fd):  # the host end's sysctls resolve there
                _finish_host_side(pod, self._host_nl, self._host_index)
            _finish_pod_side(pod, self._pod_fd, self._pod_nl, self._pod_index,
                             pod.mac != self.mac)
        except BaseException:
            self.abandon()
            raise
        self._finished, self._finished_mac = True, pod.mac
        assert pod.mac is not None
        return Plumbed(pod.host_ifname, HOST_MAC, pod.container_ifname, pod.mac, pod.mtu,
                       pod.netns)

    def readdress(self, old: tuple[IPInterface, ...] | list[IPInterface],
                  addresses: tuple[IPInterface, ...] | list[IPInterface]) -> Plumbed:
        """After finish(old): swap the pod's addresses for `addresses` (host routes and
        neighbours too), keeping the pair. ADD's rare path, when etcd refused the addresses
        it plumbed while committing: cheaper than a new pair (deleting one takes ~30 ms)."""
        if not self._finished or not self._open:
            raise PlumbingError(f"{self.pod.host_ifname}: only a finished veth is readdressed")
        gone = (ESRCH, ENOENT, EADDRNOTAVAIL)  # already gone is fine
        name = self.pod.host_ifname
        for addr in old:
            dst = _single(addr).network
            self._host_nl.queue(msgs.route(
                _family(addr), self._host_index, str(dst.network_address), dst.prefixlen, None,
                table=MAIN_TABLE, proto=ROUTE_PROTO, scope=SCOPE_LINK, route_type=RTN_UNICAST),
                RTM_DELROUTE, 0, f"deleting route {dst} dev {name}", ignore=gone)
            self._host_nl.queue(msgs.neighbour(_family(addr), self._host_index, str(addr.ip),
                                               self._finished_mac or "", NUD_PERMANENT),
                                RTM_DELNEIGH, 0, f"deleting neighbour {addr.ip}", ignore=gone)
            self._pod_nl.queue(msgs.address(_family(addr), self._pod_index, str(addr.ip),
                                            dst.prefixlen, IFA_F_NODAD),
                               RTM_DELADDR, 0, f"deleting {addr} in {self.pod.netns}",
                               ignore=gone)
        try:
            if old:
                _commit(self._host_nl)
                _commit(self._pod_nl)
        except BaseException:
            self.abandon()
            raise
        self._finished = False
        return self.finish(addresses, self._finished_mac)

    def abandon(self) -> None:
        """Remove the pair (the peer goes with the host end) and release everything."""
        if self._open:
            _delete_quietly(self._host_nl, self._host_index)
            self.close()

    def close(self) -> None:
        """Keep the pair as it is and release the sockets and namespace fds."""
        if not self._open:
            return
        self._open = False
        self._host_nl.close()
        self._pod_nl.close()
        for fd in (self._pod_fd, self._host_fd):
            if fd is not None:
                os.close(fd)


@contextmanager
def _netns_fd(path: str | None, role: str) -> Iterator[int | None]:
    """An fd for a namespace (None stays None: the caller's own), as a PlumbingError if gone."""
    if path is None:
        yield None
        return
    fd = _open_netns(path, role)
    try:
        yield fd
    finally:
        os.close(fd)


def _open_netns(path: str, role: str) -> int:
    try:
        return nslib.open_fd(path)
    except OSError as exc:
        hint = ("the sandbox is gone or the runtime passed a wrong CNI_NETNS" if role == "pod"
                else "check the host namespace path")
        raise PlumbingError(f"{role} netns {path}: {exc.strerror or exc}; {hint}") from exc


def _validate(pod: PodInterface) -> None:
    problems = []
    for role, name in (("host", pod.host_ifname), ("container", pod.container_ifname)):
        if not name or len(name) > 15 or "/" in name:
            problems.append(f"{role} interface name {name!r} must be 1-15 characters, no '/'")
    if not 68 <= pod.mtu <= 65535:
        problems.append(f"MTU {pod.mtu} is outside 68-65535")
    if pod.mac is not None and not _MAC_RE.fullmatch(pod.mac):
        problems.append(f"MAC {pod.mac!r} is not six ':'-separated hex octets")
    if problems:
        raise PlumbingError("; ".join(problems))


def _make_pair(pod: PodInterface, pod_fd: int, mac: str) -> tuple[Rtnl, int, Rtnl, int]:
    """In the host namespace: the pair, then the pod end's index through a socket opened in
    the pod namespace. (host socket, host ifindex, pod socket, pod ifindex)."""
    nl = Rtnl()
    try:
        index = _create_veth(nl, pod, pod_fd, mac)
        try:
            pod_nl, pod_index = _open_pod_end(pod, pod_fd)
        except BaseException:
            _delete_quietly(nl, index)  # the pod end goes with it
            raise
    except BaseException:
        nl.close()
        raise
    return nl, index, pod_nl, pod_index


def _open_pod_end(pod: PodInterface, pod_fd: int) -> tuple[Rtnl, int]:
    """A socket in the pod namespace (the only step that must run there) and the pod end's
    ifindex."""
    with nslib.entered(pod_fd):
        nl = Rtnl()
    try:
        _queue_get_link(nl, pod.container_ifname, f"in {pod.netns}")
        return nl, link_index(_reply(_commit(nl)[0]))
    except BaseException:
        nl.close()
        raise


def _create_veth(nl: Rtnl, pod: PodInterface, pod_fd: int, mac: str) -> int:
    """The pair in one message, the peer born in the pod netns; retried once over leftovers.
    Returns the host end's ifindex."""
    try:
        return _add_veth(nl, pod, pod_fd, mac)
    except RequestFailed as exc:
        if exc.errno != EEXIST:
            raise _failed(exc) from exc
    _remove_leftovers(nl, pod, pod_fd)
    try:
        return _add_veth(nl, pod, pod_fd, mac)
    except RequestFailed as exc:
        raise _failed(exc, "something recreated it meanwhile?") from exc


def _add_veth(nl: Rtnl, pod: PodInterface, pod_fd: int, mac: str) -> int:
    body = msgs.veth_pair(pod.host_ifname, HOST_MAC, pod.container_ifname, mac, pod_fd,
                          pod.mtu, queues=1)  # Calico's num_queues=1
    nl.queue(body, RTM_NEWLINK, NEW,
             f"creating veth {pod.host_ifname} (peer {pod.container_ifname} in {pod.netns})")
    _queue_get_link(nl, pod.host_ifname)  # same batch: runs after the create
    return link_index(_reply(nl.commit()[1]))


def _remove_leftovers(nl: Rtnl, pod: PodInterface, pod_fd: int) -> None:
    """An earlier attempt's host veth (its peer goes with it) and pod interface."""
    with _step(f"removing a leftover {pod.host_ifname}"):
        _delete_link(nl, pod.host_ifname)
    with _step(f"removing a leftover {pod.container_ifname} in {pod.netns}"):
        nslib.run_in_netns(pod_fd, _delete_in_ns, pod.container_ifname)


def _finish_host_side(pod: PodInterface, nl: Rtnl, index: int) -> None:
    """In the host namespace (sysctls resolve there)."""
    name = pod.host_ifname
    with _step(f"setting sysctls of {name}", "is /proc/sys writable here?"):
        _host_sysctls(name, pod.has_v4, pod.has_v6)
    if pod.has_v6:  # explicit, so a host with addr_gen_mode none/stable still has it
        _queue_addr(nl, index, ipaddress.IPv6Interface(f"{GATEWAY_V6}/64"), name)
    _queue_up(nl, index, name)
    for addr in pod.addresses:
        dst = _single(addr).network
        _queue_route(nl, index, dst, None, f"route {dst} dev {name}", proto=ROUTE_PROTO)
        assert pod.mac is not None
        nl.queue(msgs.neighbour(_family(addr), index, str(addr.ip), pod.mac, NUD_PERMANENT),
                 RTM_NEWNEIGH, REPLACE, f"adding neighbour {addr.ip} lladdr {pod.mac} dev {name}")
    _commit(nl)


def _host_sysctls(name: str, v4: bool, v6: bool) -> None:
    for key, value in _host_sysctl_values(name, v4, v6):
        write_sysctl(key, value)
    if not v6 and os.path.exists(f"/proc/sys/net/ipv6/conf/{name}"):
        write_sysctl(f"net/ipv6/conf/{name}/accept_ra", 0)  # always, as Calico


def _host_sysctl_values(name: str, v4: bool, v6: bool) -> list[tuple[str, int]]:
    """The values Calico sets on the host end (and Felix keeps); check() compares them."""
    values: list[tuple[str, int]] = []
    if v4:
        values += [(f"net/ipv4/conf/{name}/route_localnet", 1),
                   (f"net/ipv4/neigh/{name}/proxy_delay", 0),
                   (f"net/ipv4/conf/{name}/proxy_arp", 1),
                   (f"net/ipv4/conf/{name}/forwarding", 1)]
    if v6:
        values += [(f"net/ipv6/conf/{name}/accept_dad", 0),
                   (f"net/ipv6/conf/{name}/disable_ipv6", 0),
                   (f"net/ipv6/conf/{name}/proxy_ndp", 1),
                   (f"net/ipv6/conf/{name}/forwarding", 1),
                   (f"net/ipv6/conf/{name}/accept_ra", 0)]
    return values


def _finish_pod_side(pod: PodInterface, pod_fd: int, nl: Rtnl, index: int,
                     new_mac: bool) -> None:
    """Sysctls (inside the pod namespace), then through the pod's socket the MAC if it
    changed, addresses, link up, routes."""
    name, where = pod.container_ifname, f"in {pod.netns}"
    with _step(f"setting sysctls {where}", "IPv6 addresses need IPv6 in the kernel"), \
            nslib.entered(pod_fd):
        _pod_sysctls(pod)
    if new_mac:
        assert pod.mac is not None
        nl.queue(msgs.link(index, attrs=msgs.attr(msgs.IFLA_ADDRESS, msgs.mac_bytes(pod.mac))),
                 RTM_NEWLINK, 0, f"setting the MAC of {name} {where} to {pod.mac}")
    for addr in pod.addresses:
        _queue_addr(nl, index, _single(addr), f"{name} {where}")
    _queue_up(nl, index, f"{name} {where}")
    if pod.has_v4:
        _queue_route(nl, index, ipaddress.ip_network(f"{GATEWAY_V4}/32"), None,
                     f"route {GATEWAY_V4} dev {name} {where}")
        _queue_route(nl, index, ipaddress.ip_network("0.0.0.0/0"), GATEWAY_V4,
                     f"default route via {GATEWAY_V4} {where}")
    if pod.has_v6:
        _queue_route(nl, index, ipaddress.ip_network("::/0"), GATEWAY_V6,
                     f"default route via {GATEWAY_V6} {where}")
    _commit(nl)


def _pod_sysctls(pod: PodInterface) -> None:
    for key, value in _pod_sysctl_values(pod):
        write_sysctl(key, value)


def _pod_sysctl_values(pod: PodInterface) -> list[tuple[str, int]]:
    forward = int(pod.allow_ip_forwarding)
    values: list[tuple[str, int]] = []
    if pod.has_v4:
        values.append(("net/ipv4/ip_forward", forward))
    if pod.has_v6:
        values += [("net/ipv6/conf/all/disable_ipv6", 0),
                   ("net/ipv6/conf/default/disable_ipv6", 0),
                   ("net/ipv6/conf/lo/disable_ipv6", 0),
                   (f"net/ipv6/conf/{pod.container_ifname}/accept_dad", 0),
                   ("net/ipv6/conf/all/forwarding", forward)]
    return values


# -- netlink requests (queued on an Rtnl, sent in one batch) -----------------------------------


def _single(addr: IPInterface) -> IPInterface:
    """The address as /32 or /128, as Calico narrows block-masked IPAM results."""
    if addr.network.prefixlen == addr.max_prefixlen:
        return addr  # ADD passes them narrowed already
    return ipaddress.ip_interface((addr.ip, addr.max_prefixlen))


def _family(addr: IPInterface | ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def _queue_get_link(nl: Rtnl, name: str, where: str = "",
                    ignore: tuple[int, ...] = ()) -> None:
    nl.queue(msgs.link_by_name(name), RTM_GETLINK, 0,
             f"looking up {name}" + (f" {where}" if where else ""), ignore=ignore)


def _queue_up(nl: Rtnl, index: int, label: str) -> None:
    nl.queue(msgs.link(index, flags=IFF_UP, change=IFF_UP), RTM_NEWLINK, 0, f"setting {label} up")


def _queue_addr(nl: Rtnl, index: int, addr: IPInterface, label: str) -> None:
    ip = str(addr.ip)  # no DAD: a point-to-point link, and DAD would delay use by ~1 s
    nl.queue(msgs.address(_family(addr), index, ip, addr.network.prefixlen, IFA_F_NODAD),
             RTM_NEWADDR, REPLACE, f"adding {addr} to {label}")


def _queue_route(nl: Rtnl, index: int, dst: ipaddress.IPv4Network | ipaddress.IPv6Network,
                 gateway: str | None, what: str, proto: int = RTPROT_STATIC) -> None:
    body = msgs.route(_family(dst), index, str(dst.network_address), dst.prefixlen, gateway,
                      table=MAIN_TABLE, proto=proto,
                      scope=RT_SCOPE_UNIVERSE if gateway else SCOPE_LINK, route_type=RTN_UNICAST)
    nl.queue(body, RTM_NEWROUTE, REPLACE, f"adding {what}")


def _delete_link(nl: Rtnl, name: str) -> bool:
    """Delete by name; False when there is none."""
    nl.queue(msgs.link_by_name(name), RTM_DELLINK, 0,
             f"deleting {name}", ignore=(ENODEV,))
    return _commit(nl)[0].error == 0


def _delete_quietly(nl: Rtnl, index: int) -> None:
    nl.queue(msgs.link(index), RTM_DELLINK, 0, "cleanup")
    with suppress(RequestFailed):  # already gone, or the original error matters more
        nl.commit()


def _commit(nl: Rtnl) -> list[Answer]:
    try:
        return nl.commit()
    except RequestFailed as exc:
        raise _failed(exc) from exc


def _failed(exc: RequestFailed, hint: str = "") -> PlumbingError:
    return PlumbingError(f"{exc.what}: {exc.strerror}" + (f"; {hint}" if hint else ""))


def _reply(answer: Answer) -> bytes:
    assert answer.reply is not None  # a GET that did not fail has a reply
    return answer.reply


# -- teardown ---------------------------------------------------------------------------------


def teardown(netns: str | None, container_ifname: str, host_ifname: str | None,
             host_netns: str | None = None, *, force_host: bool = False) -> None:
    """Remove the pod's veth (its routes and neighbour entries go with it).

    The pod interface is deleted inside the pod netns, as Calico does: deleting the host end
    by name could hit a newer sandbox of the same pod, which has the same `cali…` name. With
    the netns gone (missing, or an empty CNI_NETNS) the pair is already gone with it; then only
    a host end whose peer is also in the host namespace (a half-made pair) is removed, or, with
    `force_host` (GC of an attachment the runtime no longer lists, whose netns may have
    leaked), the host end of that name whatever its peer. Nothing missing is an error."""
    deleted = False
    if netns:
        with suppress(FileNotFoundError):  # the netns is gone, and the pair with it
            deleted = nslib.run_in_netns(netns, _delete_in_ns, container_ifname)
    if not deleted and host_ifname:
        with _step(f"removing {host_ifname}", "check the host namespace path"):
            nslib.run_in_netns(host_netns, _delete_host_end, host_ifname, force_host)


def _delete_in_ns(name: str) -> bool:
    with Rtnl() as nl:
        return _delete_link(nl, name)


def _delete_host_end(name: str, force: bool) -> None:
    if force:
        _delete_in_ns(name)
        return
    with Rtnl() as nl:
        _queue_get_link(nl, name, ignore=(ENODEV,))
        reply = _commit(nl)[0].reply
        if reply is None:
            return
        link = ifinfmsg(reply)
        link.decode()
        if _kind(link) == "veth" and _peer_is_local(link):
            _delete_quietly(nl, link["index"])


def _peer_is_local(link: Any) -> bool:
    return link.get("IFLA_LINK_NETNSID") is None


# -- check ------------------------------------------------------------------------------------


def check(pod: PodInterface, host_netns: str | None = None) -> list[str]:
    """What differs from what setup() makes; [] when everything matches."""
    host = host_netns or nslib.CURRENT  # a fresh thread even here: IPRoute runs its own loop
    try:
        with _netns_fd(host, "host") as host_fd, _netns_fd(pod.netns, "pod") as pod_fd:
            pod_read = nslib.Spawned(pod_fd, _read_pod_side, pod)
            try:
                host_view = nslib.run_in_netns(host_fd, _read_host_side, pod)
            finally:
                pod_read.join()
            pod_view = pod_read.result()
    except PlumbingError as exc:
        return [str(exc)]
    problems = host_view.problems + pod_view.problems
    if host_view.index and pod_view.index and (
            (host_view.peer, pod_view.peer) != (pod_view.index, host_view.index)):
        problems.append(f"{pod.container_ifname} in {pod.netns} is not the peer of "
                        f"{pod.host_ifname}")
    return problems


@dataclass
class _View:
    """One end as read back: its problems, ifindex and the ifindex of its peer."""
    problems: list[str]
    index: int = 0
    peer: int = 0


def _read_pod_side(pod: PodInterface) -> _View:
    name, where = pod.container_ifname, f"in {pod.netns}"
    with _ipr() as ipr:
        link = _get_link(ipr, name)
        if link is None:
            return _View([f"{name} does not exist {where}"])
        view = _View([], link["index"], link.get("IFLA_LINK") or 0)
        view.problems += _link_problems(link, f"{name} {where}", pod.mtu, pod.mac)
        view.problems += _pod_addr_problems(ipr, pod, link["index"])
        view.problems += _pod_route_problems(ipr, pod, link["index"])
    view.problems += _sysctl_problems(_pod_sysctl_values(pod), where)
    return view


def _read_host_side(pod: PodInterface) -> _View:
    name = pod.host_ifname
    with _ipr() as ipr:
        link = _get_link(ipr, name)
        if link is None:
            return _View([f"host interface {name} does not exist"])
        view = _View(_link_problems(link, name, pod.mtu, HOST_MAC), link["index"],
                     link.get("IFLA_LINK") or 0)
        if _kind(link) != "veth" or _peer_is_local(link):
            view.problems.append(f"{name} is not a veth with its peer in another namespace")
        view.problems += _host_route_problems(ipr, pod, link["index"])
        view.problems += _neighbour_problems(ipr, pod, link["index"])
    view.problems += _sysctl_problems(_host_sysctl_values(name, pod.has_v4, pod.has_v6), "")
    return view


def _link_problems(link: Any, label: str, mtu: int, mac: str | None) -> list[str]:
    problems = []
    if link.get("IFLA_MTU") != mtu:
        problems.append(f"{label} has MTU {link.get('IFLA_MTU')}, expected {mtu}")
    if mac is not None and (link.get("IFLA_ADDRESS") or "").lower() != mac.lower():
        problems.append(f"{label} has MAC {link.get('IFLA_ADDRESS')}, expected {mac}")
    if not link["flags"] & 1:
        problems.append(f"{label} is down")
    return problems


def _pod_addr_problems(ipr: IPRoute, pod: PodInterface, index: int) -> list[str]:
    have = {(_norm(a.get("IFA_ADDRESS")), a["prefixlen"]) for a in ipr.addr("dump", index=index)}
    return [f"{pod.container_ifname} in {pod.netns} lacks {a.ip}/{a.max_prefixlen}"
            for a in pod.addresses if (_norm(a.ip), a.max_prefixlen) not in have]


def _pod_route_problems(ipr: IPRoute, pod: PodInterface, index: int) -> list[str]:
    where = f"in {pod.netns}"
    problems = []
    routes = _routes(ipr, socket.AF_INET) if pod.has_v4 else []
    if pod.has_v4:
        if not any(r.dst == f"{GATEWAY_V4}/32" and r.oif == index and r.scope == SCOPE_LINK
                   for r in routes):
            problems.append(f"route {GATEWAY_V4} dev {pod.container_ifname} scope link "
                            f"missing {where}")
        if not any(r.dst == "0.0.0.0/0" and r.gateway == GATEWAY_V4 and r.oif == index
                   for r in routes):
            problems.append(f"default route via {GATEWAY_V4} missing {where}")
    if pod.has_v6 and not any(r.dst == "::/0" and r.gateway == GATEWAY_V6 and r.oif == index
                              for r in _routes(ipr, socket.AF_INET6)):
        problems.append(f"IPv6 default route via {GATEWAY_V6} missing {where}")
    return problems


def _host_route_problems(ipr: IPRoute, pod: PodInterface, index: int) -> list[str]:
    routes = {r.dst: r for fam in (socket.AF_INET, socket.AF_INET6) for r in _routes(ipr, fam)}
    problems = []
    for addr in pod.addresses:
        dst = f"{_norm(addr.ip)}/{addr.max_prefixlen}"
        route = routes.get(dst)
        if route is None:
            problems.append(f"host route {dst} dev {pod.host_ifname} missing")
        elif route.oif != index:
            problems.append(f"host route {dst} does not go to {pod.host_ifname}")
    return problems


def _neighbour_problems(ipr: IPRoute, pod: PodInterface, index: int) -> list[str]:
    have = {_norm(n.get("NDA_DST")): n for n in ipr.neigh("dump", ifindex=index)}
    problems = []
    for addr in pod.addresses:
        entry = have.get(_norm(addr.ip))
        if entry is None or not entry["state"] & NUD_PERMANENT:
            problems.append(f"permanent neighbour entry {addr.ip} on {pod.host_ifname} missing")
    return problems


def _sysctl_problems(values: list[tuple[str, int]], where: str) -> list[str]:
    problems = []
    for key, want in values:
        try:
            have = read_sysctl(key)
        except OSError:
            have = "absent"
        if have != str(want):
            problems.append(f"sysctl {key.replace('/', '.')} is {have}, expected {want}"
                            + (f" {where}" if where else ""))
    return problems


@dataclass(frozen=True)
class _Route:
    dst: str
    oif: int | None
    gateway: str | None
    scope: int
    priority: int
    oifs: tuple[int, ...]


def _routes(ipr: IPRoute, family: int) -> list[_Route]:
    """Main-table routes of one family, normalised for comparisons."""
    return [_route(r) for r in ipr.route("dump", family=family, table=MAIN_TABLE)]


def _route(msg: Any) -> _Route:
    family = msg["family"]
    dst = msg.get("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
    gateway = msg.get("RTA_GATEWAY")
    oif = msg.get("RTA_OIF")
    hops = tuple(h["oif"] for h in msg.get("RTA_MULTIPATH") or ())
    return _Route(dst=f"{_norm(dst)}/{msg['dst_len']}", oif=oif,
                  gateway=_norm(gateway) if gateway else None, scope=msg["scope"],
                  priority=msg.get("RTA_PRIORITY") or 0,
                  oifs=hops or ((oif,) if oif else ()))


def _norm(ip: Any) -> str:
    return str(ipaddress.ip_address(ip))


def _get_link(ipr: IPRoute, name: str) -> Any | None:
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code != ENODEV:
            raise
        return None


def _kind(link: Any) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


# -- MTU --------------------------------------------------------------------------------------


def detect_mtu(overhead: int = 0, host_netns: str | None = None) -> int:
    """The MTU of the default route's interface (the smallest over multipath next hops, IPv4
    before IPv6) minus the encapsulation overhead; 1500 minus it with no default route."""
    with _step("reading the default route", "pass the MTU in the netconf instead"):
        # a fresh thread even for our own netns: IPRoute runs its own event loop
        mtu = nslib.run_in_netns(host_netns or nslib.CURRENT, _default_route_mtu)
    return (mtu or DEFAULT_MTU) - overhead


def _default_route_mtu() -> int | None:
    with _ipr() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            defaults = [r for r in _routes(ipr, family) if r.dst.endswith("/0") and r.oifs]
            if defaults:
                best = min(defaults, key=lambda r: r.priority)
                return min(_link_mtu(ipr, oif) for oif in best.oifs)
    return None


def _link_mtu(ipr: IPRoute, index: int) -> int:
    return int(ipr.link("get", index=index)[0].get("IFLA_MTU"))

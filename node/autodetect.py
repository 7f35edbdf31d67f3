"""The node's BGP address: which IPv4 address of this host the other nodes reach it on.

Methods (calico-node's `IP_AUTODETECTION_METHOD` spellings, plus Tabby's default):

- `default-route` (Tabby's default): the address on the interface that holds the default route;
- `first-found`: the first address on an interface that is not one of the usual virtual ones
  (cali*, docker*, tunl*, vxlan.calico, lo, ...), as calico-node's default;
- `interface=REGEX`: the first address on an interface whose name matches REGEX (a comma list
  of regexes is allowed, as Calico's);
- `skip-interface=REGEX`: first-found, skipping interfaces that match;
- `can-reach=ADDR`: the source address the kernel uses to reach ADDR;
- `cidr=CIDR[,CIDR]`: the first address inside one of the CIDRs;
- an explicit address (`198.18.0.11/24`, or without a length: /32 is assumed).

`choose` is pure: it gets the interfaces (name, addresses in order), the default-route
interface and a `route_source` callback; `read_host` reads those from the kernel (pyroute2) in
the caller's network namespace.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_METHOD = "default-route"
# interfaces calico-node's first-found skips (its DEFAULT_INTERFACES_TO_EXCLUDE), and ours
EXCLUDED = re.compile(r"^(docker.*|cbr.*|dummy.*|virbr.*|lxcbr.*|veth.*|lo|cali.*|tunl.*|"
                      r"flannel.*|kube-ipvs.*|cni.*|vxlan.calico.*|vxlan-v6.calico.*|wireguard.*|"
                      r"br-.*)$")

IPv4If = ipaddress.IPv4Interface


class AutodetectError(ValueError):
    """No address could be chosen; the message says why and what to set instead."""


@dataclass(frozen=True)
class HostInterface:
    name: str
    addresses: tuple[IPv4If, ...]  # global-scope IPv4 addresses, in kernel order
    up: bool = True


def choose(method: str, interfaces: Sequence[HostInterface], default_iface: str | None,
           route_source: Callable[[str], IPv4If | None]) -> IPv4If:
    """The address `method` picks (pure apart from `route_source`)."""
    method = (method or DEFAULT_METHOD).strip()
    usable = [i for i in interfaces if i.up and i.addresses]
    kind, _, arg = method.partition("=")
    if kind == "default-route":
        for iface in usable:
            if iface.name == default_iface:
                return iface.addresses[0]
        raise AutodetectError(
            "no IPv4 address on the default-route interface "
            f"({default_iface or 'there is no default route'}); set IP_AUTODETECTION_METHOD "
            "(interface=REGEX, can-reach=ADDR) or --ip")
    if kind == "first-found":
        return _first(usable, lambda name: not EXCLUDED.match(name), method)
    if kind == "interface":
        patterns = _patterns(arg, method)
        return _first(usable, lambda name: any(p.fullmatch(name) for p in patterns), method)
    if kind == "skip-interface":
        patterns = _patterns(arg, method)
        return _first(usable, lambda name: not EXCLUDED.match(name)
                      and not any(p.fullmatch(name) for p in patterns), method)
    if kind == "cidr":
        nets = [_network(text, method) for text in arg.split(",") if text.strip()]
        for iface in usable:
            for addr in iface.addresses:
                if any(addr.ip in net for net in nets):
                    return addr
        raise AutodetectError(f"{method}: no interface has an address inside {arg}")
    if kind == "can-reach":
        target = arg.strip()
        try:
            ipaddress.IPv4Address(target)
        except ValueError:
            raise AutodetectError(f"{method}: {target!r} is not an IPv4 address") from None
        found = route_source(target)
        if found is None:
            raise AutodetectError(f"{method}: the kernel has no route to {target}")
        return found
    return explicit(method)


def explicit(text: str) -> IPv4If:
    try:
        addr = ipaddress.ip_interface(text if "/" in text else f"{text}/32")
    except ValueError:
        raise AutodetectError(
            f"{text!r} is neither an IPv4 address nor an autodetection method (default-route, "
            "first-found, interface=REGEX, skip-interface=REGEX, can-reach=ADDR, cidr=CIDR)"
        ) from None
    if not isinstance(addr, IPv4If):
        raise AutodetectError(f"{text}: only IPv4 BGP addresses are supported")
    return addr


def _first(usable: Sequence[HostInterface], wanted: Callable[[str], bool], method: str
           ) -> IPv4If:
    for iface in usable:
        if wanted(iface.name):
            return iface.addresses[0]
    names = ", ".join(i.name for i in usable) or "none with an IPv4 address"
    raise AutodetectError(f"{method}: no matching interface (have: {names})")


def _patterns(arg: str, method: str) -> list[re.Pattern[str]]:
    try:
        patterns = [re.compile(p.strip()) for p in arg.split(",") if p.strip()]
    except re.error as e:
        raise AutodetectError(f"{method}: bad regex: {e}") from None
    if not patterns:
        raise AutodetectError(f"{method}: give a regex, e.g. interface=eth.*")
    return patterns


def _network(text: str, method: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AutodetectError(f"{method}: {text!r} is not a CIDR") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise AutodetectError(f"{method}: {text} is not IPv4")
    return net


# -- reading the host (I/O) -------------------------------------------------------------------


def read_host() -> tuple[list[HostInterface], str | None, Callable[[str], IPv4If | None]]:
    """Interfaces with their global IPv4 addresses, the default-route interface, and a
    route-source lookup, from the kernel of the caller's network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        names = {link["index"]: (link.get_attr("IFLA_IFNAME"), bool(link["flags"] & 1))
                 for link in ipr.get_links()}
        addrs: dict[int, list[IPv4If]] = {}
        for msg in ipr.get_addr(family=2):
            if msg["scope"] != 0:  # global only: no 127/8, no link-local
                continue
            addrs.setdefault(msg["index"], []).append(
                ipaddress.IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"))
        default_iface = None
        for route in ipr.get_default_routes(family=2, table=254):
            oif = route.get_attr("RTA_OIF")
            if oif in names:
                default_iface = names[oif][0]
                break
    interfaces = [HostInterface(name, tuple(addrs.get(index, ())), up)
                  for index, (name, up) in sorted(names.items())]

    def route_source(target: str) -> IPv4If | None:
        with IPRoute() as ipr:
            try:
                routes = ipr.route("get", dst=target)
            except Exception:  # no route: unreachable
                return None
        for route in routes:
            src = route.get_attr("RTA_PREFSRC")
            if src:
                for iface in interfaces:
                    for addr in iface.addresses:
                        if str(addr.ip) == src:
                            return addr
                return ipaddress.IPv4Interface(f"{src}/32")
        return None

    return interfaces, default_iface, route_source


def detect(method: str) -> IPv4If:
    interfaces, default_iface, route_source = read_host()
    return choose(method, interfaces, default_iface, route_source)

"""tabby-ipam's netconf: calico-ipam's fields, Tabby's gateway/routes extension, the requested
addresses and the node name (pure, except `determine_nodename`, which reads a file).

Every malformed field is a CNI error with code 7 (INVALID_CONFIG) that names the field.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections import namedtuple

from cni import spec
from cni.spec import CNIError

# kept out of the VERSION probe's path, as in cni.ipam_plugin: typing is not imported at run time
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

NODENAME_FILE = "/var/lib/calico/nodename"
LOCK_FILE = "/var/run/calico/ipam.lock"  # calico-ipam's default: the two never race on a node
_LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "fatal": 50,
               "panic": 50}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# -- the netconf (pure) -------------------------------------------------------------------------


class PluginConf(namedtuple("PluginConf", [
    "network", "assign_ipv4", "assign_ipv6", "ipv4_pools", "ipv6_pools", "gateways", "routes",
    "nodename", "nodename_file", "hostname", "log_level", "log_file_path", "lock_file",
])):
    """The netconf fields tabby-ipam uses; `gateways` and `routes` are Tabby's extension,
    `hostname` calico's deprecated fallback after the nodename file."""

    __slots__ = ()
    network: str
    assign_ipv4: bool
    assign_ipv6: bool
    ipv4_pools: tuple[str, ...]
    ipv6_pools: tuple[str, ...]
    gateways: tuple[str, ...]  # at most one per family
    routes: tuple[dict[str, str], ...]
    nodename: str
    nodename_file: str
    hostname: str
    log_level: int
    log_file_path: str
    lock_file: str


def parse_conf(config: Mapping[str, Any]) -> PluginConf:
    """calico-ipam's fields from the netconf; code 7 naming the field for anything malformed."""
    ipam = config.get("ipam", {})
    if not isinstance(ipam, dict):
        raise _bad("ipam", "must be an object")
    level = _text(config, "log_level").lower()
    conf = PluginConf(
        network=str(config["name"]),
        assign_ipv4=_flag(ipam, "assign_ipv4", True),
        assign_ipv6=_flag(ipam, "assign_ipv6", False),
        ipv4_pools=_pools(ipam, "ipv4_pools", 4),
        ipv6_pools=_pools(ipam, "ipv6_pools", 6),
        gateways=_gateways(ipam.get("gateway")),
        routes=_routes(ipam.get("routes")),
        nodename=_text(config, "nodename").strip(),
        nodename_file=_text(config, "nodename_file") or NODENAME_FILE,
        hostname=_text(config, "hostname").strip(),
        log_level=_LOG_LEVELS.get(level, 20),  # calico-ipam logs at info unless told otherwise
        log_file_path=_text(config, "log_file_path"),
        lock_file=_text(config, "ipam_lock_file") or LOCK_FILE,
    )
    return conf


def _bad(path: str, problem: str, hint: str = "") -> CNIError:
    return CNIError(spec.INVALID_CONFIG, f"invalid network config: {path} {problem}", hint)


def _text(section: Mapping[str, Any], key: str) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(key, f"must be a string, not {json.dumps(value)}")
    return value


def _flag(ipam: Mapping[str, Any], key: str, default: bool) -> bool:
    """calico-ipam's flags are the strings "true"/"false"; JSON booleans are accepted too."""
    value = ipam.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(f"ipam.{key}", f"is {json.dumps(value)}", 'use "true" or "false"')


def _pools(ipam: Mapping[str, Any], key: str, family: int) -> tuple[str, ...]:
    """Pool names or CIDRs; a CIDR of the other family is an error, as in calico-ipam."""
    value = ipam.get(key) or []
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise _bad(f"ipam.{key}", "must be a list of IP pool names or CIDRs")
    for pool in value:
        try:
            net = ipaddress.ip_network(pool, strict=False)
        except ValueError:
            continue  # a pool name; the allocator resolves it
        if net.version != family:
            raise _bad(f"ipam.{key}", f"lists {pool}, which is not an IPv{family} CIDR")
    return tuple(value)


def _gateways(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else (value or [])
    if not isinstance(items, list):
        raise _bad("ipam.gateway", "must be an address or a list of addresses")
    families: dict[int, str] = {}
    for item in items:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise _bad("ipam.gateway", f"has {json.dumps(item)}, not an IP address") from None
        if ip.version in families:
            raise _bad("ipam.gateway", f"has two IPv{ip.version} addresses; give one per family")
        families[ip.version] = str(ip)
    return tuple(families.values())


def _routes(value: Any) -> tuple[dict[str, str], ...]:
    hint = 'e.g. [{"dst": "0.0.0.0/0"}]'
    if not isinstance(value, list | None):
        raise _bad("ipam.routes", "must be a list of routes", hint)
    out = []
    for i, route in enumerate(value or []):
        if not isinstance(route, dict) or set(route) - {"dst", "gw"}:
            raise _bad(f"ipam.routes[{i}]", "must be an object with dst and optionally gw", hint)
        try:
            ipaddress.ip_network(route.get("dst"), strict=False)
            if "gw" in route:
                ipaddress.ip_address(route["gw"])
        except (TypeError, ValueError):
            raise _bad(f"ipam.routes[{i}]", f"is {json.dumps(route)}: dst must be a CIDR and "
                       "gw an address", hint) from None
        out.append(dict(route))
    return tuple(out)


def requested_ips(config: Mapping[str, Any], args: spec.CniArgs) -> tuple[IPAddress, ...]:
    """The addresses the runtime asks for, at most one per family.

    runtimeConfig `ips` wins over args `cni.ips`, which wins over CNI_ARGS `IP=`
    (CONVENTIONS.md: a plugin that understands `args` ignores the CNI_ARGS equivalent).
    """
    runtime = config.get("runtimeConfig") or {}
    extra = config.get("args") or {}
    cni_args = extra.get("cni") if isinstance(extra, dict) else None
    sources: list[tuple[str, Any, int]] = [
        ("runtimeConfig.ips", runtime.get("ips") if isinstance(runtime, dict) else None,
         spec.INVALID_CONFIG),
        ("args.cni.ips", cni_args.get("ips") if isinstance(cni_args, dict) else None,
         spec.INVALID_CONFIG),
        ("CNI_ARGS IP", list(args.ips), spec.INVALID_ENVIRONMENT),
    ]
    for source, value, code in sources:
        if value:
            return _parse_ips(source, value, code)
    return ()


def _parse_ips(source: str, value: Any, code: int) -> tuple[IPAddress, ...]:
    if not isinstance(value, list):
        raise CNIError(code, f"{source} must be a list of addresses")
    out: dict[int, IPAddress] = {}
    for text in value:
        try:
            ip = ipaddress.ip_interface(text).ip if isinstance(text, str) else None
        except ValueError:
            ip = None
        if ip is None:
            raise CNIError(code, f"{source}: {text!r} is not an IP address",
                           "give addresses as ip or ip/prefix, e.g. 10.244.0.5")
        if ip.version in out and out[ip.version] != ip:
            raise CNIError(code, f"{source} asks for two IPv{ip.version} addresses",
                           "a workload gets at most one address per family")
        out[ip.version] = ip
    return tuple(out[v] for v in sorted(out))


# -- host environment (I/O) ---------------------------------------------------------------------


def determine_nodename(conf: PluginConf) -> str:
    """calico-ipam's order: nodename, the nodename file, the deprecated hostname, the OS's."""
    import socket

    if conf.nodename:
        return conf.nodename
    with contextlib.suppress(OSError):
        with open(conf.nodename_file, encoding="utf-8") as f:
            name = f.read().strip()
        if name:
            return name
    return conf.hostname or socket.gethostname()

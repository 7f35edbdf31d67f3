"""Validation and defaulting of projectcalico.org/v3 resources (pure: no I/O).

`validate(obj)` checks a manifest the way Calico's API layer does in etcd mode (libcalico-go's
v3 validator, the CEL rules and defaults of the CRD schemas, and the client's write-time
defaulting) and returns a new, normalised copy with Calico's defaults filled in. Every problem is
reported at once with the path of the field that holds it, so one `apply` shows all that is
wrong with a manifest.

Normalisations (what Calico stores, so readers see one form): IPPool CIDRs in canonical form,
numeric strings in protocol/port/AS-number fields as integers, `"80:80"` as `80`, endpoint-port
protocol names in Calico's case, JSON nulls dropped (Go's decoder ignores them).
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from datastore.errors import Problems, ValidationError
from datastore.kinds import CALICO_API, CALICO_KINDS, Kind
from datastore.selector import SelectorError
from datastore.selector import parse as parse_selector

__all__ = [
    "ValidationError",
    "default_policy_types",
    "validate",
    "validate_entity_rule",
    "validate_rule",
]

Check = Callable[[Any, str, Problems], Any]
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

LABEL_TIER = "projectcalico.org/tier"
LABEL_NAMESPACE = "projectcalico.org/namespace"
LABEL_ORCHESTRATOR = "projectcalico.org/orchestrator"
DEFAULT_TIER = "default"
DEFAULT_TIER_ORDER = 1_000_000
DEFAULT_ALLOW_PROFILE = "projectcalico-default-allow"

# ---- name and label formats (Kubernetes' and Calico's) -----------------------------------------

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
_DNS_LABEL_RE = re.compile(rf"{_DNS_LABEL}")
_DNS_SUBDOMAIN_RE = re.compile(_DNS_SUBDOMAIN)
# NetworkPolicy: a label, label.label, or the knp./ossg. prefixes kube-controllers writes.
_NP_NAME_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})?|(knp|ossg)\.default\.{_DNS_SUBDOMAIN}")
_GNP_NAME_RE = re.compile(rf"({_DNS_LABEL}\.)?{_DNS_LABEL}")
_QUALIFIED_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_IFACE_RE = re.compile(r"[a-zA-Z0-9_.-]{1,15}")
_CONTAINER_ID_RE = re.compile(r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?")
_NAMED_PORT_RE = re.compile(r"[a-zA-Z0-9_.-]{1,128}")
_PORT_NAME_RE = re.compile(r"[-a-z0-9]{1,15}")
_DIGITS_RE = re.compile(r"[0-9]+")
_PORT_RANGE_RE = re.compile(r"([0-9]+):([0-9]+)")
_PREFIX_LEN_RE = re.compile(r"[0-9]{1,3}")
# Go's time.ParseDuration syntax; FelixConfiguration's CRD is stricter (its own pattern).
_GO_DURATION_RE = re.compile(r"[-+]?(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)")
_FELIX_DURATION_RE = re.compile(r"([0-9]+(\.[0-9]+)?(ms|s|m|h))*")

MAX_NAME = 253
MAX_LABEL = 63
MAX_ANNOTATIONS_BYTES = 256 * 1024


def _too_long(s: str, limit: int) -> str | None:
    return f"is {len(s)} characters long; the limit is {limit}" if len(s) > limit else None


def dns_label_problem(s: str) -> str | None:
    """Why `s` is not a DNS-1123 label (namespaces, tiers), or None."""
    if not _DNS_LABEL_RE.fullmatch(s):
        return f"{s!r} must be lower-case letters, digits and '-', starting and ending alphanumeric"
    return _too_long(s, MAX_LABEL)


def dns_subdomain_problem(s: str) -> str | None:
    """Why `s` is not a DNS-1123 subdomain (most resource names), or None."""
    if not _DNS_SUBDOMAIN_RE.fullmatch(s):
        return (f"{s!r} must be lower-case letters, digits, '-' and '.', each dot-separated part"
                " starting and ending alphanumeric")
    return _too_long(s, MAX_NAME)


def qualified_name_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes qualified name (`[prefix/]name`, label keys), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return f"{key!r} has an empty prefix before '/'"
        if "/" in prefix:
            return f"{key!r} may contain at most one '/'"
        why = dns_subdomain_problem(prefix)
        if why:
            return f"prefix of {key!r}: {why}"
    if not name:
        return f"{key!r} has an empty name part"
    if not _QUALIFIED_RE.fullmatch(name):
        return (f"{key!r}: the name part must be letters, digits, '-', '_' and '.',"
                " starting and ending alphanumeric")
    return _too_long(name, MAX_LABEL)


def label_value_problem(value: str) -> str | None:
    if value and not _QUALIFIED_RE.fullmatch(value):
        return (f"{value!r} must be empty or letters, digits, '-', '_' and '.',"
                " starting and ending alphanumeric")
    return _too_long(value, MAX_LABEL)


def port_name_problem(name: str) -> str | None:
    """Kubernetes' IANA service name rule, which Calico applies to named ports."""
    ok = (_PORT_NAME_RE.fullmatch(name) and re.search("[a-z]", name) and "--" not in name
          and not name.startswith("-") and not name.endswith("-"))
    if ok:
        return None
    return (f"{name!r} is not a valid port name: at most 15 lower-case letters, digits and '-',"
            " with at least one letter and no leading, trailing or double '-'")


# ---- paths and generic checks -------------------------------------------------------------------


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _idx(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _key(path: str, key: str) -> str:
    return f'{path}["{key}"]'


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                         type(value).__name__)


def _has_problem(p: Problems, path: str) -> bool:
    """Whether `path` (or something under it) was already reported, to avoid follow-on noise."""
    return any(q == path or q.startswith((path + ".", path + "[")) for q, _ in p.items)


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _items(value: Any) -> list[Any]:
    """A list field's items, or none if it is not a list (already reported)."""
    return value if isinstance(value, list) else []


def _is_in(value: Any, choices: Any) -> bool:
    """Membership that tolerates unhashable (already reported) values."""
    return isinstance(value, str | int) and value in choices


def _fields(obj: Any, fields: Mapping[str, Check], path: str, p: Problems,
            hints: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Check a mapping field by field and return the normalised copy; unknown fields are errors.

    A null value is dropped as if absent, as Go's JSON decoder does.
    """
    if not isinstance(obj, dict):
        p.add(path, f"must be a mapping, not {_type_name(obj)}")
        return None
    out: dict[str, Any] = {}
    for key, value in obj.items():
        check = fields.get(key)
        if check is None:
            hint = (hints or {}).get(key) or _suggest(str(key), fields)
            p.add(_at(path, str(key)), f"unknown field {key!r}{hint}")
        elif value is not None:
            out[key] = check(value, _at(path, key), p)
    return out


def _struct(fields: Mapping[str, Check]) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        out = _fields(value, fields, path, p)
        return value if out is None else out
    return check


def _anything(value: Any, path: str, p: Problems) -> Any:
    return value


def _string(value: Any, path: str, p: Problems) -> Any:
    if not isinstance(value, str):
        p.add(path, f"must be a string, not {_type_name(value)}")
    return value


def _boolean(value: Any, path: str, p: Problems) -> Any:
    if not isinstance(value, bool):
        p.add(path, f"must be true or false, not {value!r}")
    return value


def _integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        if not _is_int(value):
            p.add(path, f"must be an integer, not {_type_name(value)}")
        elif (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"{'' if lo is None else lo}..{'' if hi is None else hi}"
            p.add(path, f"{value} is out of range {bounds}")
        return value
    return check


_INT = _integer()


def _number(value: Any, path: str, p: Problems) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        p.add(path, f"must be a number, not {_type_name(value)}")
    elif not math.isfinite(value):
        p.add(path, f"must be a finite number, not {value}")
    return value


def _enum(*allowed: str, ci: bool = False) -> Check:
    """One of `allowed`; `ci`: any case, or empty (Calico's `(?i)(A|B)?` patterns)."""
    lowered = {a.lower() for a in allowed}

    def check(value: Any, path: str, p: Problems) -> Any:
        if not isinstance(value, str):
            p.add(path, f"must be one of {', '.join(allowed)}, not {_type_name(value)}")
            return value
        if value in allowed or (ci and (value == "" or value.lower() in lowered)):
            return value
        p.add(path, f"{value!r} is not one of {', '.join(allowed)}{_suggest(value, allowed)}")
        return value
    return check


def _int_choice(*allowed: int) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        if not _is_int(value) or value not in allowed:
            p.add(path, f"must be {' or '.join(map(str, allowed))}, not {value!r}")
        return value
    return check


def _pattern(regex: re.Pattern[str], what: str) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        if not isinstance(value, str):
            p.add(path, f"must be a string, not {_type_name(value)}")
        elif not regex.fullmatch(value):
            p.add(path, f"{value!r} is not {what}")
        return value
    return check


def _named(problem: Callable[[str], str | None]) -> Check:
    """A string in the format `problem` checks; empty means unset (Calico's `omitempty`)."""
    def check(value: Any, path: str, p: Problems) -> Any:
        if not isinstance(value, str):
            p.add(path, f"must be a string, not {_type_name(value)}")
        elif value and (why := problem(value)):
            p.add(path, why)
        return value
    return check


_NAME = _named(dns_subdomain_problem)
_INTERFACE = _pattern(re.compile(r"\*|[a-zA-Z0-9_.-]{1,15}"),
                      "an interface name (1-15 of letters, digits, '_', '.', '-') or '*'")
_GO_DURATION = _pattern(_GO_DURATION_RE, "a duration such as 90s, 1m30s or 500ms")


def _list(item: Check, *, max_items: int | None = None, unique: bool = False) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        if not isinstance(value, list):
            p.add(path, f"must be a list, not {_type_name(value)}")
            return value
        if max_items is not None and len(value) > max_items:
            p.add(path, f"has {len(value)} items; the limit is {max_items}")
        out = [item(v, _idx(path, i), p) for i, v in enumerate(value)]
        if unique:
            _check_unique(out, path, p)
        return out
    return check


def _check_unique(items: list[Any], path: str, p: Problems) -> None:
    seen: list[Any] = []
    for i, v in enumerate(items):
        if v in seen:
            p.add(_idx(path, i), f"duplicate value {v!r}")
        seen.append(v)


_STR_LIST = _list(_string)
_NAME_LIST = _list(_NAME)


def _string_map(value: Any, path: str, p: Problems) -> Any:
    if not isinstance(value, dict):
        p.add(path, f"must be a mapping of strings, not {_type_name(value)}")
        return value
    for k, v in value.items():
        if not isinstance(v, str):
            p.add(_key(path, str(k)), f"must be a string, not {_type_name(v)}")
    return value


# ---- addresses ----------------------------------------------------------------------------------


def parse_ip(text: Any) -> IPAddr | None:
    """An IP address as Go's net.ParseIP reads it (no zones), or None."""
    if not isinstance(text, str) or "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_cidr(text: Any) -> tuple[IPAddr, IPNet] | None:
    """(address, network) of `addr/len` as Go's net.ParseCIDR reads it, or None.

    Unlike Python, Go takes no netmask form ("/255.0.0.0") and no bare address.
    """
    if not isinstance(text, str):
        return None
    addr, slash, plen = text.partition("/")
    ip = parse_ip(addr)
    if not slash or ip is None or not _PREFIX_LEN_RE.fullmatch(plen):
        return None
    try:
        return ip, ipaddress.ip_network(f"{ip}/{int(plen)}", strict=False)
    except ValueError:
        return None


def _cidr(*, strict: bool, bare_ip: bool, version: int | None = None) -> Check:
    """A CIDR; `strict`: no host bits; `bare_ip`: an address alone means /32 or /128."""
    def check(value: Any, path: str, p: Problems) -> Any:
        if not isinstance(value, str):
            p.add(path, f"must be a CIDR string, not {_type_name(value)}")
            return value
        parsed = parse_cidr(value)
        if parsed is None and bare_ip and (ip := parse_ip(value)) is not None:
            parsed = ip, ipaddress.ip_network(ip)
        if parsed is None:
            hint = f"; write {value}/{32 if ':' not in value else 128}" if parse_ip(value) else ""
            p.add(path, f"{value!r} is not a valid CIDR{hint}")
        elif version is not None and parsed[0].version != version:
            p.add(path, f"{value!r} is not an IPv{version} address")
        elif strict and parsed[0] != parsed[1].network_address:
            p.add(path, f"{value!r} has host bits set (did you mean {parsed[1]}?)")
        return value
    return check


def _ip(version: int | None = None) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        ip = parse_ip(value)
        if ip is None:
            p.add(path, f"{value!r} is not a valid IP address")
        elif version is not None and ip.version != version:
            p.add(path, f"{value!r} is not an IPv{version} address")
        return value
    return check


def is_mac(text: Any) -> bool:
    """Whether `text` is a hardware address in a form Go's net.ParseMAC takes (EUI-48/64, IB)."""
    if not isinstance(text, str):
        return False
    for sep, width, counts in ((":", 2, (6, 8, 20)), ("-", 2, (6, 8, 20)), (".", 4, (3, 4, 10))):
        parts = text.split(sep)
        if len(parts) in counts and all(re.fullmatch(f"[0-9A-Fa-f]{{{width}}}", x) for x in parts):
            return True
    return False


def _mac(value: Any, path: str, p: Problems) -> Any:
    if not is_mac(value):
        p.add(path, f"{value!r} is not a MAC address such as 0a:58:0a:41:0c:05")
    return value


def _as_network(text: Any) -> IPNet | None:
    """The network of a CIDR or of a bare address (/32, /128), or None."""
    parsed = parse_cidr(text)
    if parsed:
        return parsed[1]
    ip = parse_ip(text)
    return ipaddress.ip_network(ip) if ip else None


def _net_version(text: Any) -> int | None:
    parsed = parse_cidr(text)
    return parsed[0].version if parsed else None


# ---- numbers-or-strings -------------------------------------------------------------------------

PROTOCOL_NAMES = ("TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite")
PORT_PROTOCOLS = frozenset({"TCP", "UDP", "SCTP", 6, 17, 132})
_ICMP_V4 = frozenset({"ICMP", 1})
_ICMP_V6 = frozenset({"ICMPv6", 58})


def _protocol(value: Any, path: str, p: Problems) -> Any:
    """A rule protocol: 1-255 or one of Calico's names, case-sensitive as Calico's validator."""
    if isinstance(value, str) and _DIGITS_RE.fullmatch(value) and int(value) <= 255:
        value = int(value)  # Calico stores numeric protocols as numbers
    if _is_int(value):
        if not 1 <= value <= 255:
            p.add(path, f"protocol number {value} is out of range 1..255")
    elif not isinstance(value, str):
        p.add(path, f"must be a protocol name or number, not {_type_name(value)}")
    elif value not in PROTOCOL_NAMES:
        exact = next((n for n in PROTOCOL_NAMES if n.lower() == value.lower()), None)
        hint = f" (names are case-sensitive: {exact!r})" if exact else ""
        p.add(path, f"unknown protocol {value!r}{hint}; use {', '.join(PROTOCOL_NAMES)} or 1..255")
    return value


def _endpoint_protocol(value: Any, path: str, p: Problems) -> Any:
    """An endpoint port's protocol: must carry ports; names take Calico's case ("tcp" → "TCP")."""
    if isinstance(value, str):
        value = next((n for n in PROTOCOL_NAMES if n.lower() == value.lower()), value)
    value = _protocol(value, path, p)
    if not _has_problem(p, path) and not _is_in(value, PORT_PROTOCOLS):
        p.add(path, f"protocol {value!r} has no ports; use TCP, UDP or SCTP")
    return value


def _port_number(text: str, value: Any, path: str, p: Problems) -> int | None:
    n = int(text)
    if not 1 <= n <= 65535:
        p.add(path, f"port {value!r} is out of range 1..65535")
        return None
    return n


def _port(value: Any, path: str, p: Problems) -> Any:
    """A rule port: a number, a "min:max" range or a named port (returns Calico's stored form)."""
    if _is_int(value):
        _port_number(str(value), value, path, p)
        return value
    if not isinstance(value, str):
        p.add(path, f"must be a port number, a 'min:max' range or a port name, not {value!r}")
        return value
    if _DIGITS_RE.fullmatch(value):
        return _port_number(value, value, path, p) or value
    if m := _PORT_RANGE_RE.fullmatch(value):
        lo, hi = (int(g) for g in m.groups())
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            p.add(path, f"port range {value!r} is out of range 1..65535")
        elif lo > hi:
            p.add(path, f"port range {value!r} ends before it starts")
        return lo if lo == hi else value
    if not _NAMED_PORT_RE.fullmatch(value):
        p.add(path, f"{value!r} is not a port number, 'min:max' range or port name")
    elif why := port_name_problem(value):
        p.add(path, why)
    return value


def is_named_port(port: Any) -> bool:
    return isinstance(port, str) and not _DIGITS_RE.fullmatch(port) and ":" not in port


def _as_number(lo: int) -> Check:
    """A BGP AS number: 32-bit integer or "a.b" asdot; stored as an integer."""
    def check(value: Any, path: str, p: Problems) -> Any:
        n = _parse_as_number(value)
        if n is None:
            p.add(path, f"{value!r} is not an AS number (an integer or asdot such as 1.10)")
            return value
        if not lo <= n <= 0xFFFFFFFF:
            p.add(path, f"AS number {n} is out of range {lo}..4294967295")
        return n
    return check


def _parse_as_number(value: Any) -> int | None:
    if _is_int(value):
        return value
    if not isinstance(value, str):
        return None
    if _DIGITS_RE.fullmatch(value):
        return int(value)
    hi, dot, lo = value.partition(".")
    asdot = dot and _DIGITS_RE.fullmatch(hi) and _DIGITS_RE.fullmatch(lo)
    if asdot and int(hi) <= 0xFFFF and int(lo) <= 0xFFFF:
        return (int(hi) << 16) + int(lo)
    return None


# ---- selectors ----------------------------------------------------------------------------------

_GLOBAL_RULE_ONLY = "global() can only be used in an EntityRule namespaceSelector"


def _selector(global_use: str | None = _GLOBAL_RULE_ONLY) -> Check:
    """A selector. `global_use` None: global() allowed, alone; else the reason it is not."""
    def check(value: Any, path: str, p: Problems) -> Any:
        if not isinstance(value, str):
            p.add(path, f"must be a selector string, not {_type_name(value)}")
            return value
        if len(value) > 1024:
            p.add(path, f"selector is {len(value)} characters long; the limit is 1024")
        try:
            sel = parse_selector(value)
        except SelectorError as e:
            p.add(path, str(e))
            return value
        if sel.uses_global and global_use is not None:
            p.add(path, global_use)
        elif sel.uses_global and not sel.is_global:
            p.add(path, "global() cannot be combined with other selectors")
        return value
    return check


_SELECTOR = _selector()


# ---- metadata -----------------------------------------------------------------------------------

_META_FIELDS: dict[str, Check] = {
    "name": _string,
    "namespace": _string,
    "labels": _anything,
    "annotations": _anything,
    "uid": _string,
    "creationTimestamp": _string,
    "resourceVersion": _anything,
    # Kubernetes bookkeeping that Calico's clients carry through and Tabby ignores.
    "generation": _anything,
    "finalizers": _anything,
    "ownerReferences": _anything,
    "managedFields": _anything,
    "deletionTimestamp": _anything,
    "deletionGracePeriodSeconds": _anything,
}


def _check_labels(labels: Any, path: str, p: Problems) -> None:
    if not isinstance(labels, dict):
        p.add(path, f"must be a mapping of strings, not {_type_name(labels)}")
        return
    for k, v in labels.items():
        if not isinstance(k, str) or (why := qualified_name_problem(k)):
            p.add(_key(path, str(k)), f"invalid label key: {why if isinstance(k, str) else k}")
        if not isinstance(v, str):
            p.add(_key(path, str(k)), f"label values must be strings (quote {v!r})")
        elif why := label_value_problem(v):
            p.add(_key(path, k), f"invalid label value: {why}")


def _check_annotations(annotations: Any, path: str, p: Problems) -> None:
    if not isinstance(annotations, dict):
        p.add(path, f"must be a mapping of strings, not {_type_name(annotations)}")
        return
    size = 0
    for k, v in annotations.items():
        # Kubernetes checks annotation keys lower-cased: upper case is allowed there.
        if not isinstance(k, str) or (why := qualified_name_problem(k.lower())):
            p.add(_key(path, str(k)), f"invalid annotation key: {why if isinstance(k, str) else k}")
        if not isinstance(v, str):
            p.add(_key(path, str(k)), f"annotation values must be strings (quote {v!r})")
        size += len(str(k)) + len(str(v))
    if size > MAX_ANNOTATIONS_BYTES:
        p.add(path, f"annotations total {size} bytes; the limit is {MAX_ANNOTATIONS_BYTES}")


def _name_problem(kind: str, name: str) -> str | None:
    """Calico's per-kind name rules."""
    if kind == "Tier":
        return dns_label_problem(name)
    if why := dns_subdomain_problem(name):
        return why
    if kind == "NetworkPolicy" and not _NP_NAME_RE.fullmatch(name):
        return (f"{name!r}: a NetworkPolicy name is a DNS label with at most one '.'"
                " (or a knp.default./ossg.default. name)")
    if kind == "GlobalNetworkPolicy" and not _GNP_NAME_RE.fullmatch(name):
        return f"{name!r}: a GlobalNetworkPolicy name is a DNS label with at most one '.'"
    if kind == "ClusterInformation" and name != "default":
        return f"{name!r}: the only ClusterInformation is named 'default'"
    if kind == "Profile" and name == DEFAULT_ALLOW_PROFILE:
        return f"{name!r} is built in (allow all) and cannot be written"
    return None


def _check_metadata(meta: dict[str, Any], kind: Kind, default_ns: str, p: Problems) -> None:
    """Check `meta` in place: names, namespace scope, labels and annotations."""
    name = meta.get("name")
    if isinstance(name, str) and name:
        if why := _name_problem(kind.name, name):
            p.add("metadata.name", why)
    elif kind.name != "WorkloadEndpoint" and not _has_problem(p, "metadata.name"):
        p.add("metadata.name", "required")
    _check_namespace(meta, kind, default_ns, p)
    if "labels" in meta:
        _check_labels(meta["labels"], "metadata.labels", p)
    if "annotations" in meta:
        _check_annotations(meta["annotations"], "metadata.annotations", p)
    if _is_int(meta.get("resourceVersion")):
        meta["resourceVersion"] = str(meta["resourceVersion"])


def _check_namespace(meta: dict[str, Any], kind: Kind, default_ns: str, p: Problems) -> None:
    ns = meta.get("namespace")
    if not kind.namespaced:
        if ns:
            p.add("metadata.namespace", f"{kind.name} is cluster-scoped: remove the namespace")
        meta.pop("namespace", None)
        return
    if not ns:
        meta["namespace"] = ns = default_ns
    if isinstance(ns, str) and (why := dns_label_problem(ns)):
        p.add("metadata.namespace", why)


# ---- rules --------------------------------------------------------------------------------------


def _not_nets_item(value: Any, path: str, p: Problems) -> Any:
    value = _cidr(strict=True, bare_ip=False)(value, path, p)
    parsed = None if _has_problem(p, path) else parse_cidr(value)
    if parsed and parsed[1].prefixlen == 0:
        p.add(path, f"{value!r} in notNets matches everything, so the rule could never match")
    return value


_RULE_NET = _cidr(strict=True, bare_ip=False)

_ENTITY_FIELDS: dict[str, Check] = {
    "nets": _list(_RULE_NET, max_items=256, unique=True),
    "notNets": _list(_not_nets_item, max_items=256, unique=True),
    "selector": _SELECTOR,
    "notSelector": _SELECTOR,
    "namespaceSelector": _selector(None),
    "ports": _list(_port, max_items=50),
    "notPorts": _list(_port, max_items=50),
    "serviceAccounts": _struct({"names": _list(_string, unique=True), "selector": _SELECTOR}),
    "services": _struct({"name": _NAME, "namespace": _NAME}),
}


def validate_entity_rule(entity: Any, path: str, problems: Problems) -> dict[str, Any]:
    """Check a rule's `source` / `destination`; returns the normalised copy."""
    out = _fields(entity, _ENTITY_FIELDS, path, problems)
    if out is None:
        return entity if isinstance(entity, dict) else {}
    if "services" in out:
        _check_services_match(out, path, problems)
    return out


def _check_services_match(entity: dict[str, Any], path: str, p: Problems) -> None:
    """A `services` match stands alone: it names its own endpoints."""
    if isinstance(entity["services"], dict) and not entity["services"].get("name"):
        p.add(_at(path, "services.name"), "required: the name of a Kubernetes Service")
    for other in ("selector", "notSelector", "namespaceSelector", "nets", "notNets",
                  "serviceAccounts"):
        if entity.get(other):
            p.add(_at(path, other), "cannot be combined with services in the same rule")


def _icmp(value: Any, path: str, p: Problems) -> Any:
    out = _fields(value, {"type": _integer(0, 254), "code": _integer(0, 255)}, path, p)
    if out is not None and "code" in out and "type" not in out:
        p.add(_at(path, "code"), "an ICMP code needs an ICMP type")
    return value if out is None else out


def _http_path(value: Any, path: str, p: Problems) -> Any:
    out = _fields(value, {"exact": _string, "prefix": _string}, path, p)
    if out is None:
        return value
    if "exact" in out and "prefix" in out:
        p.add(path, "set either exact or prefix, not both")
    text = out.get("exact") or out.get("prefix")
    if not text:
        p.add(path, "one of exact or prefix is required")
    elif isinstance(text, str) and (not text.startswith("/") or re.search("[? #]", text)):
        p.add(path, f"{text!r} must start with '/' and contain no '?', '#' or space")
    return out


_HTTP = _struct({
    "methods": _list(_string, max_items=20, unique=True),
    "paths": _list(_http_path, max_items=20),
})

_RULE_FIELDS: dict[str, Check] = {
    "action": _enum("Allow", "Deny", "Log", "Pass"),
    "ipVersion": _int_choice(4, 6),
    "protocol": _protocol,
    "notProtocol": _protocol,
    "icmp": _icmp,
    "notICMP": _icmp,
    "source": validate_entity_rule,
    "destination": validate_entity_rule,
    "http": _HTTP,
    "metadata": _struct({"annotations": _anything}),
}


def validate_rule(rule: Any, path: str, problems: Problems, *, direction: str | None = None,
                  global_policy: bool = False) -> dict[str, Any]:
    """Check one policy/profile rule; returns the normalised copy.

    `direction` ("ingress"/"egress") enables the direction-specific checks (services, http);
    `global_policy` requires a namespace on service matches (a GNP has no namespace of its own).
    """
    out = _fields(rule, _RULE_FIELDS, path, problems)
    if out is None:
        return rule if isinstance(rule, dict) else {}
    if "action" not in out and not _has_problem(problems, _at(path, "action")):
        problems.add(_at(path, "action"), "required: one of Allow, Deny, Log, Pass")
    if isinstance(out.get("metadata"), dict) and "annotations" in out["metadata"]:
        _check_annotations(out["metadata"]["annotations"], _at(path, "metadata.annotations"),
                           problems)
    _check_rule_icmp(out, path, problems)
    _check_rule_ports(out, path, problems)
    _check_rule_nets(out, path, problems)
    _check_rule_http(out, path, problems, direction)
    _check_rule_services(out, path, problems, direction, global_policy)
    return out


def _check_rule_icmp(rule: dict[str, Any], path: str, p: Problems) -> None:
    if _has_problem(p, _at(path, "protocol")) or _has_problem(p, _at(path, "ipVersion")):
        return
    proto = rule.get("protocol")
    if "icmp" in rule and not _is_in(proto, _ICMP_V4 | _ICMP_V6):
        got = "no protocol is set" if proto is None else f"protocol is {proto!r}"
        p.add(_at(path, "icmp"), f"needs protocol ICMP or ICMPv6 ({got})")
    version = rule.get("ipVersion")
    for key in ("protocol", "notProtocol"):
        value = rule.get(key)
        if _is_in(value, _ICMP_V4) and version == 6:
            p.add(_at(path, key), "protocol ICMP needs ipVersion 4 (use ICMPv6 for IPv6)")
        elif _is_in(value, _ICMP_V6) and version == 4:
            p.add(_at(path, key), "protocol ICMPv6 needs ipVersion 6 (use ICMP for IPv4)")


def _check_rule_ports(rule: dict[str, Any], path: str, p: Problems) -> None:
    if _has_problem(p, _at(path, "protocol")):
        return
    proto = rule.get("protocol")
    for side in ("source", "destination"):
        entity = rule.get(side)
        if not isinstance(entity, dict):
            continue
        for key in ("ports", "notPorts"):
            ports = entity.get(key)
            if not isinstance(ports, list) or not ports:
                continue
            where = _at(_at(path, side), key)
            if proto is None and not all(is_named_port(x) for x in ports):
                p.add(where, "numeric ports and port ranges need protocol TCP, UDP or SCTP")
            elif proto is not None and not _is_in(proto, PORT_PROTOCOLS):
                p.add(where, f"ports need protocol TCP, UDP or SCTP, not {proto!r}")
            if side == "destination" and entity.get("services"):
                p.add(where, "cannot be combined with destination services")


def _check_rule_nets(rule: dict[str, Any], path: str, p: Problems) -> None:
    """One IP family per rule, and the one ipVersion names if it is set."""
    version = rule.get("ipVersion") if rule.get("ipVersion") in (4, 6) else None
    seen: set[int] = set()
    for side in ("source", "destination"):
        entity = rule.get(side)
        if not isinstance(entity, dict):
            continue
        for key in ("nets", "notNets"):
            nets = entity.get(key)
            if not isinstance(nets, list):
                continue
            where = _at(_at(path, side), key)
            here = {v for v in map(_net_version, nets) if v}
            if version and here - {version}:
                p.add(where, f"has IPv{(here - {version}).pop()} CIDRs but ipVersion is {version}")
            if len(here | seen) > 1:
                p.add(where, "a rule cannot mix IPv4 and IPv6 CIDRs")
            seen |= here


def _check_rule_http(rule: dict[str, Any], path: str, p: Problems, direction: str | None) -> None:
    if "http" not in rule:
        return
    where = _at(path, "http")
    if direction == "egress":
        p.add(where, "HTTP matches are not allowed in egress rules")
    if rule.get("action", "Allow") != "Allow":
        p.add(where, "HTTP matches are only valid on Allow rules")
    if not _is_in(rule.get("protocol", "TCP"), ("TCP", 6)):
        p.add(where, "HTTP matches need protocol TCP (or no protocol)")


def _check_rule_services(rule: dict[str, Any], path: str, p: Problems, direction: str | None,
                         global_policy: bool) -> None:
    # Services name the far end: the source of ingress traffic, the destination of egress.
    far, near = ("source", "destination") if direction == "ingress" else ("destination", "source")
    if direction is None:
        return
    near_entity = rule.get(near)
    if isinstance(near_entity, dict) and near_entity.get("services"):
        p.add(_at(_at(path, near), "services"), f"not allowed in {direction} rule {near}")
    far_entity = rule.get(far)
    services = far_entity.get("services") if isinstance(far_entity, dict) else None
    if global_policy and isinstance(services, dict) and not services.get("namespace"):
        p.add(_at(_at(path, far), "services.namespace"),
              "required in a GlobalNetworkPolicy (it has no namespace of its own)")


def _rules(direction: str, *, global_policy: bool = False) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        if not isinstance(value, list):
            p.add(path, f"must be a list of rules, not {_type_name(value)}")
            return value
        return [validate_rule(r, _idx(path, i), p, direction=direction,
                              global_policy=global_policy) for i, r in enumerate(value)]
    return check


# ---- policies -----------------------------------------------------------------------------------


def default_policy_types(spec: Mapping[str, Any]) -> list[str]:
    """The policy's `types`: as given, or Calico's default from which rules it has.

    No egress rules → [Ingress] (even with no ingress rules either); egress only → [Egress];
    both → [Ingress, Egress].
    """
    if isinstance(spec.get("types"), list) and spec["types"]:
        return list(spec["types"])
    if not spec.get("egress"):
        return ["Ingress"]
    if not spec.get("ingress"):
        return ["Egress"]
    return ["Ingress", "Egress"]


def _policy_fields(global_policy: bool) -> dict[str, Check]:
    fields: dict[str, Check] = {
        "tier": _named(dns_label_problem),
        "order": _number,
        "ingress": _rules("ingress", global_policy=global_policy),
        "egress": _rules("egress", global_policy=global_policy),
        "selector": _SELECTOR,
        "types": _list(_enum("Ingress", "Egress"), unique=True),
        "serviceAccountSelector": _SELECTOR,
        "performanceHints": _list(_enum("AssumeNeededOnEveryNode"), unique=True),
    }
    if global_policy:
        fields |= {"doNotTrack": _boolean, "preDNAT": _boolean, "applyOnForward": _boolean,
                   "namespaceSelector": _SELECTOR}
    return fields


_NP_FIELDS = _policy_fields(False)
_GNP_FIELDS = _policy_fields(True)
_GNP_ONLY = " (only a GlobalNetworkPolicy has it)"
_NP_HINTS = {k: _GNP_ONLY for k in ("doNotTrack", "preDNAT", "applyOnForward",
                                     "namespaceSelector")}


@dataclass
class _Ctx:
    """What a spec check may need to know about the object around it."""

    kind: Kind
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        name = self.meta.get("name")
        return name if isinstance(name, str) else ""

    def set_label(self, key: str, value: str) -> None:
        labels = self.meta.get("labels")
        if not isinstance(labels, dict):
            labels = self.meta["labels"] = {}
        labels[key] = value


def _policy_defaults(out: dict[str, Any], ctx: _Ctx) -> None:
    if not out.get("tier"):
        out["tier"] = DEFAULT_TIER
    out["types"] = default_policy_types(out)
    if isinstance(out["tier"], str):
        ctx.set_label(LABEL_TIER, out["tier"])


def _network_policy(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _NP_FIELDS, "spec", p, _NP_HINTS)
    if out is not None:
        _policy_defaults(out, ctx)
    return out


def _global_network_policy(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _GNP_FIELDS, "spec", p)
    if out is None:
        return None
    _policy_defaults(out, ctx)
    _check_host_policy_flags(out, p)
    return out


def _check_host_policy_flags(spec: dict[str, Any], p: Problems) -> None:
    """preDNAT / doNotTrack policies run outside the normal filter path (raw / mangle tables)."""
    pre_dnat, untracked = spec.get("preDNAT") is True, spec.get("doNotTrack") is True
    if pre_dnat and untracked:
        p.add("spec.preDNAT", "preDNAT and doNotTrack cannot both be true")
    if (pre_dnat or untracked) and spec.get("applyOnForward") is not True:
        which = "preDNAT" if pre_dnat else "doNotTrack"
        p.add("spec.applyOnForward", f"must be true when {which} is true")
    if pre_dnat and spec.get("egress"):
        p.add("spec.egress", "a preDNAT policy cannot have egress rules")
    if pre_dnat and "Egress" in _items(spec.get("types")):
        p.add("spec.types", "a preDNAT policy cannot have type Egress")


# ---- per-kind specs -----------------------------------------------------------------------------

_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))

_IPPOOL_FIELDS: dict[str, Check] = {
    "cidr": _string,
    "vxlanMode": _enum("Never", "Always", "CrossSubnet"),
    "ipipMode": _enum("Never", "Always", "CrossSubnet"),
    "natOutgoing": _boolean,
    "disabled": _boolean,
    "disableBGPExport": _boolean,
    "blockSize": _integer(0, 128),
    "nodeSelector": _selector("global() is not valid in an IPPool selector"),
    "namespaceSelector": _selector("global() is not valid in an IPPool selector"),
    "allowedUses": _list(_enum("Workload", "Tunnel", "LoadBalancer"), max_items=10, unique=True),
    "assignmentMode": _enum("Automatic", "Manual"),
}


def _ip_pool(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _IPPOOL_FIELDS, "spec", p)
    if out is None:
        return None
    net = _ip_pool_cidr(out, p)
    _ip_pool_defaults(out, net)
    if net is not None:
        _check_block_size(out, net, p)
    _check_encapsulation(out, net, p)
    _check_allowed_uses(out, p)
    return out


def _ip_pool_cidr(spec: dict[str, Any], p: Problems) -> IPNet | None:
    """Parse, check and normalise spec.cidr as Calico's client does: strictly masked."""
    cidr = spec.get("cidr")
    if not cidr:
        if not _has_problem(p, "spec.cidr"):
            p.add("spec.cidr", "required: the pool's CIDR, e.g. 10.65.0.0/16")
        return None
    parsed = parse_cidr(cidr)
    if parsed is None:
        if not _has_problem(p, "spec.cidr"):
            p.add("spec.cidr", f"{cidr!r} is not a valid CIDR such as 10.65.0.0/16")
        return None
    ip, net = parsed
    if ip != net.network_address:
        p.add("spec.cidr", f"{cidr!r} is not strictly masked (did you mean {net}?)")
    for ll in _LINK_LOCAL:
        if net.version == ll.version and net.overlaps(ll):
            p.add("spec.cidr", f"{cidr!r} overlaps the link-local range {ll}")
    spec["cidr"] = str(net)
    return net


def _ip_pool_defaults(spec: dict[str, Any], net: IPNet | None) -> None:
    if not spec.get("blockSize") and net is not None:
        spec["blockSize"] = 26 if net.version == 4 else 122
    for mode in ("ipipMode", "vxlanMode"):
        if not spec.get(mode):
            spec[mode] = "Never"
    if not spec.get("nodeSelector"):
        spec["nodeSelector"] = "all()"
    if not spec.get("allowedUses"):
        spec["allowedUses"] = ["Workload", "Tunnel"]
    spec.setdefault("assignmentMode", "Automatic")


def _check_block_size(spec: dict[str, Any], net: IPNet, p: Problems) -> None:
    size = spec["blockSize"]
    if _has_problem(p, "spec.blockSize"):
        return
    lo, hi = (20, 32) if net.version == 4 else (116, 128)
    if not lo <= size <= hi:
        p.add("spec.blockSize", f"{size} is out of range {lo}..{hi} for an IPv{net.version} pool")
    elif net.prefixlen > size and spec.get("disabled") is not True:
        p.add("spec.blockSize", f"the pool /{net.prefixlen} is smaller than one /{size} block;"
              " use a larger pool or a smaller block")


def _check_encapsulation(spec: dict[str, Any], net: IPNet | None, p: Problems) -> None:
    if _has_problem(p, "spec.ipipMode") or _has_problem(p, "spec.vxlanMode"):
        return
    ipip, vxlan = spec.get("ipipMode"), spec.get("vxlanMode")
    if ipip != "Never" and vxlan != "Never":
        p.add("spec.vxlanMode", "ipipMode and vxlanMode cannot both be enabled")
    if net is not None and net.version == 6 and ipip != "Never":
        p.add("spec.ipipMode", "IPIP is not supported on IPv6 pools (use vxlanMode)")


def _check_allowed_uses(spec: dict[str, Any], p: Problems) -> None:
    if _has_problem(p, "spec.allowedUses"):
        return
    uses = spec["allowedUses"]
    if "Tunnel" in uses and spec.get("namespaceSelector"):
        p.add("spec.namespaceSelector", "a pool with allowed use Tunnel cannot have one")
    if "LoadBalancer" not in uses:
        return
    if {"Workload", "Tunnel"} & set(uses):
        p.add("spec.allowedUses", "LoadBalancer cannot be combined with Workload or Tunnel")
    if spec.get("ipipMode") != "Never" or spec.get("vxlanMode") != "Never":
        p.add("spec.allowedUses", "a LoadBalancer pool cannot have IPIP or VXLAN enabled")
    if spec.get("disableBGPExport") is True:
        p.add("spec.disableBGPExport", "a LoadBalancer pool cannot disable BGP export")
    if spec.get("nodeSelector") != "all()":
        p.add("spec.nodeSelector", "a LoadBalancer pool must select all() nodes")


def _ip_reservation(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    cidrs = _list(_cidr(strict=False, bare_ip=False), unique=True)
    return _fields(spec, {"reservedCIDRs": cidrs}, "spec", p)


def _tier(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, {"order": _number, "defaultAction": _enum("Deny", "Pass")}, "spec", p)
    if out is None:
        return None
    out.setdefault("order", DEFAULT_TIER_ORDER)
    out.setdefault("defaultAction", "Deny")
    _check_builtin_tier(ctx.name, out, p)
    return out


# Calico's built-in tiers keep their place and default action.
_BUILTIN_TIERS = {"kube-admin": (1_000, "Pass"), "default": (DEFAULT_TIER_ORDER, "Deny"),
                  "kube-baseline": (10_000_000, "Pass")}


def _check_builtin_tier(name: str, spec: dict[str, Any], p: Problems) -> None:
    if name not in _BUILTIN_TIERS:
        return
    order, action = _BUILTIN_TIERS[name]
    if spec["order"] != order:
        p.add("spec.order", f"the {name!r} tier's order must be {order}")
    if spec["defaultAction"] != action:
        p.add("spec.defaultAction", f"the {name!r} tier's defaultAction must be {action}")


def _network_set(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    labels = ctx.meta.get("labels")
    if isinstance(labels, dict) and LABEL_NAMESPACE in labels:
        p.add(_key("metadata.labels", LABEL_NAMESPACE), "is reserved: Calico sets it itself")
    nets = _list(_cidr(strict=False, bare_ip=True))
    return _fields(spec, {"nets": nets}, "spec", p)


def _profile(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    fields = {"ingress": _rules("ingress"), "egress": _rules("egress"), "labelsToApply": _anything}
    out = _fields(spec, fields, "spec", p)
    if out is not None and "labelsToApply" in out:
        _check_labels(out["labelsToApply"], "spec.labelsToApply", p)
    return out


def _endpoint_port(value: Any, path: str, p: Problems) -> Any:
    fields = {"name": _named(port_name_problem), "protocol": _endpoint_protocol,
              "port": _integer(1, 65535)}
    out = _fields(value, fields, path, p)
    if out is None:
        return value
    for key in ("name", "protocol", "port"):
        if out.get(key) in (None, "") and not _has_problem(p, _at(path, key)):
            p.add(_at(path, key), "required")
    return out


def _host_endpoint(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    fields = {"node": _NAME, "interfaceName": _INTERFACE, "expectedIPs": _list(_ip()),
              "profiles": _NAME_LIST, "ports": _list(_endpoint_port)}
    out = _fields(spec, fields, "spec", p)
    if out is None:
        return None
    if not out.get("node") and not _has_problem(p, "spec.node"):
        p.add("spec.node", "required: the node this host endpoint belongs to")
    if not out.get("interfaceName") and not out.get("expectedIPs"):
        p.add("spec", "at least one of interfaceName or expectedIPs is required")
    return out


# ---- workload endpoints -------------------------------------------------------------------------


def _optional_host_ip(value: Any, path: str, p: Problems) -> Any:
    """Calico writes `hostIP: ""` for every port without one, so empty means unset."""
    if value == "":
        return value
    return _ip()(value, path, p)


def _wep_port(value: Any, path: str, p: Problems) -> Any:
    fields = {"name": _named(port_name_problem), "protocol": _endpoint_protocol,
              "port": _integer(1, 65535), "hostPort": _integer(0, 65535),
              "hostIP": _optional_host_ip}
    out = _fields(value, fields, path, p)
    if out is None:
        return value
    if "port" not in out and not _has_problem(p, _at(path, "port")):
        p.add(_at(path, "port"), "required")
    if "protocol" not in out:
        p.add(_at(path, "protocol"), "required")
    if not out.get("name") and not out.get("hostPort"):
        p.add(_at(path, "name"), "required unless hostPort is set")
    return out


def _single_address(value: Any, path: str, p: Problems) -> Any:
    value = _cidr(strict=True, bare_ip=True)(value, path, p)
    if not _has_problem(p, path) and "/" in value and not value.endswith(("/32", "/128")):
        p.add(path, f"{value!r}: a workload address must be a single /32 or /128")
    return value


_QOS_FIELDS = ("ingressBandwidth", "ingressBurst", "ingressPeakrate", "ingressMinburst",
               "egressBandwidth", "egressBurst", "egressPeakrate", "egressMinburst",
               "ingressPacketRate", "ingressPacketBurst", "egressPacketRate", "egressPacketBurst",
               "ingressMaxConnections", "egressMaxConnections")
_QOS: dict[str, Check] = {k: _integer(0) for k in _QOS_FIELDS} | {"dscp": _anything}

_WEP_FIELDS: dict[str, Check] = {
    "orchestrator": _NAME,
    "workload": _NAME,
    "node": _NAME,
    "containerID": _pattern(_CONTAINER_ID_RE, "a container ID (letters, digits and '-')"),
    "pod": _NAME,
    "endpoint": _NAME,
    "serviceAccountName": _NAME,
    "ipNetworks": _list(_single_address),
    "ipNATs": _list(_struct({"internalIP": _ip(), "externalIP": _ip()})),
    "ipv4Gateway": _ip(4),
    "ipv6Gateway": _ip(6),
    "profiles": _NAME_LIST,
    "interfaceName": _pattern(_IFACE_RE, "an interface name (1-15 of letters, digits, '_.-')"),
    "mac": _mac,
    "ports": _list(_wep_port),
    "allowSpoofedSourcePrefixes": _list(_cidr(strict=False, bare_ip=True)),
    "qosControls": _struct(_QOS),
}


def workload_endpoint_name(spec: Mapping[str, Any]) -> tuple[str | None, list[tuple[str, str]]]:
    """Calico's WEP name from its spec: `<node>-<orch>-<pod|containerID|workload>-<endpoint>`.

    Each segment has its dashes doubled. Returns (name or None, problems).
    """
    orch = spec.get("orchestrator")
    middle = {"k8s": "pod", "cni": "containerID", "libnetwork": "orchestrator"}.get(
        orch if isinstance(orch, str) else "", "workload")
    segments: list[str] = []
    problems: list[tuple[str, str]] = []
    for field_name in ("node", "orchestrator", middle, "endpoint"):
        value = spec.get(field_name)
        if not isinstance(value, str) or not value:
            problems.append((f"spec.{field_name}", "required to name the workload endpoint"))
        elif value.startswith("-") or value.endswith("-"):
            problems.append((f"spec.{field_name}", "must not begin or end with '-'"))
        else:
            segments.append(value.replace("-", "--"))
    return (None if problems else "-".join(segments)), problems


def _workload_endpoint(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _WEP_FIELDS, "spec", p)
    if out is None:
        return None
    if "interfaceName" not in out and not _has_problem(p, "spec.interfaceName"):
        p.add("spec.interfaceName", "required: the host side interface (e.g. cali1234567890a)")
    _check_wep_nats(out, p)
    expected, problems = workload_endpoint_name(out)
    for path, reason in problems:
        if not _has_problem(p, path):
            p.add(path, reason)
    if expected and not ctx.name:
        ctx.meta["name"] = expected
    elif expected and ctx.name != expected:
        p.add("metadata.name", f"{ctx.name!r} does not match the spec: expected {expected!r}")
    # Calico overrides these two labels on every write; selectors rely on them.
    ctx.set_label(LABEL_NAMESPACE, str(ctx.meta.get("namespace", "")))
    if isinstance(out.get("orchestrator"), str):
        ctx.set_label(LABEL_ORCHESTRATOR, out["orchestrator"])
    return out


def _check_wep_nats(spec: dict[str, Any], p: Problems) -> None:
    """Each NAT maps one of the endpoint's own addresses, within one IP family."""
    networks = [n for n in map(_as_network, _items(spec.get("ipNetworks"))) if n]
    for i, nat in enumerate(_items(spec.get("ipNATs"))):
        if not isinstance(nat, dict):
            continue
        inside, outside = parse_ip(nat.get("internalIP")), parse_ip(nat.get("externalIP"))
        path = _idx("spec.ipNATs", i)
        if inside and outside and inside.version != outside.version:
            p.add(path, "internalIP and externalIP must be the same IP version")
        if inside and not any(inside in n for n in networks if n.version == inside.version):
            p.add(_at(path, "internalIP"), f"{nat['internalIP']} is not in the ipNetworks")


# ---- nodes and BGP ------------------------------------------------------------------------------

_NODE_BGP_FIELDS: dict[str, Check] = {
    "asNumber": _as_number(1),
    "ipv4Address": _cidr(strict=False, bare_ip=True, version=4),
    "ipv6Address": _cidr(strict=False, bare_ip=True, version=6),
    "ipv4IPIPTunnelAddr": _ip(4),
    "routeReflectorClusterID": _ip(4),
}

_NODE_FIELDS: dict[str, Check] = {
    "bgp": _struct(_NODE_BGP_FIELDS),
    "ipv4VXLANTunnelAddr": _ip(4),
    "vxlanTunnelMACAddr": _mac,
    "ipv6VXLANTunnelAddr": _ip(6),
    "vxlanTunnelMACAddrV6": _mac,
    "orchRefs": _list(_struct({"nodeName": _string, "orchestrator": _string})),
    "wireguard": _struct({"interfaceIPv4Address": _ip(4), "interfaceIPv6Address": _ip(6)}),
    "addresses": _list(_struct({
        "address": _cidr(strict=True, bare_ip=True),
        "type": _enum("CalicoNodeIP", "InternalIP", "ExternalIP"),
    })),
    "interfaces": _list(_struct({"name": _NAME, "addresses": _STR_LIST})),
}

_NODE_STATUS = _struct({"wireguardPublicKey": _string, "wireguardPublicKeyV6": _string,
                        "podCIDRs": _STR_LIST})


def _node(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _NODE_FIELDS, "spec", p)
    if out is not None and out.get("bgp") == {}:
        p.add("spec.bgp", "must not be empty (remove it, or set ipv4Address/ipv6Address)")
    return out


def _secret_ref(value: Any, path: str, p: Problems) -> Any:
    ref = {"name": _string, "key": _string, "optional": _boolean}
    return _struct({"secretKeyRef": _struct(ref)})(value, path, p)


_SERVICE_CIDRS = _list(_struct({"cidr": _cidr(strict=True, bare_ip=True)}))
_STANDARD_COMMUNITY = re.compile(r"([0-9]+):([0-9]+)")
_LARGE_COMMUNITY = re.compile(r"([0-9]+):([0-9]+):([0-9]+)")


def community_problem(value: str) -> str | None:
    """Why `value` is not a BGP community (`aa:nn` 16-bit or `aa:nn:mm` 32-bit parts), or None."""
    if m := _STANDARD_COMMUNITY.fullmatch(value):
        bits = 16
    elif m := _LARGE_COMMUNITY.fullmatch(value):
        bits = 32
    else:
        return f"{value!r} is not a community such as 65001:100 or 65001:100:200"
    if any(int(g) >= 1 << bits for g in m.groups()):
        return f"{value!r}: each part must fit in {bits} bits"
    return None


_BGP_CONFIG_FIELDS: dict[str, Check] = {
    "logSeverityScreen": _enum("Trace", "Debug", "Info", "Warning", "Error", "Fatal", ci=True),
    "nodeToNodeMeshEnabled": _boolean,
    "asNumber": _as_number(1),
    "serviceLoadBalancerIPs": _SERVICE_CIDRS,
    "serviceExternalIPs": _SERVICE_CIDRS,
    "serviceClusterIPs": _SERVICE_CIDRS,
    "serviceLoadBalancerAggregation": _enum("Enabled", "Disabled"),
    "communities": _list(_struct({"name": _NAME, "value": _named(community_problem)}),
                         max_items=500),
    "prefixAdvertisements": _list(_struct({"cidr": _cidr(strict=True, bare_ip=True),
                                           "communities": _STR_LIST}), max_items=500),
    "listenPort": _integer(1, 65535),
    "nodeMeshPassword": _secret_ref,
    "nodeMeshMaxRestartTime": _GO_DURATION,
    "bindMode": _enum("None", "NodeIP"),
    "ignoredInterfaces": _list(_pattern(re.compile(r"[a-zA-Z0-9_.*-]{1,15}"),
                                        "an interface name or pattern")),
    "localWorkloadPeeringIPV4": _ip(4),
    "localWorkloadPeeringIPV6": _ip(6),
    "programClusterRoutes": _enum("Enabled", "Disabled", "EnabledIPIPOnly", "EnabledNoEncapOnly"),
    "ipv4NormalRoutePriority": _integer(1, 2147483646),
    "ipv6NormalRoutePriority": _integer(1, 2147483646),
}

# Cluster-wide settings that only the BGPConfiguration named "default" may carry.
_BGP_DEFAULT_ONLY = ("nodeToNodeMeshEnabled", "asNumber", "serviceLoadBalancerIPs",
                     "serviceExternalIPs", "serviceClusterIPs", "nodeMeshPassword",
                     "nodeMeshMaxRestartTime")


def _bgp_configuration(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _BGP_CONFIG_FIELDS, "spec", p)
    if out is None:
        return None
    out.setdefault("logSeverityScreen", "Info")
    out.setdefault("serviceLoadBalancerAggregation", "Enabled")
    if ctx.name != "default":
        for key in _BGP_DEFAULT_ONLY:
            if out.get(key) not in (None, []):
                p.add(_at("spec", key), "can only be set on the BGPConfiguration named 'default'")
    if out.get("nodeToNodeMeshEnabled") is False:
        for key in ("nodeMeshPassword", "nodeMeshMaxRestartTime"):
            if key in out:
                p.add(_at("spec", key), "cannot be set when nodeToNodeMeshEnabled is false")
    _check_communities(out, p)
    return out


def _check_communities(spec: dict[str, Any], p: Problems) -> None:
    communities = _items(spec.get("communities"))
    if communities and not spec.get("prefixAdvertisements"):
        p.add("spec.communities", "defined but not used by any prefixAdvertisements")
    names = {c["name"] for c in communities
             if isinstance(c, dict) and isinstance(c.get("name"), str)}
    for i, adv in enumerate(_items(spec.get("prefixAdvertisements"))):
        if not isinstance(adv, dict):
            continue
        path = _idx("spec.prefixAdvertisements", i)
        for key in ("cidr", "communities"):
            if not adv.get(key) and not _has_problem(p, _at(path, key)):
                p.add(_at(path, key), "required")
        for j, value in enumerate(_items(adv.get("communities"))):
            if isinstance(value, str) and value not in names and community_problem(value):
                p.add(_idx(_at(path, "communities"), j),
                      f"{value!r} is neither a community value nor a name in spec.communities")


def _peer_ip(value: Any, path: str, p: Problems) -> Any:
    if split_peer_ip(value) is None:
        p.add(path, f"{value!r} is not an IP, IPv4:port or [IPv6]:port")
    return value


def split_peer_ip(value: Any) -> tuple[IPAddr, int | None] | None:
    """(address, port or None) of a BGPPeer peerIP, or None if malformed."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"([0-9.]+):([0-9]+)|\[([0-9a-fA-F:.]+)\]:([0-9]+)", value)
    if not m:
        ip = parse_ip(value)
        return (ip, None) if ip else None
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    ip = parse_ip(host)
    if ip is None or not 1 <= int(port) <= 65535 or (m.group(1) and ip.version != 4):
        return None
    return ip, int(port)


_BGP_PEER_FIELDS: dict[str, Check] = {
    "node": _NAME,
    "nodeSelector": _selector("global() is not valid in a BGPPeer selector"),
    "peerIP": _peer_ip,
    "asNumber": _as_number(0),
    "localASNumber": _as_number(1),
    "peerSelector": _selector("global() is not valid in a BGPPeer selector"),
    "keepOriginalNextHop": _boolean,
    "nextHopMode": _enum("Auto", "Self", "Keep"),
    "password": _secret_ref,
    "sourceAddress": _enum("UseNodeIP", "None"),
    "maxRestartTime": _GO_DURATION,
    "keepaliveTime": _GO_DURATION,
    "numAllowedLocalASNumbers": _integer(0, 2147483647),
    "ttlSecurity": _integer(0, 255),
    "reachableBy": _ip(),
    "filters": _NAME_LIST,
    "localWorkloadSelector": _selector("global() is not valid in a BGPPeer selector"),
    "reversePeering": _enum("Auto", "Manual"),
}

# (a, b, reason): fields that cannot both be set.
_BGP_PEER_EXCLUSIVE = (
    ("node", "nodeSelector", "node and nodeSelector cannot both be set"),
    ("peerIP", "peerSelector", "peerIP and peerSelector cannot both be set"),
    ("peerSelector", "asNumber", "asNumber must be empty when peerSelector is set"),
    ("localWorkloadSelector", "peerIP", "peerIP must be empty when localWorkloadSelector is set"),
    ("localWorkloadSelector", "peerSelector",
     "peerSelector must be empty when localWorkloadSelector is set"),
    ("keepOriginalNextHop", "nextHopMode",
     "keepOriginalNextHop is deprecated: use nextHopMode alone"),
)


def _bgp_peer(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _BGP_PEER_FIELDS, "spec", p)
    if out is None:
        return None
    for a, b, reason in _BGP_PEER_EXCLUSIVE:
        if out.get(a) and out.get(b):
            p.add(_at("spec", b), reason)
    if out.get("localWorkloadSelector") and not out.get("asNumber"):
        p.add("spec.asNumber", "required when localWorkloadSelector is set")
    if out.get("reachableBy"):
        _check_reachable_by(out, p)
    return out


def _check_reachable_by(spec: dict[str, Any], p: Problems) -> None:
    peer = split_peer_ip(spec.get("peerIP"))
    gateway = parse_ip(spec["reachableBy"])
    if not spec.get("peerIP"):
        p.add("spec.reachableBy", "must be empty when peerIP is empty")
    elif peer and gateway and peer[0].version != gateway.version:
        p.add("spec.reachableBy", "reachableBy and peerIP must be the same IP version")


def _cluster_information(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    fields = {"clusterGUID": _string, "clusterType": _string, "calicoVersion": _string,
              "datastoreReady": _boolean, "variant": _string}
    return _fields(spec, fields, "spec", p)


# ---- FelixConfiguration -------------------------------------------------------------------------

_BOOL, _STR, _ANY = _boolean, _string, _anything
_DUR = _pattern(_FELIX_DURATION_RE, "a duration such as 90s, 1m30s or 500ms")
_LOG_LEVEL = _enum("Trace", "Debug", "Info", "Warning", "Error", "Fatal", ci=True)


def openstack_region_problem(region: str) -> str | None:
    # Felix names a namespace "openstack-region-<region>", which must stay a DNS label.
    return dns_label_problem(region) or _too_long(region, MAX_LABEL - len("openstack-region-"))


def _failsafe_port(value: Any, path: str, p: Problems) -> Any:
    fields = {"protocol": _enum("TCP", "UDP", "SCTP"), "port": _integer(0, 65535),
              "net": _cidr(strict=False, bare_ip=True)}
    out = _fields(value, fields, path, p)
    if out is not None and "protocol" not in out:
        p.add(_at(path, "protocol"), "required: TCP, UDP or SCTP")
    return value if out is None else out


def _numeric_port(value: Any, path: str, p: Problems) -> Any:
    value = _port(value, path, p)
    if is_named_port(value) and not _has_problem(p, path):
        p.add(path, "must be a port number or 'min:max' range, not a name")
    return value


def _route_table_range(lo: int, hi: int) -> Check:
    def check(value: Any, path: str, p: Problems) -> Any:
        out = _fields(value, {"min": _INT, "max": _INT}, path, p)
        if out is None or _has_problem(p, path):
            return value
        low, high = out.get("min", 0), out.get("max", 0)
        if not lo <= low <= high <= hi:
            p.add(path, f"must be a range min <= max within {lo}..{hi}")
        return out
    return check


_FELIX_FIELDS: dict[str, Check] = {
    "nodeSelector": _STR, "useInternalDataplaneDriver": _BOOL, "dataplaneDriver": _STR,
    "dataplaneWatchdogTimeout": _DUR, "ipv6Support": _BOOL, "routeRefreshInterval": _DUR,
    "interfaceRefreshInterval": _DUR, "iptablesRefreshInterval": _DUR,
    "iptablesPostWriteCheckInterval": _DUR, "iptablesLockProbeInterval": _DUR,
    "featureDetectOverride": _STR, "featureGates": _STR, "ipsetsRefreshInterval": _DUR,
    "maxIpsetSize": _INT, "iptablesBackend": _enum("Auto", "Legacy", "NFT", ci=True),
    "xdpRefreshInterval": _DUR, "netlinkTimeout": _DUR, "metadataAddr": _STR,
    "metadataPort": _INT, "openstackRegion": _named(openstack_region_problem),
    "interfacePrefix": _STR,
    "interfaceExclude": _STR, "chainInsertMode": _enum("Insert", "Append", ci=True),
    "defaultEndpointToHostAction": _enum("Drop", "Accept", "Return", ci=True),
    "iptablesFilterAllowAction": _enum("Accept", "Return", ci=True),
    "iptablesMangleAllowAction": _enum("Accept", "Return", ci=True),
    "iptablesFilterDenyAction": _enum("Drop", "Reject", ci=True),
    "logPrefix": _pattern(re.compile(r"[a-zA-Z0-9%: /_-]*"),
                          "a log prefix (letters, digits and '%: /_-')"),
    "logActionRateLimit": _pattern(re.compile(r"[1-9][0-9]{0,3}/(second|minute|hour|day)"),
                                   "a rate such as 10/second"),
    "logActionRateLimitBurst": _INT, "logFilePath": _STR, "logSeverityFile": _LOG_LEVEL,
    "logSeverityScreen": _LOG_LEVEL, "logSeveritySys": _LOG_LEVEL, "logDebugFilenameRegex": _STR,
    "ipipEnabled": _BOOL, "ipipMTU": _INT, "vxlanEnabled": _BOOL, "vxlanMTU": _INT,
    "vxlanMTUV6": _INT, "vxlanPort": _INT, "vxlanVNI": _INT,
    "allowVXLANPacketsFromWorkloads": _BOOL, "allowIPIPPacketsFromWorkloads": _BOOL,
    "reportingInterval": _DUR, "reportingTTL": _DUR, "endpointReportingEnabled": _BOOL,
    "endpointReportingDelay": _DUR, "endpointStatusPathPrefix": _STR, "iptablesMarkMask": _INT,
    "disableConntrackInvalidCheck": _BOOL, "healthEnabled": _BOOL, "healthHost": _STR,
    "healthPort": _INT,
    "healthTimeoutOverrides": _list(_struct({
        "name": _pattern(re.compile(r"[a-zA-Z0-9_ -]+"), "a health reporter name"),
        "timeout": _DUR})),
    "prometheusMetricsEnabled": _BOOL, "prometheusMetricsHost": _STR,
    "prometheusMetricsPort": _INT, "prometheusGoMetricsEnabled": _BOOL,
    "prometheusProcessMetricsEnabled": _BOOL, "prometheusWireGuardMetricsEnabled": _BOOL,
    "prometheusMetricsCAFile": _STR, "prometheusMetricsCertFile": _STR,
    "prometheusMetricsKeyFile": _STR,
    "prometheusMetricsClientAuth": _enum("RequireAndVerifyClientCert", "RequireAnyClientCert",
                                         "VerifyClientCertIfGiven", "NoClientCert"),
    "failsafeInboundHostPorts": _list(_failsafe_port),
    "failsafeOutboundHostPorts": _list(_failsafe_port),
    "kubeNodePortRanges": _list(_numeric_port, max_items=7),
    "policySyncPathPrefix": _STR, "usageReportingEnabled": _BOOL,
    "usageReportingInitialDelay": _DUR, "usageReportingInterval": _DUR,
    "natPortRange": _numeric_port, "natOutgoingAddress": _ip(),
    "natOutgoingExclusions": _enum("IPPoolsOnly", "IPPoolsAndHostIPs"),
    "deviceRouteSourceAddress": _ip(), "deviceRouteSourceAddressIPv6": _ip(),
    "deviceRouteProtocol": _INT, "removeExternalRoutes": _BOOL,
    "programClusterRoutes": _enum("Enabled", "Disabled", "EnabledIPIPOnly", "EnabledNoEncapOnly"),
    "ipForwarding": _enum("Enabled", "Disabled"),
    "externalNodesList": _list(_cidr(strict=False, bare_ip=True, version=4)),
    "debugMemoryProfilePath": _STR, "debugDisableLogDropping": _BOOL,
    "debugSimulateCalcGraphHangAfter": _DUR, "debugSimulateDataplaneHangAfter": _DUR,
    "debugSimulateDataplaneApplyDelay": _DUR, "debugHost": _STR,
    "debugPort": _integer(0, 65535), "iptablesNATOutgoingInterfaceFilter": _STR,
    "sidecarAccelerationEnabled": _BOOL, "xdpEnabled": _BOOL, "genericXDPEnabled": _BOOL,
    "nftablesMode": _enum("Disabled", "Enabled", "Auto"),
    "nftablesFlowTableOffload": _enum("All", "Disabled"),
    "nftablesFlowTableDataIfacePattern": _STR, "nftablesRefreshInterval": _DUR,
    "nftablesFilterAllowAction": _enum("Accept", "Return", ci=True),
    "nftablesMangleAllowAction": _enum("Accept", "Return", ci=True),
    "nftablesFilterDenyAction": _enum("Drop", "Reject", ci=True),
    "nftablesMarkMask": _INT, "bpfEnabled": _BOOL,
    "bpfOverlayHostSourceIP": _enum("TunnelAddress", "HostAddress"),
    "bpfDisableUnprivileged": _BOOL, "bpfJITHardening": _enum("Auto", "Strict"),
    "bpfLogLevel": _enum("Off", "Info", "Debug", ci=True),
    "bpfConntrackLogLevel": _enum("Off", "Debug"),
    "bpfConntrackMode": _enum("Auto", "Userspace", "BPFProgram"),
    "bpfConntrackTimeouts": _ANY, "bpfIPFragTimeout": _DUR, "bpfLogFilters": _string_map,
    "bpfCTLBLogFilter": _STR, "bpfDataIfacePattern": _STR, "bpfL3IfacePattern": _STR,
    "bpfConnectTimeLoadBalancingEnabled": _BOOL,
    "bpfConnectTimeLoadBalancing": _enum("TCP", "Enabled", "Disabled"),
    "bpfHostNetworkedNATWithoutCTLB": _enum("Enabled", "Disabled"),
    "bpfExternalServiceMode": _enum("Tunnel", "DSR", ci=True),
    "bpfDSROptoutCIDRs": _list(_cidr(strict=False, bare_ip=True)),
    "bpfExtToServiceConnmark": _integer(0, 4294967295),
    "bpfKubeProxyIptablesCleanupEnabled": _BOOL, "bpfKubeProxyMinSyncPeriod": _DUR,
    "bpfKubeProxyHealthzPort": _integer(0, 65535), "bpfPSNATPorts": _numeric_port,
    "bpfMapSizeNATFrontend": _INT, "bpfMapSizeNATBackend": _INT, "bpfMapSizeNATAffinity": _INT,
    "bpfMapSizeRoute": _INT, "bpfMapSizeConntrack": _INT, "bpfMapSizePerCpuConntrack": _INT,
    "bpfMapSizeConntrackScaling": _enum("Disabled", "DoubleIfFull", ci=True),
    "bpfMapSizeConntrackCleanupQueue": _integer(1), "bpfMapSizeIPSets": _INT,
    "bpfMapSizeIfState": _INT, "bpfHostConntrackBypass": _BOOL,
    "bpfIPFragmentReassemblyEnabled": _BOOL,
    "bpfEnforceRPF": _enum("Disabled", "Strict", "Loose", ci=True),
    "bpfPolicyDebugEnabled": _BOOL, "bpfForceTrackPacketsFromIfaces": _STR_LIST,
    "bpfDisableGROForIfaces": _STR,
    "bpfExcludeCIDRsFromNAT": _list(_cidr(strict=False, bare_ip=True)),
    "bpfExportBufferSizeMB": _INT, "istioAmbientMode": _enum("Enabled", "Disabled"),
    "istioDSCPMark": _ANY, "cgroupV2Path": _STR,
    "flowLogsPolicyEvaluationMode": _enum("None", "Continuous"),
    "bpfRedirectToPeer": _enum("Enabled", "Disabled"),
    "bpfAttachType": _enum("TC", "TCX", "Netkit"), "flowLogsFlushInterval": _DUR,
    "flowLogsCollectorDebugTrace": _BOOL, "flowLogsGoldmaneServer": _STR,
    "flowLogsLocalReporter": _enum("Disabled", "Enabled"),
    "bpfProfiling": _enum("Enabled", "Disabled"),
    "routeSource": _enum("WorkloadIPs", "CalicoIPAM", ci=True),
    "routeTableRanges": _list(_route_table_range(1, 0xFFFFFFFF)),
    "routeTableRange": _route_table_range(1, 250), "routeSyncDisabled": _BOOL,
    "ipv4NormalRoutePriority": _integer(1, 2147483646),
    "ipv4ElevatedRoutePriority": _integer(1, 2147483646),
    "ipv6NormalRoutePriority": _integer(1, 2147483646),
    "ipv6ElevatedRoutePriority": _integer(1, 2147483646),
    "liveMigrationRouteConvergenceTime": _DUR, "wireguardEnabled": _BOOL,
    "wireguardEnabledV6": _BOOL, "wireguardThreadingEnabled": _BOOL,
    "wireguardListeningPort": _integer(1, 65535), "wireguardListeningPortV6": _integer(1, 65535),
    "wireguardRoutingRulePriority": _integer(1, 32765), "wireguardInterfaceName": _INTERFACE,
    "wireguardInterfaceNameV6": _INTERFACE, "wireguardMTU": _INT, "wireguardMTUV6": _INT,
    "wireguardHostEncryptionEnabled": _BOOL, "wireguardKeepAlive": _DUR,
    "awsSrcDstCheck": _enum("DoNothing", "Enable", "Disable"),
    "serviceLoopPrevention": _enum("Drop", "Reject", "Disabled"),
    "workloadSourceSpoofing": _enum("Disabled", "Any"), "mtuIfacePattern": _STR,
    "floatingIPs": _enum("Enabled", "Disabled"),
    "localSubnetL2Reachability": _enum("Disabled", "PodsAndLoadBalancers"),
    "localSubnetL2ReachabilityRefreshInterval": _DUR,
    "windowsManageFirewallRules": _enum("Enabled", "Disabled"),
    "goGCThreshold": _integer(-1), "goMemoryLimitMB": _integer(-1), "goMaxProcs": _integer(-1),
    "requireMTUFile": _BOOL, "bpfMaglevMaxEndpointsPerService": _integer(1, 3000),
    "bpfMaglevMaxServices": _integer(1, 3000),
}


def _felix_configuration(spec: Any, ctx: _Ctx, p: Problems) -> dict[str, Any] | None:
    out = _fields(spec, _FELIX_FIELDS, "spec", p)
    if out is None:
        return None
    ranges = out.get("routeTableRanges")
    if isinstance(ranges, list) and not _has_problem(p, "spec.routeTableRanges"):
        tables = sum(r["max"] - r["min"] + 1 for r in ranges)
        if tables > 0xFFFF:
            p.add("spec.routeTableRanges", f"targets {tables} tables; the limit is 65535")
    _felix_defaults(out)
    return out


def _felix_defaults(spec: dict[str, Any]) -> None:
    """The defaults Calico's client and CRD schema write into every FelixConfiguration."""
    spec.setdefault("floatingIPs", "Disabled")
    spec.setdefault("nftablesMode", "Auto")
    spec.setdefault("nftablesFlowTableOffload", "Disabled")
    ctlb = spec.get("bpfConnectTimeLoadBalancingEnabled")
    if ctlb is None:
        spec.setdefault("bpfConnectTimeLoadBalancing", "TCP")
        spec.setdefault("bpfHostNetworkedNATWithoutCTLB", "Enabled")
    else:
        # The deprecated boolean wins over the newer fields, as in Calico's client.
        spec["bpfConnectTimeLoadBalancing"] = "Enabled" if ctlb is True else "Disabled"
        spec["bpfHostNetworkedNATWithoutCTLB"] = "Disabled"


# ---- the entry point ----------------------------------------------------------------------------

SpecCheck = Callable[[Any, _Ctx, Problems], dict[str, Any] | None]

_SPECS: dict[str, SpecCheck] = {
    "IPPool": _ip_pool,
    "IPReservation": _ip_reservation,
    "NetworkPolicy": _network_policy,
    "GlobalNetworkPolicy": _global_network_policy,
    "NetworkSet": _network_set,
    "GlobalNetworkSet": _network_set,
    "HostEndpoint": _host_endpoint,
    "WorkloadEndpoint": _workload_endpoint,
    "Profile": _profile,
    "Tier": _tier,
    "Node": _node,
    "BGPConfiguration": _bgp_configuration,
    "BGPPeer": _bgp_peer,
    "FelixConfiguration": _felix_configuration,
    "ClusterInformation": _cluster_information,
}

# Kinds that carry a status Calico writes; passed through.
_STATUS: dict[str, Check] = {"IPPool": _struct({"conditions": _anything}), "Node": _NODE_STATUS}

_KINDS_BY_NAME = {k.name: k for k in CALICO_KINDS}


def _resolve_kind(obj: dict[str, Any], p: Problems) -> Kind | None:
    api, kind_name = obj.get("apiVersion"), obj.get("kind")
    if api != CALICO_API:
        got = "missing" if api is None else repr(api)
        p.add("apiVersion", f"must be {CALICO_API} ({got})")
    if not isinstance(kind_name, str) or not kind_name:
        p.add("kind", "required")
        return None
    kind = _KINDS_BY_NAME.get(kind_name)
    if kind is None:
        p.add("kind", f"unknown kind {kind_name!r}{_suggest(kind_name, _KINDS_BY_NAME)}; known: "
              + ", ".join(sorted(_KINDS_BY_NAME)))
    return kind


def _subject(kind_name: str, meta: Any) -> str:
    meta = meta if isinstance(meta, dict) else {}
    name, ns = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        return kind_name
    return f"{kind_name} {ns}/{name}" if ns else f"{kind_name} {name}"


def validate(obj: Any, default_namespace: str = "default") -> dict[str, Any]:
    """Validate a projectcalico.org/v3 object; return a normalised copy with defaults applied.

    Raises ValidationError listing every problem as (field path, reason). `obj` is never changed.
    """
    if not isinstance(obj, dict):
        raise ValidationError([("", f"a resource must be a mapping, not {_type_name(obj)}")])
    p = Problems()
    kind = _resolve_kind(obj, p)
    subject = _subject(str(obj.get("kind") or "resource"), obj.get("metadata"))
    if kind is None:
        raise ValidationError(p.items, subject)
    out = _validate_known(obj, kind, default_namespace, p)
    p.raise_if_any(_subject(kind.name, out.get("metadata")))
    return out


def _validate_known(obj: dict[str, Any], kind: Kind, default_ns: str,
                    p: Problems) -> dict[str, Any]:
    fields: dict[str, Check] = {"apiVersion": _anything, "kind": _anything,
                                "metadata": _struct(_META_FIELDS), "spec": _anything}
    if kind.name in _STATUS:
        fields["status"] = _STATUS[kind.name]
    out = _fields(copy.deepcopy(obj), fields, "", p) or {}
    meta = out.get("metadata")
    if not isinstance(meta, dict):
        meta = out["metadata"] = {}
    _check_metadata(meta, kind, default_ns, p)
    spec = _SPECS[kind.name](out.get("spec", {}), _Ctx(kind, meta), p)
    if spec is not None:
        out["spec"] = spec
    return out

"""Field checkers shared by every kind's validation (pure).

A `Check` takes (value, field path, Problems), reports what is wrong at that path and returns the
normalised value. Here: path helpers, generic checkers (mappings, scalars, enums, lists), address
parsing and checks, selectors, labels and annotations, and the context a spec check receives.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from datastore.errors import Problems
from datastore.kinds import Kind
from datastore.selector import SelectorError
from datastore.selector import parse as parse_selector
from datastore.validation.names import (
    MAX_ANNOTATIONS_BYTES,
    dns_subdomain_problem,
    label_value_problem,
    qualified_name_problem,
)

Check = Callable[[Any, str, Problems], Any]
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

LABEL_TIER = "projectcalico.org/tier"
LABEL_NAMESPACE = "projectcalico.org/namespace"
LABEL_ORCHESTRATOR = "projectcalico.org/orchestrator"

_DIGITS_RE = re.compile(r"[0-9]+")
_PREFIX_LEN_RE = re.compile(r"[0-9]{1,3}")
# Go's time.ParseDuration syntax; FelixConfiguration's CRD is stricter (its own pattern).
_GO_DURATION_RE = re.compile(r"[-+]?(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)")


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


# ---- labels and annotations ---------------------------------------------------------------------


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


# ---- the object around a spec -------------------------------------------------------------------


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


SpecCheck = Callable[[Any, _Ctx, Problems], dict[str, Any] | None]

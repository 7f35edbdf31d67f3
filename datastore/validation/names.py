"""Name and label formats of Kubernetes and Calico (pure).

Each `*_problem` function says why a string is not in its format, or returns None.
"""

from __future__ import annotations

import re

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
_DNS_LABEL_RE = re.compile(rf"{_DNS_LABEL}")
_DNS_SUBDOMAIN_RE = re.compile(_DNS_SUBDOMAIN)
# NetworkPolicy: a label, label.label, or the knp./ossg. prefixes kube-controllers writes.
_NP_NAME_RE = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})?|(knp|ossg)\.default\.{_DNS_SUBDOMAIN}")
_GNP_NAME_RE = re.compile(rf"({_DNS_LABEL}\.)?{_DNS_LABEL}")
_QUALIFIED_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PORT_NAME_RE = re.compile(r"[-a-z0-9]{1,15}")

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

"""Syntax checks for Kubernetes names, labels and ports (each returns the reason a value is
bad, or None)."""

from __future__ import annotations

import re
from typing import Any

_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PORT_NAME_RE = re.compile(r"[-a-z0-9]+")


def _dns_label_problem(value: str) -> str | None:
    if len(value) > 63:
        return f"{value!r} is longer than 63 characters"
    if not _DNS_LABEL_RE.fullmatch(value):
        return (f"{value!r} is not a valid DNS-1123 label: use lower-case letters, digits and "
                "'-', starting and ending with a letter or digit")
    return None


def _dns_subdomain_problem(value: str) -> str | None:
    if len(value) > 253:
        return f"{value!r} is longer than 253 characters"
    if not _DNS_SUBDOMAIN_RE.fullmatch(value):
        return (f"{value!r} is not a valid DNS-1123 subdomain: use lower-case letters, digits, "
                "'-' and '.', starting and ending with a letter or digit")
    return None


def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return f"label key {key!r} has an empty prefix before '/'"
    if slash:
        reason = _dns_subdomain_problem(prefix)
        if reason:
            return f"label key {key!r}: prefix {reason}"
    if not name:
        return f"label key {key!r} has an empty name"
    if len(name) > 63:
        return f"label key {key!r}: name part is longer than 63 characters"
    if not _LABEL_NAME_RE.fullmatch(name):
        return (f"label key {key!r} is not valid: the name part must be letters, digits, '-', "
                "'_' or '.', starting and ending with a letter or digit")
    return None


def _label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return f"label value {value!r} is longer than 63 characters"
    if value and not _LABEL_NAME_RE.fullmatch(value):
        return (f"label value {value!r} is not valid: use letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit")
    return None


def _port_name_problem(name: str) -> str | None:
    # Kubernetes IANA_SVC_NAME rules for named ports.
    if not 1 <= len(name) <= 15:
        return f"port name {name!r} must be 1-15 characters"
    if not _PORT_NAME_RE.fullmatch(name):
        return f"port name {name!r} may only contain lower-case letters, digits and '-'"
    if not re.search(r"[a-z]", name):
        return f"port name {name!r} must contain at least one letter"
    if "--" in name:
        return f"port name {name!r} must not contain consecutive '-'"
    if name.startswith("-") or name.endswith("-"):
        return f"port name {name!r} must not begin or end with '-'"
    return None


def _is_int(value: Any) -> bool:
    # YAML `true` is a Python int; it is never a valid port.
    return isinstance(value, int) and not isinstance(value, bool)


def _port_number_problem(value: Any) -> str | None:
    if not _is_int(value):
        return f"{value!r} is not a port number"
    if not 1 <= value <= 65535:
        return f"{value} is out of range (1-65535)"
    return None

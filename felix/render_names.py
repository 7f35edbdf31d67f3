"""Calico's names for chains and IP sets (pure).

Chain names are capped at 28 characters the way libcalico-go's GetLengthLimitedID does it:
too long (or exactly 28 and starting with "_") becomes prefix + "_" + base64url(SHA-256).
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from datastore.selector import Selector

MAX_CHAIN_NAME = 28
MAX_IPSET_NAME = 31
_SHORTENED = "_"

POLICY_IN, POLICY_OUT = "cali-pi-", "cali-po-"
# Runs of guarded policy jumps (Calico names its policy-group chains alike).
GROUP_IN, GROUP_OUT = "cali-gi-", "cali-go-"
PROFILE_IN, PROFILE_OUT = "cali-pri-", "cali-pro-"
TO_WORKLOAD, FROM_WORKLOAD = "cali-tw-", "cali-fw-"
TO_HOST, FROM_HOST = "cali-th-", "cali-fh-"
TO_HOST_FORWARD, FROM_HOST_FORWARD = "cali-thfw-", "cali-fhfw-"
# Felix's interface name for a host endpoint with interfaceName "*" (endpoint_mgr.go).
ALL_INTERFACES = "any-interface-at-all"

FILTER_INPUT, FILTER_FORWARD, FILTER_OUTPUT = "cali-INPUT", "cali-FORWARD", "cali-OUTPUT"
WORKLOAD_TO_HOST = "cali-wl-to-host"
FROM_WL_DISPATCH, TO_WL_DISPATCH = "cali-from-wl-dispatch", "cali-to-wl-dispatch"
FROM_HOST_DISPATCH, TO_HOST_DISPATCH = "cali-from-host-endpoint", "cali-to-host-endpoint"
FROM_HOST_FWD_DISPATCH, TO_HOST_FWD_DISPATCH = "cali-from-hep-forward", "cali-to-hep-forward"
FAILSAFE_IN, FAILSAFE_OUT = "cali-failsafe-in", "cali-failsafe-out"
PREROUTING, OUTPUT, POSTROUTING = "cali-PREROUTING", "cali-OUTPUT", "cali-POSTROUTING"
NAT_OUTGOING = "cali-nat-outgoing"

MASQ_POOLS_ID = "masq-ipam-pools"
# The brief's name; current Calico calls this set "network-ip-pools".
ALL_POOLS_ID = "all-ipam-pools"


@lru_cache(maxsize=65536)  # asked for every policy jump of every sync
def length_limited(prefix: str, suffix: str, max_length: int = MAX_CHAIN_NAME) -> str:
    suffix = suffix or _SHORTENED
    total = len(prefix) + len(suffix)
    if total > max_length or (total == max_length and suffix.startswith(_SHORTENED)):
        digest = hashlib.sha256(suffix.encode()).digest()
        encoded = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        return prefix + _SHORTENED + encoded[: max_length - 1 - len(prefix)]
    return prefix + suffix


def policy_chain(prefix: str, chain_id: str) -> str:
    return length_limited(prefix, chain_id)


def endpoint_chain(prefix: str, interface: str) -> str:
    return length_limited(prefix, interface)


def unique_id(prefix: str, content: str) -> str:
    """libcalico-go MakeUniqueID: prefix + ":" + base64url(SHA-224(prefix + ":" + content))."""
    digest = hashlib.sha224(f"{prefix}:{content}".encode()).digest()
    return f"{prefix}:" + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def named_port_set_id(selector: Selector, protocol: str, port_name: str) -> str:
    """Felix's named-port IP set ID; protocol is tcp|udp|sctp|any."""
    return unique_id("n", f"{selector.unique_id},{protocol},{port_name}")


def ipset_name(family: int, set_id: str) -> str:
    """The main (non-temporary) set name: cali40s:..., cali60n:..., cali40masq-ipam-pools."""
    return f"cali{family}0{set_id}"[:MAX_IPSET_NAME]

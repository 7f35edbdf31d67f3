"""Calico's IPAM annotations on pods and namespaces (pure).

Calico's CNI reads them from the Kubernetes API; Tabby reads the Pod and Namespace objects
users applied with tabbyctl (kept in etcd under /tabby/k8s/). A pod's annotation overrides its
namespace's, which overrides the netconf (`ipv4_pools` / `ipv6_pools`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any

from cni.spec import INVALID_CONFIG, CNIError

IPV4_POOLS = "cni.projectcalico.org/ipv4pools"
IPV6_POOLS = "cni.projectcalico.org/ipv6pools"
IP_ADDRS = "cni.projectcalico.org/ipAddrs"
IP_ADDRS_NO_IPAM = "cni.projectcalico.org/ipAddrsNoIpam"
FLOATING_IPS = "cni.projectcalico.org/floatingIPs"


def annotations_of(obj: Mapping[str, Any] | None) -> dict[str, str]:
    if not obj:
        return {}
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def _json_list(annotations: Mapping[str, str], key: str, owner: str) -> list[str] | None:
    if key not in annotations:
        return None
    try:
        value = json.loads(annotations[key])
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CNIError(INVALID_CONFIG, f"annotation {key} on {owner} must be a JSON list of "
                       f"strings, not {annotations[key]!r}",
                       "e.g. '[\"default-ipv4-ippool\"]' or '[\"10.244.0.0/16\"]'")
    return value


def pools(pod: Mapping[str, str], namespace: Mapping[str, str], key: str, pod_name: str,
          namespace_name: str) -> tuple[str, ...] | None:
    """The pools an annotation asks for (pod first, then namespace), or None if neither does."""
    owners = ((pod, f"pod {pod_name}"), (namespace, f"namespace {namespace_name}"))
    for found, owner in owners:
        value = _json_list(found, key, owner)
        if value is not None:
            return tuple(value)
    return None


def requested_addresses(pod: Mapping[str, str], pod_name: str
                        ) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """`cni.projectcalico.org/ipAddrs`: specific addresses, at most one per family."""
    value = _json_list(pod, IP_ADDRS, f"pod {pod_name}")
    if not value:
        return ()
    if IPV4_POOLS in pod or IPV6_POOLS in pod:
        raise CNIError(INVALID_CONFIG, f"pod {pod_name} has both {IP_ADDRS} and a pools "
                       "annotation", "keep one of them")
    return _one_per_family(value, IP_ADDRS, pod_name)


def addresses_without_ipam(pod: Mapping[str, str], pod_name: str
                           ) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    """`cni.projectcalico.org/ipAddrsNoIpam`: addresses the pod gets as they are, at most one
    per family, with no IPAM record (routing and conflicts are the user's, as in Calico)."""
    value = _json_list(pod, IP_ADDRS_NO_IPAM, f"pod {pod_name}")
    if not value:
        return ()
    if pod.get(IP_ADDRS):
        raise CNIError(INVALID_CONFIG, f"pod {pod_name} has both {IP_ADDRS} and "
                       f"{IP_ADDRS_NO_IPAM}", "keep one of them")
    return _one_per_family(value, IP_ADDRS_NO_IPAM, pod_name)


def _one_per_family(value: list[str], key: str, pod_name: str
                    ) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    out: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
    for text in value:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise CNIError(INVALID_CONFIG, f"annotation {key} on pod {pod_name}: "
                           f"{text!r} is not an IP address") from None
        if ip.version in out:
            raise CNIError(INVALID_CONFIG, f"annotation {key} on pod {pod_name} asks for "
                           f"two IPv{ip.version} addresses", "give at most one per family")
        out[ip.version] = ip
    return tuple(out[v] for v in sorted(out))

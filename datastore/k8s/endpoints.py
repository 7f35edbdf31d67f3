"""WorkloadEndpoints as Calico's CNI plugin writes them for pods: names, veth names, labels,
ports, and the pod controller's label/service-account refresh."""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import re
from typing import Any

from datastore.errors import ValidationError
from datastore.k8s._common import (
    LABEL_NAMESPACE,
    LABEL_ORCHESTRATOR,
    LABEL_SERVICEACCOUNT,
    NAMESPACE_PROFILE_PREFIX,
    ORCHESTRATOR_K8S,
    Obj,
)
from datastore.k8s._walk import _subject
from datastore.k8s.profiles import _sa_profile_name
from datastore.k8s.validate import _normalised
from datastore.k8s.validate_core import _pod_status_ips
from datastore.kinds import CALICO_API

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}")


def veth_name(namespace: str, pod: str, prefix: str = "cali") -> str:
    """Host-side veth name: prefix + first 11 hex digits of SHA-1("<namespace>.<pod>").
    Felix recomputes the same name, so this must never change."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode(), usedforsecurity=False).hexdigest()
    return prefix + digest[:11]


def _workload_field(orchestrator: str) -> str:
    return {"k8s": "pod", "cni": "containerID"}.get(orchestrator, "workload")


def workload_endpoint_name(node: str, orchestrator: str, workload: str, endpoint: str) -> str:
    """`<node>-<orchestrator>-<workload>-<endpoint>` with each '-' inside a part doubled, so
    the name splits back unambiguously (`node-1`,`k8s`,`web-7d9f`,`eth0` ->
    `node--1-k8s-web--7d9f-eth0`). Calico's libnetwork names repeat the orchestrator."""
    if orchestrator == "libnetwork":
        workload = orchestrator
    parts = (("node", node), ("orchestrator", orchestrator),
             (_workload_field(orchestrator), workload), ("endpoint", endpoint))
    problems = []
    for field, value in parts:
        if not value:
            problems.append((field, "field should be assigned"))
        elif value.startswith("-") or value.endswith("-"):
            problems.append((field, f"{value!r} must not begin or end with '-'"))
    if problems:
        raise ValidationError(problems, "WorkloadEndpoint name")
    return "-".join(value.replace("-", "--") for _, value in parts)


def parse_workload_endpoint_name(name: str) -> list[str]:
    """Split a WorkloadEndpoint name back into its parts, undoing the dash doubling."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(name):
        char = name[i]
        # A '-' in first position can only be data: names never start with a separator.
        if char == "-" and i > 0:
            if i + 1 < len(name) and name[i + 1] == "-":
                current.append("-")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _host_network(text: str, path: str) -> str:
    """An endpoint address as Calico records it: the bare IP with a full-length mask."""
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise ValidationError([(path, f"{text!r} is not an IP address or CIDR")]) from None
    return f"{iface.ip}/{iface.max_prefixlen}"


def _endpoint_labels(pod: Obj) -> dict[str, str]:
    meta = pod["metadata"]
    sa = pod["spec"]["serviceAccountName"]
    labels = dict(meta.get("labels") or {})
    labels[LABEL_NAMESPACE] = meta["namespace"]
    labels[LABEL_ORCHESTRATOR] = ORCHESTRATOR_K8S
    if sa and len(sa) < 63:
        # Calico only sets it below 63 characters (a label value's limit), for compatibility.
        labels[LABEL_SERVICEACCOUNT] = sa
    return dict(sorted(labels.items()))


def _endpoint_ports(pod: Obj) -> list[Obj]:
    """Named ports and host ports of all containers, then init containers."""
    ports = []
    for field in ("containers", "initContainers"):
        for container in pod["spec"].get(field) or []:
            for port in container.get("ports") or []:
                number = port.get("containerPort") or 0
                name = port.get("name") or ""
                host_port = port.get("hostPort") or 0
                if not number or not (name or host_port):
                    continue
                # Calico's WorkloadEndpointPort has no omitempty: all five fields are written.
                ports.append({
                    "name": name,
                    "protocol": (port.get("protocol") or "TCP").lower(),
                    "port": number,
                    "hostPort": host_port,
                    "hostIP": port.get("hostIP") or "",
                })
    return ports


def workload_endpoint_for_pod(
    pod: dict[str, Any],
    node: str,
    ip_networks: list[str],
    container_id: str = "",
    interface_name: str | None = None,
    mac: str = "",
    endpoint: str = "eth0",
) -> dict[str, Any]:
    """The WorkloadEndpoint Calico's CNI plugin writes for a pod on `node`.

    `ip_networks` are the IPAM results (bare IPs or CIDRs; stored as /32 or /128); when empty the
    pod's status IPs are used, as Calico's KDD conversion does. Empty optional fields are left
    out, as Calico's JSON omits them.
    """
    pod = _normalised(pod, "Pod")
    meta, spec = pod["metadata"], pod["spec"]
    if spec.get("hostNetwork"):
        raise ValidationError([("spec.hostNetwork", "host-networked pods get no endpoint")],
                              _subject("Pod", meta))
    ns, name, sa = meta["namespace"], meta["name"], spec["serviceAccountName"]
    nets = [_host_network(n, f"ip_networks[{i}]") for i, n in enumerate(ip_networks)]
    if not nets:
        nets = [_host_network(ip, "status.podIPs") for ip in
                _pod_status_ips(None, pod.get("status") or {})]
    if mac:
        if not _MAC_RE.fullmatch(mac):
            raise ValidationError([("mac", f"{mac!r} is not a MAC address")])
        mac = mac.lower().replace("-", ":")
    out_meta: Obj = {
        "name": workload_endpoint_name(node, ORCHESTRATOR_K8S, name, endpoint),
        "namespace": ns,
        "labels": _endpoint_labels(pod),
    }
    if meta.get("generateName"):
        out_meta["generateName"] = meta["generateName"]
    profiles = [NAMESPACE_PROFILE_PREFIX + ns]
    if sa:
        profiles.append(_sa_profile_name(ns, sa))
    # Field order follows Calico's WorkloadEndpointSpec; empty values are omitted like its JSON.
    candidates: list[tuple[str, Any]] = [
        ("orchestrator", ORCHESTRATOR_K8S),
        ("node", node),
        ("containerID", container_id),
        ("pod", name),
        ("endpoint", endpoint),
        ("serviceAccountName", sa),
        ("ipNetworks", nets),
        ("profiles", profiles),
        ("interfaceName", interface_name or veth_name(ns, name)),
        ("mac", mac),
        ("ports", _endpoint_ports(pod)),
    ]
    return {
        "kind": "WorkloadEndpoint",
        "apiVersion": CALICO_API,
        "metadata": out_meta,
        "spec": {key: value for key, value in candidates if value},
    }


def refresh_workload_endpoint(wep: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    """A copy of `wep` with the labels and service account of the pod's current state.

    This is all Calico's pod controller syncs when a pod changes after its endpoint was
    written (profiles, IPs and ports are the CNI plugin's and stay as they are).
    """
    pod = _normalised(pod, "Pod")
    out = copy.deepcopy(wep)
    out.setdefault("metadata", {})["labels"] = _endpoint_labels(pod)
    spec = out.setdefault("spec", {})
    if pod["spec"]["serviceAccountName"]:
        spec["serviceAccountName"] = pod["spec"]["serviceAccountName"]
    else:
        spec.pop("serviceAccountName", None)
    return out

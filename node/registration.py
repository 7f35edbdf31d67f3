"""This node's `Node` resource and the cluster-wide `ClusterInformation default`, as calico-node
writes them at start.

The Node keeps whatever spec and labels it already has (an operator's `routeReflectorClusterID`,
the routing agent's tunnel addresses); Tabby adds the `kubernetes.io/hostname` label and, when
tabby-node knows it (`node.autodetect`), the BGP address `spec.bgp.ipv4Address` in Calico's CIDR
form and the AS number (only when one is configured: otherwise the cluster's applies).
ClusterInformation gets `datastoreReady: true` when it has no value: Calico's CNI refuses
ADD/DEL unless it is true, and an explicit `false` is an operator's lock (e.g. during a
migration) that must stay. Nothing is written when nothing would change, so restarts do not
churn revisions.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from datastore.kinds import kind_for
from datastore.store import NotFoundError

if TYPE_CHECKING:
    from datastore.store import ResourceStore

API_VERSION = "projectcalico.org/v3"
HOSTNAME_LABEL = "kubernetes.io/hostname"
CLUSTER_INFO = "default"
CLUSTER_TYPE = "tabby"
WRITE_ATTEMPTS = 10

Resource = dict[str, Any]


def desired_node(nodename: str, existing: Resource | None, ipv4_address: str | None = None,
                 asn: int | None = None) -> Resource:
    """The Node to store: the existing one with our label and BGP identity added (pure)."""
    if existing is None:
        node: Resource = {"apiVersion": API_VERSION, "kind": "Node",
                          "metadata": {"name": nodename}, "spec": {}}
    else:
        node = copy.deepcopy(existing)
    node.setdefault("metadata", {}).setdefault("labels", {})[HOSTNAME_LABEL] = nodename
    spec = node.setdefault("spec", {})
    if ipv4_address is not None or asn is not None:
        bgp = spec.setdefault("bgp", {})
        if ipv4_address is not None:
            bgp["ipv4Address"] = ipv4_address
        if asn is not None:
            bgp["asNumber"] = asn
    return node


def desired_cluster_information(existing: Resource | None) -> Resource:
    """ClusterInformation `default` with a GUID and datastoreReady set unless set (pure)."""
    if existing is None:
        info: Resource = {"apiVersion": API_VERSION, "kind": "ClusterInformation",
                          "metadata": {"name": CLUSTER_INFO},
                          "spec": {"clusterType": CLUSTER_TYPE}}
    else:
        info = copy.deepcopy(existing)
    spec = info.setdefault("spec", {})
    spec.setdefault("clusterGUID", uuid.uuid4().hex)
    spec.setdefault("datastoreReady", True)
    return info


async def register_node(store: ResourceStore, nodename: str, ipv4_address: str | None = None,
                        asn: int | None = None) -> str:
    """Create or refresh this node's Node; returns created / updated / unchanged."""
    return await _merge(store, "Node", nodename,
                        lambda existing: desired_node(nodename, existing, ipv4_address, asn))


async def ensure_cluster_information(store: ResourceStore) -> str:
    """Create or complete ClusterInformation `default`; returns created / updated / unchanged."""
    return await _merge(store, "ClusterInformation", CLUSTER_INFO, desired_cluster_information)


async def _merge(store: ResourceStore, kind: str, name: str,
                 desired: Callable[[Resource | None], Resource]) -> str:
    """Read, merge, write guarded by what was read; again when someone else wrote meanwhile
    (another node creating ClusterInformation, the routing agent adding tunnel addresses)."""
    from datastore.store import AlreadyExistsError, ConflictError

    for _ in range(WRITE_ATTEMPTS):
        existing = await _get(store, kind, name)
        try:
            return await _write(store, desired(existing), existing)
        except (ConflictError, AlreadyExistsError):
            continue
    raise RuntimeError(f"{kind} {name} kept changing while writing it")


async def register(store: ResourceStore, nodename: str, log: logging.Logger,
                   ipv4_address: str | None = None, asn: int | None = None) -> None:
    node = await register_node(store, nodename, ipv4_address, asn)
    info = await ensure_cluster_information(store)
    log.info("Node %s %s%s; ClusterInformation default %s", nodename, node,
             f" (BGP address {ipv4_address})" if ipv4_address else "", info)
    current = await _get(store, "ClusterInformation", CLUSTER_INFO)
    if current is not None and current.get("spec", {}).get("datastoreReady") is False:
        log.warning("ClusterInformation default has datastoreReady: false (a datastore lock); "
                    "Calico-compatible CNIs refuse pods until it is true")


async def _get(store: ResourceStore, kind: str, name: str) -> Resource | None:
    try:
        return await store.get(kind_for(kind), name)
    except NotFoundError:
        return None


def _comparable(obj: Resource) -> Resource:
    """What a write would change: metadata fields etcd or the store fill in are ignored."""
    meta = {k: v for k, v in obj.get("metadata", {}).items()
            if k not in ("resourceVersion", "uid", "creationTimestamp")}
    return {**obj, "metadata": meta}


async def _write(store: ResourceStore, obj: Resource, existing: Resource | None) -> str:
    if existing is not None and _comparable(obj) == _comparable(existing):
        return "unchanged"
    obj = copy.deepcopy(obj)
    if existing is None:
        await store.write([obj], "create")
    else:  # guarded by the revision `obj` was built from: nobody's concurrent write is lost
        await store.write([obj], "replace")
    return "created" if existing is None else "updated"

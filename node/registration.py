"""This node's `Node` resource and the cluster-wide `ClusterInformation default`, as calico-node
writes them at start.

The Node keeps whatever spec and labels it already has (an operator's or a later BGP issue's
`spec.bgp`); Tabby only adds the `kubernetes.io/hostname` label. ClusterInformation gets
`datastoreReady: true` when it has no value: Calico's CNI refuses ADD/DEL unless it is true,
and an explicit `false` is an operator's lock (e.g. during a migration) that must stay.
Nothing is written when nothing would change, so restarts do not churn revisions.
"""

from __future__ import annotations

import copy
import logging
import uuid
from typing import TYPE_CHECKING, Any

from datastore.kinds import kind_for
from datastore.store import NotFoundError

if TYPE_CHECKING:
    from datastore.store import ResourceStore

API_VERSION = "projectcalico.org/v3"
HOSTNAME_LABEL = "kubernetes.io/hostname"
CLUSTER_INFO = "default"
CLUSTER_TYPE = "tabby"

Resource = dict[str, Any]


def desired_node(nodename: str, existing: Resource | None) -> Resource:
    """The Node to store: the existing one with our label added (pure)."""
    if existing is None:
        node: Resource = {"apiVersion": API_VERSION, "kind": "Node",
                          "metadata": {"name": nodename}, "spec": {}}
    else:
        node = copy.deepcopy(existing)
    node.setdefault("metadata", {}).setdefault("labels", {})[HOSTNAME_LABEL] = nodename
    node.setdefault("spec", {})
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


async def register_node(store: ResourceStore, nodename: str) -> str:
    """Create or refresh this node's Node; returns created / updated / unchanged."""
    existing = await _get(store, "Node", nodename)
    return await _write(store, desired_node(nodename, existing), existing)


async def ensure_cluster_information(store: ResourceStore) -> str:
    """Create or complete ClusterInformation `default`; returns created / updated / unchanged."""
    existing = await _get(store, "ClusterInformation", CLUSTER_INFO)
    return await _write(store, desired_cluster_information(existing), existing)


async def register(store: ResourceStore, nodename: str, log: logging.Logger) -> None:
    node = await register_node(store, nodename)
    info = await ensure_cluster_information(store)
    log.info("Node %s %s; ClusterInformation default %s", nodename, node, info)
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
    obj["metadata"].pop("resourceVersion", None)  # apply: the store guards by its own read
    await store.write([obj], "apply")
    return "created" if existing is None else "updated"

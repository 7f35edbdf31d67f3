"""What one IPAM request needs to know besides the blocks: config, pools, reservations, the
node's labels and the namespace's labels, read concurrently (I/O).

Pools and reservations are the v3 resources Tabby stores (already validated and defaulted);
node labels come from the Node resource (none when there is no Node), namespace labels from
the namespace's profile `kns.<ns>` (`pcns.`-prefixed in `labelsToApply`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from datastore.etcd import Datastore
from datastore.kinds import kind_for
from ipam.keys import CONFIG_KEY
from ipam.pools import Pool, Reservations
from ipam.records import IPAMConfig, decode

log = logging.getLogger(__name__)

POOL_PREFIX = kind_for("IPPool").prefix
RESERVATION_PREFIX = kind_for("IPReservation").prefix
NAMESPACE_LABEL_PREFIX = "pcns."


@dataclass(frozen=True)
class Inputs:
    config: IPAMConfig
    pools: list[Pool]  # every pool, disabled ones too, by name
    reservations: Reservations
    node_labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(default_factory=dict)


async def read_inputs(ds: Datastore, hostname: str, namespace: str | None = None) -> Inputs:
    config, pools, reservations, node, ns = await asyncio.gather(
        read_config(ds), read_pools(ds), read_reservations(ds),
        node_labels(ds, hostname), namespace_labels(ds, namespace))
    return Inputs(config[0], pools, reservations, node, ns)


async def read_config(ds: Datastore) -> tuple[IPAMConfig, int | None]:
    """The config and its revision; Calico's defaults (and None) when it was never written."""
    kv = await ds.get(CONFIG_KEY)
    if kv is None:
        return IPAMConfig(), None
    return IPAMConfig.from_json(decode(kv.value)), kv.mod_revision


async def read_pools(ds: Datastore) -> list[Pool]:
    kvs, _ = await ds.list(POOL_PREFIX)
    pools = []
    for kv in kvs:
        try:
            pools.append(Pool.from_resource(json.loads(kv.value)))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring IP pool %s: unreadable (%s)", kv.key, e)
    return sorted(pools, key=lambda p: p.name)


async def read_reservations(ds: Datastore) -> Reservations:
    kvs, _ = await ds.list(RESERVATION_PREFIX)
    objs = []
    for kv in kvs:
        try:
            objs.append(json.loads(kv.value))
        except ValueError as e:
            log.warning("ignoring IP reservation %s: unreadable (%s)", kv.key, e)
    return Reservations.from_resources(objs)


async def node_labels(ds: Datastore, hostname: str) -> dict[str, str]:
    kv = await ds.get(kind_for("Node").key(hostname))
    if kv is None:
        return {}
    return dict((json.loads(kv.value).get("metadata") or {}).get("labels") or {})


async def namespace_labels(ds: Datastore, namespace: str | None) -> dict[str, str]:
    if not namespace:
        return {}
    kv = await ds.get(kind_for("Profile").key(f"kns.{namespace}"))
    if kv is None:
        return {}
    labels = (json.loads(kv.value).get("spec") or {}).get("labelsToApply") or {}
    return {k[len(NAMESPACE_LABEL_PREFIX):]: v for k, v in labels.items()
            if k.startswith(NAMESPACE_LABEL_PREFIX)}

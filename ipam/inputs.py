"""What one IPAM request needs to know besides the blocks: config, pools, reservations, the
node's labels and the namespace's labels, read in one request (I/O).

Pools and reservations are the v3 resources Tabby stores (already validated and defaulted);
node labels come from the Node resource (none when there is no Node), namespace labels from
the namespace's profile `kns.<ns>` (`pcns.`-prefixed in `labelsToApply`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from datastore.etcd import KV, Datastore
from datastore.kinds import kind_for
from datastore.reads import ReadBatch, ReadResult
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
    """Everything in one read (`datastore.reads`), at one revision."""
    batch = ReadBatch()
    queue_inputs(batch, hostname, namespace)
    return inputs_from(await batch.run(ds), hostname, namespace)


def queue_inputs(batch: ReadBatch, hostname: str, namespace: str | None = None) -> None:
    """Add what `inputs_from` needs to a batch of reads."""
    batch.get(CONFIG_KEY)
    batch.list(POOL_PREFIX)
    batch.list(RESERVATION_PREFIX)
    batch.get(_node_key(hostname))
    if namespace:
        batch.get(_profile_key(namespace))


def inputs_from(result: ReadResult, hostname: str, namespace: str | None = None) -> Inputs:
    return Inputs(
        _config(result.get(CONFIG_KEY))[0], _pools(result.list(POOL_PREFIX)),
        _reservations(result.list(RESERVATION_PREFIX)),
        _node_labels(result.get(_node_key(hostname))),
        _namespace_labels(result.get(_profile_key(namespace)) if namespace else None))


async def read_config(ds: Datastore) -> tuple[IPAMConfig, int | None]:
    """The config and its revision; Calico's defaults (and None) when it was never written."""
    return _config(await ds.get(CONFIG_KEY))


async def read_pools(ds: Datastore) -> list[Pool]:
    return _pools((await ds.list(POOL_PREFIX))[0])


async def read_reservations(ds: Datastore) -> Reservations:
    return _reservations((await ds.list(RESERVATION_PREFIX))[0])


async def node_labels(ds: Datastore, hostname: str) -> dict[str, str]:
    return _node_labels(await ds.get(_node_key(hostname)))


async def namespace_labels(ds: Datastore, namespace: str | None) -> dict[str, str]:
    if not namespace:
        return {}
    return _namespace_labels(await ds.get(_profile_key(namespace)))


# -- decoding (pure) ----------------------------------------------------------------------------


def _node_key(hostname: str) -> str:
    return kind_for("Node").key(hostname)


def _profile_key(namespace: str) -> str:
    return kind_for("Profile").key(f"kns.{namespace}")


def _config(kv: KV | None) -> tuple[IPAMConfig, int | None]:
    if kv is None:
        return IPAMConfig(), None
    return IPAMConfig.from_json(decode(kv.value)), kv.mod_revision


def _pools(kvs: list[KV]) -> list[Pool]:
    pools = []
    for kv in kvs:
        try:
            pools.append(Pool.from_resource(json.loads(kv.value)))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring IP pool %s: unreadable (%s)", kv.key, e)
    return sorted(pools, key=lambda p: p.name)


def _reservations(kvs: list[KV]) -> Reservations:
    objs = []
    for kv in kvs:
        try:
            objs.append(json.loads(kv.value))
        except ValueError as e:
            log.warning("ignoring IP reservation %s: unreadable (%s)", kv.key, e)
    return Reservations.from_resources(objs)


def _node_labels(kv: KV | None) -> dict[str, str]:
    if kv is None:
        return {}
    return dict((json.loads(kv.value).get("metadata") or {}).get("labels") or {})


def _namespace_labels(kv: KV | None) -> dict[str, str]:
    if kv is None:
        return {}
    labels = (json.loads(kv.value).get("spec") or {}).get("labelsToApply") or {}
    return {k[len(NAMESPACE_LABEL_PREFIX):]: v for k, v in labels.items()
            if k.startswith(NAMESPACE_LABEL_PREFIX)}

"""The routing agent's copy of the store: raw values per watched prefix, and the records the
calculations need (pure).

Each watched prefix has its own map (key -> value); a Resync replaces that prefix's map, an
event puts or deletes one key. `inputs()` decodes them into bgp.model records; a value that
does not decode is skipped and named in `Inputs.problems` (logged by the agent), never fatal.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bgp.model import BlockRecord, NodeRecord, PoolRecord, block_record, node_record, pool_record
from datastore.kinds import CALICO_PREFIX, kind_for
from ipam import keys

NODES = f"{CALICO_PREFIX}nodes/"
POOLS = f"{CALICO_PREFIX}ippools/"
BGP_CONFIGS = f"{CALICO_PREFIX}bgpconfigurations/"
BGP_PEERS = f"{CALICO_PREFIX}bgppeers/"
BLOCKS = keys.block_prefix(4)
AFFINITIES = keys.HOST_PREFIX
PREFIXES = (NODES, POOLS, BGP_CONFIGS, BGP_PEERS, BLOCKS, AFFINITIES)
SECRET = kind_for("Secret", "v1")
DEFAULT_SECRETS_NAMESPACE = "calico-system"  # where calico-node (operator install) runs
MAX_PASSWORD = 80  # longer BGP passwords fail the session (Calico's docs say so too)


def secrets_prefix(namespace: str) -> str:
    """The Secrets BGP passwords come from: those of the namespace calico-node would run in."""
    return SECRET.list_prefix(namespace)


@dataclass
class Inputs:
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    pools: list[PoolRecord] = field(default_factory=list)
    blocks: list[BlockRecord] = field(default_factory=list)
    bgp_config: dict[str, Any] | None = None  # BGPConfiguration "default"
    bgp_peers: list[dict[str, Any]] = field(default_factory=list)
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)  # (Secret, key) -> value
    problems: list[str] = field(default_factory=list)


class StoreView:
    def __init__(self, secrets_namespace: str | None = None) -> None:
        self.secrets = secrets_prefix(secrets_namespace) if secrets_namespace else None
        self.prefixes = PREFIXES + ((self.secrets,) if self.secrets else ())
        self.maps: dict[str, dict[str, bytes]] = {p: {} for p in self.prefixes}
        self.loaded: set[str] = set()

    @property
    def complete(self) -> bool:
        return self.loaded == set(self.prefixes)

    def replace(self, prefix: str, items: Iterable[tuple[str, bytes]]) -> None:
        self.maps[prefix] = dict(items)
        self.loaded.add(prefix)

    def put(self, prefix: str, key: str, value: bytes | None) -> None:
        if value is None:
            self.maps[prefix].pop(key, None)
        else:
            self.maps[prefix][key] = value

    def inputs(self) -> Inputs:
        out = Inputs()
        for key, value in sorted(self.maps[NODES].items()):
            obj = _json(key, value, out)
            if obj is not None:
                try:
                    record = node_record(obj)
                except (KeyError, TypeError, AttributeError):
                    out.problems.append(f"{key}: not a Node")
                    continue
                out.nodes[record.name] = record
        for key, value in sorted(self.maps[POOLS].items()):
            obj = _json(key, value, out)
            if obj is not None and (pool := pool_record(obj)) is not None:
                out.pools.append(pool)
        confirmed = set()
        for key, value in self.maps[AFFINITIES].items():
            parsed = keys.parse_affinity_key(key)
            if parsed is None:
                continue
            obj = _json(key, value, out) if value else {}
            if obj is not None and (obj.get("state") or "confirmed") == "confirmed":
                confirmed.add(parsed)
        for key, value in sorted(self.maps[BLOCKS].items()):
            obj = _json(key, value, out)
            if obj is not None and (block := block_record(obj, confirmed)) is not None:
                out.blocks.append(block)
        for key, value in self.maps[BGP_CONFIGS].items():
            obj = _json(key, value, out)
            if obj is not None and (obj.get("metadata") or {}).get("name") == "default":
                out.bgp_config = obj
        for key, value in sorted(self.maps[BGP_PEERS].items()):
            obj = _json(key, value, out)
            if obj is not None:
                out.bgp_peers.append(obj)
        if self.secrets:
            for key, value in sorted(self.maps[self.secrets].items()):
                obj = _json(key, value, out)
                if obj is not None:
                    _secret_values(key, obj, out)
        return out


def _secret_values(key: str, obj: dict[str, Any], out: Inputs) -> None:
    """A Secret's data (base64, as stored) as text, by (Secret name, data key)."""
    name = (obj.get("metadata") or {}).get("name") or key.rsplit("/", 1)[-1]
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        out.problems.append(f"{key}: data is not a mapping")
        return
    for data_key, encoded in data.items():
        try:
            value = base64.b64decode(str(encoded), validate=True).decode()
        except (binascii.Error, ValueError):
            out.problems.append(f"{key}: {data_key} is not base64 of UTF-8 text")
            continue
        if len(value) > MAX_PASSWORD:
            out.problems.append(f"{key}: {data_key} is longer than {MAX_PASSWORD} characters, "
                                "too long for a BGP password")
        out.secrets[(str(name), str(data_key))] = value


def _json(key: str, value: bytes, out: Inputs) -> dict[str, Any] | None:
    try:
        obj = json.loads(value)
    except ValueError:
        out.problems.append(f"{key}: not JSON")
        return None
    if not isinstance(obj, dict):
        out.problems.append(f"{key}: not a JSON object")
        return None
    return obj

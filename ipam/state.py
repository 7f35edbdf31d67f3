"""Everything under `/calico/ipam/v2/` read at one revision, for checks, reports and node
removal (I/O at the edge, parsing pure).

Soft-deleted values (`"deleted": true`) are left out, as Calico's readers filter them; values
that cannot be parsed are logged and left out rather than failing the whole read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from datastore.etcd import KV, Datastore
from ipam import keys
from ipam.block import Block
from ipam.records import Affinity, Handle, IPAMConfig, decode

log = logging.getLogger(__name__)


@dataclass
class IPAMState:
    blocks: dict[str, tuple[Block, int]] = field(default_factory=dict)
    affinities: dict[tuple[str, str], tuple[Affinity, int]] = field(default_factory=dict)
    handles: dict[str, tuple[Handle, int]] = field(default_factory=dict)
    config: IPAMConfig = field(default_factory=IPAMConfig)
    revision: int = 0


async def read_state(ds: Datastore) -> IPAMState:
    kvs, revision = await ds.list(keys.IPAM_PREFIX)
    return parse_state(kvs, revision)


def parse_state(kvs: Iterable[KV], revision: int) -> IPAMState:
    state = IPAMState(revision=revision)
    for kv in kvs:
        try:
            _add(state, kv)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s: unreadable value (%s)", kv.key, e)
    return state


def _add(state: IPAMState, kv: KV) -> None:
    if kv.key == keys.CONFIG_KEY:
        state.config = IPAMConfig.from_json(decode(kv.value))
    elif (cidr := keys.parse_block_key(kv.key)) is not None:
        block = Block.from_json(decode(kv.value))
        if not block.deleted:
            state.blocks[cidr] = (block, kv.mod_revision)
    elif (host_cidr := keys.parse_affinity_key(kv.key)) is not None:
        affinity = Affinity.from_json(decode(kv.value))
        if not affinity.deleted:
            state.affinities[host_cidr] = (affinity, kv.mod_revision)
    elif (handle_id := keys.parse_handle_key(kv.key)) is not None:
        handle = Handle.from_json(decode(kv.value))
        if not handle.deleted:
            state.handles[handle_id] = (handle, kv.mod_revision)

"""Tabby IPAM: Calico's per-node address blocks, affinities and handles, kept in etcd.

Pure parts (no I/O, tested with plain data): `keys` (Calico's key layout), `block` (one
allocation block: ordinals, FIFO free list, attributes, sequence numbers), `records` (affinity,
handle and config values, Go-style JSON), `pools` (pool selection, the per-host block walk,
reservations), `errors`. The I/O edge: `allocator` (the `IPAM` class: assign, release,
config), `affinity` (claiming and releasing block affinities), `release` (giving addresses
back), `store` (typed reads and revision-guarded writes), `inputs` (pools, reservations and
labels for one request) and `state` (everything under `/calico/ipam/v2/` at one revision).
"""

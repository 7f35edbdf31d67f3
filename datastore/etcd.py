"""Tabby's etcd interface: revision-guarded writes, atomic commits, leases, resuming watches.

The rest of Tabby sees only this module's types; aetcd and gRPC stay inside it. aetcd supplies
the connection (a subclass builds the gRPC channel, with TLS when the endpoint is https) and the
generated etcd stubs; requests go to the stubs directly so every answer keeps its revision
header and every call carries a deadline.

Connections: endpoints are tried in order until one answers a Status probe within
`dial_timeout`; a channel that loses its connection is replaced (a fresh channel skips gRPC's
growing reconnect backoff). Writes are sent only on a channel known to be up and are retried
only when gRPC says the request never left (a write whose answer was lost may have been
applied, and a blind retry would report our own write as a conflict). Reads retry once.

Watches resume from the last delivered revision + 1 after any disconnect, fall back to a full
listing (Resync) when that revision was compacted, and ask etcd for a progress notification
when a stream has been quiet, so a stream that died silently is noticed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import aetcd
import grpc
from aetcd import rpc

from datastore.config import ConfigError, Endpoint, EtcdConfig, parse_endpoint
from datastore.errors import TabbyError

log = logging.getLogger(__name__)

T = TypeVar("T")

LIST_PAGE = 500  # keys per Range request, so big listings stay under gRPC's message limit
WATCH_IDLE = 10.0  # a watch quiet for this long asks etcd for a progress notification
BACKOFF_START = 0.1
BACKOFF_MAX = 2.0

_CHANNEL_OPTIONS = {
    # gRPC's default reconnect backoff grows to 120 s; a restarted etcd must be found quickly
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}
_CONNECTION_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


# -- errors ------------------------------------------------------------------------------------


class DatastoreError(TabbyError):
    """Base of every datastore failure; str() is one clear line."""


class Unavailable(DatastoreError):
    def __init__(self, endpoint: str, reason: str) -> None:
        self.endpoint = endpoint
        self.reason = reason
        super().__init__(f"etcd at {endpoint} is unreachable: {reason}")


class AlreadyExists(DatastoreError):
    def __init__(self, key: str, current: KV | None = None) -> None:
        self.key = key
        self.current = current
        at = f" (revision {current.mod_revision})" if current else ""
        super().__init__(f"{key} already exists{at}")


class NotFound(DatastoreError):
    """`key` names what is missing: a key, or `lease <id>`."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"{key} does not exist")


class Conflict(DatastoreError):
    """A revision guard failed: the key changed since it was read."""

    def __init__(self, key: str, current: KV | None, expected: int | None = None) -> None:
        self.key = key
        self.current = current
        self.expected = expected
        now = f"it is now at revision {current.mod_revision}" if current else "it is gone"
        was = f"expected revision {expected}, " if expected is not None else ""
        super().__init__(f"{key} changed since it was read: {was}{now}")


class _Compacted(DatastoreError):
    """The revision asked for is older than etcd's compaction point (handled internally)."""


# -- values ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0  # 0: not known (a value remembered from a write or an event)
    version: int = 0
    lease: int = 0


@dataclass(frozen=True)
class Event:
    type: Literal["put", "delete"]
    key: str
    value: bytes | None
    mod_revision: int


@dataclass(frozen=True)
class Resync:
    """A full listing at `revision`; a watcher must replace its state with it."""

    items: tuple[KV, ...]
    revision: int


@dataclass(frozen=True)
class Create:
    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True)
class Update:
    """Replace a key still at `revision`; a lease already on the key stays attached."""

    key: str
    value: bytes
    revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    """Delete a key that exists (and, with `revision`, is still at that revision)."""

    key: str
    revision: int | None = None


@dataclass(frozen=True)
class Purge:
    """Delete a key if it exists: for objects we own and rewrite whatever their state."""

    key: str


@dataclass(frozen=True)
class Unchanged:
    """A guard that writes nothing: `key` is still at `revision` (0: still absent)."""

    key: str
    revision: int


@dataclass(frozen=True)
class NothingNewer:
    """A guard that writes nothing: no key under the prefix `key` was written after
    `revision` (a key deleted since is not seen: guard the keys you know with Unchanged)."""

    key: str
    revision: int


Guard = Unchanged | NothingNewer
Op = Create | Update | Put | Delete | Purge | Unchanged | NothingNewer


# -- connection --------------------------------------------------------------------------------


class _Client(aetcd.Client):
    """aetcd's client on a channel we build: TLS for https endpoints, our channel options."""

    def __init__(
        self, endpoint: Endpoint, timeout: float, credentials: grpc.ChannelCredentials | None
    ) -> None:
        super().__init__(
            host=endpoint.host, port=endpoint.port, timeout=timeout, options=_CHANNEL_OPTIONS
        )
        self.endpoint = endpoint
        self._credentials = credentials
        self.watchstub: Any = None

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = list(self._options.items())
        target = self.endpoint.target
        if self._credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(target, self._credentials, options=options)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.watchstub = rpc.WatchStub(self.channel)
        self._connected.set()

    def is_ready(self) -> bool:
        return self.channel is not None and (
            self.channel.get_state() == grpc.ChannelConnectivity.READY
        )


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DatastoreError(f"cannot read the etcd {what} {path}: {e.strerror}") from None


def _credentials(config: EtcdConfig) -> grpc.ChannelCredentials:
    ca = _read_file(config.ca_cert_file, "CA file") if config.ca_cert_file else _system_roots()
    key = _read_file(config.key_file, "key file") if config.key_file else None
    cert = _read_file(config.cert_file, "certificate file") if config.cert_file else None
    return grpc.ssl_channel_credentials(ca, key, cert)


def _system_roots() -> bytes | None:
    """The host's CA bundle; gRPC would otherwise use only its own bundled roots."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                continue
    return None


# -- error mapping -----------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


_GRPC_PREFIX = re.compile(
    r"^failed to connect to all addresses; last error: \w+: (?:ipv[46]:\S+?: )?"
)


def _reason(error: grpc.aio.AioRpcError, timeout: float, endpoint: Endpoint, cert: bool) -> str:
    """gRPC's details, trimmed to the part a person needs, with a hint for TLS trouble."""
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout:g} s"
    details = _GRPC_PREFIX.sub("", _one_line(error.details() or error.code().name))
    hint = _tls_hint(details, cert) if endpoint.tls else None
    if hint is None and not endpoint.tls and details == "Socket closed":
        hint = "connection closed during setup; does this endpoint need https?"
    return hint or details[:1].lower() + details[1:]


def _tls_hint(details: str, cert: bool) -> str | None:
    """gRPC's TLS failures in words a person can act on."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        why = details.split("CERTIFICATE_VERIFY_FAILED: ", 1)[-1].removesuffix(": OK")
        return f"etcd's certificate is not trusted by the configured CA ({why})"
    if "TSI_DATA_CORRUPTED" in details:  # etcd answered the handshake with a bad_certificate alert
        if cert:
            return "etcd rejected the client certificate; is it signed by a CA etcd trusts?"
        return "etcd requires a client certificate; set the etcd cert and key files"
    if "Handshake read failed" in details:
        return "TLS handshake failed; is this endpoint plain http?"
    return None


def _cancelled_by_caller() -> bool:
    """Whether a CancelledError is our own task being cancelled.

    gRPC also raises CancelledError from a call whose channel was closed under it (another
    task retired the connection); that one is a lost connection and must not end the caller.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _never_sent(error: grpc.aio.AioRpcError) -> bool:
    """gRPC found no connection to send on, so the request cannot have been applied."""
    details = error.details() or ""
    return error.code() == grpc.StatusCode.UNAVAILABLE and details.startswith(
        "failed to connect to all addresses"
    )


def _map_error(
    error: grpc.aio.AioRpcError, endpoint: Endpoint, timeout: float, cert: bool
) -> DatastoreError:
    code, where = error.code(), endpoint.url
    if code in _CONNECTION_CODES:
        return Unavailable(where, _reason(error, timeout, endpoint, cert))
    details = _one_line(error.details() or code.name)
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return _Compacted(f"etcd at {where}: {details}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return DatastoreError(f"etcd at {where} refused the request: {details}")
    return DatastoreError(f"etcd at {where}: {details}")


# -- conversions -------------------------------------------------------------------------------


def _b(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _s(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def _kv(kv: Any) -> KV:
    return KV(_s(kv.key), kv.value, kv.mod_revision, kv.create_revision, kv.version, kv.lease)


def _event(ev: Any) -> Event:
    if ev.type == rpc.Event.EventType.DELETE:
        return Event("delete", _s(ev.kv.key), None, ev.kv.mod_revision)
    return Event("put", _s(ev.kv.key), ev.kv.value, ev.kv.mod_revision)


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    if not prefix:  # the whole keyspace
        return b"\0", b"\0"
    key = _b(prefix)
    return key, aetcd.utils.prefix_range_end(key)


# -- transactions ------------------------------------------------------------------------------


def _compares(op: Op) -> list[Any]:
    key = _b(op.key)
    if isinstance(op, Create):
        return [
            rpc.Compare(
                key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0
            )
        ]
    if isinstance(op, Update) or (isinstance(op, Delete) and op.revision is not None):
        return [
            rpc.Compare(
                key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=op.revision
            )
        ]
    if isinstance(op, Delete):  # unguarded delete still needs the key to exist
        return [
            rpc.Compare(key=key, target=rpc.Compare.VERSION, result=rpc.Compare.GREATER, version=0)
        ]
    if isinstance(op, Unchanged):  # etcd compares a missing key as mod_revision 0
        return [rpc.Compare(key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                            mod_revision=op.revision)]
    if isinstance(op, NothingNewer):  # every key in the range; an empty range passes
        start, end = _prefix_range(op.key)
        return [rpc.Compare(key=start, range_end=end, target=rpc.Compare.MOD,
                            result=rpc.Compare.LESS, mod_revision=op.revision + 1)]
    return []


def _request(op: Op) -> Any:
    key = _b(op.key)
    if isinstance(op, Delete | Purge):
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, prev_kv=True))
    if isinstance(op, Update):
        put = rpc.PutRequest(key=key, value=op.value, ignore_lease=True)
    else:
        put = rpc.PutRequest(key=key, value=op.value, lease=op.lease or 0)
    return rpc.RequestOp(request_put=put)


def _txn_request(ops: Sequence[Op]) -> Any:
    """One txn: all guards, all writes; on failure read back every guarded key."""
    for op in ops:
        # mod_revision 0 means "absent" to etcd, so a guard on 0 would pass for a missing key
        if isinstance(op, Update | Delete) and op.revision is not None and op.revision <= 0:
            raise ValueError(f"{op.key}: revision {op.revision} is not an etcd revision")
    compares = [c for op in ops for c in _compares(op)]
    guarded = list(dict.fromkeys(op.key for op in ops
                                 if not isinstance(op, Put | Purge | NothingNewer)))
    failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=_b(k))) for k in guarded]
    # per prefix guard, one key written since (if any), so the refusal can name it
    failure += [rpc.RequestOp(request_range=rpc.RangeRequest(
        key=start, range_end=end, min_mod_revision=op.revision + 1, limit=1, keys_only=True))
        for op in ops if isinstance(op, NothingNewer)
        for start, end in [_prefix_range(op.key)]]
    success = [_request(op) for op in ops if not isinstance(op, Unchanged | NothingNewer)]
    return rpc.TxnRequest(compare=compares, success=success, failure=failure)


def _precondition_error(ops: Sequence[Op], response: Any) -> DatastoreError:
    """Name the first op whose guard failed, from the values read in the failure branch."""
    prefixes = [op for op in ops if isinstance(op, NothingNewer)]
    reads = list(response.responses)
    split = len(reads) - len(prefixes)  # the guarded keys' reads, then one per prefix guard
    current = {kv.key: kv for r in reads[:split] for kv in map(_kv, r.response_range.kvs)}
    for op in ops:
        kv = current.get(op.key)
        if isinstance(op, Create) and kv is not None:
            return AlreadyExists(op.key, kv)
        if isinstance(op, Unchanged) and (kv.mod_revision if kv else 0) != op.revision:
            return Conflict(op.key, kv, op.revision)
        if isinstance(op, Update | Delete):
            expected = op.revision
            if kv is None:
                return NotFound(op.key)
            if expected is not None and kv.mod_revision != expected:
                return Conflict(op.key, kv, expected)
    for op, r in zip(prefixes, reads[split:], strict=True):
        if r.response_range.kvs:  # a key under the prefix written since: say when
            return Conflict(op.key, _kv(r.response_range.kvs[0]), op.revision)
    # unreachable while etcd is atomic; say what we know rather than guess
    first = next(op for op in ops if not isinstance(op, Put | Purge))
    return Conflict(first.key, current.get(first.key))


# -- the datastore -----------------------------------------------------------------------------


class Datastore:
    """An etcd connection; safe to share between the tasks of one event loop."""

    def __init__(self, config: EtcdConfig, *, watch_idle: float = WATCH_IDLE) -> None:
        if not config.endpoints:
            raise ConfigError("no etcd endpoints configured")
        self.config = config
        self.watch_idle = watch_idle
        self._endpoints = [parse_endpoint(e) for e in config.endpoints]
        self._index = 0
        self._client: _Client | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._tls: grpc.ChannelCredentials | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint in use (or to be tried first)."""
        return self._endpoints[self._index].url

    async def __aenter__(self) -> Datastore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        await self._ready()

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- key/value --

    async def get(self, key: str) -> KV | None:
        request = rpc.RangeRequest(key=_b(key))
        response = await self._call(lambda c: c.kvstub.Range(request, **self._opts(c)), retry=True)
        return _kv(response.kvs[0]) if response.kvs else None

    async def list(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under `prefix`, sorted by key, read at one revision (returned)."""
        while True:
            try:
                return await self._list_once(prefix)
            except _Compacted:  # the pinned revision went away between pages; start over
                continue

    async def read_many(self, gets: Sequence[str], lists: Sequence[str] = ()
                        ) -> tuple[dict[str, KV | None], dict[str, list[KV]], int]:
        """Several gets and prefix listings in ONE read-only transaction, all at one revision
        (values, listings, revision). A listing longer than a page is finished with `list`."""
        ops = [rpc.RequestOp(request_range=rpc.RangeRequest(key=_b(k))) for k in gets]
        for prefix in lists:
            start, end = _prefix_range(prefix)
            ops.append(rpc.RequestOp(request_range=rpc.RangeRequest(
                key=start, range_end=end, limit=LIST_PAGE)))
        if not ops:
            return {}, {}, 0
        request = rpc.TxnRequest(success=ops)
        response = await self._call(lambda c: c.kvstub.Txn(request, **self._opts(c)),
                                    retry=True)
        answers = [r.response_range for r in response.responses]
        values = {k: (_kv(a.kvs[0]) if a.kvs else None)
                  for k, a in zip(gets, answers[:len(gets)], strict=True)}
        listings: dict[str, list[KV]] = {}
        for prefix, answer in zip(lists, answers[len(gets):], strict=True):
            if answer.more:
                listings[prefix] = (await self.list(prefix))[0]
            else:
                listings[prefix] = [_kv(kv) for kv in answer.kvs]
        return values, listings, response.header.revision

    async def create(self, key: str, value: bytes, lease: int | None = None) -> int:
        return await self.commit([Create(key, value, lease)])

    async def update(self, key: str, value: bytes, revision: int) -> int:
        return await self.commit([Update(key, value, revision)])

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        return await self.commit([Put(key, value, lease)])

    async def delete(self, key: str, revision: int | None = None) -> KV:
        response = await self._txn([Delete(key, revision)])
        return _kv(response.responses[0].response_delete_range.prev_kvs[0])

    async def commit(self, ops: Sequence[Op]) -> int:
        """Apply `ops` in one etcd transaction, all or nothing; returns the new revision."""
        response = await self._txn(ops)
        return response.header.revision

    async def revision(self) -> int:
        request = rpc.RangeRequest(key=b"\0")  # any cheap read carries the store revision
        response = await self._call(lambda c: c.kvstub.Range(request, **self._opts(c)), retry=True)
        return response.header.revision

    async def compact(self, revision: int) -> None:
        """Drop history before `revision`; compacting to an already compacted point is a no-op."""
        request = rpc.CompactionRequest(revision=revision)
        with contextlib.suppress(_Compacted):
            await self._call(lambda c: c.kvstub.Compact(request, **self._opts(c)))

    # -- leases --

    async def grant_lease(self, ttl: int) -> int:
        request = rpc.LeaseGrantRequest(TTL=ttl)
        response = await self._call(lambda c: c.leasestub.LeaseGrant(request, **self._opts(c)))
        if response.error:
            raise DatastoreError(f"etcd at {self.endpoint} refused a lease: {response.error}")
        return response.ID

    async def refresh_lease(self, lease_id: int) -> None:
        ttl = await self._call(lambda c: self._keepalive_once(c, lease_id), retry=True)
        if ttl <= 0:
            raise NotFound(f"lease {lease_id:x}")

    async def revoke_lease(self, lease_id: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(lambda c: c.leasestub.LeaseRevoke(request, **self._opts(c)))
        except DatastoreError as e:
            if "lease not found" in str(e):
                raise NotFound(f"lease {lease_id:x}") from None
            raise

    # -- watch --

    def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncIterator[Event | Resync]:
        """Events under `prefix`, in order, each exactly once, across disconnects.

        Without `start_revision` the first item is a Resync of the current listing. Whenever
        the history needed to resume has been compacted, a Resync replaces the caller's state.
        """
        return self._watch(prefix, start_revision)

    async def _watch(
        self, prefix: str, start_revision: int | None
    ) -> AsyncIterator[Event | Resync]:
        backoff = _Backoff()
        next_rev = start_revision
        if next_rev is None:
            resync = await self._resync(prefix, backoff)
            yield resync
            next_rev = resync.revision + 1
        while True:
            stream: _WatchStream | None = None
            try:
                stream = await self._open_watch(prefix, next_rev)
                backoff.reset()
                while True:
                    for event in await stream.events():
                        if event.mod_revision < stream.start_revision:
                            continue  # never hand out anything older than asked for
                        next_rev = event.mod_revision + 1
                        yield event
            except _Compacted:
                if stream is not None:
                    stream.cancel()
                log.info("watch %s: revision %d was compacted; resyncing", prefix, next_rev)
                resync = await self._resync(prefix, backoff)
                yield resync
                next_rev = resync.revision + 1
            except Unavailable as e:
                if stream is not None:
                    stream.cancel()
                    # a silent stream may sit on a dead connection that still looks READY
                    await self._retire(stream.client)
                await self._before_retry(backoff, f"watch {prefix}: {e}; resuming at {next_rev}")
            finally:
                if stream is not None:
                    stream.cancel()

    async def _resync(self, prefix: str, backoff: _Backoff) -> Resync:
        while True:
            try:
                items, revision = await self.list(prefix)
                return Resync(tuple(items), revision)
            except Unavailable as e:
                await self._before_retry(backoff, f"watch {prefix}: listing failed: {e}")

    async def _before_retry(self, backoff: _Backoff, message: str) -> None:
        if self._closed:
            raise DatastoreError("the datastore connection is closed") from None
        delay = backoff.next()
        log.warning("%s; retrying in %.1f s", message, delay)
        await asyncio.sleep(delay)

    async def _open_watch(self, prefix: str, start_revision: int) -> _WatchStream:
        client = await self._ready()
        stream = _WatchStream(client, self, start_revision)
        try:
            await stream.create(*_prefix_range(prefix))
        except BaseException:
            stream.cancel()
            raise
        return stream

    # -- internals --

    def _opts(self, client: _Client) -> dict[str, Any]:
        return {"timeout": self.config.timeout, "metadata": client.metadata}

    async def _txn(self, ops: Sequence[Op]) -> Any:
        request = _txn_request(ops)
        response = await self._call(lambda c: c.kvstub.Txn(request, **self._opts(c)))
        if not response.succeeded:
            raise _precondition_error(ops, response)
        return response

    async def _list_once(self, prefix: str) -> tuple[list[KV], int]:
        start, end = _prefix_range(prefix)
        items: list[KV] = []
        revision = 0  # 0 = latest for the first page; later pages pin the first page's revision
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=LIST_PAGE, revision=revision)
            response = await self._call(
                lambda c, r=request: c.kvstub.Range(r, **self._opts(c)), retry=True
            )
            revision = revision or response.header.revision
            items.extend(_kv(kv) for kv in response.kvs)
            if not response.more:
                return items, revision
            start = response.kvs[-1].key + b"\0"

    async def _keepalive_once(self, client: _Client, lease_id: int) -> int:
        call = client.leasestub.LeaseKeepAlive(
            iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), **self._opts(client)
        )
        try:
            reply = await call.read()
        finally:
            call.cancel()
        return 0 if reply is grpc.aio.EOF else reply.TTL

    async def _call(self, fn: Callable[[_Client], Awaitable[T]], *, retry: bool = False) -> T:
        """Run one request on a live connection; map gRPC failures to DatastoreErrors.

        A request is sent a second time (after a reconnect) only when `retry` says it is
        idempotent or when gRPC reports it never reached a connection.
        """
        for last in (False, True):
            client = await self._ready()
            try:
                return await fn(client)
            except grpc.aio.AioRpcError as e:
                error = await self._failed(client, e)
                again = retry or _never_sent(e)
            except asyncio.CancelledError:
                if _cancelled_by_caller():
                    raise
                error = await self._lost(client, "the connection was closed during the request")
                again = retry
            if last or not (again and isinstance(error, Unavailable)):
                raise error
        raise AssertionError("unreachable")

    def _map(self, client: _Client, error: grpc.aio.AioRpcError) -> DatastoreError:
        return _map_error(error, client.endpoint, self.config.timeout, self._has_cert)

    async def _failed(self, client: _Client, error: grpc.aio.AioRpcError) -> DatastoreError:
        """Map an error; a connection-level one also retires the client."""
        mapped = self._map(client, error)
        if isinstance(mapped, Unavailable):
            await self._retire(client)
        return mapped

    async def _lost(self, client: _Client, reason: str) -> Unavailable:
        """gRPC cancelled a call under us (another task retired its channel)."""
        await self._retire(client)
        return Unavailable(client.endpoint.url, reason)

    async def _retire(self, client: _Client) -> None:
        if self._client is client:
            self._client = None
        await client.close()

    async def _ready(self) -> _Client:
        """A client whose channel is up, dialling the endpoints in turn if needed."""
        if self._closed:
            raise DatastoreError("the datastore connection is closed")
        client = self._client
        if client is not None and client.is_ready():
            return client
        async with self._lock:
            client = self._client
            if client is not None and client.is_ready():
                return client  # another task reconnected while we waited for the lock
            if client is not None:
                try:
                    await self._probe(client)
                    return client
                except grpc.aio.AioRpcError:
                    await self._retire(client)
                except asyncio.CancelledError:
                    if _cancelled_by_caller():
                        raise
                    await self._retire(client)
            return await self._dial()

    async def _dial(self) -> _Client:
        failures: list[tuple[str, str]] = []
        count = len(self._endpoints)
        for step in range(count):
            index = (self._index + step) % count
            endpoint = self._endpoints[index]
            client = _Client(endpoint, self.config.timeout, self._credentials_for(endpoint))
            await client.connect()
            try:
                await self._probe(client)
            except grpc.aio.AioRpcError as e:
                reason = _reason(e, self.config.dial_timeout, endpoint, self._has_cert)
                failures.append((endpoint.url, reason))
                await client.close()
                continue
            if step:
                log.warning(
                    "etcd: using %s (%s)", endpoint.url, "; ".join(map(": ".join, failures))
                )
            self._client, self._index = client, index
            return client
        if count == 1:
            raise Unavailable(*failures[0])
        raise Unavailable(
            ", ".join(url for url, _ in failures),
            "; ".join(f"{url}: {reason}" for url, reason in failures),
        )

    async def _probe(self, client: _Client) -> None:
        """One cheap request bounded by dial_timeout: the connection, TLS and etcd all work."""
        await client.maintenancestub.Status(
            rpc.StatusRequest(), timeout=self.config.dial_timeout, metadata=client.metadata
        )

    @property
    def _has_cert(self) -> bool:
        return self.config.cert_file is not None

    def _credentials_for(self, endpoint: Endpoint) -> grpc.ChannelCredentials | None:
        if not endpoint.tls:
            return None
        if self._tls is None:
            self._tls = _credentials(self.config)
        return self._tls


class _Backoff:
    def __init__(self) -> None:
        self._delay = BACKOFF_START

    def next(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, BACKOFF_MAX)
        return delay

    def reset(self) -> None:
        self._delay = BACKOFF_START


class _WatchStream:
    """One etcd Watch stream for one key range, with a liveness check.

    When nothing arrives for `idle` seconds it asks etcd for a progress notification; if that
    gets no answer within `timeout`, the stream is declared dead (Unavailable).
    """

    def __init__(self, client: _Client, ds: Datastore, start_revision: int) -> None:
        self.client = client
        self.start_revision = start_revision
        self._ds = ds
        self._timeout = ds.config.timeout
        self._idle = ds.watch_idle
        self._call = client.watchstub.Watch(metadata=client.metadata)
        self._pending: asyncio.Future[Any] | None = None

    async def create(self, key: bytes, range_end: bytes) -> None:
        request = rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=self.start_revision
        )
        await self._send(rpc.WatchRequest(create_request=request))
        response = await self._read(self._timeout)
        if response is None:
            raise self._unavailable(f"no answer to the watch request within {self._timeout:g} s")
        if not response.created:
            raise DatastoreError(f"etcd at {self._url}: unexpected watch answer: {response}")
        self._check(response)

    async def events(self) -> list[Event]:
        """The next batch of events (empty for a progress notification)."""
        response = await self._read(self._idle)
        if response is None:  # quiet: is anyone there?
            await self._send(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
            response = await self._read(self._timeout)
            if response is None:
                silent = self._idle + self._timeout
                raise self._unavailable(f"watch stream silent for {silent:g} s")
        self._check(response)
        return [_event(ev) for ev in response.events]

    def cancel(self) -> None:
        """Cancel the RPC (etcd drops the watch with it); safe to call twice."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._call.cancel()

    @property
    def _url(self) -> str:
        return self.client.endpoint.url

    def _unavailable(self, reason: str) -> Unavailable:
        return Unavailable(self._url, reason)

    def _check(self, response: Any) -> None:
        if response.compact_revision:
            raise _Compacted(
                f"revision {self.start_revision} compacted "
                f"(compacted up to {response.compact_revision})"
            )
        if response.canceled:
            reason = _one_line(response.cancel_reason) or "no reason given"
            raise DatastoreError(f"etcd at {self._url} cancelled the watch: {reason}")

    async def _send(self, request: Any) -> None:
        try:
            await asyncio.wait_for(self._call.write(request), self._timeout)
        except TimeoutError:
            raise self._unavailable(f"watch request not sent within {self._timeout:g} s") from None
        except grpc.aio.AioRpcError as e:
            raise self._ds._map(self.client, e) from None
        except asyncio.InvalidStateError:  # the call already ended without an error status
            raise self._unavailable("etcd closed the watch stream") from None
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                raise
            raise self._unavailable("the connection was closed") from None

    async def _read(self, wait: float) -> Any | None:
        """The next response, or None after `wait` seconds; the read stays pending."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._call.read())
            self._pending.add_done_callback(_consume)
        done, _ = await asyncio.wait({self._pending}, timeout=wait)
        if not done:
            return None
        task, self._pending = self._pending, None
        if task.cancelled():  # gRPC cancelled the call: its channel was closed under us
            raise self._unavailable("the connection was closed")
        try:
            response = task.result()
        except grpc.aio.AioRpcError as e:
            raise self._ds._map(self.client, e) from None
        if response is grpc.aio.EOF:
            raise self._unavailable("etcd closed the watch stream")
        return response


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve a finished read's exception so asyncio does not log it as unhandled."""
    if not future.cancelled():
        future.exception()

"""datastore.etcd against a real etcd: CAS writes, commits, leases, watches, TLS, failures.

Every wait is guarded by asyncio.wait_for only to turn a hang into a failure; nothing here
asserts on how long something took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import urllib.request
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from datastore.config import EtcdConfig
from datastore.etcd import (
    KV,
    AlreadyExists,
    Conflict,
    Create,
    Datastore,
    DatastoreError,
    Delete,
    Event,
    NotFound,
    NothingNewer,
    Put,
    Resync,
    Unavailable,
    Unchanged,
    Update,
)
from tests.conftest import require_binary
from tests.etcd_server import EtcdServer, make_tls_files

pytestmark = pytest.mark.etcd

T = TypeVar("T")
GUARD = 60.0  # seconds before a stuck test is failed rather than left hanging


def run(coro: Coroutine[Any, Any, T], guard: float = GUARD) -> T:
    return asyncio.run(asyncio.wait_for(coro, guard))


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own in the module's shared etcd."""
    return f"/test/{request.node.name}/"


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """An etcd that demands client certificates (--client-cert-auth)."""
    require_binary("openssl")
    workdir = tmp_path_factory.mktemp("etcd-tls")
    server = EtcdServer(workdir, tls=make_tls_files(workdir / "pki"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def take(watch: AsyncIterator[Event | Resync], count: int) -> list[Event | Resync]:
    return [await anext(watch) for _ in range(count)]


# -- key/value ---------------------------------------------------------------------------------


def test_crud_round_trip(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            assert await ds.get(prefix + "a") is None
            rev_a = await ds.create(prefix + "a", b"1")
            rev_b = await ds.put(prefix + "b", b"2")
            assert rev_b > rev_a

            got = await ds.get(prefix + "a")
            assert got == KV(prefix + "a", b"1", rev_a, rev_a, 1)

            rev_a2 = await ds.update(prefix + "a", b"10", rev_a)
            items, read_rev = await ds.list(prefix)
            assert [(kv.key, kv.value) for kv in items] == [
                (prefix + "a", b"10"),
                (prefix + "b", b"2"),
            ]
            assert items[0].mod_revision == rev_a2 and items[0].create_revision == rev_a
            assert items[0].version == 2
            assert read_rev >= rev_a2 and read_rev == await ds.revision()

            deleted = await ds.delete(prefix + "b")
            assert deleted.value == b"2" and deleted.mod_revision == rev_b
            assert await ds.get(prefix + "b") is None

    run(body())
    # the layout is plain etcd: etcdctl sees exactly what was written
    assert etcd_server.etcdctl("get", prefix, "--prefix").split() == [prefix + "a", "10"]


def test_list_pages_through_many_keys_at_one_revision(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            count = 1234  # more than two pages of LIST_PAGE
            keys = [f"{prefix}{i:05d}" for i in range(count)]
            for start in range(0, count, 100):
                await ds.commit([Put(k, b"v") for k in keys[start : start + 100]])
            items, revision = await ds.list(prefix)
            assert [kv.key for kv in items] == keys
            assert revision == await ds.revision()

    run(body())


def test_create_existing_raises_already_exists_with_current(
    etcd_server: EtcdServer, prefix: str
) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            rev = await ds.create(prefix + "k", b"first")
            with pytest.raises(AlreadyExists) as err:
                await ds.create(prefix + "k", b"second")
            assert err.value.key == prefix + "k"
            assert err.value.current is not None
            assert (err.value.current.value, err.value.current.mod_revision) == (b"first", rev)
            assert prefix + "k" in str(err.value)
            assert (await ds.get(prefix + "k")).value == b"first"  # type: ignore[union-attr]

    run(body())


def test_update_with_stale_revision_raises_conflict_with_current(
    etcd_server: EtcdServer, prefix: str
) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            rev1 = await ds.create(prefix + "k", b"v1")
            rev2 = await ds.update(prefix + "k", b"v2", rev1)
            with pytest.raises(Conflict) as err:
                await ds.update(prefix + "k", b"v3", rev1)
            current = err.value.current
            assert current is not None and (current.value, current.mod_revision) == (b"v2", rev2)
            assert err.value.key == prefix + "k"
            assert str(rev1) in str(err.value) and str(rev2) in str(err.value)

            with pytest.raises(NotFound) as missing:
                await ds.update(prefix + "absent", b"x", rev1)
            assert missing.value.key == prefix + "absent"

    run(body())


def test_guarded_delete(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            rev1 = await ds.create(prefix + "k", b"v1")
            rev2 = await ds.update(prefix + "k", b"v2", rev1)
            with pytest.raises(Conflict) as err:
                await ds.delete(prefix + "k", revision=rev1)
            assert err.value.current is not None and err.value.current.mod_revision == rev2
            assert await ds.get(prefix + "k") is not None  # the failed delete changed nothing

            deleted = await ds.delete(prefix + "k", revision=rev2)
            assert (deleted.value, deleted.mod_revision) == (b"v2", rev2)
            with pytest.raises(NotFound):
                await ds.delete(prefix + "k")
            with pytest.raises(NotFound):
                await ds.delete(prefix + "k", revision=rev2)

    run(body())


def test_commit_is_all_or_nothing(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            old = await ds.create(prefix + "c", b"c1")
            await ds.put(prefix + "c", b"c2")  # makes `old` stale
            await ds.create(prefix + "d", b"d1")
            before = await ds.revision()

            batch = [
                Create(prefix + "a", b"a"),
                Put(prefix + "b", b"b"),
                Delete(prefix + "d"),
                Update(prefix + "c", b"c3", old),  # the last op fails
            ]
            with pytest.raises(Conflict) as err:
                await ds.commit(batch)
            assert err.value.key == prefix + "c"
            assert await ds.revision() == before  # nothing at all was written
            items, _ = await ds.list(prefix)
            assert [(kv.key, kv.value) for kv in items] == [
                (prefix + "c", b"c2"),
                (prefix + "d", b"d1"),
            ]

            # the first failing op is the one named
            with pytest.raises(AlreadyExists) as first:
                await ds.commit([Update(prefix + "c", b"x", old), Create(prefix + "d", b"x")][::-1])
            assert first.value.key == prefix + "d"
            with pytest.raises(NotFound) as gone:
                await ds.commit([Delete(prefix + "nope"), Update(prefix + "c", b"x", old)])
            assert gone.value.key == prefix + "nope"

            with pytest.raises(ValueError):
                await ds.commit([Update(prefix + "absent", b"x", 0)])
            assert await ds.commit([]) == before  # an empty commit writes nothing

            current = await ds.get(prefix + "c")
            assert current is not None
            rev = await ds.commit([*batch[:3], Update(prefix + "c", b"c3", current.mod_revision)])
            items, _ = await ds.list(prefix)
            assert [(kv.key, kv.value, kv.mod_revision) for kv in items] == [
                (prefix + "a", b"a", rev),
                (prefix + "b", b"b", rev),
                (prefix + "c", b"c3", rev),
            ]

    run(body())


# -- leases ------------------------------------------------------------------------------------


def test_lease_revoke_removes_its_keys(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            lease = await ds.grant_lease(60)
            await ds.create(prefix + "leased", b"x", lease=lease)
            await ds.put(prefix + "plain", b"y")
            got = await ds.get(prefix + "leased")
            assert got is not None and got.lease == lease
            await ds.refresh_lease(lease)

            await ds.revoke_lease(lease)
            assert await ds.get(prefix + "leased") is None
            assert await ds.get(prefix + "plain") is not None
            with pytest.raises(NotFound):
                await ds.refresh_lease(lease)
            with pytest.raises(NotFound):
                await ds.revoke_lease(lease)

    run(body())


def test_update_keeps_the_lease(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            lease = await ds.grant_lease(60)
            rev = await ds.create(prefix + "k", b"1", lease=lease)
            await ds.update(prefix + "k", b"2", rev)
            got = await ds.get(prefix + "k")
            assert got is not None and got.lease == lease
            await ds.revoke_lease(lease)

    run(body())


def test_lease_expiry_deletes_the_key(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            lease = await ds.grant_lease(1)  # etcd raises tiny TTLs to its minimum (~2 s)
            rev = await ds.create(prefix + "k", b"x", lease=lease)
            watch = ds.watch(prefix + "k", start_revision=rev + 1)
            event = await asyncio.wait_for(anext(watch), 30)  # nobody refreshes the lease
            assert (event.type, event.key) == ("delete", prefix + "k")  # type: ignore[union-attr]
            assert await ds.get(prefix + "k") is None
            await watch.aclose()  # type: ignore[attr-defined]

    run(body())


# -- watch -------------------------------------------------------------------------------------


def test_watch_starts_with_resync_then_events(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            await ds.put(prefix + "a", b"1")
            await ds.put(prefix + "b", b"2")
            await ds.put(prefix + "zz-other", b"3")
            await ds.put(prefix[:-1] + "-sibling", b"not under the prefix")
            watch = ds.watch(prefix)
            resync = await anext(watch)
            assert isinstance(resync, Resync)
            assert [kv.key for kv in resync.items] == [
                prefix + "a",
                prefix + "b",
                prefix + "zz-other",
            ]
            assert resync.revision == await ds.revision()

            r1 = await ds.put(prefix + "c", b"3")
            await ds.put(prefix[:-1] + "-sibling", b"still not under the prefix")
            await ds.delete(prefix + "a")
            r3 = await ds.commit([Put(prefix + "d", b"4"), Delete(prefix + "b")])
            events = await take(watch, 4)
            deleted_at = events[1].mod_revision  # type: ignore[union-attr]
            assert r1 < deleted_at < r3
            assert events == [
                Event("put", prefix + "c", b"3", r1),
                Event("delete", prefix + "a", None, deleted_at),
                Event("put", prefix + "d", b"4", r3),  # one txn: one revision, two events
                Event("delete", prefix + "b", None, r3),
            ]
            await watch.aclose()  # type: ignore[attr-defined]

    run(body())


def test_watch_from_revision_replays_history(etcd_server: EtcdServer, prefix: str) -> None:
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            revs = [await ds.put(f"{prefix}{i}", str(i).encode()) for i in range(5)]
            watch = ds.watch(prefix, start_revision=revs[2])
            events = await take(watch, 3)
            assert [(e.key, e.mod_revision) for e in events] == [  # type: ignore[union-attr]
                (f"{prefix}{i}", revs[i]) for i in (2, 3, 4)
            ]
            await watch.aclose()  # type: ignore[attr-defined]

    run(body())


def watcher_count(server: EtcdServer) -> int:
    """etcd's own count of open watchers (from /metrics)."""
    with urllib.request.urlopen(f"{server.endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(r"^etcd_debugging_mvcc_watcher_total (\S+)$", text, re.M)
    assert match, "etcd no longer exports etcd_debugging_mvcc_watcher_total"
    return int(float(match.group(1)))


def test_closing_a_watch_cancels_it_in_etcd(fresh_etcd: EtcdServer) -> None:
    async def wait_watchers(count: int) -> None:
        while watcher_count(fresh_etcd) != count:
            await asyncio.sleep(0.05)

    async def body() -> None:
        async with Datastore(fresh_etcd.config()) as ds:
            watch = ds.watch("/w/")
            await anext(watch)  # the Resync
            await ds.put("/w/a", b"1")
            await anext(watch)
            await wait_watchers(1)
            await watch.aclose()  # type: ignore[attr-defined]
            await wait_watchers(0)

            async for item in ds.watch("/w/"):  # leaving the loop early closes it too
                if isinstance(item, Resync):
                    await ds.put("/w/b", b"2")
                    continue
                await wait_watchers(1)
                break
            await wait_watchers(0)

    run(body())


def test_watch_resumes_across_etcd_restart_without_loss(fresh_etcd: EtcdServer) -> None:
    received: list[Event] = []

    async def consume(watch: AsyncIterator[Event | Resync], arrived: asyncio.Event) -> None:
        async for item in watch:
            assert isinstance(item, Event), f"unexpected {item}"
            received.append(item)
            arrived.set()

    async def wait_for_count(arrived: asyncio.Event, count: int) -> None:
        while len(received) < count:
            arrived.clear()
            await arrived.wait()

    async def body() -> None:
        async with Datastore(fresh_etcd.config()) as writer, Datastore(fresh_etcd.config()) as ds:
            start = await writer.revision() + 1
            arrived = asyncio.Event()
            consumer = asyncio.create_task(consume(ds.watch("/r/", start_revision=start), arrived))
            try:
                revs = [await writer.put(f"/r/{i:02d}", b"before") for i in range(5)]
                await wait_for_count(arrived, 5)

                # restart() blocks the loop, so the watch only finds out afterwards, like a
                # client on a busy node; writes land before it reconnects and must be replayed
                fresh_etcd.restart()
                revs += [await writer.put(f"/r/{i:02d}", b"after") for i in range(5, 10)]
                await wait_for_count(arrived, 10)
                revs += [await writer.put(f"/r/{i:02d}", b"later") for i in range(10, 12)]
                await wait_for_count(arrived, 12)
            finally:
                consumer.cancel()
            assert [(e.key, e.mod_revision) for e in received] == [
                (f"/r/{i:02d}", rev) for i, rev in enumerate(revs)
            ]

    run(body())


def test_watch_notices_a_hung_etcd_and_recovers(
    fresh_etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped (SIGSTOP) etcd keeps its sockets open; only the liveness check notices."""

    async def body() -> None:
        config = fresh_etcd.config(timeout=1.0, dial_timeout=1.0)
        async with Datastore(config, watch_idle=0.5) as ds:
            watch = ds.watch("/h/")
            assert isinstance(await anext(watch), Resync)
            rev = await ds.put("/h/before", b"1")
            assert await anext(watch) == Event("put", "/h/before", b"1", rev)

            pending = asyncio.ensure_future(anext(watch))
            fresh_etcd.pause()
            try:
                while not any("retrying" in r.getMessage() for r in caplog.records):
                    await asyncio.sleep(0.1)
            finally:
                fresh_etcd.resume()
            async with Datastore(fresh_etcd.config()) as writer:
                rev = await writer.put("/h/after", b"2")
            assert await pending == Event("put", "/h/after", b"2", rev)
            await watch.aclose()  # type: ignore[attr-defined]

    with caplog.at_level(logging.WARNING, logger="datastore.etcd"):
        run(body())
    assert any("silent" in r.getMessage() for r in caplog.records)


def test_watch_survives_a_request_timeout_on_its_connection(fresh_etcd: EtcdServer) -> None:
    """A timed-out request replaces the shared connection; the watch on it must carry on."""

    async def body() -> None:
        config = fresh_etcd.config(timeout=1.0, dial_timeout=1.0)
        async with Datastore(config, watch_idle=600) as ds:  # only the timeout can intervene
            watch = ds.watch("/s/")
            assert isinstance(await anext(watch), Resync)
            rev = await ds.put("/s/before", b"0")
            assert await anext(watch) == Event("put", "/s/before", b"0", rev)  # stream is up
            pending = asyncio.ensure_future(anext(watch))
            fresh_etcd.pause()
            try:
                with pytest.raises(Unavailable, match="no answer within 1 s"):
                    await ds.get("/s/x")
            finally:
                fresh_etcd.resume()
            rev = await ds.put("/s/after", b"1")
            assert await pending == Event("put", "/s/after", b"1", rev)
            await watch.aclose()  # type: ignore[attr-defined]

    run(body())


def test_watch_from_compacted_revision_resyncs(fresh_etcd: EtcdServer) -> None:
    async def body() -> None:
        async with Datastore(fresh_etcd.config()) as ds:
            old = await ds.put("/c/a", b"1")
            await ds.put("/c/b", b"2")
            await ds.put("/c/a", b"3")
            await ds.delete("/c/b")
            now = await ds.put("/c/z", b"4")
            await ds.compact(now)
            await ds.compact(now)  # compacting again is harmless

            watch = ds.watch("/c/", start_revision=old + 1)
            resync = await anext(watch)
            assert isinstance(resync, Resync)
            assert resync.revision == now
            assert [(kv.key, kv.value) for kv in resync.items] == [("/c/a", b"3"), ("/c/z", b"4")]

            rev = await ds.put("/c/after", b"5")
            assert await anext(watch) == Event("put", "/c/after", b"5", rev)
            await watch.aclose()  # type: ignore[attr-defined]

    run(body())


def test_watch_resumes_into_compaction_with_resync(
    fresh_etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """History compacted while the watcher was disconnected: it resumes with a fresh listing."""

    async def body() -> None:
        async with Datastore(fresh_etcd.config()) as ds:
            watch = ds.watch("/q/")
            assert isinstance(await anext(watch), Resync)
            rev = await ds.put("/q/a", b"1")
            assert await anext(watch) == Event("put", "/q/a", b"1", rev)

            pending = asyncio.ensure_future(anext(watch))
            fresh_etcd.stop()
            while not any("retrying" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)  # until the watch knows it lost etcd
            # etcdctl runs synchronously, so the watch cannot reconnect before the compaction
            fresh_etcd.start()
            fresh_etcd.etcdctl("put", "/q/a", "2")
            fresh_etcd.etcdctl("put", "/q/b", "3")
            header = json.loads(fresh_etcd.etcdctl("put", "/q/a", "4", "-w", "json"))["header"]
            fresh_etcd.etcdctl("compaction", str(header["revision"]))

            resync = await pending
            assert isinstance(resync, Resync) and resync.revision >= header["revision"]
            assert [(kv.key, kv.value) for kv in resync.items] == [("/q/a", b"4"), ("/q/b", b"3")]
            rev = await ds.put("/q/c", b"5")
            assert await anext(watch) == Event("put", "/q/c", b"5", rev)
            await watch.aclose()  # type: ignore[attr-defined]

    with caplog.at_level(logging.WARNING, logger="datastore.etcd"):
        run(body())


# -- TLS and failures --------------------------------------------------------------------------


def test_mtls_with_client_certificate(tls_etcd: EtcdServer) -> None:
    async def body() -> None:
        async with Datastore(tls_etcd.config()) as ds:
            rev = await ds.create("/tls/k", b"secret")
            got = await ds.get("/tls/k")
            assert got is not None and got.mod_revision == rev
            watch = ds.watch("/tls/")
            resync = await anext(watch)
            assert isinstance(resync, Resync) and [kv.key for kv in resync.items] == ["/tls/k"]
            await watch.aclose()  # type: ignore[attr-defined]

    run(body())
    assert tls_etcd.etcdctl("get", "/tls/k", "--print-value-only").strip() == "secret"


def test_mtls_without_client_certificate_is_refused_clearly(tls_etcd: EtcdServer) -> None:
    config = tls_etcd.config(cert_file=None, key_file=None)

    async def body() -> None:
        async with Datastore(config) as ds:
            await ds.get("/tls/k")

    with pytest.raises(DatastoreError) as err:
        run(body(), guard=30)
    message = str(err.value)
    assert tls_etcd.endpoint in message and "client certificate" in message
    assert "\n" not in message


def test_unreachable_etcd_raises_unavailable_naming_the_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"

    async def body() -> None:
        ds = Datastore(EtcdConfig(endpoints=(endpoint,), timeout=2.0, dial_timeout=2.0))
        try:
            await ds.put("/x", b"1")
        finally:
            await ds.close()

    with pytest.raises(Unavailable) as err:
        run(body(), guard=30)
    assert str(err.value).startswith(f"etcd at {endpoint} is unreachable: ")
    assert err.value.endpoint == endpoint


def test_dead_first_endpoint_falls_over_to_the_next(etcd_server: EtcdServer, prefix: str) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"

    async def body() -> None:
        async with Datastore(EtcdConfig(endpoints=(dead, etcd_server.endpoint))) as ds:
            rev = await ds.put(prefix + "k", b"v")
            assert (await ds.get(prefix + "k")).mod_revision == rev  # type: ignore[union-attr]
            assert ds.endpoint == etcd_server.endpoint
            watch = ds.watch(prefix)
            assert isinstance(await anext(watch), Resync)
            await watch.aclose()  # type: ignore[attr-defined]

    run(body(), guard=30)


def test_failover_when_the_endpoint_in_use_dies(
    fresh_etcd: EtcdServer, etcd_server: EtcdServer, prefix: str
) -> None:
    async def body() -> None:
        config = EtcdConfig(endpoints=(fresh_etcd.endpoint, etcd_server.endpoint))
        async with Datastore(config) as ds:
            await ds.put(prefix + "k", b"on the first")
            assert ds.endpoint == fresh_etcd.endpoint
            fresh_etcd.stop()
            await ds.put(prefix + "k", b"on the second")
            assert ds.endpoint == etcd_server.endpoint

    run(body(), guard=30)
    assert etcd_server.etcdctl("get", prefix + "k", "--print-value-only").strip() == "on the second"


def test_closed_datastore_refuses_requests(etcd_server: EtcdServer) -> None:
    async def body() -> None:
        ds = Datastore(etcd_server.config())
        await ds.connect()
        await ds.close()
        with pytest.raises(DatastoreError, match="closed"):
            await ds.get("/x")

    run(body())


def test_unreadable_tls_file_is_a_datastore_error(tmp_path: Path) -> None:
    config = EtcdConfig(endpoints=("https://127.0.0.1:2379",), ca_cert_file=str(tmp_path / "no"))

    async def body() -> None:
        async with Datastore(config):
            pass

    with pytest.raises(DatastoreError, match="CA file"):
        run(body())


def test_guards_that_write_nothing(etcd_server: EtcdServer, prefix: str) -> None:
    """Unchanged: a key still at a revision (0: still absent); NothingNewer: no key under a
    prefix written after a revision. Both only guard the transaction's writes."""
    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            rev_a = await ds.create(prefix + "list/a", b"1")
            await ds.create(prefix + "list/b", b"2")
            listed = await ds.revision()
            ok = [Unchanged(prefix + "list/a", rev_a), Unchanged(prefix + "absent", 0),
                  NothingNewer(prefix + "list/", listed), Put(prefix + "out", b"x")]
            await ds.commit(ok)
            assert (await ds.get(prefix + "out")) is not None

            await ds.put(prefix + "list/a", b"changed")
            with pytest.raises(Conflict) as changed:
                await ds.commit([Unchanged(prefix + "list/a", rev_a), Put(prefix + "o2", b"")])
            assert changed.value.key == prefix + "list/a"
            await ds.create(prefix + "absent", b"now here")
            with pytest.raises(Conflict) as appeared:
                await ds.commit([Unchanged(prefix + "absent", 0), Put(prefix + "o2", b"")])
            assert appeared.value.key == prefix + "absent"
            listed = await ds.revision()
            await ds.commit([NothingNewer(prefix + "list/", listed)])  # guards only: fine
            await ds.create(prefix + "other/x", b"")
            created = await ds.create(prefix + "list/c", b"3")  # a new key under the prefix
            with pytest.raises(Conflict) as newer:
                await ds.commit([NothingNewer(prefix + "other/", created),  # holds
                                 NothingNewer(prefix + "list/", listed), Put(prefix + "o2", b"")])
            # the refusal names the prefix that moved, and when
            assert newer.value.key == prefix + "list/"
            assert str(newer.value).endswith(f"expected revision {listed}, it is now at "
                                             f"revision {created}")
            assert await ds.get(prefix + "o2") is None  # nothing of a refused commit
    run(body())


async def guards_hold_again(remembered: Any, batch: Any, ds: Datastore) -> None:
    """Once the watches have caught up, a fresh answer's guards commit (within 10 s)."""
    for _ in range(1000):
        fresh = remembered.answer(batch)
        assert fresh is not None
        try:
            await ds.commit(list(fresh[1]))
            return
        except Conflict:
            await asyncio.sleep(0.01)
    raise AssertionError("the watches never caught up")


def test_remembered_reads_answer_as_a_read_would_with_guards_that_notice_changes(
        etcd_server: EtcdServer, prefix: str) -> None:
    from datastore.reads import ReadBatch
    from datastore.remembered import RememberedReads

    async def body() -> None:
        async with Datastore(etcd_server.config()) as ds:
            await ds.create(prefix + "pods/ns/a", b"A")
            await ds.create(prefix + "pools/p1", b"P1")
            await ds.create(prefix + "node", b"N")
            remembered = RememberedReads(ds, roots=[prefix + "pods/"])
            batch = ReadBatch(gets=[prefix + "pods/ns/a", prefix + "pods/ns/b", prefix + "node",
                                    prefix + "mine"], lists=[prefix + "pools/"])
            mine = {"assume_absent": [prefix + "mine"]}
            assert remembered.answer(batch, **mine) is None  # starts the three watches
            while not (watched := remembered.watching()) or not all(watched.values()):
                await asyncio.sleep(0.01)
            assert set(watched) == {prefix + "pods/", prefix + "node", prefix + "pools/"}
            got = remembered.answer(batch, **mine)
            assert got is not None
            result, guards = got
            real = await batch.run(ds)
            for key in batch.gets:
                assert result.get(key) == (real.get(key) if key != prefix + "mine" else None)
            assert [(kv.key, kv.value) for kv in result.list(prefix + "pools/")] == \
                [(kv.key, kv.value) for kv in real.list(prefix + "pools/")]
            await ds.commit([*guards, Put(prefix + "mine", b"1")])  # all still true

            # every kind of change fails the same guards: a modified, a deleted, a created key
            batch = ReadBatch(gets=[prefix + "pods/ns/a", prefix + "pods/ns/b", prefix + "node"],
                              lists=[prefix + "pools/"])
            for change in (Put(prefix + "pods/ns/a", b"A2"), Delete(prefix + "pools/p1"),
                           Put(prefix + "pools/p2", b"P2"), Put(prefix + "pods/ns/b", b"B")):
                got = remembered.answer(batch)
                assert got is not None
                await ds.commit([change])
                with pytest.raises(Conflict):
                    await ds.commit([*got[1], Put(prefix + "never", b"")])
                await guards_hold_again(remembered, batch, ds)
            assert await ds.get(prefix + "never") is None
            await remembered.close()
            assert remembered.watching() == {}
    run(body())

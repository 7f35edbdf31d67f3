"""tabby-node's CNI service and the `tabby` shim together, over a real unix socket.

Two kinds of daemon: a CniService on a thread with a stub handler (timeouts, concurrency,
framing), and the real `tabby-node` command with the real handler against a real etcd (VERSION,
STATUS, errors; health; Node registration; clean shutdown). Nothing here touches the network:
the real handler only runs VERSION, STATUS and requests it rejects before any plumbing.
Sockets live in short temporary directories under /tmp, never /run/tabby.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni import spec
from node.cni_service import (
    CniService,
    ServiceError,
    ServicesCache,
    bind_socket,
    decode_reply,
    probe,
)
from tests.etcd_server import EtcdServer
from tests.unit.test_shim import PYTHON, SHIM

pytestmark = pytest.mark.etcd

BIN = Path(sys.executable).parent
VENV_PYTHON = sys.executable


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tabby-svc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shim(sock: Path, env: Mapping[str, str], stdin: bytes = b"",
         **extra: str) -> subprocess.CompletedProcess[bytes]:
    """Run the shim as kubelet would, with the venv's python baked in for the fallback."""
    full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TABBY_CNI_SOCKET": str(sock),
            "TABBY_PYTHON": VENV_PYTHON, **env, **extra}
    return subprocess.run([PYTHON, "-IS", str(SHIM)], input=stdin, env=full,
                          capture_output=True, timeout=120, check=False)


# -- a CniService with a stub handler on its own thread ---------------------------------------


@dataclass
class StubReply:
    exit_code: int
    stdout: str
    stderr: str = ""


class ServiceThread:
    """A CniService running on a private event loop in a thread."""

    def __init__(self, sock: Path, handler: Any, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.sock = sock
        self.handler = handler
        self.kw = kw
        self.service: CniService | None = None

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> CniService:
        self.thread.start()

        async def start() -> CniService:
            cache = ServicesCache(_log(), self.sock.parent / "spool", opener=_no_etcd)
            service = CniService(self.sock, cache, handler=self.handler, **self.kw)
            await service.start()
            return service

        self.service = self.call(start())
        return self.service

    def __exit__(self, *exc: object) -> None:
        try:
            if self.service is not None:
                self.call(self.service.stop(drain=5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def _log() -> Any:
    import logging

    return logging.getLogger("tabby.test")


async def _no_etcd(*_: Any) -> Any:
    raise AssertionError("the stub handler never asks for etcd")


def test_stub_reply_is_relayed_exactly(short_dir: Path) -> None:
    seen: list[tuple[dict[str, str], bytes]] = []

    async def handler(env: Mapping[str, str], stdin: bytes, _services: Any) -> StubReply:
        seen.append((dict(env), stdin))
        return StubReply(3, '{"out": "é"}\n', "some log\n")

    sock = short_dir / "run" / "cni.sock"
    with ServiceThread(sock, handler):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        done = shim(sock, {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "HOME": "/root"},
                    b"\xffbytes")
    assert (done.returncode, done.stdout, done.stderr) == (3, '{"out": "é"}\n'.encode(),
                                                           b"some log\n")
    env, stdin = seen[0]
    assert stdin == b"\xffbytes"
    assert env == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1",
                   "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    assert not sock.exists()  # removed on stop


def test_a_hanging_handler_is_answered_with_error_11_within_the_bound(short_dir: Path) -> None:
    async def handler(*_: Any) -> StubReply:
        await asyncio.sleep(3600)
        raise AssertionError

    sock = short_dir / "cni.sock"
    with ServiceThread(sock, handler, timeout=0.5):
        started = time.monotonic()
        done = shim(sock, {"CNI_COMMAND": "ADD"}, b'{"cniVersion":"0.4.0"}')
        elapsed = time.monotonic() - started
    err = json.loads(done.stdout)
    assert done.returncode == 1
    assert (err["code"], err["cniVersion"]) == (spec.TRY_AGAIN_LATER, "0.4.0")
    assert "within 0.5 s" in err["details"]
    assert elapsed < 20  # answered by the daemon's bound, not the shim's 75 s


def test_a_raising_handler_still_gives_cni_json(short_dir: Path) -> None:
    async def handler(*_: Any) -> StubReply:
        raise RuntimeError("boom")

    sock = short_dir / "cni.sock"
    with ServiceThread(sock, handler):
        done = shim(sock, {"CNI_COMMAND": "DEL"}, b"{}")
    err = json.loads(done.stdout)
    assert (done.returncode, err["code"]) == (1, spec.INTERNAL)
    assert "boom" in err["details"]


def test_fifty_concurrent_requests_are_all_answered(short_dir: Path) -> None:
    active = {"now": 0, "max": 0}

    async def handler(env: Mapping[str, str], _stdin: bytes, _services: Any) -> StubReply:
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        await asyncio.sleep(0.5)
        active["now"] -= 1
        return StubReply(0, env["CNI_CONTAINERID"] + "\n")

    sock = short_dir / "cni.sock"
    with ServiceThread(sock, handler, concurrency=64):
        procs = [subprocess.Popen(
            [PYTHON, "-IS", str(SHIM)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            env={"TABBY_CNI_SOCKET": str(sock), "TABBY_PYTHON": "/bin/false",
                 "CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"c{i}"}) for i in range(50)]
        outputs = [(p.communicate(timeout=60)[0], p.returncode) for p in procs]
    assert outputs == [(f"c{i}\n".encode(), 0) for i in range(50)]
    assert active["max"] > 1  # they overlapped


def test_the_semaphore_bounds_concurrency(short_dir: Path) -> None:
    active = {"now": 0, "max": 0}

    async def handler(*_: Any) -> StubReply:
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        await asyncio.sleep(0.05)
        active["now"] -= 1
        return StubReply(0, "")

    sock = short_dir / "cni.sock"
    with ServiceThread(sock, handler, concurrency=4) as service:
        async def many() -> list[dict[str, Any]]:
            return await asyncio.gather(*(probe(sock, timeout=30) for _ in range(40)))

        replies = asyncio.run(many())
        assert service.handled == 40
    assert all(r["exit_code"] == 0 for r in replies)
    assert active["max"] == 4


def test_a_bad_frame_gets_a_decoding_error(short_dir: Path) -> None:
    async def handler(*_: Any) -> StubReply:
        raise AssertionError("not called for a bad frame")

    sock = short_dir / "cni.sock"
    with ServiceThread(sock, handler):
        frames = [b"not a frame", b"TABBY-CNI 2\nCNI_COMMAND=ADD", b"TABBY-CNI 2\nNOEQUALS\0\0",
                  b"TABBY-CNI 9\n\0", b'{"env": {"A": 1}, "stdin": ""}', b"[1]"]
        for frame in frames:
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(sock))
                c.sendall(frame)
                c.shutdown(socket.SHUT_WR)
                raw = b"".join(iter(lambda c=c: c.recv(65536), b""))
            # the first shims' JSON frames are answered in JSON, everything else in frames
            reply = json.loads(raw) if frame.startswith(b"{") else decode_reply(raw)
            assert reply["exit_code"] == 1, frame
            assert json.loads(reply["stdout"])["code"] == spec.DECODING_FAILURE


def test_stale_socket_is_replaced_and_a_live_one_is_refused(short_dir: Path) -> None:
    path = short_dir / "cni.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    live = bind_socket(path)  # the stale file is removed and re-bound
    try:
        with pytest.raises(ServiceError, match="already serving"):
            bind_socket(path)
    finally:
        live.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(ServiceError, match="not a socket"):
        bind_socket(path)


def test_services_are_opened_once_per_config() -> None:
    from datastore.config import EtcdConfig

    opened: list[EtcdConfig] = []

    async def opener(config: EtcdConfig, *_: Any) -> Any:
        await asyncio.sleep(0.01)
        opened.append(config)
        return object()

    async def go() -> None:
        cache = ServicesCache(_log(), Path("/nonexistent"), opener=opener)
        a, b = EtcdConfig(endpoints=("http://127.0.0.1:1",)), EtcdConfig(
            endpoints=("http://127.0.0.1:2",))
        got = await asyncio.gather(*(cache.get(c) for c in (a, b, a, a, b)))
        assert got[0] is got[2] is got[3] and got[1] is got[4] and got[0] is not got[1]

    asyncio.run(go())
    assert len(opened) == 2


# -- the real tabby-node ----------------------------------------------------------------------


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    sock: Path
    health_port: int
    log: Path
    workdir: Path

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def tabby_node(workdir: Path, endpoint: str, nodename: str = "node-a",
               *extra: str) -> Iterator[Node]:
    sock = workdir / "run" / "cni.sock"
    port = free_port()
    log = workdir / "log" / "tabby-node.log"
    cmd = [str(BIN / "tabby-node"), "--nodename", nodename,
           "--nodename-file", str(workdir / "nodename"), "--socket", str(sock),
           "--etcd-endpoints", endpoint, "--log-file", str(log), "--health-port", str(port),
           "--spool-dir", str(workdir / "spool"), "--replay-interval", "1", "--no-felix",
           # in the root namespace: no routing agent, nothing read for a BGP address
           "--networking-backend", "none", "--ip", "none",
           *extra]
    with open(workdir / "stderr", "ab") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    node = Node(proc, sock, port, log, workdir)
    try:
        _wait(lambda: proc.poll() is not None or _serving(sock), 30, "tabby-node's socket")
        assert proc.poll() is None, (workdir / "stderr").read_text()
        yield node
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _serving(sock: Path) -> bool:
    try:
        asyncio.run(probe(sock, timeout=1))
        return True
    except (OSError, ServiceError, TimeoutError, ValueError):
        return False


def netconf(endpoint: str, workdir: Path, version: str = "1.1.0") -> bytes:
    return json.dumps({
        "cniVersion": version, "name": "k8s-pod-network", "type": "tabby",
        "datastore_type": "etcdv3", "etcd_endpoints": endpoint, "nodename": "node-a",
        "log_file_path": str(workdir / "cni.log"), "ipam": {"type": "tabby-ipam"},
    }).encode()


def both_paths(node: Node, env: Mapping[str, str],
               stdin: bytes) -> tuple[subprocess.CompletedProcess[bytes], ...]:
    """The same request through tabby-node and through the in-process fallback."""
    spool = str(node.workdir / "fallback-spool")
    via_socket = shim(node.sock, env, stdin, TABBY_SPOOL_DIR=spool)
    fallback = shim(node.workdir / "absent.sock", env, stdin, TABBY_SPOOL_DIR=spool)
    return via_socket, fallback


def _pool(server: EtcdServer) -> None:
    pool = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
            "metadata": {"name": "test-pool"},
            "spec": {"cidr": "10.244.0.0/16", "blockSize": 26, "nodeSelector": "all()"}}

    async def go() -> None:
        from datastore.etcd import Datastore
        from datastore.store import ResourceStore

        async with Datastore(server.config()) as ds:
            await ResourceStore(ds).apply(pool)

    asyncio.run(go())


@pytest.fixture
def node(etcd_server: EtcdServer, short_dir: Path) -> Iterator[Node]:
    with tabby_node(short_dir, etcd_server.endpoint) as n:
        yield n


VERSION_ENV = {"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy",
               "CNI_PATH": "dummy", "CNI_CONTAINERID": ""}  # what podman probes with


def test_version_via_daemon_and_fallback_is_identical(node: Node) -> None:
    daemon, fallback = both_paths(node, VERSION_ENV, b'{"cniVersion":"1.0.0"}')
    assert daemon.returncode == fallback.returncode == 0
    assert daemon.stdout == fallback.stdout
    assert json.loads(daemon.stdout)["supportedVersions"] == list(spec.SUPPORTED_VERSIONS)


def test_status_via_daemon_and_fallback_is_identical(node: Node, etcd_server: EtcdServer
                                                     ) -> None:
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}
    _pool(etcd_server)
    daemon, fallback = both_paths(node, env, netconf(etcd_server.endpoint, node.workdir))
    assert (daemon.returncode, daemon.stdout) == (fallback.returncode, fallback.stdout) == (0, b"")
    # etcd down: an etcd nobody serves (the daemon opens a second warm Services for it)
    dead = f"http://127.0.0.1:{free_port()}"
    daemon, fallback = both_paths(node, env, netconf(dead, node.workdir))
    assert daemon.returncode == fallback.returncode == 1
    assert daemon.stdout == fallback.stdout
    err = json.loads(daemon.stdout)
    assert (err["code"], err["cniVersion"]) == (spec.NOT_AVAILABLE, "1.1.0")


def test_malformed_stdin_is_code_6_on_both_paths(node: Node) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/none",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    daemon, fallback = both_paths(node, env, b'{"cniVersion": "1.0.0", "name": ')
    assert daemon.returncode == fallback.returncode == 1
    assert daemon.stdout == fallback.stdout
    assert json.loads(daemon.stdout)["code"] == spec.DECODING_FAILURE


def test_health_endpoints(node: Node) -> None:
    assert node.get("/liveness")[0] == 200
    status, body = node.get("/readiness")
    assert status == 200, body
    assert body["ready"] is True and set(body["checks"]) == {"etcd", "cni"}
    assert node.get("/nope")[0] == 404


def test_registers_node_and_cluster_information(node: Node, etcd_server: EtcdServer) -> None:
    key = "/calico/resources/v3/projectcalico.org/nodes/node-a"
    _wait(lambda: etcd_server.etcdctl("get", key, "--print-value-only").strip(), 20,
          "the Node resource")
    stored = json.loads(etcd_server.etcdctl("get", key, "--print-value-only"))
    assert stored["metadata"]["labels"] == {"kubernetes.io/hostname": "node-a"}
    info = json.loads(etcd_server.etcdctl(
        "get", "/calico/resources/v3/projectcalico.org/clusterinformations/default",
        "--print-value-only"))
    assert info["spec"]["datastoreReady"] is True and info["spec"]["clusterGUID"]
    assert (node.workdir / "nodename").read_text() == "node-a"


def test_readiness_fails_without_etcd_and_comes_back(fresh_etcd: EtcdServer,
                                                      short_dir: Path) -> None:
    with tabby_node(short_dir, fresh_etcd.endpoint) as n:
        _wait(lambda: n.get("/readiness")[0] == 200, 20, "readiness")
        fresh_etcd.stop()
        status, body = n.get("/readiness")
        assert status == 503 and body["checks"]["cni"]["ok"] is True
        assert body["checks"]["etcd"]["ok"] is False
        # VERSION needs no etcd: still served by the daemon
        assert shim(n.sock, VERSION_ENV, b'{"cniVersion":"1.0.0"}').returncode == 0
        fresh_etcd.start()
        _wait(lambda: n.get("/readiness")[0] == 200, 30, "readiness after etcd is back")


def test_sigterm_removes_the_socket_and_a_second_daemon_is_refused(
        etcd_server: EtcdServer, short_dir: Path) -> None:
    with tabby_node(short_dir, etcd_server.endpoint) as n:
        other = subprocess.run(
            [str(BIN / "tabby-node"), "--socket", str(n.sock), "--nodename", "x",
             "--nodename-file", str(short_dir / "other-nodename"), "--log-file", "",
             "--health-port", "0", "--etcd-endpoints", etcd_server.endpoint, "--no-felix",
             "--networking-backend", "none", "--ip", "none"],
            capture_output=True, text=True, timeout=60, check=False)
        assert other.returncode == 1 and "already serving" in other.stderr
        assert n.sock.exists()  # the refused daemon left the live socket alone
        n.proc.send_signal(signal.SIGTERM)
        assert n.proc.wait(20) == 0
        assert not n.sock.exists()
        text = n.log.read_text()
        assert "CNI service listening" in text and "stopped" in text


def test_no_socket_falls_back_for_a_bad_netns(short_dir: Path) -> None:
    """The fallback reports the spec's code for a missing netns without touching anything."""
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni"}
    done = shim(short_dir / "absent.sock", env,
                netconf("http://127.0.0.1:1", short_dir, "1.0.0"),
                TABBY_SPOOL_DIR=str(short_dir / "spool"))
    assert done.returncode == 1
    assert json.loads(done.stdout)["code"] == spec.INVALID_ENVIRONMENT


def test_registration_keeps_what_is_there_and_writes_only_changes(
        etcd_server: EtcdServer) -> None:
    from datastore.etcd import Datastore
    from datastore.kinds import kind_for
    from datastore.store import ResourceStore
    from node.registration import ensure_cluster_information, register_node

    async def go() -> None:
        async with Datastore(etcd_server.config()) as ds:
            store = ResourceStore(ds)
            await store.apply({"apiVersion": "projectcalico.org/v3", "kind": "Node",
                               "metadata": {"name": "node-b", "labels": {"rack": "r1"}},
                               "spec": {"bgp": {"ipv4Address": "198.18.0.2/24"}}})
            assert await register_node(store, "node-b") == "updated"
            node = await store.get(kind_for("Node"), "node-b")
            assert node["metadata"]["labels"] == {"rack": "r1",
                                                  "kubernetes.io/hostname": "node-b"}
            assert node["spec"]["bgp"] == {"ipv4Address": "198.18.0.2/24"}
            assert await register_node(store, "node-b") == "unchanged"
            again = await store.get(kind_for("Node"), "node-b")
            assert again["metadata"]["resourceVersion"] == node["metadata"]["resourceVersion"]

            # an operator's datastoreReady: false (a lock) stays
            await store.apply({"apiVersion": "projectcalico.org/v3",
                               "kind": "ClusterInformation", "metadata": {"name": "default"},
                               "spec": {"clusterGUID": "abc", "datastoreReady": False}})
            assert await ensure_cluster_information(store) == "unchanged"
            info = await store.get(kind_for("ClusterInformation"), "default")
            assert info["spec"]["datastoreReady"] is False
            # unset: set to true, GUID kept
            await store.apply({"apiVersion": "projectcalico.org/v3",
                               "kind": "ClusterInformation", "metadata": {"name": "default"},
                               "spec": {"clusterGUID": "abc"}})
            assert await ensure_cluster_information(store) == "updated"
            info = await store.get(kind_for("ClusterInformation"), "default")
            assert info["spec"] == {"clusterGUID": "abc", "datastoreReady": True}

    asyncio.run(go())


def test_defaults_agree_with_the_handler() -> None:
    from cni import handler, shim
    from node import main

    assert main.DEFAULT_SPOOL == handler.DEFAULT_SPOOL
    assert handler.DEADLINE < main.REQUEST_TIMEOUT < shim.REPLY_TIMEOUT


def test_the_mtu_file_is_the_same_everywhere() -> None:
    """tabby-node hands its --mtu-file to the routing agent, which writes where the CNI reads."""
    from bgp import agent, mtu
    from cni import netconf
    from node import main

    assert str(main.DEFAULT_MTU_FILE) == str(mtu.DEFAULT_MTU_FILE) == netconf.DEFAULT_MTU_FILE
    opts = main.parse_args(["--mtu-file", "/run/x/mtu", "--etcd-endpoints", "http://e:2379"])
    argv = main.routing_argv(opts, "node-a")
    assert agent.parse_args(argv[3:]).mtu_file == Path("/run/x/mtu")

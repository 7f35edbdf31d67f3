"""tabby-node's CNI service: the unix socket the `tabby` shim forwards each CNI request to.

One request per connection (the wire protocol is in cni/shim.py). Every request runs
`cni.handler.handle()` with warm imports and a warm etcd connection, bounded in time (an
answer within REQUEST_TIMEOUT, else CNI error 11 so the runtime retries) and in number
(CONCURRENCY handlers at once; the rest wait for a slot inside the same time bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cni import shim, spec

if TYPE_CHECKING:
    from cni.handler import Services
    from datastore.config import EtcdConfig

DEFAULT_SOCKET = "/run/tabby/cni.sock"
REQUEST_TIMEOUT = 65.0  # handle() bounds itself at 60 s; the shim waits 75 s (cni.shim)
CONCURRENCY = 64
BACKLOG = 256  # the shim retries a full backlog until its connect timeout
MAX_REQUEST = 4 << 20  # a netconf with prevResult is a few KiB
READ_TIMEOUT = 10.0  # a client that connects and sends nothing does not hold a connection
DRAIN_TIMEOUT = 30.0  # on stop: how long requests already running may finish
MAX_UNIX_PATH = 107


class ServiceError(Exception):
    """The CNI socket cannot be served; str() says why and what to do."""


class ReplyLike(Protocol):
    exit_code: int
    stdout: str
    stderr: str


ServicesFactory = Callable[["EtcdConfig"], Awaitable["Services"]]
Handler = Callable[[Mapping[str, str], bytes, ServicesFactory], Awaitable[ReplyLike]]
Opener = Callable[["EtcdConfig", logging.Logger, Path], Awaitable["Services"]]


class ServicesCache:
    """One warm Services per etcd config, opened on first use. A failed open is not kept, so
    the next request tries again (etcd may be back)."""

    def __init__(self, log: logging.Logger, spool_dir: Path, opener: Opener | None = None):
        self.log = log
        self.spool_dir = spool_dir
        self._opener = opener
        self._open: dict[EtcdConfig, Services] = {}
        self._locks: dict[EtcdConfig, asyncio.Lock] = {}

    async def get(self, config: EtcdConfig) -> Services:
        if (found := self._open.get(config)) is not None:
            return found
        async with self._locks.setdefault(config, asyncio.Lock()):  # one open per config
            if (found := self._open.get(config)) is not None:
                return found
            opener = self._opener or _open_remembering
            services = await opener(config, self.log, self.spool_dir)
            self._open[config] = services
            self.log.info("etcd services open for %s", ",".join(config.endpoints))
            return services

    def opened(self) -> list[Services]:
        return list(self._open.values())

    async def close(self) -> None:
        opened, self._open = list(self._open.values()), {}
        for services in opened:
            try:
                await services.close()
            except Exception as e:  # closing is best effort at shutdown
                self.log.warning("closing etcd services failed: %s", e)


async def _open_remembering(config: EtcdConfig, log: logging.Logger, spool_dir: Path
                            ) -> Services:
    """tabby-node's Services: ADD answers its reads from watched copies (cni.cmd_add)."""
    from cni.handler import Services

    return await Services.open(config, log, spool_dir, remember=True)


def _default_handler() -> Handler:
    from cni.handler import handle

    return handle


class CniService:
    """The unix-socket server. `start()` binds (mode 0600, dir 0700), `stop()` drains and
    removes the socket file if it is still the one this service bound."""

    def __init__(self, socket_path: str | Path, services: ServicesCache, *,
                 handler: Handler | None = None, timeout: float = REQUEST_TIMEOUT,
                 concurrency: int = CONCURRENCY, log: logging.Logger | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.services = services
        self.timeout = timeout
        self.concurrency = concurrency
        self.log = log or logging.getLogger("tabby.cni")
        self._handler = handler or _default_handler()
        self._slots = asyncio.Semaphore(concurrency)
        self._server: asyncio.AbstractServer | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._tasks: set[asyncio.Task[None]] = set()
        self.in_flight = 0
        self.handled = 0

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        sock = bind_socket(self.socket_path)
        st = os.stat(self.socket_path)
        self._bound = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._connection, sock=sock)
        self.log.info("CNI service listening on %s (%d at once, %g s per request)",
                      self.socket_path, self.concurrency, self.timeout)

    async def stop(self, drain: float = DRAIN_TIMEOUT) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()  # no new connections; requests already read keep running
        self._unlink_ours()
        if self._tasks:
            self.log.info("waiting up to %g s for %d CNI request(s)", drain, len(self._tasks))
            _, pending = await asyncio.wait(self._tasks, timeout=drain)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await server.wait_closed()

    def _unlink_ours(self) -> None:
        """Remove the socket file unless another tabby-node has replaced it meanwhile."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._bound:
                os.unlink(self.socket_path)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            frame = await self.answer(reader)
            writer.write(frame)
            with contextlib.suppress(OSError):  # the shim reads to EOF: now, not at close
                writer.write_eof()
            await writer.drain()
        except ConnectionError as e:
            self.log.warning("CNI client went away before its answer: %s", e)
        except Exception:  # a bug here must not kill the server; the shim reports error 11
            self.log.exception("CNI connection failed")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def answer(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request frame and return the reply frame; never raises for bad input."""
        legacy = False
        try:
            data = await _read_all(reader)
            legacy = is_legacy(data)
            env, stdin = parse_request(data)
        except (ValueError, TimeoutError) as e:
            self.log.warning("bad CNI request frame: %s", e)
            details = f"bad request from the tabby shim: {e}"
            return reply_frame(1, error_stdout(spec.DECODING_FAILURE, details, b""), "", legacy)
        started = time.monotonic()
        command = env.get("CNI_COMMAND", "")
        self.in_flight += 1
        try:
            exit_code, out, err = await self._run(env, stdin)
        finally:
            self.in_flight -= 1
            self.handled += 1
        elapsed = (time.monotonic() - started) * 1000
        level = logging.DEBUG if command == spec.VERSION else logging.INFO
        self.log.log(level, "CNI %s container=%s ifname=%s -> exit %d in %.1f ms",
                     command or "?", env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", ""),
                     exit_code, elapsed)
        return reply_frame(exit_code, out, err, legacy)

    async def _run(self, env: Mapping[str, str], stdin: bytes) -> tuple[int, str, str]:
        command = env.get("CNI_COMMAND", "?")
        try:
            async with asyncio.timeout(self.timeout):  # the slot wait counts: the shim waits too
                async with self._slots:
                    reply = await self._handler(env, stdin, self.services.get)
            return reply.exit_code, reply.stdout, reply.stderr
        except TimeoutError:
            detail = (f"tabby-node did not finish CNI {command} within {self.timeout:g} s "
                      f"({self.in_flight} request(s) in flight); the runtime should retry")
            self.log.error("%s (container %s)", detail, env.get("CNI_CONTAINERID", ""))
            return 1, error_stdout(spec.TRY_AGAIN_LATER, detail, stdin), ""
        except Exception as e:  # handle() never raises; if it does, the runtime still gets JSON
            self.log.exception("CNI %s failed inside tabby-node", command)
            return 1, error_stdout(spec.INTERNAL, f"tabby-node: {type(e).__name__}: {e}",
                                   stdin), ""


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(READ_TIMEOUT):
        while chunk := await reader.read(65536):
            size += len(chunk)
            if size > MAX_REQUEST:
                raise ValueError(f"request larger than {MAX_REQUEST} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


MAGIC = shim.MAGIC  # the shim's frames; a frame starting with "{" is the first shims' JSON


def is_legacy(data: bytes) -> bool:
    return data[:1] == b"{"


def parse_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """(environment, stdin bytes) from a request frame; ValueError says what is wrong."""
    if is_legacy(data):
        return _parse_json_request(data)
    head, sep, rest = data.partition(b"\n")
    if not sep or head != MAGIC:
        raise ValueError(f"does not start with {MAGIC.decode()!r} (an older or foreign client?)")
    env: dict[str, str] = {}
    while True:
        entry, sep, rest = rest.partition(b"\0")
        if not sep:
            raise ValueError("the environment is not terminated")
        if not entry:
            return env, rest
        name, eq, value = entry.partition(b"=")
        if not eq or not name:
            raise ValueError(f"environment entry {entry[:40]!r} is not NAME=VALUE")
        env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")


def _parse_json_request(data: bytes) -> tuple[dict[str, str], bytes]:
    try:
        frame = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(frame, dict):
        raise ValueError("not a JSON object")
    env, stdin = frame.get("env"), frame.get("stdin", "")
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("'env' must be an object of strings")
    if not isinstance(stdin, str):
        raise ValueError("'stdin' must be a string")
    # that shim sent invalid UTF-8 as surrogate escapes; this gives back the runtime's bytes
    return env, stdin.encode("utf-8", "surrogateescape")


def reply_frame(exit_code: int, stdout: str, stderr: str, legacy: bool = False) -> bytes:
    if legacy:
        frame = {"exit_code": exit_code, "stdout": stdout, "stderr": stderr}
        return json.dumps(frame).encode("utf-8", "surrogateescape")
    out = stdout.encode("utf-8", "surrogateescape")
    return (b"%s %d %d\n" % (MAGIC, exit_code, len(out)) + out
            + stderr.encode("utf-8", "surrogateescape"))


def error_stdout(code: int, details: str, stdin: bytes) -> str:
    """A CNI error result as the handler prints it, in the request's cniVersion if known."""
    err = spec.CNIError(code, spec.ERROR_NAMES.get(code, "Internal error"), details)
    return json.dumps(err.to_json(spec.peek_version(stdin)), indent=4) + "\n"




# -- the socket file --------------------------------------------------------------------------


def bind_socket(path: Path) -> socket.socket:
    """A listening socket at `path`: its directory created 0700, the file mode 0600, a stale
    file from a crashed daemon replaced, a live daemon's socket left alone (an error)."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ServiceError(f"socket path {path} is longer than {MAX_UNIX_PATH} bytes; "
                           "choose a shorter --socket")
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True)
        os.chmod(path.parent, 0o700)  # mkdir's mode is filtered by the umask
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # only root (the runtime) may ask for pod networking
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ServiceError(f"cannot listen on {path}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServiceError(f"{path} exists and is not a socket; remove it or choose another "
                           "--socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: left behind by a daemon that died
        return
    except OSError as e:
        raise ServiceError(f"{path} exists and may be in use ({e.strerror or e}); "
                           "is another tabby-node running?") from None
    finally:
        probe.close()
    raise ServiceError(f"another tabby-node is already serving {path}; stop it first")


async def probe(path: str | Path, timeout: float = 2.0) -> dict[str, Any]:
    """Ask the service for VERSION, as the shim would; the decoded reply (raises on failure)."""
    stdin = json.dumps({"cniVersion": spec.CURRENT_VERSION}).encode()
    request = shim.encode_request({b"CNI_COMMAND": spec.VERSION.encode()}, stdin)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(request)
            writer.write_eof()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    reply = decode_reply(data)
    if reply["exit_code"] != 0:
        raise ServiceError(f"VERSION through {path} answered {reply}")
    return reply


def decode_reply(data: bytes) -> dict[str, Any]:
    """{"exit_code", "stdout", "stderr"} of a reply frame, read as the shim reads it."""
    code, out, err = shim.decode_reply(data)
    return {"exit_code": code, "stdout": out.decode("utf-8", "surrogateescape"),
            "stderr": err.decode("utf-8", "surrogateescape")}

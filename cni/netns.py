"""Run code inside another network namespace.

`setns(2)` changes the namespace of the calling *thread* only. `run_in_netns` starts a fresh
thread, joins it to the target namespace and runs the function there: the thread never runs
anything else and ends with the call. `entered` moves the calling thread itself for a short
synchronous block and back (no thread start, no wake-up of another thread: ADD's plumbing on
the daemon's loop thread); nothing else of that thread can run inside the block.

Inside such a thread everything that resolves the namespace from the current task follows it:
new netlink sockets (so `Rtnl()` or `IPRoute()` need no `netns=` and no forked helper, which
costs pyroute2 ~8 ms) and `/proc/sys/net/...`, which is how `write_sysctl`/`read_sysctl` reach
a pod's sysctls. A socket keeps the namespace it was made in after the thread is gone.

`Rtnl` sends rtnetlink requests in batches, one sendmsg() and one answer per request.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
CURRENT = "/proc/thread-self/ns/net"  # the calling thread's own namespace
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs fd: which kind of namespace it is
NETNS_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> str:
    """A path as given (/run/netns/x, /proc/<pid>/ns/net); a bare name as `ip netns` names it."""
    return netns if "/" in netns else os.path.join(NETNS_DIR, netns)


class NetnsGone(FileNotFoundError):
    """The path exists but holds no network namespace (e.g. a file left after an unmount)."""


def open_fd(netns: str) -> int:
    """An fd for the namespace, checked to be one; FileNotFoundError when it is gone."""
    path = netns_path(netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise NetnsGone(errno.ENOENT, "not a network namespace", path)
    return fd


def exists(netns: str | None) -> bool:
    """Whether the path (or name) holds a network namespace; "" and None do not."""
    if not netns:
        return False
    try:
        os.close(open_fd(netns))
    except OSError:
        return False
    return True


@contextmanager
def open_netns(netns: str) -> Iterator[int]:
    fd = open_fd(netns)
    try:
        yield fd
    finally:
        os.close(fd)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)} (is it a network namespace?)")


@contextmanager
def entered(netns_fd: int | None) -> Iterator[None]:
    """The calling thread inside the namespace `netns_fd` for a short synchronous block, then
    back where it was (None: stays). Cheaper than a thread (ADD does all its plumbing this
    way, on the asyncio loop's thread), so the block must not yield to other code of this
    thread: no await, nothing that waits on another thread. A thread that cannot get back
    would run everything after in a pod's namespace, so the process then exits."""
    if netns_fd is None:
        yield
        return
    home = os.open(CURRENT, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(netns_fd)
        try:
            yield
        finally:
            _go_home(home)
    finally:
        os.close(home)


def _go_home(home_fd: int) -> None:
    try:
        _setns(home_fd)
    except OSError as exc:  # pragma: no cover - the fd came from /proc/thread-self just before
        os.write(2, f"tabby: cannot return to the original network namespace ({exc}); "
                    "exiting rather than go on in another namespace\n".encode())
        os._exit(70)


def run_in_netns(netns: str | int | None, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) inside `netns` (a path, a name or an open fd); None runs it right here.

    Exceptions from fn are raised in the caller."""
    if netns is None:
        return fn(*args)
    if isinstance(netns, str):
        with open_netns(netns) as fd:
            return Spawned(fd, fn, *args).result()
    return Spawned(netns, fn, *args).result()


class Spawned:
    """fn(*args) started in the namespace `fd` in its own thread; .result() joins and returns
    or raises. Lets the caller work in its own namespace meanwhile; keep fd open until
    result() returns."""

    def __init__(self, fd: int, fn: Callable[..., Any], *args: Any) -> None:
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(
            target=self._body, args=(fd, fn, args), name="tabby-netns", daemon=True)
        self._thread.start()

    def _body(self, fd: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            _setns(fd)
            self._box["result"] = fn(*args)
        except BaseException as exc:  # handed to the caller, who re-raises it
            self._box["error"] = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["result"]


def _sysctl_file(key: str) -> str:
    # "net.ipv4.conf.cali1.proxy_arp" or "net/ipv4/conf/cali1/proxy_arp"; interface names
    # never contain '/', so dots only need translating when no '/' is present
    return "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))


def write_sysctl(key: str, value: str | int) -> None:
    """Set a sysctl in the namespace of the calling thread (use inside run_in_netns or
    entered). Plain open/write/close: ADD sets half a dozen, and the io layer's buffering and
    seeks cost more than the kernel's work."""
    fd = os.open(_sysctl_file(key), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def read_sysctl(key: str) -> str:
    with open(_sysctl_file(key)) as f:
        return f.read().strip()


# -- rtnetlink requests in batches ------------------------------------------------------------

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 1, 4, 0x200, 0x400, 0x100
NETLINK_ROUTE = 0
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
_GET = 2  # RTM_GET* types are 2 mod 4 (NEW, DEL, GET, SET)


class RequestFailed(OSError):
    """The kernel refused one request of a batch; `what` says which."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, os.strerror(code))
        self.what = what


@dataclass(frozen=True)
class Answer:
    error: int  # 0, or the errno the kernel answered (also when ignored)
    reply: bytes | None  # the reply message of a GET


@dataclass
class _Request:
    msg: Any  # the body as bytes (cni.rtnl_msgs), or a pyroute2 message (ifinfmsg, rtmsg...)
    msg_type: int
    flags: int
    what: str
    ignore: frozenset[int]


class Rtnl:
    """An rtnetlink socket in the calling thread's namespace. Requests are queued and sent in
    one sendmsg(); the kernel runs them in order, so a batch may depend on its own earlier
    requests. A request body is bytes packed by cni.rtnl_msgs (a few µs; the ADD path) or a
    pyroute2 message (~80 µs to encode; still ~5x cheaper than a call through IPRoute). Single
    GETs only, no dumps: a second dump in one batch gets EBUSY."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.settimeout(timeout)  # the kernel always answers; this only bounds a bug
        self._sock.bind((0, 0))
        self._queue: list[_Request] = []
        self._seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def queue(self, msg: Any, msg_type: int, flags: int, what: str,
              ignore: tuple[int, ...] = ()) -> None:
        """Add a request; `ignore` lists errnos that count as success (ENODEV on a delete)."""
        if msg_type % 4 != _GET:
            flags |= NLM_F_ACK  # so every request gets exactly one answer: ack, error or reply
        self._queue.append(_Request(msg, msg_type, NLM_F_REQUEST | flags, what,
                                    frozenset(ignore)))

    def commit(self) -> list[Answer]:
        """Send the queue; one Answer per request. Raises RequestFailed for the first request
        that failed with an errno it does not ignore, after every answer has been read."""
        requests, self._queue = self._queue, []
        first = self._seq + 1
        self._seq += len(requests)
        self._sock.send(b"".join(_encode(r, first + i) for i, r in enumerate(requests)))
        try:
            replies, errors = self._collect(first, len(requests))
        except TimeoutError as exc:
            raise RequestFailed(errno.ETIMEDOUT, requests[0].what) from exc
        for i, request in enumerate(requests):
            code = errors.get(i, 0)
            if code and code not in request.ignore:
                raise RequestFailed(code, request.what)
        return [Answer(errors.get(i, 0), replies.get(i)) for i in range(len(requests))]

    def _collect(self, first: int, count: int) -> tuple[dict[int, bytes], dict[int, int]]:
        replies: dict[int, bytes] = {}
        errors: dict[int, int] = {}
        answered: set[int] = set()
        while len(answered) < count:
            data = self._sock.recv(1 << 16)
            for msg_type, _flags, seq, message in messages(data):
                i = seq - first
                if not 0 <= i < count:
                    continue  # not ours (nothing else shares this socket, but be strict)
                if msg_type == NLMSG_ERROR:
                    errors[i] = -struct.unpack_from("=i", message, _HEADER.size)[0]
                elif msg_type != NLMSG_DONE:
                    replies[i] = message
                answered.add(i)
        return replies, errors


def _encode(request: _Request, seq: int) -> bytes:
    body = request.msg
    if isinstance(body, bytes):
        return _HEADER.pack(_HEADER.size + len(body), request.msg_type, request.flags, seq,
                            0) + body
    body["header"]["type"] = request.msg_type
    body["header"]["flags"] = request.flags
    body["header"]["sequence_number"] = seq
    body.encode()
    return bytes(body.data)


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, the whole message) for each netlink message in one datagram."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            return
        yield msg_type, flags, seq, data[offset:offset + length]
        offset += (length + 3) & ~3


def link_index(message: bytes) -> int:
    """ifi_index of an RTM_NEWLINK reply (after nlmsghdr: family, pad, type u16, index i32)."""
    return int(struct.unpack_from("=i", message, _HEADER.size + 4)[0])

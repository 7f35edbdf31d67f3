"""tabby: the CNI executable. Forwards the request to tabby-node, or runs it in-process.

The runtime execs this for every ADD/DEL/CHECK/GC/STATUS/VERSION, so it must start fast: it
imports only modules the interpreter has already loaded or built in (`_socket`, `posix`, `sys`,
`time`). `json` and `socket` would cost ~13 ms per exec (they pull in `re` and `enum`); even
`_json` (a shared object) and `__future__` cost ~0.5 ms, so the wire format below is bytes, not
JSON. cni-install copies this file as the `tabby` binary with `#!/usr/bin/python3 -IS` and
rewrites TABBY_PYTHON below; it never imports anything of Tabby's.

Wire protocol (unix stream socket, env TABBY_CNI_SOCKET or /run/tabby/cni.sock), bytes as the
runtime gave them, nothing decoded or escaped:

    request: b"TABBY-CNI 2\n", then `NAME=VALUE\0` for every CNI_* variable and PATH, then
             b"\0", then stdin; the shim then shuts its write side
    reply:   b"TABBY-CNI 2 <exit code> <length of stdout>\n", stdout, stderr; then the daemon
             closes

(tabby-node also still answers the JSON frames of the first shims, in JSON.)

Fallback: when the socket is absent, refuses, or cannot be reached within CONNECT_TIMEOUT, the
request has not been delivered, so running it in-process cannot double it: the shim execs the
Tabby python with `-m cni.fallback`, handing stdin over through a memfd. Once the request is
delivered it never falls back; a daemon that does not answer within REPLY_TIMEOUT (its own
65 s bound plus a margin) gets CNI error 11, so the runtime retries instead of hanging.
"""

import _socket
import posix
import sys
import time

VERSION = "0.1.0"
# cni-install rewrites this line in the installed copy to the venv's python.
TABBY_PYTHON = ""
DEFAULT_SOCKET = "/run/tabby/cni.sock"
CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 75.0  # tabby-node bounds each request at 65 s and then answers error 11
FALLBACK_MODULE = "cni.fallback"
MAGIC = b"TABBY-CNI 2"

# cni.spec's SUPPORTED_VERSIONS (a unit test keeps them equal); only for the shim's own errors
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
_ERROR_NAMES = {TRY_AGAIN_LATER: "Try again later", NOT_AVAILABLE: "The plugin is not available"}

_AF_UNIX = 1
_SOCK_STREAM = 1
_SHUT_WR = 1

Env = dict[bytes, bytes]


class Unreachable(Exception):
    """The request was not delivered to tabby-node: falling back is safe."""


class NoAnswer(Exception):
    """The request was delivered but no usable reply came back: do not run it twice."""


# -- the frames -------------------------------------------------------------------------------


def encode_request(env: Env, stdin: bytes) -> bytes:
    entries = b"".join(k + b"=" + v + b"\0" for k, v in sorted(env.items()))
    return MAGIC + b"\n" + entries + b"\0" + stdin


def decode_reply(data: bytes) -> tuple[int, bytes, bytes]:
    """(exit_code, stdout, stderr) from a reply frame; ValueError when it is not one."""
    head, sep, rest = data.partition(b"\n")
    fields = head.split(b" ")
    if not sep or len(fields) != 4 or b" ".join(fields[:2]) != MAGIC:
        raise ValueError("the reply is not a tabby-node reply frame")
    if not (fields[2].lstrip(b"-").isdigit() and fields[3].isdigit()):
        raise ValueError("the reply's exit code or length is not a number")
    length = int(fields[3])
    if length > len(rest):
        raise ValueError("the reply is shorter than its stdout length")
    return int(fields[2]), rest[:length], rest[length:]


# -- the request ------------------------------------------------------------------------------


def forwarded_env(env: Env) -> Env:
    """What the daemon gets: every CNI_* variable and PATH (nothing else of the runtime's)."""
    return {k: v for k, v in env.items() if k.startswith(b"CNI_") or k == b"PATH"}


def _text(env: Env, name: str) -> str:
    return env.get(name.encode(), b"").decode("utf-8", "surrogateescape")


def read_stdin(env: Env) -> bytes:
    stream = sys.stdin
    if stream is None:  # fd 0 closed
        return b""
    if env.get(b"CNI_COMMAND", b"") in (b"", b"VERSION") and stream.isatty():
        return b""  # a person at a terminal: nothing will come
    return stream.buffer.read()


def error_json(code: int, details: str, stdin: bytes) -> str:
    """A CNI error result in the request's cniVersion (when it names one we know). Only on
    failures, so `json` may be imported here."""
    import json

    version = CURRENT_VERSION
    try:
        conf = json.loads(stdin.decode("utf-8"))
        if isinstance(conf, dict) and conf.get("cniVersion") in SUPPORTED_VERSIONS:
            version = conf["cniVersion"]
    except (ValueError, UnicodeDecodeError):
        pass
    return json.dumps({"cniVersion": version, "code": code, "msg": _ERROR_NAMES[code],
                       "details": details}, indent=4) + "\n"


# -- the socket -------------------------------------------------------------------------------


def _connect(path: str, timeout: float) -> _socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = _socket.socket(_AF_UNIX, _SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            sock.connect(path)
            return sock
        except BlockingIOError as e:  # backlog full: the daemon is busy, not gone
            sock.close()
            if time.monotonic() >= deadline:
                raise Unreachable(f"{path}: backlog full for {timeout:g} s") from e
            time.sleep(0.02)
        except OSError as e:  # absent, refused, no permission, timed out
            sock.close()
            raise Unreachable(f"{path}: {e.strerror or e}") from e


def ask(path: str, frame: bytes, connect_timeout: float, reply_timeout: float) -> bytes:
    """Send one request and return the raw reply (Unreachable / NoAnswer as documented)."""
    sock = _connect(path, connect_timeout)
    try:
        try:
            sock.settimeout(connect_timeout)
            sock.sendall(frame)
            sock.shutdown(_SHUT_WR)
        except OSError as e:  # the daemon never saw a whole request: it cannot have run it
            raise Unreachable(f"{path}: sending the request failed: {e.strerror or e}") from e
        sock.settimeout(reply_timeout)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise NoAnswer(f"tabby-node ({path}) did not answer within {reply_timeout:g} s") \
                from None
        except OSError as e:
            raise NoAnswer(f"tabby-node ({path}) dropped the connection: {e.strerror or e}") \
                from None
        if not chunks:
            raise NoAnswer(f"tabby-node ({path}) closed the connection without answering")
        return b"".join(chunks)
    finally:
        sock.close()


# -- the fallback -----------------------------------------------------------------------------


def fallback_python(env: Env) -> str:
    return _text(env, "TABBY_PYTHON") or TABBY_PYTHON or sys.executable


def exec_fallback(python: str, stdin: bytes) -> None:
    """Replace this process with `python -I -m cni.fallback`, stdin refilled from a memfd."""
    fd = posix.memfd_create("tabby-stdin", 0)
    view = memoryview(stdin)
    while view:
        view = view[posix.write(fd, view):]
    posix.lseek(fd, 0, 0)
    if fd != 0:
        posix.dup2(fd, 0)  # fd 0 is inheritable after dup2
        posix.close(fd)
    posix.execv(python, [python, "-I", "-m", FALLBACK_MODULE])


def _float(env: Env, name: str, default: float) -> float:
    try:
        return float(_text(env, name) or default)
    except ValueError:
        return default


def _write(stream: object, data: bytes | str) -> None:
    if data and stream is not None:
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        stream.buffer.write(data)  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if argv[1:2] in (["--version"], ["-v"]):
        _write(sys.stdout, f"tabby {VERSION}\n")
        return 0
    env = dict(posix.environ)
    stdin = read_stdin(env)
    path = _text(env, "TABBY_CNI_SOCKET") or DEFAULT_SOCKET
    try:
        raw = ask(path, encode_request(forwarded_env(env), stdin),
                  _float(env, "TABBY_CNI_CONNECT_TIMEOUT", CONNECT_TIMEOUT),
                  _float(env, "TABBY_CNI_REPLY_TIMEOUT", REPLY_TIMEOUT))
        code, out, err = decode_reply(raw)
    except Unreachable as e:
        python = fallback_python(env)
        try:
            exec_fallback(python, stdin)
        except OSError as exec_error:  # only returns on failure
            detail = (f"tabby-node is not reachable ({e}) and the in-process fallback "
                      f"{python} -m {FALLBACK_MODULE} cannot run: {exec_error}")
            _write(sys.stdout, error_json(NOT_AVAILABLE, detail, stdin))
            _write(sys.stderr, f"tabby: {detail}\n")
            return 1
        return 1  # pragma: no cover - execv does not return
    except (NoAnswer, ValueError) as e:
        detail = f"{e}; see the tabby-node log"
        _write(sys.stdout, error_json(TRY_AGAIN_LATER, detail, stdin))
        _write(sys.stderr, f"tabby: {detail}\n")
        return 1
    _write(sys.stdout, out)
    _write(sys.stderr, err)
    return code


def exit_now(code: int) -> None:
    """Leave without the interpreter's finalization (module teardown, GC): ~1.7 ms of every
    exec on a small VM, for a process whose output is already written and flushed."""
    posix._exit(code & 0xFF)


if __name__ == "__main__":
    exit_now(main())

"""exabgp's API process: a relay between exabgp and Tabby's routing agent (stdlib only).

exabgp runs `python -m bgp.pipe SOCKET`: what exabgp writes to our stdin (JSON messages and
"done"/"error" acks) goes to the agent's unix socket line by line, and what the agent sends
(announce / withdraw commands) goes to our stdout, which exabgp reads as commands. Nothing else
is ever printed on stdout: it is the command channel (diagnostics go to stderr, which exabgp
logs). When either side closes, the relay exits; exabgp lives and dies with the agent, so
there is nothing to reconnect to.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time

CONNECT_WAIT = 10.0  # s: the agent listens before it starts exabgp; this covers a slow start


def connect(path: str, wait: float = CONNECT_WAIT) -> socket.socket:
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _to_agent(sock: socket.socket) -> None:
    try:
        for line in sys.stdin.buffer:
            sock.sendall(line if line.endswith(b"\n") else line + b"\n")
    except OSError as e:
        sys.stderr.write(f"tabby bgp pipe: agent socket: {e}\n")
    finally:
        # exabgp closed our stdin (it is stopping): nothing more will come
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: python -m bgp.pipe SOCKET\n")
        return 2
    try:
        sock = connect(argv[1])
    except OSError as e:
        sys.stderr.write(f"tabby bgp pipe: cannot reach the routing agent at {argv[1]}: {e}\n")
        return 1
    threading.Thread(target=_to_agent, args=(sock,), daemon=True).start()
    out = sys.stdout.buffer
    with sock, sock.makefile("rb") as commands:
        for line in commands:
            out.write(line)
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

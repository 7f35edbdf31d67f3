"""Small pieces the kernel tests share: a command runner and the TCP responder/prober scripts
they run inside namespaces (`python -c SCRIPT ...`)."""

from __future__ import annotations

import subprocess

# accepts on every port given as an argument (IPv4), prints "ready", closes each connection
TCP_SERVER = """
import select, socket, sys
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64); socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        s.accept()[0].close()
"""

# HOST PORT TIMEOUT: exit 0 when a TCP connection opens, 1 when it does not
TCP_CLIENT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError:
    sys.exit(1)
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)

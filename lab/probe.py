"""Real packets between lab namespaces: a tiny TCP/UDP responder and one-shot probes.

Responder (`python -m lab.probe serve --tcp 80,81 --udp 53`, started with nsenter in a pod's or an
external's namespace): every TCP connection gets `tabby-probe <name>\\n` and is closed, every UDP
datagram is echoed back with the same prefix. It prints `ready` once every port is bound.

Probes run in the calling process: the socket is *created* by a thread that joined the source
namespace (`netns.call_in`), and a socket belongs to the namespace it was created in for life, so
the probe itself can then run on any thread (many in parallel). Each probe returns an Outcome:
allowed or not, and why.

    TCP   connect + read the responder's banner            (deny: timeout, refused, unreachable)
    UDP   send a nonce, expect it echoed (resent 3 times)  (deny: no echo before the timeout)
    ICMP  raw socket. Echo (type 8): an echo reply from the destination with our id and sequence.
          Any other type/code: a raw ICMP socket opened in the *destination* namespace before
          sending must see the packet arrive (kernels do not answer most types).
    SCTP  not probed: this kernel has no SCTP sockets (see NOT_PROBED_SCTP).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import os
import selectors
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

from lab import netns

BANNER = b"tabby-probe"
TIMEOUT = 1.0
UDP_TRIES = 3
NOT_PROBED_SCTP = "not probed: no SCTP sockets in this kernel"
ICMP_ECHO, ICMP_ECHO_REPLY = 8, 0

_ids = itertools.count(os.getpid() & 0x3FFF)
_ids_lock = threading.Lock()


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    reason: str


def _next_id() -> int:
    with _ids_lock:
        return next(_ids) & 0xFFFF


def socket_in(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket living in lab namespace `ns` (usable from any thread)."""
    return netns.call_in(ns, lambda: socket.socket(family, kind, proto))


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _why(e: OSError) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    names = {errno.ECONNREFUSED: "refused (no listener?)", errno.EHOSTUNREACH: "host unreachable",
             errno.ENETUNREACH: "network unreachable", errno.EPERM: "EPERM (local rule)"}
    return names.get(e.errno or 0, f"{type(e).__name__}: {e}")


def tcp(src_ns: str, dst_ip: str, port: int, timeout: float = TIMEOUT) -> Outcome:
    s = socket_in(src_ns, _family(dst_ip), socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        start = time.monotonic()
        s.connect((dst_ip, port))
        data = s.recv(100)
        ms = (time.monotonic() - start) * 1000
        if data.startswith(BANNER):
            return Outcome(True, f"connected, banner in {ms:.0f} ms")
        return Outcome(False, f"connected but no banner ({data[:20]!r})")
    except OSError as e:
        return Outcome(False, _why(e))
    finally:
        s.close()


def udp(src_ns: str, dst_ip: str, port: int, timeout: float = TIMEOUT) -> Outcome:
    s = socket_in(src_ns, _family(dst_ip), socket.SOCK_DGRAM)
    nonce = os.urandom(8).hex().encode()
    try:
        s.connect((dst_ip, port))
        for _ in range(UDP_TRIES):
            s.settimeout(timeout / UDP_TRIES)
            s.send(nonce)
            try:
                data = s.recv(200)
            except TimeoutError:
                continue
            if data.startswith(BANNER) and data.endswith(nonce):
                return Outcome(True, "echoed")
        return Outcome(False, "timeout")
    except OSError as e:
        return Outcome(False, _why(e))
    finally:
        s.close()


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_packet(icmp_type: int, code: int, ident: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHH", icmp_type, code, 0, ident, seq) + payload
    return head[:2] + struct.pack("!H", checksum(head)) + head[4:]


def _icmp_of(packet: bytes) -> tuple[int, int, int, int, bytes]:
    """(type, code, id, seq, payload) of an IPv4 packet read from a raw ICMP socket."""
    ihl = (packet[0] & 0x0F) * 4
    t, c, _, ident, seq = struct.unpack("!BBHHH", packet[ihl:ihl + 8])
    return t, c, ident, seq, packet[ihl + 8:]


def icmp(src_ns: str, dst_ns: str, dst_ip: str, icmp_type: int | None, icmp_code: int | None,
         timeout: float = TIMEOUT) -> Outcome:
    if ":" in dst_ip:
        return Outcome(False, "not probed: ICMPv6 probes are not implemented")
    t = ICMP_ECHO if icmp_type is None else int(icmp_type)
    c = 0 if icmp_code is None else int(icmp_code)
    ident, seq = _next_id(), 1
    payload = b"tabby" + os.urandom(8)
    watch = None
    if t != ICMP_ECHO:  # nothing answers: watch for it arriving at the destination
        watch = socket_in(dst_ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s = socket_in(src_ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        s.sendto(icmp_packet(t, c, ident, seq, payload), (dst_ip, 0))
        listen, want = (s, ICMP_ECHO_REPLY) if watch is None else (watch, t)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            listen.settimeout(left)
            try:
                data, (peer, _) = listen.recvfrom(4096)
            except TimeoutError:
                break
            got = _icmp_of(data)
            if got[0] == want and got[2] == ident and got[4] == payload:
                if watch is None and peer == dst_ip:
                    return Outcome(True, "echo reply")
                if watch is not None:
                    return Outcome(True, f"type {t} code {c} arrived")
        return Outcome(False, "timeout")
    except OSError as e:
        return Outcome(False, _why(e))
    finally:
        s.close()
        if watch is not None:
            watch.close()


# ---- the responder -----------------------------------------------------------------------------

def _bind(kind: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.setblocking(False)
    if kind == socket.SOCK_STREAM:
        s.listen(128)
    return s


def serve(name: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
    banner = BANNER + b" " + name.encode() + b"\n"
    sel = selectors.DefaultSelector()
    for p in tcp_ports:
        sel.register(_bind(socket.SOCK_STREAM, p), selectors.EVENT_READ, "tcp")
    for p in udp_ports:
        sel.register(_bind(socket.SOCK_DGRAM, p), selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            with contextlib.suppress(OSError):
                if key.data == "tcp":
                    conn, _ = sock.accept()
                    conn.setblocking(True)
                    conn.settimeout(1)
                    conn.sendall(banner)
                    conn.close()
                else:
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(banner.rstrip() + b" " + data, peer)


def _ports(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve", help="answer TCP and UDP probes on these ports")
    sv.add_argument("--name", default="")
    sv.add_argument("--tcp", default="")
    sv.add_argument("--udp", default="")
    args = parser.parse_args(argv)
    try:
        serve(args.name, _ports(args.tcp), _ports(args.udp))
    except OSError as e:
        print(f"error: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

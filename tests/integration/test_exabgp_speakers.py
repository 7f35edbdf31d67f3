"""Real exabgp 5.0.15 speakers (and BIRD 2) running the configs bgp/ renders, in namespaces.

SAFETY: every speaker runs inside namespaces from `make_ns`, joined by a veth created inside
them (198.18.0.0/24); nothing touches the root namespace. Every process started here (exabgp,
its API helper, BIRD) is stopped by pid in a fixture's teardown, even on failure.

Each exabgp's API process is a small stdlib script written into tmp_path: it announces its
commands on start and again on every "up", appends every line exabgp writes to it (JSON
messages and "done"/"error" acks) to a file, and relays lines written to a FIFO as commands.
Waiting is a poll with a deadline; no assertion depends on how fast anything happened.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bgp.exabgp_conf import Speaker, render_config, render_env
from bgp.messages import EndOfRib, PeerState, Update, announce, parse_line, withdraw
from bgp.model import NodeRecord, node_record
from bgp.peers import Peer, bgp_settings, local_as, peers_for
from tests.conftest import require_binary

pytestmark = pytest.mark.netns

T = TypeVar("T")
EXABGP = Path(sys.executable).parent / "exabgp"
WAIT = 60.0  # generous: a session needs a connect retry or two before it is up

HELPER = r'''
import json, os, sys, threading

log_path, fifo, pid_path, *commands = sys.argv[1:]
with open(pid_path, "w") as f:
    f.write(str(os.getpid()))
lock = threading.Lock()


def send(command):
    # stdout is exabgp's command channel: only commands go there
    with lock:
        sys.stdout.write(command + "\n")
        sys.stdout.flush()


def relay():
    while True:
        with open(fifo) as f:
            for line in f:
                if line.strip():
                    send(line.strip())


threading.Thread(target=relay, daemon=True).start()
for command in commands:
    send(command)
with open(log_path, "a", buffering=1) as log:
    for line in sys.stdin:  # keep reading: exabgp acks every command here
        log.write(line)
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("neighbor", {}).get("state") == "up":
            for command in commands:
                send(command)
'''


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def wait_for(what: str, check: Callable[[], T | None], timeout: float = WAIT,
             on_timeout: Callable[[], str] = lambda: "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 f"{on_timeout()}")
        time.sleep(0.1)


def link(ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> None:
    """A veth made inside ns_a with its peer moved straight into ns_b."""
    sh("ip", "-n", ns_a, "link", "add", "bgp0", "type", "veth", "peer", "name", "bgp1",
       "netns", ns_b)
    for ns, dev, addr in ((ns_a, "bgp0", addr_a), (ns_b, "bgp1", addr_b)):
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")


def _alive(pid: int, marker: str) -> bool:
    """Still our process (a pid that was reused by something else does not count)?"""
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_pid(pid: int, marker: str, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only while /proc says it is still ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _alive(pid, marker):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class ExaBGP:
    """One exabgp in a namespace, with the test API helper as its `tabby` process."""

    ns: str
    workdir: Path
    speaker: Speaker
    peers: Sequence[Peer]
    commands: Sequence[str]
    proc: subprocess.Popen[bytes] | None = None
    conf_text: str = field(default="", repr=False)

    @property
    def received_path(self) -> Path:
        return self.workdir / "received.jsonl"

    @property
    def fifo(self) -> Path:
        return self.workdir / "control"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        helper = self.workdir / "api_helper.py"
        helper.write_text(HELPER)
        os.mkfifo(self.fifo)
        argv = [sys.executable, str(helper), str(self.received_path), str(self.fifo),
                str(self.workdir / "helper.pid"), *self.commands]
        self.conf_text = render_config(self.speaker, self.peers, argv)
        conf = self.workdir / "exabgp.conf"
        env = self.workdir / "exabgp.env"
        conf.write_text(self.conf_text)
        env.write_text(render_env(self.speaker, str(self.workdir / "exabgp.log")))
        with open(self.workdir / "exabgp.out", "wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, str(EXABGP), "--env-file", str(env), "server",
                 str(conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        pid_file = self.workdir / "helper.pid"
        if pid_file.exists():  # exabgp ends its helper, but make sure
            stop_pid(int(pid_file.read_text()), str(self.workdir / "api_helper.py"))

    def lines(self) -> list[str]:
        try:
            return self.received_path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def messages(self) -> list[PeerState | Update | EndOfRib]:
        return [m for m in map(parse_line, self.lines()) if m is not None]

    def send(self, command: str) -> None:
        """Through the helper: a non-blocking open fails until the helper is reading."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            os.write(fd, (command + "\n").encode())
        finally:
            os.close(fd)

    def diagnostics(self) -> str:
        parts = [f"--- {self.ns} exabgp.conf\n{self.conf_text}"]
        for name in ("exabgp.out", "exabgp.log", "received.jsonl"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {self.ns} {name} (tail)\n" +
                             "\n".join(path.read_text().splitlines()[-40:]))
        return "\n".join(parts)

    def learned(self, peer: str) -> dict[str, str]:
        """prefix -> next hop currently announced by `peer` (updates applied in order)."""
        rib: dict[str, str] = {}
        for m in self.messages():
            if isinstance(m, Update) and m.peer == peer:
                for prefix in m.withdrawn:
                    rib.pop(prefix, None)
                rib.update(m.announced)
        return rib


@pytest.fixture
def speakers() -> Iterator[list[ExaBGP]]:
    """Speakers a test starts; all stopped by pid afterwards, even on failure."""
    require_binary("ip")
    started: list[ExaBGP] = []
    try:
        yield started
    finally:
        for speaker in started:
            speaker.stop()


def calico_node(name: str, ip: str, **bgp: Any) -> NodeRecord:
    return node_record({"metadata": {"name": name},
                        "spec": {"bgp": {"ipv4Address": f"{ip}/24", **bgp}}})


def test_two_exabgp_speakers_exchange_and_withdraw(make_ns: Callable[[], str], tmp_path: Path,
                                                   speakers: list[ExaBGP]) -> None:
    """Two Tabby nodes in the node-to-node mesh on a non-default port with an MD5 password:
    each learns the other's block with the other as next hop, and a withdraw arrives."""
    ns_a, ns_b = make_ns(), make_ns()
    link(ns_a, "198.18.0.1", ns_b, "198.18.0.2")
    nodes = {"a": calico_node("a", "198.18.0.1"), "b": calico_node("b", "198.18.0.2")}
    config = {"metadata": {"name": "default"},
              "spec": {"listenPort": 1790, "nodeMeshPassword": {
                  "secretKeyRef": {"name": "bgp", "key": "mesh"}}}}
    settings = bgp_settings(config, {("bgp", "mesh"): "s3cret pass#;"})
    blocks = {"a": "10.244.1.0/26", "b": "10.244.2.0/26"}
    for name, ns in (("a", ns_a), ("b", ns_b)):
        node = nodes[name]
        peers = peers_for(node, nodes, settings, [])
        assert [p.kind for p in peers] == ["mesh"]
        # "a" sorts lower, so it waits; "b" dials: this also proves the listener works.
        assert peers[0].passive is (name == "a")
        # "a" targets its one peer explicitly, "b" relies on the default (all neighbors).
        target = peers[0].address if name == "a" else None
        speaker = Speaker(str(node.ip), str(node.ip), local_as(node, settings),
                          settings.listen_port)
        speakers.append(ExaBGP(ns, tmp_path / name, speaker, peers,
                               [announce(blocks[name], neighbor=target)]))
    a, b = speakers
    for s in speakers:
        s.start()

    def diag() -> str:
        return a.diagnostics() + "\n" + b.diagnostics()

    assert wait_for("a learns b's block", lambda: a.learned("198.18.0.2").get(blocks["b"]),
                    on_timeout=diag) == "198.18.0.2"
    assert wait_for("b learns a's block", lambda: b.learned("198.18.0.1").get(blocks["a"]),
                    on_timeout=diag) == "198.18.0.1"
    for s, peer in ((a, "198.18.0.2"), (b, "198.18.0.1")):
        messages = s.messages()
        assert PeerState(peer, True) in messages
        assert EndOfRib(peer) in messages
        assert "done" in s.lines()  # exabgp acked the helper's announce

    # The mesh password is in force: the kernel holds an MD5 key for the peer on the session.
    sessions = sh("ip", "netns", "exec", ns_a, "ss", "-tnie", "state", "established")
    assert "198.18.0.1:1790" in sessions and "md5keys:198.18.0.2/32" in sessions, sessions

    b.send(withdraw(blocks["b"]))
    update = wait_for("a sees the withdraw", lambda: next(
        (m for m in a.messages() if isinstance(m, Update) and blocks["b"] in m.withdrawn),
        None), on_timeout=diag)
    assert update.peer == "198.18.0.2" and update.announced == {}
    assert a.learned("198.18.0.2") == {}

    # Stopping one side shows up as the peer going down on the other.
    b.stop()
    wait_for("a sees b go down", lambda: a.messages()[-1] == PeerState("198.18.0.2", False),
             on_timeout=diag)


BIRD_CONF = """\
router id 198.18.0.3;
log "{log}" all;

protocol device {{
}}

protocol static tabby_blocks {{
    ipv4;
    route 10.244.3.0/26 blackhole;
}}

protocol bgp tabby {{
    local 198.18.0.3 as 64513;
    neighbor 198.18.0.1 as 64512;
    hold time 30;
    ipv4 {{
        import all;
        export where proto = "tabby_blocks";
    }};
}}
"""


def test_exabgp_peers_with_bird(make_ns: Callable[[], str], tmp_path: Path,
                                speakers: list[ExaBGP]) -> None:
    """eBGP to BIRD 2 through a global BGPPeer: BIRD learns the exabgp announcement, and
    BIRD's static route reaches exabgp's API process."""
    bird = require_binary("bird")
    birdc = require_binary("birdc")
    ns_x, ns_bird = make_ns(), make_ns()
    link(ns_x, "198.18.0.1", ns_bird, "198.18.0.3")
    node = calico_node("x", "198.18.0.1")
    settings = bgp_settings(None)
    bgp_peer = {"metadata": {"name": "tor"}, "spec": {"peerIP": "198.18.0.3",
                                                       "asNumber": 64513}}
    peers = peers_for(node, {"x": node}, settings, [bgp_peer])
    assert [(p.name, p.kind, p.peer_as, p.passive) for p in peers] == [
        ("Global_198_18_0_3", "global", 64513, False)]
    speaker = Speaker("198.18.0.1", "198.18.0.1", local_as(node, settings))
    x = ExaBGP(ns_x, tmp_path / "exabgp", speaker, peers, [announce("10.244.1.0/26")])
    speakers.append(x)

    workdir = tmp_path / "bird"
    workdir.mkdir()
    conf, sock, pid = workdir / "bird.conf", workdir / "bird.ctl", workdir / "bird.pid"
    conf.write_text(BIRD_CONF.format(log=workdir / "bird.log"))
    with open(workdir / "bird.out", "wb") as out:
        bird_proc = subprocess.Popen(
            ["ip", "netns", "exec", ns_bird, bird, "-f", "-c", str(conf), "-s", str(sock),
             "-P", str(pid)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        x.start()

        def birdc_out(*args: str) -> str:
            done = subprocess.run([birdc, "-s", str(sock), *args], capture_output=True,
                                  text=True, timeout=30)
            return done.stdout

        def diag() -> str:
            return (x.diagnostics() + "\n--- bird protocols\n" + birdc_out("show", "protocols")
                    + "\n--- bird routes\n" + birdc_out("show", "route", "all"))

        wait_for("BIRD session established",
                 lambda: "Established" in birdc_out("show", "protocols", "tabby"),
                 on_timeout=diag)
        def bird_route() -> str | None:
            text = birdc_out("show", "route", "for", "10.244.1.0/26", "all")
            return text if "10.244.1.0/26" in text else None

        route = wait_for("BIRD learns 10.244.1.0/26", bird_route, on_timeout=diag)
        assert "[tabby " in route and "via 198.18.0.1 " in route, route
        assert "BGP.next_hop: 198.18.0.1" in route and "BGP.as_path: 64512" in route, route
        assert wait_for("exabgp learns BIRD's static route",
                        lambda: x.learned("198.18.0.3").get("10.244.3.0/26"),
                        on_timeout=diag) == "198.18.0.3"
    finally:
        stop(bird_proc)

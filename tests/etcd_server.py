"""A real, throwaway etcd for tests: loopback only, free ports, its own data dir.

`EtcdServer(workdir).start()` runs `etcd` on 127.0.0.1 and waits until it is healthy;
`stop()` ends exactly that process; `restart()` keeps the data dir and ports, so clients see
the same cluster come back. `make_tls_files()` writes a throwaway CA and certificates for an
mTLS etcd (`EtcdServer(workdir, tls=...)`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

from datastore.config import EtcdConfig

START_TIMEOUT = 15.0  # etcd on this VM is healthy in well under a second
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 (IP SAN) and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    ca_key = directory / "ca.key"
    _openssl(
        "req",
        "-x509",
        "-new",
        *_EC_KEY,
        "-nodes",
        "-days",
        "2",
        "-keyout",
        ca_key,
        "-out",
        files.ca,
        "-subj",
        "/CN=tabby-test-ca",
    )
    # etcd's own gateway dials itself with the server cert, so it needs clientAuth too
    _issue(
        files.ca,
        ca_key,
        files.server_cert,
        files.server_key,
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    _issue(
        files.ca,
        ca_key,
        files.client_cert,
        files.client_key,
        "tabby-test-client",
        "extendedKeyUsage=clientAuth\n",
    )
    return files


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _issue(ca: Path, ca_key: Path, cert: Path, key: Path, cn: str, extensions: str) -> None:
    csr = cert.with_suffix(".csr")
    ext = cert.with_suffix(".ext")
    ext.write_text(extensions)
    _openssl("req", "-new", *_EC_KEY, "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        cert,
        "-extfile",
        ext,
    )


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop one process we started: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class EtcdServer:
    def __init__(self, workdir: Path, tls: TlsFiles | None = None) -> None:
        self.workdir = Path(workdir)
        self.tls = tls
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self.client_port = 0
        self.peer_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def config(self, **overrides: object) -> EtcdConfig:
        tls = self.tls
        base: dict[str, object] = {"endpoints": (self.endpoint,)}
        if tls:
            base.update(
                ca_cert_file=str(tls.ca),
                cert_file=str(tls.client_cert),
                key_file=str(tls.client_key),
            )
        base.update(overrides)
        return EtcdConfig(**base)  # type: ignore[arg-type]

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError(f"etcd already running (pid {self._proc.pid})")
        if not self.client_port:
            self.client_port, self.peer_port = _free_port(), _free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        # a safety net: never leave etcd behind if a test forgets to stop it
        self._finalizer = weakref.finalize(self, _terminate, self._proc)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _terminate(proc)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def restart(self) -> None:
        """Stop and start again with the same data dir and ports."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung etcd). Returns once
        every thread of etcd is stopped: the signal is only queued when kill() returns."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self._proc.pid}/task")
        deadline = time.monotonic() + 10
        while not all(_stopped(t) for t in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd (pid {self._proc.pid}) did not stop on SIGSTOP")
            time.sleep(0.002)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl (API v3) against this etcd; returns stdout, raises on failure."""
        cmd = ["etcdctl", f"--endpoints={self.endpoint}", "--command-timeout=10s"]
        if self.tls:
            cmd += [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        env = {**os.environ, "ETCDCTL_API": "3"}
        done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def _command(self) -> list[str]:
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            "etcd",
            "--name=tabby-test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=tabby-test={peer}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls:
            cmd += [
                "--client-cert-auth",
                f"--trusted-ca-file={self.tls.ca}",
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
            ]
        return cmd

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self._proc.returncode}; log tail:\n{self._log_tail()}"
                )
            try:
                if self._healthy():
                    return
                last = "unhealthy"
            except OSError as e:
                last = str(e)
            time.sleep(0.05)
        raise RuntimeError(
            f"etcd at {self.endpoint} not healthy after {START_TIMEOUT} s ({last}); "
            f"log tail:\n{self._log_tail()}"
        )

    def _healthy(self) -> bool:
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1, context=context) as r:
            return json.loads(r.read()).get("health") == "true"

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _stopped(task: Path) -> bool:
    """A thread in state T (stopped); a thread that has exited meanwhile counts as stopped."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "T"

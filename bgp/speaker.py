"""exabgp as the node's BGP speaker: a child process of the routing agent.

`Speaker.apply(config, env)` writes both files and brings the process in line: started when
not running; restarted when the env file changed (listen address, logging); reloaded with
SIGUSR1 when only the neighbor set changed — established sessions stay up, new neighbors are
added (exabgp does not replay earlier API routes to them: the agent re-announces when it sees a
peer come up). A child that dies is started again after a backoff that doubles up to
BACKOFF_MAX. The child gets SIGKILL if the agent dies (PR_SET_PDEATHSIG), so a restarted agent
never finds an orphan speaker holding port 179.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

BACKOFF_START, BACKOFF_MAX = 0.5, 10.0
STOP_TIMEOUT = 5.0
PR_SET_PDEATHSIG = 1

log = logging.getLogger("tabby.bgp.speaker")


def exabgp_binary() -> str:
    return str(Path(sys.executable).parent / "exabgp")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Speaker:
    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        self.workdir = workdir
        self.binary = binary or exabgp_binary()
        self.config_path = workdir / "exabgp.conf"
        self.env_path = workdir / "exabgp.env"
        self.log_path = workdir / "exabgp.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._config = self._env = ""
        self._keeper: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def apply(self, config: str, env: str) -> str:
        """Write the files and start, restart or reload; returns what it did."""
        if config == self._config and env == self._env and self._keeper is not None:
            return "unchanged"
        self.workdir.mkdir(parents=True, exist_ok=True)
        env_changed = env != self._env
        _write(self.config_path, config)
        _write(self.env_path, env)
        self._config, self._env = config, env
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_running(), name="exabgp")
            return "started"
        if env_changed or not self.running:
            await self._terminate()  # the keeper starts it again with the new files
            return "restarted"
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        return "reloaded"

    async def stop(self) -> None:
        self._stopping = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        await self._terminate()

    async def kill(self) -> None:
        """Test hook and `restart` path: SIGKILL the child; the keeper starts a new one."""
        if self.running and self.proc is not None:
            self.proc.kill()

    async def _keep_running(self) -> None:
        delay = BACKOFF_START
        while not self._stopping:
            self.starts += 1
            with open(self.log_path, "ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    self.binary, "--env-file", str(self.env_path), "server",
                    str(self.config_path), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=out, preexec_fn=_die_with_parent)
            log.info("exabgp started (pid %d)", self.proc.pid)
            started = asyncio.get_running_loop().time()
            code = await self.proc.wait()
            if self._stopping:
                return
            if asyncio.get_running_loop().time() - started > 30:
                delay = BACKOFF_START
            log.warning("exabgp exited with %s; starting it again in %.1f s (log %s)",
                        code, delay, self.log_path)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""A child process tabby-node keeps running: started, restarted with backoff, stopped cleanly.

The child inherits tabby-node's network namespace, environment and stderr. When it exits it is
started again after a delay that doubles from BACKOFF_START to BACKOFF_MAX, back to the start
once a run lasted STABLE_AFTER seconds. `stop()` sends SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Sequence

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
STOP_TIMEOUT = 10.0


class Supervisor:
    def __init__(self, name: str, argv: Sequence[str], log: logging.Logger, *,
                 backoff_start: float = BACKOFF_START, backoff_max: float = BACKOFF_MAX,
                 stable_after: float = STABLE_AFTER) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.backoff_start, self.backoff_max = backoff_start, backoff_max
        self.stable_after = stable_after
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.name}")

    async def check(self) -> str:
        """A readiness check: raises unless the child is running."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running (last exit {self.last_exit}, "
                               f"{self.restarts} restarts)")
        assert self.proc is not None
        return f"{self.name} running as pid {self.proc.pid} ({self.restarts} restarts)"

    async def _run(self) -> None:
        delay = self.backoff_start
        while True:
            started = time.monotonic()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=subprocess.DEVNULL)
            except OSError as e:
                self.log.error("cannot start %s: %s", self.name, e)
            else:
                self.log.info("%s started (pid %d)", self.name, self.proc.pid)
                self.last_exit = await self.proc.wait()
            if time.monotonic() - started >= self.stable_after:
                delay = self.backoff_start
            self.log.warning("%s exited (%s); restarting in %g s", self.name, self.last_exit,
                             delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            self.restarts += 1

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            self.log.warning("%s did not stop within %g s; killing it", self.name, timeout)
            proc.kill()
            await proc.wait()
        self.log.info("%s stopped", self.name)

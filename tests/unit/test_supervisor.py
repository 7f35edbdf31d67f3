"""tabby-node's child supervisor: restart with backoff, clean stop (real tiny processes)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

from node.supervisor import Supervisor

LOG = logging.getLogger("test.supervisor")


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_child_that_exits_is_restarted_with_backoff() -> None:
    async def scenario() -> None:
        sup = Supervisor("quitter", [sys.executable, "-c", "raise SystemExit(3)"], LOG,
                         backoff_start=0.01, backoff_max=0.05)
        sup.start()
        try:
            await _until(lambda: sup.restarts >= 3)
            assert sup.last_exit == 3
        finally:
            await sup.stop()

    asyncio.run(scenario())


def test_stop_terminates_a_running_child() -> None:
    async def scenario() -> None:
        sup = Supervisor("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], LOG)
        sup.start()
        await _until(lambda: sup.running)
        assert "running as pid" in await sup.check()
        proc = sup.proc
        await sup.stop(timeout=5)
        assert proc is not None and proc.returncode is not None and not sup.running
        assert sup.restarts == 0

    asyncio.run(scenario())

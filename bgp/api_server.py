"""The agent's end of exabgp's API channel: a unix socket the relay (`bgp.pipe`) connects to.

One connection at a time (exabgp runs one relay). `send` writes a command line to the current
connection (dropped when none: the agent re-sends its whole state on each new connection);
every line exabgp sends is handed to `on_line`; `on_connect` runs for each new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("tabby.bgp.api")


class ApiServer:
    def __init__(self, path: Path, on_line: Callable[[str], Awaitable[None]],
                 on_connect: Callable[[], Awaitable[None]]) -> None:
        self.path = path
        self.on_line, self.on_connect = on_line, on_connect
        self._server: asyncio.base_events.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connections = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # ours from an earlier run: only the agent binds it
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def send(self, lines: list[str]) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing() or not lines:
            return False
        try:
            writer.write("".join(f"{line}\n" for line in lines).encode())
            await writer.drain()
            return True
        except (ConnectionError, OSError) as e:
            log.warning("exabgp API channel: %s", e)
            return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connected and self._writer is not None:
            self._writer.close()  # a new exabgp replaced the old one
        self._writer = writer
        self.connections += 1
        log.info("exabgp API relay connected")
        try:
            await self.on_connect()
            while line := await reader.readline():
                try:
                    await self.on_line(line.decode("utf-8", "replace").rstrip("\n"))
                except Exception:  # one bad message must not end the channel
                    log.exception("exabgp API: handling %r failed", line[:200])
        except (ConnectionError, OSError) as e:
            log.warning("exabgp API relay: %s", e)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            log.info("exabgp API relay disconnected")

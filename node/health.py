"""tabby-node's health endpoint: plain HTTP on 127.0.0.1 (Calico's felix uses port 9099).

`GET /liveness`  -> 200 while the event loop answers (a wedged loop answers nothing).
`GET /readiness` -> 200 when every readiness check passes, else 503; the JSON body says which
check failed and why. Checks run concurrently, each bounded by CHECK_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

DEFAULT_PORT = 9099
CHECK_TIMEOUT = 2.0
Check = Callable[[], Awaitable[str]]  # returns a detail when healthy, raises when not

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    def __init__(self, port: int = DEFAULT_PORT, checks: Mapping[str, Check] | None = None, *,
                 host: str = "127.0.0.1", log: logging.Logger | None = None) -> None:
        self.host = host
        self.port = port
        self.checks = dict(checks or {})
        self.log = log or logging.getLogger("tabby.health")
        self._server: asyncio.AbstractServer | None = None
        self._started = time.monotonic()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # port 0: the one the kernel chose
        self.log.info("health endpoint on http://%s:%d/{liveness,readiness}", self.host,
                      self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def liveness(self) -> tuple[int, dict[str, Any]]:
        return 200, {"live": True, "uptime_s": round(time.monotonic() - self._started, 1)}

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._run(self.checks[n]) for n in names))
        checks = dict(zip(names, results, strict=True))
        ready = all(c["ok"] for c in checks.values())
        return (200 if ready else 503), {"ready": ready, "checks": checks}

    @staticmethod
    async def _run(check: Check) -> dict[str, Any]:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                return {"ok": True, "detail": await check()}
        except TimeoutError:
            return {"ok": False, "detail": f"no answer within {CHECK_TIMEOUT:g} s"}
        except Exception as e:  # a failing check is a 503 with its reason, not a crash
            return {"ok": False, "detail": f"{type(e).__name__}: {e}"}

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
                while (await reader.readline()).strip():  # headers: not needed
                    pass
            method, path = _parse(request_line)
            status, body = await self._route(method, path)
            payload = json.dumps(body, indent=2).encode() + b"\n"
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head if method == "HEAD" else head + payload)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as e:
            self.log.debug("health request dropped: %s", e)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        if method not in ("GET", "HEAD"):
            return 405, {"error": f"{method} not allowed; use GET"}
        path = path.split("?", 1)[0].rstrip("/")
        if path == "/liveness":
            return await self.liveness()
        if path == "/readiness":
            return await self.readiness()
        return 404, {"error": f"{path or '/'} not found", "paths": ["/liveness", "/readiness"]}


def _parse(line: bytes) -> tuple[str, str]:
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"not an HTTP request line: {line[:80]!r}")
    return parts[0], parts[1]

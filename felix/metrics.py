"""The agent's Prometheus metrics and health, served as plain HTTP on 127.0.0.1.

`GET /metrics`   -> Prometheus text format (counters and gauges below, then each collector's
                   text, e.g. `felix.counters.DeniedCounters.metrics_text`; served off the loop).
`GET /liveness`  -> 200 while the event loop answers.
`GET /readiness` -> 200 once the first complete sync reached the kernel, else 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_PORT = 9091

log = logging.getLogger(__name__)

# name -> (type, help)
_DESCRIPTIONS = {
    "felix_syncs_total": ("counter", "Dataplane syncs attempted (one per coalesced burst)."),
    "felix_sync_errors_total": ("counter", "Syncs that failed (render or apply)."),
    "felix_writes_total": ("counter", "Syncs that changed the kernel."),
    "felix_drift_repairs_total": ("counter", "Drift checks that had to rewrite something."),
    "felix_last_sync_seconds": ("gauge", "Duration of the last sync (render + apply)."),
    "felix_last_apply_seconds": ("gauge", "Duration of the last kernel apply."),
    "felix_rules_programmed": ("gauge", "iptables rules in Tabby's desired dataplane."),
    "felix_ipset_members_programmed": ("gauge", "IP set members in the desired dataplane."),
    "felix_ipsets_programmed": ("gauge", "IP sets in the desired dataplane."),
    "felix_local_endpoints": ("gauge", "Workload and host endpoints on this node."),
    "felix_render_problems": ("gauge", "Objects or policies rendered fail-closed (DROP)."),
    "felix_datastore_revision": ("gauge", "Store revision of the last applied state."),
    "felix_in_sync": ("gauge", "1 when the kernel holds the latest state, stale objects swept."),
}


@dataclass
class Metrics:
    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_DESCRIPTIONS, 0.0))
    # Each returns complete Prometheus text (HELP/TYPE and samples); may block briefly.
    collectors: list[Callable[[], str]] = field(default_factory=list)

    def inc(self, name: str, by: float = 1.0) -> None:
        self.values[name] += by

    def set(self, name: str, value: float) -> None:
        self.values[name] = float(value)

    def get(self, name: str) -> float:
        return self.values[name]

    def text(self) -> str:
        lines = []
        for name, value in self.values.items():
            kind, text = _DESCRIPTIONS[name]
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        out = "\n".join(lines) + "\n"
        for collect in self.collectors:
            try:
                out += collect()
            except Exception as e:  # one broken collector must not hide the rest
                log.warning("metrics collector %s failed: %s", getattr(collect, "__qualname__",
                                                                        collect), e)
        return out


def parse_text(text: str) -> dict[str, float]:
    """Sample lines of the text format -> name: value (for tests and tools)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


class MetricsServer:
    def __init__(self, metrics: Metrics, port: int = DEFAULT_PORT, *,
                 host: str = "127.0.0.1") -> None:
        self.metrics = metrics
        self.host, self.port = host, port
        self.ready = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _route(self, path: str) -> tuple[int, str, str]:
        path = path.split("?", 1)[0].rstrip("/")
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", self.metrics.text()
        if path == "/liveness":
            return 200, "text/plain", "live\n"
        if path == "/readiness":
            return (200, "text/plain", "ready\n") if self.ready else (
                503, "text/plain", "not in sync yet\n")
        return 404, "text/plain", "try /metrics, /liveness or /readiness\n"

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                parts = (await reader.readline()).decode("latin-1").split()
                while (await reader.readline()).strip():
                    pass
            # Off the loop: a collector may run iptables-save.
            status, ctype, body = await asyncio.to_thread(
                self._route, parts[1] if len(parts) == 3 else "")
            payload = body.encode()
            writer.write((f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                          ).encode() + payload)
            await writer.drain()
        except (TimeoutError, ConnectionError) as e:
            log.debug("metrics request dropped: %s", e)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

"""The routing agent's end of exabgp's API relay, over a real unix socket: lines in order, and
a line whose handling fails does not end the channel."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bgp.api_server import ApiServer


def test_a_failing_line_does_not_end_the_channel(tmp_path: Path) -> None:
    seen: list[str] = []
    connects: list[int] = []

    async def on_line(line: str) -> None:
        if line == "boom":
            raise KeyError("a bug in the handler")
        seen.append(line)

    async def on_connect() -> None:
        connects.append(1)

    async def main() -> list[str]:
        server = ApiServer(tmp_path / "api.sock", on_line, on_connect)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "api.sock"))
            writer.write(b"one\nboom\ntwo\n")
            await writer.drain()
            for _ in range(100):
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.01)
            assert server.connected
            assert await server.send(["announce route 10.244.0.0/26 next-hop self"])
            assert await reader.readline() == b"announce route 10.244.0.0/26 next-hop self\n"
            writer.close()
        finally:
            await server.stop()
        return seen

    assert asyncio.run(main()) == ["one", "two"]
    assert connects == [1]

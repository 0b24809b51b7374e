"""A Bus reads its socket in chunks below glibc's mmap threshold, also after a reconnect,
and a message larger than one chunk still arrives whole."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio

from bus.client import READ_SIZE, Bus, BusSettings, open_bus
from bus.embedded import open_embedded_nats

TIMEOUT = 30.0


def _transport(bus: Bus) -> Any:
    # The connection's asyncio transport (nats-py internals: there is no public way to it).
    return bus._nc._transport._io_writer.transport  # type: ignore[union-attr]


def _read_size(bus: Bus) -> int:
    size: int = _transport(bus).max_size  # what asyncio passes to each recv() of the socket
    return size


async def _round_trip(bus: Bus, subject: str, data: bytes) -> bytes:
    received: list[bytes] = []
    got = anyio.Event()

    async def on_message(msg: object) -> None:
        received.append(msg.data)  # type: ignore[attr-defined]
        got.set()

    sub = await bus._nc.subscribe(subject, cb=on_message)
    await bus._nc.flush()
    await bus._nc.publish(subject, data)
    await got.wait()
    await sub.unsubscribe()
    return received[0]


async def test_reads_stay_small_across_a_reconnect(tmp_path: Path, prefix: str) -> None:
    big = bytes(range(256)) * 1200  # 300 KB: several reads of READ_SIZE
    store = tmp_path / "nats"
    async with AsyncExitStack() as second_server, AsyncExitStack() as first_server:
        with anyio.fail_after(TIMEOUT):
            first = await first_server.enter_async_context(open_embedded_nats(store))
            reconnected = anyio.Event()

            def on_event(text: str) -> None:
                if text == "reconnected":
                    reconnected.set()

            async with open_bus(BusSettings(url=first.url, name="reads"), on_event) as bus:
                assert _read_size(bus) == READ_SIZE < 128 * 1024
                assert await _round_trip(bus, f"{prefix}.big", big) == big
                before = _transport(bus)

                await first_server.aclose()  # the server goes away; the Bus reconnects
                await second_server.enter_async_context(
                    open_embedded_nats(store, port=first.port))
                await reconnected.wait()
                assert _transport(bus) is not before
                assert _read_size(bus) == READ_SIZE
                assert await _round_trip(bus, f"{prefix}.big", big) == big

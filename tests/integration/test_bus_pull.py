"""A pull consumer picks up again as soon as its connection is back after nats-server was
killed and restarted, not when its forgotten pull requests would have expired."""

from __future__ import annotations

import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from bus.client import BusError, BusSettings, Inbound, open_bus
from bus.embedded import open_embedded_nats
from bus.topology import ConsumerSpec, StreamSpec

EXPIRES = 60.0  # how long each pull request lives: far beyond what the test waits
PROMPT = 15.0  # what "at once" is allowed to take here (a reconnect takes ~0.5-2 s)


async def test_pulling_resumes_right_after_a_server_restart(tmp_path: Path,
                                                            prefix: str) -> None:
    store = tmp_path / "nats"
    stream, subject = f"{prefix.upper()}_WORK", f"{prefix}.work"
    spec = ConsumerSpec(stream, "reader", subject)
    async with AsyncExitStack() as servers:
        first = await servers.enter_async_context(open_embedded_nats(store))
        reconnected = anyio.Event()

        def on_event(text: str) -> None:
            if text == "reconnected":
                reconnected.set()

        send, receive = anyio.create_memory_object_stream[Inbound](16)
        async with (open_bus(BusSettings(url=first.url, name="puller"), on_event) as bus,
                    anyio.create_task_group() as tg, receive):
            await bus.ensure_streams([StreamSpec(stream, (subject,), "workqueue")])
            await bus.ensure_consumer(spec)
            await tg.start(lambda task_status: bus.serve_pull(
                spec, send, expires=EXPIRES, task_status=task_status))
            with anyio.fail_after(PROMPT):
                await bus.publish(subject, b"before", msg_id="m1")
                before = await receive.receive()
                await before.ack()
            assert before.data == b"before"

            os.kill(first.pid, signal.SIGKILL)  # the pull requests die with the server
            await anyio.sleep(0.5)
            await servers.enter_async_context(open_embedded_nats(store, port=first.port))
            with anyio.fail_after(PROMPT):
                await reconnected.wait()
                while True:  # JetStream may still be recovering its streams for a moment
                    try:
                        await bus.publish(subject, b"after", msg_id="m2")
                        break
                    except BusError:
                        await anyio.sleep(0.2)
                # The ack of "before" may have died with the server: then it comes again
                # first (at least once). Either way, nothing comes without new requests.
                while (after := await receive.receive()).data == b"before":
                    await after.ack()
            assert after.data == b"after"
            await after.ack()
            tg.cancel_scope.cancel()

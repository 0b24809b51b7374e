"""How long one message takes through NATS on this machine, before any work is done:
``python -m bench.transit``.

Two figures bound the latency of a hop: a core-NATS publish until another connection's
subscriber has it (what limit (a) pays twice per hop), and a JetStream publish until a
pull consumer (``Bus.serve_pull``, as agents and the coordinator use) has it (what the
real system pays twice per hop: the delivery to the agent, the agent's output to the
coordinator). Each is measured back to back and with a 2 ms pause between messages (a
hop at 1 in flight finds the machine idle, and waking it up costs time too).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import nats
from anyio.streams.memory import MemoryObjectReceiveStream
from nats.aio.msg import Msg

from bus.client import Bus, BusSettings, Inbound, open_bus
from bus.embedded import open_embedded_nats
from bus.topology import ConsumerSpec, StreamSpec

SAMPLES = 300
PAYLOAD = b"x" * 600


async def _core(url: str, pause: float, samples_wanted: int) -> float:
    """Plain nats-py on both sides, as limit (a) uses it."""
    sender, receiver = await nats.connect(url), await nats.connect(url)
    arrived, arrivals = anyio.create_memory_object_stream[float](samples_wanted + 100)

    async def note(_: Msg) -> None:
        arrived.send_nowait(time.perf_counter())

    samples = []
    try:
        with arrived, arrivals:
            subject = f"transit.core.{uuid.uuid4().hex[:8]}"
            await receiver.subscribe(subject, cb=note)
            await receiver.flush()
            # nats-server 2.15 can drop another connection's messages for a moment after
            # a new subscription's SUB was answered (PONG): probe until one gets through.
            for _ in range(100):
                await sender.publish(subject, b"probe")
                with anyio.move_on_after(0.05):
                    await arrivals.receive()
                    break
            else:
                raise RuntimeError("core NATS: no probe reached the new subscription")
            await anyio.sleep(0.05)
            while True:  # late probes
                try:
                    arrivals.receive_nowait()
                except anyio.WouldBlock:
                    break
            for _ in range(samples_wanted):
                start = time.perf_counter()
                await sender.publish(subject, PAYLOAD)
                await sender.flush()
                with anyio.fail_after(5):  # at most once: a lost message is an error, not a hang
                    samples.append(await arrivals.receive() - start)
                await anyio.sleep(pause)
    finally:
        await sender.close()
        await receiver.close()
    return statistics.median(samples) * 1000


async def _jetstream(sender: Bus, arrivals: MemoryObjectReceiveStream[Inbound],
                     pause: float, samples_wanted: int) -> float:
    samples = []
    for _ in range(samples_wanted):
        start = time.perf_counter()
        pending = await sender.start_publish("transit.js.x", PAYLOAD, msg_id=str(uuid.uuid4()))
        with anyio.fail_after(10):  # redelivery would take the ack wait: an error instead
            message = await arrivals.receive()
        samples.append(time.perf_counter() - start)
        await pending.wait()
        await message.ack()
        await anyio.sleep(pause)
    return statistics.median(samples) * 1000


async def measure(url: str, samples: int = SAMPLES) -> dict[str, float]:
    """Median one-way transit, ms: core NATS and JetStream, back to back and paused."""
    out: dict[str, float] = {}
    async with open_bus(BusSettings(url=url, name="transit_a")) as sender, \
            open_bus(BusSettings(url=url, name="transit_b")) as receiver:
        for pause in (0.0, 0.002):
            out[f"core_p50_ms_pause_{pause * 1000:g}ms"] = await _core(url, pause, samples)
        await sender.ensure_streams([StreamSpec("TRANSIT", ("transit.js.>",), "workqueue")])
        spec = ConsumerSpec("TRANSIT", "transit", "transit.js.>")
        await sender.ensure_consumer(spec)
        send, arrivals = anyio.create_memory_object_stream[Inbound](samples)
        async with anyio.create_task_group() as tg, arrivals:
            await tg.start(receiver.serve_pull, spec, send)
            for pause in (0.0, 0.002):
                out[f"jetstream_p50_ms_pause_{pause * 1000:g}ms"] = await _jetstream(
                    sender, arrivals, pause, samples)
            tg.cancel_scope.cancel()
    return out


async def _main() -> None:
    with tempfile.TemporaryDirectory(prefix="ledgermesh-transit-") as workdir:
        async with open_embedded_nats(Path(workdir)) as server:
            figures = await measure(server.url)
    for name, value in figures.items():
        print(f"{name:<34}{value:8.3f}")


if __name__ == "__main__":
    anyio.run(_main)

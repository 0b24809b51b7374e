"""Baseline (b): JetStream acked publish on this machine, pipelined and one at a time.

A file-backed stream on the same embedded nats-server, messages about the size of an
envelope, acks awaited (``publish_async`` with a bounded window when pipelined). This is
the floor under each of the system's JetStream hops (intake, deliver, ledger copy).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import nats
from nats.js import api

PAYLOAD = b"x" * 600


async def measure(url: str, *, pipelined: int, one_at_a_time: int,
                  window: int = 2000) -> dict[str, float]:
    nc = await nats.connect(url, name="bench_js")
    name = f"BENCHJS_{uuid.uuid4().hex[:6].upper()}"
    subject = f"benchjs.{name.lower()}"
    try:
        js = nc.jetstream(publish_async_max_pending=window)
        await js.add_stream(api.StreamConfig(name=name, subjects=[subject],
                                             storage=api.StorageType.FILE))
        # Pipelined: keep up to ``window`` publishes outstanding, then collect the acks.
        t0 = time.perf_counter()
        futures: list[Any] = []
        for i in range(pipelined):
            futures.append(await js.publish_async(subject, PAYLOAD,
                                                  headers={"Nats-Msg-Id": f"p{i}"}))
            if len(futures) >= window:
                for future in futures:
                    await future
                futures.clear()
        for future in futures:
            await future
        pipelined_rate = pipelined / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(one_at_a_time):
            await js.publish(subject, PAYLOAD, headers={"Nats-Msg-Id": f"s{i}"})
        sync_rate = one_at_a_time / (time.perf_counter() - t0)
        await js.delete_stream(name)
    finally:
        await nc.drain()
    return {"js_publish_pipelined_per_s": pipelined_rate,
            "js_publish_one_at_a_time_per_s": sync_rate}

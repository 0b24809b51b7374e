"""Grow a ledger through the coordinator's real write path, minus NATS.

Used when the real system cannot write the ≥200k-event ledger within the time budget:
``LedgerWriter.record`` (decide → seal → one transaction with the tracking position) is
fed the very intake messages the chain's agents would publish. Each delivery is taken from
the recorded ``task.assigned`` event, encoded exactly as the relay encodes it, decoded as
the agent runtime decodes it, and handed to the chain agent's real handler through
``agents.sdk.Context``; its outputs become the next intake messages. Only the transport
is missing. Also gives the write path's own ceiling (events/s with nothing else running).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast

from agents.sdk import Context
from bench import chain
from bench.stack import PREFIX
from coordinator.ledger.store import open_ledger
from coordinator.ledger.writer import IntakeMessage, LedgerWriter
from coordinator.policy import parse_policy
from coordinator.service import utc_now
from schemas import Codec, Envelope, Subjects, SubmitTask, canonical

AGENTS = {a.name: a for a in (chain.hop1, chain.hop2, chain.hop3, chain.hop4, chain.hop5)}


class _Kept:
    """An output the collector kept: stored as soon as said."""

    async def wait(self, timeout: float = 10.0) -> object:
        return None


class _Collect:
    def __init__(self) -> None:
        self.sent: list[Envelope] = []

    async def send(self, envelope: Envelope) -> _Kept:
        self.sent.append(envelope)
        return _Kept()

    async def call_tool(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the bench chain calls no tools")


def _run_handler(ctx: Context, body: Any) -> None:
    handler = AGENTS[ctx.agent].handler_for(body)
    assert handler is not None
    coro = cast(Coroutine[Any, Any, None], handler(ctx, body))
    try:
        coro.send(None)  # the collecting outbox never suspends: one step runs it all
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("chain handler suspended outside an event loop")


def fill(location: str, target_events: int, *, in_flight: int = 64, batch_max: int = 256,
         progress: Callable[[int], object] | None = None) -> dict[str, float]:
    """Record chain tasks into ``location`` until it holds ``target_events``."""
    subjects = Subjects(PREFIX)
    codec = Codec()
    ledger = open_ledger(location, create=True)
    try:
        writer = LedgerWriter(ledger, parse_policy(chain.policy_toml()), subjects, utc_now)
        start_events = ledger.last_position()
        seq = writer.position
        pending: deque[IntakeMessage] = deque()
        run = uuid.uuid4().hex[:6]
        submitted = 0

        def enqueue(envelope: Envelope) -> None:
            nonlocal seq
            seq += 1
            pending.append(IntakeMessage(seq, subjects.intake(envelope.sender),
                                         codec.encode(envelope), envelope.id))

        def submit() -> None:
            nonlocal submitted
            submitted += 1
            envelope = Envelope(id=str(uuid.uuid4()), sender=chain.SUBMITTER,
                                task_id=f"fill-{run}-{submitted}", sent_at=utc_now(),
                                body=SubmitTask(to="hop1", title="bench chain",
                                                payload={"n": submitted}))
            enqueue(envelope)

        recorded_events = 0
        needed_tasks = max(target_events - start_events, 0) // chain.EVENTS_PER_TASK + 1
        for _ in range(min(in_flight, needed_tasks)):
            submit()
        t0 = time.perf_counter()
        while pending:
            batch = [pending.popleft() for _ in range(min(batch_max, len(pending)))]
            recorded = writer.record(batch)
            if progress is not None and (recorded_events + len(recorded.events)) // 10_000 > (
                    recorded_events // 10_000):
                progress(start_events + recorded_events + len(recorded.events))
            recorded_events += len(recorded.events)
            for event in recorded.events:
                if event.kind == "task.assigned":
                    delivery = codec.decode_delivery(canonical(event.data["delivery"]))
                    out = _Collect()
                    ctx = Context(delivery.agent, delivery, out, utc_now)
                    _run_handler(ctx, delivery.envelope.body)
                    for envelope in out.sent:
                        enqueue(envelope)
                elif event.kind in ("task.completed", "task.failed") and submitted < needed_tasks:
                    submit()
        seconds = time.perf_counter() - t0
        total = ledger.last_position()
    finally:
        ledger.close()
    return {"events_added": recorded_events, "ledger_events": total, "seconds": seconds,
            "events_per_s": recorded_events / max(seconds, 1e-9)}

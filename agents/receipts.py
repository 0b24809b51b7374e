"""Ack a delivery once the ledger has recorded what its handler sent.

JetStream acknowledges a publish before it syncs it to disk, so a PubAck does not survive
a crash of the NATS machine; the coordinator's receipt (``<prefix>.receipt.<agent>``,
after its commit) does. A delivery is acked once every intake message its handler sent
is named in a receipt. A message without one in time is published again under a new id
(the ledger finds its envelopes already recorded, or records them if the stream lost
them) until the delivery's deadline: past it, the coordinator has retried the attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import anyio
import msgspec
from anyio.abc import TaskStatus

from bus.client import Bus, BusError
from schemas import Receipt

log = logging.getLogger("ledgermesh.agent.receipts")
_receipt = msgspec.json.Decoder(Receipt)

FIRST_WAIT_S = 5.0  # before the first publish again; then twice as long each time
LONGEST_WAIT_S = 60.0


class Sent:
    """One intake message a handler sent: kept until the ledger has recorded it."""

    __slots__ = ("data", "ids", "recorded", "waiter")

    def __init__(self, msg_id: str, data: bytes) -> None:
        self.ids = [msg_id]  # its first id, then one per publish again
        self.data = data
        self.recorded = False
        self.waiter: _Waiter | None = None


class _Waiter:
    """A delivery whose ack waits for receipts."""

    __slots__ = ("ack", "deadline", "due", "left", "pause", "task_id")

    def __init__(self, ack: Callable[[], Awaitable[None]], left: list[Sent],
                 deadline: datetime | None, task_id: str, pause: float) -> None:
        self.ack = ack
        self.left = left
        self.deadline = deadline
        self.task_id = task_id
        self.pause = pause
        self.due = anyio.current_time() + pause  # when to publish again what is left


class Receipts:
    """The receipts of one agent process: which of its intake messages are recorded."""

    def __init__(self, bus: Bus, subject: str, intake: str, clock: Callable[[], datetime],
                 first_wait_s: float = FIRST_WAIT_S) -> None:
        self._bus = bus
        self._subject = subject  # where the receipts come
        self._intake = intake  # where a message is published again
        self._clock = clock
        self._first_wait_s = first_wait_s
        self._by_id: dict[str, Sent] = {}
        self._waiting: set[_Waiter] = set()
        self._emptied: anyio.Event | None = None  # set when ``_waiting`` empties (a drain)

    def expect(self, msg_id: str, data: bytes) -> Sent:
        """Call before publishing: a receipt may come before the publish returns."""
        sent = self._by_id[msg_id] = Sent(msg_id, data)
        return sent

    def forget(self, sent: Sequence[Sent]) -> None:
        """Messages whose delivery will not be acked here (it comes again)."""
        for message in sent:
            for msg_id in message.ids:
                self._by_id.pop(msg_id, None)

    async def ack_when_recorded(self, ack: Callable[[], Awaitable[None]], sent: Sequence[Sent],
                                deadline: datetime | None, task_id: str) -> None:
        """Ack now if everything ``sent`` is recorded, else as the last receipt comes."""
        left = [message for message in sent if not message.recorded]
        if not left:
            await ack()
            return
        waiter = _Waiter(ack, left, deadline, task_id, self._first_wait_s)
        for message in left:
            message.waiter = waiter
        self._waiting.add(waiter)

    async def settled(self) -> None:
        """Return once no delivery waits for its receipts (each acked, or given up)."""
        while self._waiting:
            self._emptied = anyio.Event()
            await self._emptied.wait()

    def _done(self, waiter: _Waiter) -> None:
        self._waiting.discard(waiter)
        if not self._waiting and self._emptied is not None:
            self._emptied.set()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take receipts, and publish again what waits too long, until cancelled."""
        async with anyio.create_task_group() as tg:
            await tg.start(self._bus.serve_notices, self._subject, self._on_receipt)
            task_status.started()
            while True:
                await anyio.sleep(min(1.0, self._first_wait_s))
                await self._publish_overdue()

    async def _on_receipt(self, data: bytes) -> None:
        try:
            receipt = _receipt.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("ignoring an unreadable receipt on %s: %s", self._subject, exc)
            return
        for refusal in receipt.refused:
            if refusal.message in self._by_id:  # sent by this process, not another instance
                log.warning("task %s: the coordinator refused message %s sent on %s (%s): %s",
                            refusal.task_id, refusal.id, self._intake, refusal.code,
                            refusal.reason)
        for msg_id in receipt.ids:
            message = self._by_id.pop(msg_id, None)
            if message is None or message.recorded:
                continue
            message.recorded = True
            self.forget([message])
            waiter = message.waiter
            if waiter is None:
                continue  # its handler is still running: acked once it returns
            waiter.left.remove(message)
            if not waiter.left:
                try:
                    await waiter.ack()
                except Exception as exc:  # nats-py's errors vary; the delivery comes again
                    log.warning("task %s: ack failed: %s", waiter.task_id, exc)
                finally:
                    self._done(waiter)  # (after the ack: a drain waits for it)

    async def _publish_overdue(self) -> None:
        now = anyio.current_time()
        for waiter in [w for w in self._waiting if w.due <= now]:
            if waiter.deadline is not None and self._clock() > waiter.deadline:
                # The coordinator has timed the attempt out (or will): a redelivery of it
                # would be dropped as stale. Nothing more to do here; no ack.
                log.warning("task %s: %d output message(s) not confirmed recorded by the "
                            "attempt's deadline; leaving it to the coordinator's retry",
                            waiter.task_id, len(waiter.left))
                self._done(waiter)
                self.forget(waiter.left)
                continue
            for message in waiter.left:
                await self._publish_again(message, waiter)
            waiter.pause = min(waiter.pause * 2, LONGEST_WAIT_S)
            waiter.due = now + waiter.pause

    async def _publish_again(self, message: Sent, waiter: _Waiter) -> None:
        """Under a new id: the stream may still hold the first (so would drop the same id
        as a duplicate, and no new receipt would come), or have lost it."""
        msg_id = f"{message.ids[0]}.{len(message.ids)}"
        message.ids.append(msg_id)
        self._by_id[msg_id] = message
        log.info("task %s: no receipt for intake message %s after %.0f s; publishing it "
                 "again as %s", waiter.task_id, message.ids[0], waiter.pause, msg_id)
        try:
            await self._bus.publish(self._intake, message.data, msg_id=msg_id)
        except BusError as exc:
            log.warning("task %s: publishing %s again failed (next try later): %s",
                        waiter.task_id, msg_id, exc)

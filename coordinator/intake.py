"""Intake: pull from the intake stream, record each batch in one transaction, then ack.

Acks follow the commit, never precede it: a crash in between redelivers the batch, and the
ledger, which knows every message id it recorded, turns the redelivery into a no-op.
"""

from __future__ import annotations

import logging
from contextlib import suppress

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from bus.client import MSG_ID, Bus, BusError, Inbound
from bus.faults import NO_CRASH, CrashPoints
from bus.topology import coordinator_consumer
from coordinator.health import Health
from coordinator.ledger.writer import IntakeMessage, LedgerWriter, Recorded
from coordinator.ledger_writes import LedgerWrites
from coordinator.receipts import ReceiptBook
from coordinator.signals import Doorbell
from schemas import Subjects, is_batch

log = logging.getLogger("ledgermesh.coordinator.intake")


async def serve_intake(bus: Bus, writer: LedgerWriter, writes: LedgerWrites,
                       subjects: Subjects, relay: Doorbell, health: Health,
                       batch_max: int = 256, crash: CrashPoints = NO_CRASH, *,
                       linger: float = 0.0005, receipts: ReceiptBook | None = None,
                       idle_s: float = 1.0,
                       task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """``receipts``: where what each commit recorded is noted, for the agents that sent it.
    After ``idle_s`` without a delivery, the stream is asked whether it holds more than
    was recorded (``_record_stranded``)."""
    send, receive = anyio.create_memory_object_stream[Inbound](max_buffer_size=batch_max * 2)
    async with anyio.create_task_group() as tg, receive:
        await tg.start(bus.serve_pull, coordinator_consumer(subjects), send)
        task_status.started()
        # Pulling ends only at a stop (it hands back what it was sent first): between the
        # commit in hand and the cancellation, the stream may be found closed.
        with suppress(anyio.EndOfStream):
            await _take_intake(bus, writer, writes, subjects, relay, health, receive,
                               batch_max, crash, linger, receipts, idle_s)


async def _take_intake(bus: Bus, writer: LedgerWriter, writes: LedgerWrites,
                       subjects: Subjects, relay: Doorbell, health: Health,
                       receive: MemoryObjectReceiveStream[Inbound], batch_max: int,
                       crash: CrashPoints, linger: float, receipts: ReceiptBook | None,
                       idle_s: float) -> None:
    seen = 0  # the intake stream's last sequence at the previous idle turn
    while True:
        batch: list[Inbound] = []
        # What waited during the last commit is taken without a turn of the event loop:
        # on a writer thread, the writer starts on it while the relay publishes.
        _take_waiting(receive, batch, batch_max)
        if not batch:
            with anyio.move_on_after(idle_s):
                batch.append(await receive.receive())
            if not batch:
                seen = await _record_stranded(bus, writer, writes, subjects, relay, health,
                                              receipts, seen)
                continue
            _take_waiting(receive, batch, batch_max)
        if len(batch) == 1 and linger > 0 and not is_batch(batch[0].data):
            # A lone envelope often has company on the way (an agent that publishes
            # its say and its handoff one by one): a short wait for it saves a whole
            # commit. Never more than once per batch, so load is not held up. (A
            # batch is a handler's whole turn: nothing is to follow it.)
            with anyio.move_on_after(linger):
                batch.append(await receive.receive())
            _take_waiting(receive, batch, batch_max)
        crash.reached("coordinator.after_receive", batch[0].data)
        messages = await _in_stream_order(bus, subjects, writer.position, batch)
        recorded = await _record_until_stored(messages, writer, writes, health)
        relay.ring()  # recorded: the relay may publish while the acks go out
        if receipts is not None:
            receipts.add(messages, anyio.current_time(), recorded.refused)
        crash.reached("coordinator.after_commit", batch[0].data)
        # One ack for the batch (the consumer acks all up to it): it covers every
        # message up to the newest in the stream, and everything up to there is
        # recorded (the gaps were read above). Buffered: the next batch starts meanwhile.
        await max(batch, key=lambda m: m.stream_seq).ack()


async def _record_stranded(bus: Bus, writer: LedgerWriter, writes: LedgerWrites,
                           subjects: Subjects, relay: Doorbell, health: Health,
                           receipts: ReceiptBook | None, seen: int) -> int:
    """Record what the intake stream held past the recorded position at the previous
    idle turn (``seen``) as well as now, none of it delivered since: messages delivered
    to a connection that died unnoticed (a silent network partition) or to a coordinator
    that crashed come back only after the consumer's ack wait (30 s). Read from the
    stream, they are recorded at once, and their redelivery is a no-op. (Nothing to ack:
    the redelivery's ack covers them. A message stored a moment ago is left to its
    delivery.) The stream's last sequence now, for the next turn."""
    try:
        last = await bus.last_seq(subjects.intake_stream)
    except BusError:
        return seen  # disconnected: the next idle turn asks again
    upto = min(seen, last)
    if upto <= writer.position:
        return last
    log.warning("intake #%d to #%d have waited in the stream for a delivery for over a "
                "second (delivered to a connection that died?): reading them from the "
                "stream", writer.position + 1, upto)
    messages = await _in_stream_order(bus, subjects, writer.position, [], upto=upto)
    if messages:
        recorded = await _record_until_stored(messages, writer, writes, health)
        relay.ring()
        if receipts is not None:
            receipts.add(messages, anyio.current_time(), recorded.refused)
    return last


def _take_waiting(receive: MemoryObjectReceiveStream[Inbound], batch: list[Inbound],
                  batch_max: int) -> None:
    """Group commit: add whatever else is already waiting, up to ``batch_max``."""
    while len(batch) < batch_max:
        try:
            batch.append(receive.receive_nowait())
        except anyio.WouldBlock:
            return


async def _in_stream_order(bus: Bus, subjects: Subjects, position: int,
                           batch: list[Inbound], *, upto: int = 0) -> list[IntakeMessage]:
    """The batch in stream order, preceded by every message between the recorded position
    and the batch (or up to ``upto``) that the consumer has not (re)delivered yet.

    A message delivered to a coordinator that stopped before recording it comes back only
    after the ack wait, behind newer ones; recording those first would decide them before
    it (a handoff before the say that preceded it: the say would then be refused, its
    sender no longer the owner). So read it from the stream now; its later redelivery is
    the no-op.
    """
    have = {m.stream_seq for m in batch}
    out = [IntakeMessage(m.stream_seq, m.subject, m.data, m.msg_id) for m in batch]
    for seq in range(position + 1, max(have, default=upto + 1)):
        if seq in have:
            continue
        while True:
            try:
                stored = await bus.stored(subjects.intake_stream, seq)
                break
            except BusError as exc:
                log.warning("cannot read intake #%d yet: %s", seq, exc)
                await anyio.sleep(0.5)
        if stored is not None:
            subject, data, headers = stored
            out.append(IntakeMessage(seq, subject, data, headers.get(MSG_ID)))
    return sorted(out, key=lambda m: m.seq)


async def _record_until_stored(messages: list[IntakeMessage], writer: LedgerWriter,
                               writes: LedgerWrites, health: Health) -> Recorded:
    """Record the batch, retrying with backoff while the ledger cannot be written.

    Nothing is acked meanwhile, so the messages wait in the intake stream.
    """
    delay = 0.1
    while True:
        try:
            recorded = await writes.run(writer.record, messages)
        except Exception as exc:  # the ledger's driver errors vary by backend
            health.ledger_error(f"{type(exc).__name__}: {exc}")
            log.error("cannot record %d intake messages (retrying in %.1fs): %s",
                      len(messages), delay, exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        health.recorded(len(recorded.events), writer.position)
        if recorded.reused:
            log.warning("%d intake message(s) at or below the recorded position %d were "
                        "new: the intake stream lost messages it had acknowledged (a "
                        "server crash before its sync?) and reused their sequences; "
                        "recorded by message id", recorded.reused, writer.position)
        return recorded

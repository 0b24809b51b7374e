"""Relay: the notification log is the outbox.

After each commit, publish every new ledger event to ``<prefix>.ledger.…`` (in ledger
order, guarded by ``Nats-Expected-Last-Msg-Id``) and every assignment to its agent's
deliver subject. No cursor of its own: it resumes after the last message in the ledger
stream, so a crash anywhere means republish (deduplicated), never loss. What the writer
just committed comes through the CommitFeed, without a read back from the database, when
the feed can vouch for it; otherwise from the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import msgspec
from anyio.abc import TaskStatus
from eventsourcing.persistence import InterfaceError, Notification, OperationalError

from bus.client import EXPECTED_LAST_MSG_ID, MSG_ID, Bus, BusError
from bus.faults import NO_CRASH, CrashPoints
from coordinator.health import Health
from coordinator.ledger.events import Aggregate, Kind
from coordinator.ledger.feed import CommitFeed
from coordinator.ledger.store import Ledger
from coordinator.signals import Doorbell
from schemas import LedgerRecord, Subjects

log = logging.getLogger("ledgermesh.coordinator.relay")

class _Routing(msgspec.Struct):
    """What the relay needs of a stored event's state (the rest is skipped, not decoded)."""

    aggregate: str
    key: str
    kind: str
    data: msgspec.Raw


class _Assignment(msgspec.Struct):
    agent: str
    delivery: msgspec.Raw  # canonical JSON already: stored states are


class _Delivery(msgspec.Struct):
    id: str


_routing = msgspec.json.Decoder(_Routing)
_assignment = msgspec.json.Decoder(_Assignment)
_delivery_id = msgspec.json.Decoder(_Delivery)
_record = msgspec.json.Encoder()


Message = tuple[str, bytes, dict[str, str]]  # subject, data, headers


def outbox_items(notifications: Sequence[Notification], subjects: Subjects,
                 last_position: int, live: LiveDeliveries | None = None,
                 ) -> tuple[list[Message], list[Message]]:
    """What to publish for these notifications: the deliveries (those ``live`` keeps),
    then the ledger copies (a chain: each expects the one before it as the stream's last).

    A delivery goes out before its ledger copy so that a crash between the two leaves the
    copy missing (and so republished, with the delivery deduplicated), never the delivery.
    """
    deliveries: list[Message] = []
    copies: list[Message] = []
    previous = subjects.ledger_msg_id(last_position) if last_position else None
    for n in notifications:
        state = _routing.decode(n.state)
        if state.kind == Kind.ASSIGNED:
            assignment = _assignment.decode(state.data)
            delivery = bytes(assignment.delivery)
            delivery_id = _delivery_id.decode(delivery).id
            if live is None or live.keeps(n.id, delivery_id):
                deliveries.append((subjects.deliver(assignment.agent), delivery,
                                   {MSG_ID: delivery_id}))
        record = LedgerRecord(position=n.id, aggregate_id=str(n.originator_id),
                              version=n.originator_version, topic=n.topic,
                              event=msgspec.Raw(n.state))
        msg_id = subjects.ledger_msg_id(n.id)
        headers = ({MSG_ID: msg_id} if previous is None
                   else {MSG_ID: msg_id, EXPECTED_LAST_MSG_ID: previous})
        copies.append((subjects.ledger(state.aggregate, state.key, state.kind),
                       _record.encode(record), headers))
        previous = msg_id
    return deliveries, copies


# What ends an attempt for good: after one of these, its delivery can only make its agent
# run a handler whose outputs are refused (stale_attempt, task_closed).
_ENDS_ATTEMPT = frozenset({Kind.COMPLETED, Kind.FAILED, Kind.DEAD_LETTERED, Kind.TIMED_OUT,
                           Kind.ATTEMPT_FAILED})


@dataclass(frozen=True)
class LiveDeliveries:
    """Of the deliveries recorded up to ``until``, those that still matter there: each
    open task's last assignment, unless its attempt ended (timed out, failed)."""

    ids: frozenset[str]
    until: int

    def keeps(self, position: int, delivery_id: str) -> bool:
        return position > self.until or delivery_id in self.ids


def live_deliveries(ledger: Ledger, after: int, page: int = 4096) -> LiveDeliveries:
    """Read the log past ``after`` to its end: which of its deliveries still matter.

    Asked when the relay must publish again from a ledger stream behind the log (a
    server crash before its sync, or a relay that stopped early): the deliver stream lost
    the same span, and relaying every delivery in it would make agents run again the
    handlers of tasks that have moved on or closed since. Memory follows the open tasks."""
    latest: dict[str, str] = {}  # task -> the delivery of its last assignment so far
    until = after
    while notifications := ledger.read(until, page):
        for n in notifications:
            state = _routing.decode(n.state)
            if state.aggregate != Aggregate.TASK:
                continue
            if state.kind == Kind.ASSIGNED:
                delivery = _assignment.decode(state.data).delivery
                latest[state.key] = _delivery_id.decode(delivery).id
            elif state.kind in _ENDS_ATTEMPT:
                latest.pop(state.key, None)
        until = notifications[-1].id
    return LiveDeliveries(frozenset(latest.values()), until)


async def serve_relay(bus: Bus, ledger: Ledger, limiter: anyio.CapacityLimiter,
                      subjects: Subjects, doorbell: Doorbell, health: Health,
                      crash: CrashPoints = NO_CRASH, *, feed: CommitFeed | None = None,
                      page: int = 512,
                      task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    position = subjects.ledger_position(await bus.last_msg_id(subjects.ledger_stream))
    health.relayed_position = position
    # Behind the log (a stop before the relay caught up, or a server that lost its tail):
    # relay again only the deliveries that still matter.
    live: LiveDeliveries | None = await anyio.to_thread.run_sync(
        live_deliveries, ledger, position, limiter=limiter)
    task_status.started()
    read_log = True  # at start, and whenever the feed cannot vouch for what follows
    reconnects = bus.reconnects
    while True:
        if bus.reconnects != reconnects:
            # A server that crashed before its sync comes back without what it acked
            # since: relay again from what the stream really holds (a publish would find
            # out too, but only once there is something new to publish).
            reconnects = bus.reconnects
            tail = subjects.ledger_position(await _tail(bus, subjects))
            if tail < position:
                log.warning("the ledger stream lost positions %d to %d (a server crash "
                            "before its sync?): relaying them again", tail + 1, position)
                position, read_log = tail, True
                live = await anyio.to_thread.run_sync(live_deliveries, ledger, position,
                                                      limiter=limiter)
        notifications: Sequence[Notification] | None = (
            None if read_log or feed is None else feed.after(position, page))
        if notifications is None:
            notifications = await _read_log(ledger, position, page, limiter, health)
            read_log = len(notifications) == page  # a full page: more may be waiting
        if not notifications:
            # Quiet for a second: look at the log itself (a commit whose outcome the writer
            # could not tell is in the log, but not in the feed).
            read_log = not await doorbell.wait(timeout=1.0)
            continue
        crash.reached("coordinator.before_relay", notifications[-1].state)
        try:
            await _publish(bus, notifications, subjects, position, live)
        except (BusError, TimeoutError) as exc:
            # Resynchronise from what the stream really holds, then go again.
            log.warning("relay publish failed after position %d: %s", position, exc)
            await anyio.sleep(0.5)
            tail = subjects.ledger_position(await _tail(bus, subjects))
            if tail < position:  # the stream lost some of what it had
                live = await anyio.to_thread.run_sync(live_deliveries, ledger, tail,
                                                      limiter=limiter)
            position = tail
            continue
        position = notifications[-1].id
        health.relayed_position = position
        if live is not None and position >= live.until:
            live = None  # caught up with the span it was read for


async def _read_log(ledger: Ledger, position: int, page: int,
                    limiter: anyio.CapacityLimiter, health: Health) -> Sequence[Notification]:
    """The log past ``position``, retried with backoff while the database cannot be read (a
    dropped PostgreSQL connection, a restart): the relay waits, as intake does, where the
    error ended the coordinator."""
    delay = 0.1
    while True:
        try:
            read = await anyio.to_thread.run_sync(ledger.read, position, page, limiter=limiter)
            health.problem("relay", None)
            return read
        except (InterfaceError, OperationalError) as exc:
            health.problem("relay", f"{type(exc).__name__}: {exc}")
            log.error("relay: cannot read the ledger after position %d (retrying in %.1fs): "
                      "%s", position, delay, exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def relay_rest(bus: Bus, ledger: Ledger, subjects: Subjects, page: int = 512) -> int:
    """Publish whatever the log holds past the ledger stream's tail, once (at a stop, when
    the relay itself is gone); the position relayed to."""
    position = subjects.ledger_position(await bus.last_msg_id(subjects.ledger_stream))
    while notifications := await anyio.to_thread.run_sync(ledger.read, position, page):
        await _publish(bus, notifications, subjects, position)
        position = notifications[-1].id
    return position


async def _publish(bus: Bus, notifications: Sequence[Notification], subjects: Subjects,
                   position: int, live: LiveDeliveries | None = None) -> None:
    """The deliveries and ledger copies of ``notifications``, which follow ``position``.
    Every delivery is acked; of the copies only the last (its ack vouches for all)."""
    deliveries, copies = outbox_items(notifications, subjects, position, live)
    await bus.publish_all(deliveries, chain=copies)


async def _tail(bus: Bus, subjects: Subjects) -> str | None:
    while True:
        try:
            return await bus.last_msg_id(subjects.ledger_stream)
        except BusError as exc:
            log.warning("cannot read the ledger stream tail: %s", exc)
            await anyio.sleep(1.0)

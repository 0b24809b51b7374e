"""The write path: a batch of intake messages → decisions → one transaction.

Synchronous and single-threaded by design: the async coordinator calls ``record`` through
one worker thread (anyio CapacityLimiter(1)), so there is exactly one writer per ledger.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec
from eventsourcing.persistence import Tracking

from coordinator.decide import decide, decide_timer, reject_unreadable
from coordinator.ledger.events import (
    Aggregate,
    Draft,
    Kind,
    LedgerEvent,
    principal_aggregate_id,
    stamp,
    task_aggregate_id,
)
from coordinator.ledger.state import PrincipalState, TaskState
from coordinator.ledger.store import Ledger
from coordinator.policy import Policy
from schemas import Codec, MalformedMessageError, Subjects

INTAKE = "intake"  # tracking name of the intake stream
UNKNOWN_PRINCIPAL = "_unknown"


@dataclass(frozen=True)
class IntakeMessage:
    """One message from the intake stream, as the coordinator sees it."""

    seq: int  # stream sequence: the tracking position
    subject: str
    data: bytes
    msg_id: str | None  # the Nats-Msg-Id header, if any


@dataclass(frozen=True)
class Recorded:
    events: list[LedgerEvent]
    positions: list[int]
    skipped: int  # messages at or below the tracking position (redeliveries)


class LedgerWriter:
    """Decides and records intake batches, keeping recent aggregate states in memory."""

    def __init__(self, ledger: Ledger, policy: Policy, subjects: Subjects,
                 clock: Callable[[], datetime], cache_size: int = 10_000) -> None:
        self._ledger = ledger
        self._policy = policy
        self._subjects = subjects
        self._clock = clock
        self._codec = Codec()
        self._cache_size = cache_size
        self._touched: set[str] = set()  # aggregates advanced by the batch in progress
        self._tasks: OrderedDict[str, TaskState | None] = OrderedDict()
        self._principals: dict[str, PrincipalState] = {}
        self.position = ledger.tracking_position(INTAKE)
        # task id -> when the coordinator must next decide for it (deadline or retry).
        self.timers: dict[str, datetime] = open_timers(ledger)

    def record(self, batch: Sequence[IntakeMessage]) -> Recorded:
        """Decide and store a batch of intake messages with their tracking position."""
        now = self._clock()
        top = self.position
        skipped = 0

        def decide_all() -> list[LedgerEvent]:
            nonlocal top, skipped
            events = []
            for message in batch:
                if message.seq <= top:
                    skipped += 1
                    continue
                top = message.seq
                events += [self._seal(d, now) for d in self._decide(message, now)]
            return events

        events, positions = self._commit(decide_all, lambda: Tracking(INTAKE, top)
                                         if top > self.position else None)
        self.position = top
        return Recorded(events, positions, skipped)

    def tick(self) -> Recorded:
        """Record what the clock decides: timeouts of overdue assignments, due retries."""
        now = self._clock()
        due = sorted(task_id for task_id, when in self.timers.items() if when <= now)
        if not due:
            return Recorded([], [], 0)

        def decide_due() -> list[LedgerEvent]:
            events = []
            for task_id in due:
                task = self._task(task_id)
                if task is None:
                    self.timers.pop(task_id, None)
                    continue
                events += [self._seal(d, now) for d in decide_timer(task, self._policy, now)]
            return events

        events, positions = self._commit(decide_due, lambda: None)
        return Recorded(events, positions, 0)

    def _commit(self, decide_events: Callable[[], list[LedgerEvent]],
                tracking: Callable[[], Tracking | None]) -> tuple[list[LedgerEvent], list[int]]:
        touched_before = set(self._touched)
        try:
            events = decide_events()
            position = tracking()
            if not events and position is None:
                return [], []
            positions = self._ledger.append(events, position)
        except BaseException:
            # In-memory states were advanced for events that may not be stored: forget
            # them, the next read reloads from the database.
            for key in self._touched - touched_before:
                self._tasks.pop(key, None)
                self._principals.pop(key, None)
                self.timers.pop(key, None)
            self._touched = touched_before
            raise
        finally:
            self._touched.clear()
        return events, positions

    def _decide(self, message: IntakeMessage, now: datetime) -> list[Draft]:
        principal = self._subjects.principal_of(message.subject) or UNKNOWN_PRINCIPAL
        msg_id = message.msg_id or f"seq-{message.seq}"
        if len(message.data) > self._policy.max_payload_bytes:
            return reject_unreadable(principal, msg_id, b"",
                                     f"{len(message.data)} bytes exceeds the limit of "
                                     f"{self._policy.max_payload_bytes}", code="oversize")
        try:
            envelope = self._codec.decode_envelope(message.data, message.subject)
        except MalformedMessageError as exc:
            return reject_unreadable(principal, msg_id, message.data, exc.reason)
        task = self._task(envelope.task_id)
        return decide(principal, message.data, envelope, task, self._policy, now,
                      message.msg_id)

    def _seal(self, draft: Draft, now: datetime) -> LedgerEvent:
        self._touched.add(draft.key)
        state: TaskState | PrincipalState
        if draft.aggregate is Aggregate.TASK:
            task = self._task(draft.key)
            state = task if task is not None else TaskState(task_id=draft.key)
            self._remember(draft.key, state)
        else:
            state = self._principal(draft.key)
        event = stamp(draft, version=state.version + 1, prev_hash=state.head,
                      recorded_at=now.isoformat())
        state.apply(event)
        if isinstance(state, TaskState):
            when = state.next_timer()
            if when is None:
                self.timers.pop(draft.key, None)
            else:
                self.timers[draft.key] = datetime.fromisoformat(when)
        return event

    def _task(self, task_id: str) -> TaskState | None:
        if task_id in self._tasks:
            self._tasks.move_to_end(task_id)
            return self._tasks[task_id]
        history = self._ledger.history(task_aggregate_id(task_id))
        state = None
        if history:
            state = TaskState(task_id=task_id)
            for event in history:
                state.apply(event)
        self._remember(task_id, state)
        return state

    def _remember(self, task_id: str, state: TaskState | None) -> None:
        self._tasks[task_id] = state
        self._tasks.move_to_end(task_id)
        while len(self._tasks) > self._cache_size:
            self._tasks.popitem(last=False)

    def _principal(self, name: str) -> PrincipalState:
        state = self._principals.get(name)
        if state is None:
            state = PrincipalState(name=name)
            for event in self._ledger.history(principal_aggregate_id(name)):
                state.apply(event)
            self._principals[name] = state
        return state


def open_timers(ledger: Ledger, page: int = 2000) -> dict[str, datetime]:
    """Deadlines and retry times of every open task, from one pass over the log.

    Only the last timer-relevant event of each task matters, so this keeps one entry per
    open task, not their states.
    """
    timers: dict[str, datetime] = {}
    decoder = msgspec.json.Decoder()
    after = 0
    while notifications := ledger.read(after, page):
        for n in notifications:
            state = decoder.decode(n.state)
            kind, data, key = state["kind"], state["data"], state["key"]
            if kind == Kind.ASSIGNED:
                timers[key] = datetime.fromisoformat(data["deadline"])
            elif kind in (Kind.TIMED_OUT, Kind.ATTEMPT_FAILED) and data["retry_at"]:
                timers[key] = datetime.fromisoformat(data["retry_at"])
            elif kind in (Kind.COMPLETED, Kind.FAILED, Kind.TIMED_OUT, Kind.ATTEMPT_FAILED):
                timers.pop(key, None)
            after = n.id
    return timers

"""The write path: a batch of intake messages → decisions → one transaction.

Synchronous and single-threaded by design: the async coordinator calls ``record`` through
one worker thread (anyio CapacityLimiter(1)), so there is exactly one writer per ledger.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from eventsourcing.persistence import Tracking

from coordinator.decide import decide, reject_unreadable
from coordinator.ledger.events import (
    Aggregate,
    Draft,
    LedgerEvent,
    principal_aggregate_id,
    stamp,
    task_aggregate_id,
)
from coordinator.ledger.state import PrincipalState, TaskState
from coordinator.ledger.store import Ledger
from coordinator.policy import Policy
from schemas import Codec, MalformedMessageError, Subjects, is_token

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
        self._tasks: OrderedDict[str, TaskState | None] = OrderedDict()
        self._principals: dict[str, PrincipalState] = {}
        self.position = ledger.tracking_position(INTAKE)

    def record(self, batch: Sequence[IntakeMessage]) -> Recorded:
        events: list[LedgerEvent] = []
        skipped = 0
        top = self.position
        touched: set[str] = set()
        recorded_at = self._clock().isoformat()
        try:
            for message in batch:
                if message.seq <= top:
                    skipped += 1
                    continue
                top = message.seq
                for draft in self._decide(message):
                    touched.add(draft.key)
                    events.append(self._seal(draft, recorded_at))
            if top == self.position:
                return Recorded([], [], skipped)
            positions = self._ledger.append(events, Tracking(INTAKE, top))
        except BaseException:
            # In-memory states were advanced for events that may not be stored: forget
            # them, the next read reloads from the database.
            for key in touched:
                self._tasks.pop(key, None)
                self._principals.pop(key, None)
            raise
        self.position = top
        return Recorded(events, positions, skipped)

    def _decide(self, message: IntakeMessage) -> list[Draft]:
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
        task = self._task(envelope.task_id) if is_token(envelope.task_id) else None
        return decide(principal, message.data, envelope, task, self._policy)

    def _seal(self, draft: Draft, recorded_at: str) -> LedgerEvent:
        state: TaskState | PrincipalState
        if draft.aggregate is Aggregate.TASK:
            task = self._task(draft.key)
            state = task if task is not None else TaskState(task_id=draft.key)
            self._remember(draft.key, state)
        else:
            state = self._principal(draft.key)
        event = stamp(draft, version=state.version + 1, prev_hash=state.head,
                      recorded_at=recorded_at)
        state.apply(event)
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


def aggregate_uuid(aggregate: str, key: str) -> UUID:
    return task_aggregate_id(key) if aggregate == Aggregate.TASK else principal_aggregate_id(key)

"""The write path: a batch of intake messages → decisions → one transaction.

Synchronous and single-threaded by design: the async coordinator calls ``record`` through
its one ``LedgerWrites`` (``coordinator/ledger_writes.py``), so there is exactly one writer
per ledger.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any, TypeVar
from uuid import UUID

import msgspec
from eventsourcing.persistence import Notification, Tracking

from coordinator.decide import (
    ToolVerdict,
    decide,
    decide_suspension,
    decide_throttled,
    decide_timer,
    decide_tool_call,
    decide_tool_result,
    reject_unreadable,
)
from coordinator.ledger.checkpoints import Checkpointer
from coordinator.ledger.events import (
    Aggregate,
    Draft,
    Kind,
    LedgerEvent,
    Sealed,
    aggregate_id_of,
    event_from_state,
    stamp,
)
from coordinator.ledger.known import MaybeKnown
from coordinator.ledger.state import PrincipalState, TaskState
from coordinator.ledger.store import Ledger
from coordinator.policy import Policy
from schemas import (
    Codec,
    MalformedMessageError,
    ResumeAgent,
    Subjects,
    SuspendAgent,
    ToolCall,
    ToolOutcome,
    is_batch,
)

INTAKE = "intake"  # tracking name of the intake stream
UNKNOWN_PRINCIPAL = "_unknown"
S = TypeVar("S", TaskState | None, PrincipalState)


class IntakeMessage(msgspec.Struct, frozen=True):
    """One message from the intake stream, as the coordinator sees it (a Struct: one is
    made per message, and a frozen dataclass's construction costs ~10x as much)."""

    seq: int  # stream sequence: the tracking position
    subject: str
    data: bytes
    msg_id: str | None  # the Nats-Msg-Id header, if any


@dataclass(frozen=True)
class Recorded:
    events: list[LedgerEvent]
    positions: list[int]
    # Messages at or below the tracking position that were new to the ledger: the intake
    # stream reused sequences it had acknowledged before (it lost them: a server crash
    # before its sync). A plain redelivery is decided by id and adds nothing.
    reused: int = 0
    # The rejections recorded, each with the Nats-Msg-Id of the intake message that
    # carried what was refused: its sender's receipt names them.
    refused: list[tuple[str, LedgerEvent]] = field(default_factory=list)


class LedgerWriter:
    """Decides and records intake batches, keeping recent aggregate states in memory."""

    def __init__(self, ledger: Ledger, policy: Policy, subjects: Subjects,
                 clock: Callable[[], datetime], cache_size: int = 10_000,
                 on_commit: Callable[[list[Notification], list[LedgerEvent]], None]
                 | None = None,
                 ) -> None:
        self._ledger = ledger
        self._on_commit = on_commit  # told what each commit stored (the relay's feed)
        self._policy = policy
        self._subjects = subjects
        self._clock = clock
        self._codec = Codec()
        self._cache_size = cache_size  # states kept of each kind (tasks, principals)
        self._touched: set[str] = set()  # aggregates advanced by the batch in progress
        self._timers_before: dict[str, datetime | None] = {}  # to undo a failed commit
        self._tasks: OrderedDict[str, TaskState | None] = OrderedDict()
        self._principals: OrderedDict[str, PrincipalState] = OrderedDict()
        self.position = ledger.tracking_position(INTAKE)
        self._known = MaybeKnown()  # task ids the ledger may hold (filled by the scan below)
        # task id -> when the coordinator must next decide for it (deadline or retry).
        self.timers, suspended = open_schedule(ledger, self._known, self._principals,
                                               keep=cache_size)
        self.suspended = frozenset(suspended)
        self._buckets: dict[str, tuple[float, datetime]] = {}  # principal -> tokens, at
        self._dropped: dict[str, tuple[int, datetime]] = {}  # principal -> count, since
        self._recorded_at: tuple[datetime | None, str] = (None, "")

    def record(self, batch: Sequence[IntakeMessage]) -> Recorded:
        """Decide and store a batch of intake messages with their tracking position."""
        now = self._clock()
        top = self.position
        reused = 0

        def decide_all() -> list[Sealed]:
            # Every message is decided, even one at or below the tracking position: the
            # ledger deduplicates by message id, so a redelivery adds nothing, while a
            # stream that lost its tail hands out those sequences again to new messages.
            nonlocal top, reused
            events = self._flush_throttled(now, older_than=1.0)
            for message in batch:
                again, before = message.seq <= top, len(events)
                top = max(top, message.seq)
                principal = (self._subjects.principal_of(message.subject)
                             or UNKNOWN_PRINCIPAL)
                for drafts in self._decide(message, principal, now):
                    events += [self._seal(d, now) for d in drafts]
                reused += again and len(events) > before
                if message.msg_id is not None:
                    refused.extend((message.msg_id, s.event) for s in events[before:]
                                   if s.event.kind == Kind.REJECTED)
            return events + self.fallout(events, now)

        refused: list[tuple[str, LedgerEvent]] = []
        events, positions = self._commit(decide_all, lambda: Tracking(INTAKE, top)
                                         if top > self.position else None)
        self.position = top
        return Recorded(events, positions, reused, refused)

    def tick(self) -> Recorded:
        """Record what the clock decides: timeouts of overdue assignments, due retries."""
        now = self._clock()
        due = sorted(task_id for task_id, when in self.timers.items() if when <= now)
        if not due and not self._dropped:
            return Recorded([], [])

        def decide_due() -> list[Sealed]:
            events = self._flush_throttled(now, older_than=1.0)
            for task_id in due:
                task = self._task(task_id)
                if task is None:
                    self.timers.pop(task_id, None)
                    continue
                events += [self._seal(d, now) for d in decide_timer(task, self._policy, now)]
            return events

        events, positions = self._commit(decide_due, lambda: None)
        return Recorded(events, positions)

    def record_checkpoint(self, checkpointer: Checkpointer) -> Recorded:
        """Record a signed checkpoint of everything stored so far (ledger/checkpoints.py)."""
        now = self._clock()
        events, positions = self._commit(lambda: checkpointer.seal(self._ledger, now),
                                         lambda: None)
        return Recorded(events, positions)

    def _commit(self, decide_events: Callable[[], list[Sealed]],
                tracking: Callable[[], Tracking | None]) -> tuple[list[LedgerEvent], list[int]]:
        touched_before = set(self._touched)
        try:
            sealed = decide_events()
            position = tracking()
            if not sealed and position is None:
                return [], []
            stored = self._ledger.append(sealed, position)
        except BaseException:
            # In-memory states were advanced for events that may not be stored: forget
            # them, the next read reloads from the database.
            for key in self._touched - touched_before:
                self._tasks.pop(key, None)
                self._principals.pop(key, None)
            # Timers as they were: nothing the failed batch decided has happened.
            for key, when in self._timers_before.items():
                if when is None:
                    self.timers.pop(key, None)
                else:
                    self.timers[key] = when
            self._touched = touched_before
            raise
        finally:
            touched, self._touched = self._touched, set()
            self._timers_before.clear()
        events = [s.event for s in sealed]
        if self._on_commit is not None:
            self._on_commit(stored, events)
        # Closed tasks leave the cache once stored (a late message reloads them), so memory
        # follows the open tasks, not the history.
        for key in touched:
            task = self._tasks.get(key)
            if task is not None and not task.is_open:
                del self._tasks[key]
        return events, [n.id for n in stored]

    def _decide(self, message: IntakeMessage, principal: str,
                now: datetime) -> Iterator[list[Draft]]:
        """The drafts for each envelope the message carries (one, or a batch's), an
        envelope at a time: each is sealed before the next is decided, as the next may be
        on the same task. Envelopes past the principal's rate are dropped (counted, and
        recorded as one principal.throttled per window)."""
        key = message.msg_id or f"seq-{message.seq}"
        if self._principal(principal).saw(key):
            return  # rejected before: a resend after JetStream's dedup window
        if not is_batch(message.data):
            if self._admit(principal, now):
                yield self._decide_one(principal, message.subject, message.data, key,
                                       message.msg_id, now)
            return
        try:
            parts = self._codec.split_batch(message.data, message.subject)
        except MalformedMessageError as exc:
            if self._admit(principal, now):
                yield reject_unreadable(principal, key, message.data, exc.reason)
            return
        # A batch's Nats-Msg-Id is not any envelope's id: each envelope is deduplicated by
        # its own id, and a rejected element is remembered under the batch's id and its place.
        for i, part in enumerate(parts):
            element = f"{key}/{i}"
            if self._principal(principal).saw(element) or not self._admit(principal, now):
                continue
            yield self._decide_one(principal, message.subject, part, element, None, now)

    def _decide_one(self, principal: str, subject: str, data: bytes, key: str,
                    msg_id: str | None, now: datetime) -> list[Draft]:
        """The drafts for one envelope's bytes ``data``, which came on ``subject``; ``key``
        names it in a rejection, ``msg_id`` is the Nats-Msg-Id it must carry as its id
        (None: not checked)."""
        if len(data) > self._policy.max_payload_bytes:
            return reject_unreadable(principal, key, b"",
                                     f"{len(data)} bytes exceeds the limit of "
                                     f"{self._policy.max_payload_bytes}", code="oversize")
        try:
            envelope = self._codec.decode_envelope(data, subject)
        except MalformedMessageError as exc:
            return reject_unreadable(principal, key, data, exc.reason)
        if self._principal(principal).saw(envelope.id):
            return []
        body = envelope.body
        if (isinstance(body, SuspendAgent | ResumeAgent) and self._policy.is_agent(body.agent)
                and self._principal(body.agent).saw(envelope.id)):
            return []  # recorded already, on the agent's record
        task = self._task(envelope.task_id)
        return decide(principal, data, envelope, task, self._policy, now, msg_id,
                      self.suspended)

    def record_tool_call(self, principal: str, data: bytes) -> ToolVerdict:
        """Authorize and record a tool call from the gateway; what to do next."""
        now = self._clock()
        envelope = self._codec.decode_envelope(data, self._subjects.tool_gateway(principal))
        if not isinstance(envelope.body, ToolCall):
            raise MalformedMessageError(self._subjects.tool_gateway(principal),
                                        f"expected a tool.call body, got {envelope.body}")
        verdict: list[ToolVerdict] = []

        def decide_call() -> list[Sealed]:
            drafts, outcome = decide_tool_call(principal, data, envelope,
                                               self._task(envelope.task_id), self._policy,
                                               self.suspended)
            verdict.append(outcome)
            return [self._seal(d, now) for d in drafts]

        self._commit(decide_call, lambda: None)
        return verdict[0]

    def record_tool_result(self, task_id: str, call_id: str,
                           outcome: ToolOutcome) -> ToolOutcome:
        """Record a tool's answer; returns the answer as recorded (with its labels), which
        is what the agent gets, now and on any repeat of the call."""
        now = self._clock()

        def decide_result() -> list[Sealed]:
            task = self._task(task_id)
            if task is None or task.tool_calls.get(call_id, {}).get("state") != "authorized":
                return []  # answered already (a repeated call), nothing more to record
            spec = self._policy.tools.get(task.tool_calls[call_id]["tool"])
            untrusted = spec is not None and spec.untrusted_output
            return [self._seal(d, now)
                    for d in decide_tool_result(task, call_id, outcome, untrusted)]

        self._commit(decide_result, lambda: None)
        task = self._task(task_id)
        recorded = task.tool_calls.get(call_id, {}) if task is not None else {}
        if recorded.get("state") != "done":
            return outcome
        return msgspec.convert(recorded["outcome"], ToolOutcome)

    def _admit(self, principal: str, now: datetime) -> bool:
        """Token bucket per principal (from the policy); False drops the message."""
        agent = self._policy.agents.get(principal)
        if agent is None or agent.rate_per_s is None:
            return True
        tokens, at = self._buckets.get(principal, (float(agent.burst), now))
        tokens = min(float(agent.burst), tokens + (now - at).total_seconds() * agent.rate_per_s)
        if tokens >= 1.0:
            self._buckets[principal] = (tokens - 1.0, now)
            return True
        self._buckets[principal] = (tokens, now)
        count, since = self._dropped.get(principal, (0, now))
        self._dropped[principal] = (count + 1, since)
        return False

    def _flush_throttled(self, now: datetime, older_than: float) -> list[Sealed]:
        """One principal.throttled event per principal and window, not one per message."""
        events: list[Sealed] = []
        for principal, (count, since) in sorted(self._dropped.items()):
            if (now - since).total_seconds() >= older_than:
                del self._dropped[principal]
                events += [self._seal(d, now)
                           for d in decide_throttled(principal, count, since, now)]
        return events

    def _seal(self, draft: Draft, now: datetime) -> Sealed:
        self._touched.add(draft.key)
        state: TaskState | PrincipalState
        if draft.aggregate is Aggregate.TASK:
            task = self._task(draft.key)  # (the most recently used now, if cached)
            if task is None:
                task = TaskState(task_id=draft.key)
                self._known.add(draft.key)
                self._remember(self._tasks, draft.key, task)
            state = task
        else:
            state = self._principal(draft.key)
        if self._recorded_at[0] is not now:  # one clock reading per batch: format it once
            self._recorded_at = (now, now.isoformat())
        sealed = stamp(draft, version=state.version + 1, prev_hash=state.head,
                       recorded_at=self._recorded_at[1])
        state.apply(sealed.event)
        if isinstance(state, TaskState):
            self._timers_before.setdefault(draft.key, self.timers.get(draft.key))
            when = state.next_timer()
            if when is None:
                self.timers.pop(draft.key, None)
            else:
                self.timers[draft.key] = datetime.fromisoformat(when)
        elif draft.kind in (Kind.SUSPENDED, Kind.RESUMED):
            self.suspended = (self.suspended | {draft.key} if draft.kind == Kind.SUSPENDED
                              else self.suspended - {draft.key})
        return sealed

    def fallout(self, events: list[Sealed], now: datetime) -> list[Sealed]:
        """Events that follow from others in the same batch: a suspension fails the
        suspended agent's open tasks (every open task has a timer, so they are all known)."""
        out: list[Sealed] = []
        for event, _ in events:
            if event.kind != Kind.SUSPENDED:
                continue
            for task_id in sorted(self.timers):
                task = self._task(task_id)
                if task is not None:
                    out += [self._seal(d, now) for d in decide_suspension(
                        task, event.key, event.data["reason"] or "no reason given",
                        event.msg_id)]
        return out

    def _task(self, task_id: str) -> TaskState | None:
        if task_id in self._tasks:
            self._tasks.move_to_end(task_id)
            return self._tasks[task_id]
        if not self._known.may_hold(task_id):
            return None  # certainly not in the ledger: no need to read it
        history = self._ledger.history(aggregate_id_of(Aggregate.TASK, task_id)[0])
        state = None
        if history:
            state = TaskState(task_id=task_id)
            for event in history:
                state.apply(event)
        self._remember(self._tasks, task_id, state)
        return state

    def _principal(self, name: str) -> PrincipalState:
        state = self._principals.get(name)
        if state is not None:
            self._principals.move_to_end(name)
            return state
        state = PrincipalState(name=name)
        for event in self._ledger.history(aggregate_id_of(Aggregate.PRINCIPAL, name)[0]):
            state.apply(event)
        self._remember(self._principals, name, state)
        return state

    def _remember(self, cache: OrderedDict[str, S], key: str, state: S) -> None:
        cache[key] = state
        cache.move_to_end(key)
        # Evict the least recently used, but never a state the batch in progress advanced:
        # it is not in the database yet, so a reload would forget it.
        excess = len(cache) - self._cache_size
        if excess <= 0:
            return
        for old in list(islice(cache, excess + len(self._touched))):
            if excess <= 0:
                break
            if old not in self._touched:
                del cache[old]
                excess -= 1


def open_schedule(ledger: Ledger, known: MaybeKnown, principals: OrderedDict[str, PrincipalState],
                  keep: int, page: int = 2000) -> tuple[dict[str, datetime], set[str]]:
    """Deadlines and retry times of every open task, and the suspended agents, from one
    pass over the log; every task id in it is added to ``known``, and the states of the
    ``keep`` principals active last to ``principals``.

    Only the last timer-relevant event of each task matters, so this keeps one entry per
    open task, not their states. A principal's state is bounded, and folding it here saves
    reading its whole history when it next speaks (a principal refused 100k times: ~2 s
    that would block the intake).
    """
    timers: dict[str, datetime] = {}
    suspended: set[str] = set()
    decoder = msgspec.json.Decoder()
    after = 0
    while notifications := ledger.read(after, page):
        for n in notifications:
            state = decoder.decode(n.state)
            kind, data, key = state["kind"], state["data"], state["key"]
            if state["aggregate"] == Aggregate.PRINCIPAL:
                _fold_principal(principals, keep, n, state)
            elif n.originator_version == 1 and state["aggregate"] == Aggregate.TASK:
                known.add(key)
            if kind == Kind.ASSIGNED:
                timers[key] = datetime.fromisoformat(data["deadline"])
            elif kind in (Kind.TIMED_OUT, Kind.ATTEMPT_FAILED) and data["retry_at"]:
                timers[key] = datetime.fromisoformat(data["retry_at"])
            elif kind in (Kind.COMPLETED, Kind.FAILED, Kind.TIMED_OUT, Kind.ATTEMPT_FAILED):
                timers.pop(key, None)
            elif kind == Kind.SUSPENDED:
                suspended.add(key)
            elif kind == Kind.RESUMED:
                suspended.discard(key)
            after = n.id
    return timers, suspended


def _fold_principal(principals: OrderedDict[str, PrincipalState], keep: int,
                    n: Notification, state: dict[str, Any]) -> None:
    """Fold one stored principal event into its state, kept if among the ``keep`` last
    active; a principal evicted here, and seen again, starts again from its first event
    (any gap would make a wrong state)."""
    key = state["key"]
    principal = principals.get(key)
    if principal is None:
        if n.originator_version != 1:
            return  # evicted before: read from the ledger if it ever speaks again
        principal = principals[key] = PrincipalState(name=key)
    principals.move_to_end(key)
    aggregate_id = n.originator_id  # (its text, on SQLite)
    principal.apply(event_from_state(
        aggregate_id if isinstance(aggregate_id, UUID) else UUID(aggregate_id),
        n.originator_version, state))
    if len(principals) > keep:
        principals.popitem(last=False)

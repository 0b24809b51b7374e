"""Aggregate state as a pure fold of recorded events: no clock, no randomness, no I/O.

The coordinator folds each event as it records it; replay folds the same events read
back from the database. Both must arrive at byte-identical state (see ``digest``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from coordinator.ledger.events import GENESIS, Kind
from schemas import canonical


class Recorded(Protocol):
    """What folding reads of a recorded event: a ``LedgerEvent``, or replay's lighter
    reading of one stored."""

    @property
    def originator_version(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def data(self) -> dict[str, Any]: ...
    @property
    def msg_id(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def hash(self) -> str: ...


class Offer(msgspec.Struct, kw_only=True):
    """A handoff waiting for the receiver's decision."""

    request_id: str
    by: str
    to: str
    reason: str


class TaskState(msgspec.Struct, kw_only=True):
    task_id: str
    title: str = ""
    input: dict[str, Any] = {}
    status: str = "new"  # new → assigned ⇄ retrying → completed | failed
    submitter: str = ""
    owner: str | None = None
    participants: list[str] = []  # every agent ever assigned, in order
    attempt: int = 0  # fencing token: bumped by every assignment
    tries: int = 0  # tries of the current step (reset by a handoff)
    deadline: str | None = None  # of the current assignment (ISO 8601)
    retry_at: str | None = None  # when the current step is tried again
    cause: dict[str, Any] | None = None  # the delivery of the current step, for retries
    hops: int = 0
    labels: list[str] = []
    offer: Offer | None = None
    result: str | None = None
    failure: str | None = None
    rejections: int = 0
    refused: str | None = None  # the owner's last refused output in this attempt: why
    approvals: list[str] = []  # tools an operator approved on this task
    # call id -> {"state": "denied"|"authorized"|"done", ...}: answers a repeated call
    tool_calls: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()  # msg ids already recorded: a resent message changes nothing
    version: int = 0
    head: str = GENESIS
    last_kind: str = ""

    @property
    def is_open(self) -> bool:
        return self.status in ("new", "assigned", "retrying")

    def next_timer(self) -> str | None:
        """When the coordinator must next decide something on its own for this task."""
        if self.status == "assigned":
            return self.deadline
        if self.status == "retrying":
            return self.retry_at
        return None

    def apply(self, event: Recorded) -> None:
        """Fold one event into the state. Must stay deterministic."""
        data = event.data
        kind = event.kind
        if event.msg_id:
            self.seen.add(event.msg_id)
        fold = _TASK_FOLDS.get(kind)  # one lookup, not a comparison per kind
        if fold is not None:
            fold(self, event, data)
        for label in data.get("labels", ()):
            if label not in self.labels:
                self.labels.append(label)
        self.version = event.originator_version
        self.head = event.hash
        self.last_kind = kind


def _submitted(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.title = data["title"]
    task.input = data["input"]
    task.submitter = event.sender


def _assigned(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.status = "assigned"
    task.owner = data["agent"]
    task.attempt = data["attempt"]
    task.tries = data["tries"]
    task.deadline = data["deadline"]
    task.retry_at = None
    task.cause = data["delivery"]
    task.refused = None
    if task.owner not in task.participants:
        task.participants.append(data["agent"])


def _attempt_ended(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.status = "retrying"
    task.deadline = None
    task.retry_at = data["retry_at"]


def _handoff_requested(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.hops += 1
    task.offer = Offer(request_id=event.msg_id, by=event.sender, to=data["to"],
                       reason=data["reason"])


def _handoff_decided(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.offer = None


def _completed(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.status = "completed"
    task.result = data["result"]
    task.owner = None
    task.deadline = task.retry_at = None


def _failed(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.status = "failed"
    task.failure = data["reason"]
    task.owner = None
    task.deadline = task.retry_at = None


def _rejected(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.rejections += 1
    if event.sender == task.owner:
        task.refused = f"{data['code']}: {data['reason']}"


def _tool_denied(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.tool_calls[data["call_id"]] = {"state": "denied", "rule": data["rule"],
                                        "reason": data["reason"]}


def _tool_authorized(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    task.tool_calls[data["call_id"]] = {"state": "authorized", "tool": data["tool"],
                                        "args": data["args"]}


def _tool_completed(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    outcome = data["outcome"]
    error = outcome.get("error") or {}
    # A retryable failure (no tool host yet, a crashing tool) is not the final answer:
    # the same call, repeated, runs again. Anything else is final.
    retry = not outcome["ok"] and error.get("retryable", False)
    task.tool_calls[data["call_id"]] = (
        {**task.tool_calls.get(data["call_id"], {}), "state": "authorized"} if retry
        else {"state": "done", "outcome": outcome})


def _tool_approved(task: TaskState, event: Recorded, data: dict[str, Any]) -> None:
    if data["tool"] not in task.approvals:
        task.approvals.append(data["tool"])


# What each kind of event does to a task (kinds not here change only the common fields).
_TASK_FOLDS: dict[str, Callable[[TaskState, Recorded, dict[str, Any]], None]] = {
    Kind.SUBMITTED: _submitted,
    Kind.ASSIGNED: _assigned,
    Kind.TIMED_OUT: _attempt_ended,
    Kind.ATTEMPT_FAILED: _attempt_ended,
    Kind.HANDOFF_REQUESTED: _handoff_requested,
    Kind.HANDOFF_ACCEPTED: _handoff_decided,
    Kind.HANDOFF_DECLINED: _handoff_decided,
    Kind.COMPLETED: _completed,
    Kind.FAILED: _failed,
    Kind.REJECTED: _rejected,
    Kind.TOOL_DENIED: _tool_denied,
    Kind.TOOL_AUTHORIZED: _tool_authorized,
    Kind.TOOL_COMPLETED: _tool_completed,
    Kind.TOOL_APPROVED: _tool_approved,
}


# How many of a principal's rejected message ids its state keeps (the newest): a resend of
# one of them is not recorded again. A sender resends within its handler's deadline, a few
# messages at a time; the bound keeps a sender that is refused without end from growing
# the coordinator (and the replayed state) by one id per refusal.
REMEMBERED_REJECTIONS = 1000


class PrincipalState(msgspec.Struct, kw_only=True):
    """What the ledger knows of a principal beyond its tasks: rejected messages."""

    name: str
    rejections: int = 0
    throttled: int = 0  # messages dropped by the rate limit
    suspended: bool = False
    # ids of the newest REMEMBERED_REJECTIONS messages rejected on this record, oldest first
    rejected: dict[str, None] = {}
    # ids of the suspensions and resumptions of this agent: operators' commands, few, all
    # kept (an old resumption resent after a later suspension must not resume the agent)
    commands: set[str] = set()
    version: int = 0
    head: str = GENESIS

    def saw(self, msg_id: str) -> bool:
        """Whether a message with this id is on this record already: its resend changes
        nothing."""
        return msg_id in self.rejected or msg_id in self.commands

    def apply(self, event: Recorded) -> None:
        if event.kind == Kind.REJECTED:
            self.rejections += 1
            self.rejected[event.msg_id] = None
            if len(self.rejected) > REMEMBERED_REJECTIONS:
                del self.rejected[next(iter(self.rejected))]
        elif event.kind == Kind.THROTTLED:
            self.throttled += event.data["count"]
        elif event.kind == Kind.SUSPENDED:
            self.suspended = True
            self.commands.add(event.msg_id)
        elif event.kind == Kind.RESUMED:
            self.suspended = False
            self.commands.add(event.msg_id)
        self.version = event.originator_version
        self.head = event.hash


def digest(tasks: dict[str, TaskState], principals: dict[str, PrincipalState]) -> str:
    """sha256 over the canonical encoding of every aggregate's state, in key order."""
    h = hashlib.sha256()
    for key in sorted(tasks):
        h.update(canonical(tasks[key]))
    for key in sorted(principals):
        h.update(canonical(principals[key]))
    return h.hexdigest()

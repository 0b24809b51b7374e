"""Aggregate state as a pure fold of recorded events: no clock, no randomness, no I/O.

The coordinator folds each event as it records it; replay folds the same events read
back from the database. Both must arrive at byte-identical state (see ``digest``).
"""

from __future__ import annotations

import hashlib
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
        if kind == Kind.SUBMITTED:
            self.title = data["title"]
            self.input = data["input"]
            self.submitter = event.sender
        elif kind == Kind.ASSIGNED:
            self.status = "assigned"
            self.owner = data["agent"]
            self.attempt = data["attempt"]
            self.tries = data["tries"]
            self.deadline = data["deadline"]
            self.retry_at = None
            self.cause = data["delivery"]
            if self.owner not in self.participants:
                self.participants.append(data["agent"])
        elif kind in (Kind.TIMED_OUT, Kind.ATTEMPT_FAILED):
            self.status = "retrying"
            self.deadline = None
            self.retry_at = data["retry_at"]
        elif kind == Kind.HANDOFF_REQUESTED:
            self.hops += 1
            self.offer = Offer(
                request_id=event.msg_id, by=event.sender, to=data["to"], reason=data["reason"]
            )
        elif kind in (Kind.HANDOFF_ACCEPTED, Kind.HANDOFF_DECLINED):
            self.offer = None
        elif kind == Kind.COMPLETED:
            self.status = "completed"
            self.result = data["result"]
            self.owner = None
            self.deadline = self.retry_at = None
        elif kind == Kind.FAILED:
            self.status = "failed"
            self.failure = data["reason"]
            self.owner = None
            self.deadline = self.retry_at = None
        elif kind == Kind.REJECTED:
            self.rejections += 1
        elif kind == Kind.TOOL_DENIED:
            self.tool_calls[data["call_id"]] = {"state": "denied", "rule": data["rule"],
                                                "reason": data["reason"]}
        elif kind == Kind.TOOL_AUTHORIZED:
            self.tool_calls[data["call_id"]] = {"state": "authorized", "tool": data["tool"],
                                                "args": data["args"]}
        elif kind == Kind.TOOL_COMPLETED:
            outcome = data["outcome"]
            error = outcome.get("error") or {}
            # A retryable failure (no tool host yet, a crashing tool) is not the final
            # answer: the same call, repeated, runs again. Anything else is final.
            retry = not outcome["ok"] and error.get("retryable", False)
            self.tool_calls[data["call_id"]] = (
                {**self.tool_calls.get(data["call_id"], {}), "state": "authorized"} if retry
                else {"state": "done", "outcome": outcome})
        elif kind == Kind.TOOL_APPROVED and data["tool"] not in self.approvals:
            self.approvals.append(data["tool"])
        for label in data.get("labels", ()):
            if label not in self.labels:
                self.labels.append(label)
        self.version = event.originator_version
        self.head = event.hash
        self.last_kind = kind


class PrincipalState(msgspec.Struct, kw_only=True):
    """What the ledger knows of a principal beyond its tasks: rejected messages."""

    name: str
    rejections: int = 0
    throttled: int = 0  # messages dropped by the rate limit
    suspended: bool = False
    seen: set[str] = set()  # ids of the messages rejected on this record (resends: no-ops)
    version: int = 0
    head: str = GENESIS

    def apply(self, event: Recorded) -> None:
        if event.kind == Kind.REJECTED:
            self.rejections += 1
            self.seen.add(event.msg_id)
        elif event.kind == Kind.THROTTLED:
            self.throttled += event.data["count"]
        elif event.kind == Kind.SUSPENDED:
            self.suspended = True
        elif event.kind == Kind.RESUMED:
            self.suspended = False
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

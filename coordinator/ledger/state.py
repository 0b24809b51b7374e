"""Aggregate state as a pure fold of recorded events: no clock, no randomness, no I/O.

The coordinator folds each event as it records it; replay folds the same events read
back from the database. Both must arrive at byte-identical state (see ``digest``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from coordinator.ledger.events import GENESIS, Kind, LedgerEvent
from schemas import canonical


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
    status: str = "new"  # new → assigned → completed | failed
    owner: str | None = None
    attempt: int = 0
    hops: int = 0
    labels: list[str] = []
    offer: Offer | None = None
    result: str | None = None
    failure: str | None = None
    rejections: int = 0
    seen: set[str] = set()  # msg ids already recorded: a resent message changes nothing
    version: int = 0
    head: str = GENESIS
    last_kind: str = ""

    @property
    def is_open(self) -> bool:
        return self.status in ("new", "assigned")

    def apply(self, event: LedgerEvent) -> None:
        """Fold one event into the state. Must stay deterministic."""
        data = event.data
        kind = event.kind
        if kind != Kind.REJECTED and kind != Kind.ASSIGNED and event.msg_id:
            self.seen.add(event.msg_id)
        if kind == Kind.SUBMITTED:
            self.title = data["title"]
            self.input = data["input"]
        elif kind == Kind.ASSIGNED:
            self.status = "assigned"
            self.owner = data["agent"]
            self.attempt = data["attempt"]
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
        elif kind == Kind.FAILED:
            self.status = "failed"
            self.failure = data["reason"]
            self.owner = None
        elif kind == Kind.REJECTED:
            self.rejections += 1
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
    version: int = 0
    head: str = GENESIS

    def apply(self, event: LedgerEvent) -> None:
        if event.kind == Kind.REJECTED:
            self.rejections += 1
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

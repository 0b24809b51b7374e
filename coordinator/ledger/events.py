"""Recorded events and their hash chain.

Every event is one ``LedgerEvent``: common provenance fields (who said it, when it was
sent and recorded, the raw envelope bytes as received) plus ``data`` for its kind. The
event's ``hash`` is ``sha256(prev_hash || canonical(every other stored field))``, so
editing any stored byte — the raw envelope included — breaks the chain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Final, NamedTuple
from uuid import UUID, uuid5

import msgspec

from schemas import canonical, uuid5_text

GENESIS = "0" * 64

# Fixed namespaces: aggregate ids and delivery ids are derived, never random, so the
# same input always yields the same ledger.
_NS_TASK = UUID("6d1f3d0e-8a57-5b6c-9d0e-4c1a2b3c4d5e")
_NS_PRINCIPAL = UUID("0b7c5a2e-3f41-5d8e-a6b9-1c2d3e4f5a6b")
_NS_DELIVERY = UUID("9a4e2c1b-7d3f-5e6a-8b9c-0d1e2f3a4b5c")
_NS_CHECKPOINT = UUID("c3e8f1a2-4b5d-5c6e-9f0a-1b2c3d4e5f60")


class Kind:
    """What happened. Facts in the past tense; the wire tag is lowercase and dotted.

    String constants, not an Enum: on Python 3.11 an Enum member is read through the
    metaclass's ``__getattr__`` slot, ~90 ns a read against ~15 for a class attribute,
    and the write path reads these for every event (1.6% of the coordinator's
    instructions per handoff, counted with ``bench.instructions``)."""

    SUBMITTED: Final = "task.submitted"
    ASSIGNED: Final = "task.assigned"
    SAID: Final = "message.said"
    HANDOFF_REQUESTED: Final = "handoff.requested"
    HANDOFF_ACCEPTED: Final = "handoff.accepted"
    HANDOFF_DECLINED: Final = "handoff.declined"
    COMPLETED: Final = "task.completed"
    FAILED: Final = "task.failed"
    TIMED_OUT: Final = "attempt.timed_out"
    ATTEMPT_FAILED: Final = "attempt.failed"
    DEAD_LETTERED: Final = "task.dead_lettered"
    TOOL_REQUESTED: Final = "tool.requested"
    TOOL_DENIED: Final = "tool.denied"
    TOOL_AUTHORIZED: Final = "tool.authorized"
    TOOL_COMPLETED: Final = "tool.completed"
    TOOL_APPROVED: Final = "tool.approved"
    SUSPENDED: Final = "agent.suspended"
    RESUMED: Final = "agent.resumed"
    THROTTLED: Final = "principal.throttled"
    REJECTED: Final = "message.rejected"
    CHECKPOINTED: Final = "ledger.checkpointed"  # a signed global chain head (checkpoints.py)


class Aggregate:
    """Whose sequence an event belongs to (string constants, as ``Kind``)."""

    TASK: Final = "task"
    PRINCIPAL: Final = "principal"
    CHECKPOINT: Final = "checkpoint"


def task_aggregate_id(task_id: str) -> UUID:
    return uuid5(_NS_TASK, task_id)


def principal_aggregate_id(principal: str) -> UUID:
    return uuid5(_NS_PRINCIPAL, principal)


def checkpoint_aggregate_id(key: str) -> UUID:
    return uuid5(_NS_CHECKPOINT, key)


def delivery_id(cause_msg_id: str, agent: str, attempt: int) -> str:
    """The id of the delivery an assignment produces: stable, and new for every retry."""
    return uuid5_text(_NS_DELIVERY, f"{cause_msg_id}:{agent}:{attempt}")


# Provenance and Draft are Structs, not frozen dataclasses: several are made for every
# intake message, and a frozen dataclass sets each field through object.__setattr__
# (~10x the time of a Struct's construction, measured).
class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    """Where a recorded event came from: the intake message that caused it."""

    msg_id: str
    sender: str
    sent_at: str | None = None
    causation_id: str | None = None
    trace: str | None = None
    raw: str = ""  # base64 of the envelope bytes exactly as received; "" on decisions


class Draft(msgspec.Struct, frozen=True, kw_only=True):
    """An event decided but not yet placed in its aggregate's sequence."""

    aggregate: str  # an Aggregate
    key: str  # task id or principal name
    kind: str  # a Kind
    data: dict[str, Any]
    provenance: Provenance


@dataclass(frozen=True, kw_only=True)
class LedgerEvent:
    """One stored event. eventsourcing's mapper stores ``vars()`` of it."""

    originator_id: UUID
    originator_version: int
    aggregate: str
    key: str
    kind: str
    data: dict[str, Any]
    msg_id: str
    sender: str
    sent_at: str | None
    recorded_at: str
    causation_id: str | None
    trace: str | None
    raw: str
    prev_hash: str
    hash: str = field(default="")


TOPIC = f"{LedgerEvent.__module__}:{LedgerEvent.__qualname__}"
_STATE_FIELDS = frozenset(f.name for f in fields(LedgerEvent)) - {"originator_id",
                                                                   "originator_version"}


def event_from_state(originator_id: UUID, version: int, state: dict[str, Any]) -> LedgerEvent:
    """The event a stored state holds, as eventsourcing's mapper builds it (the state goes
    into the instance's ``__dict__``): replay does this for every event, and the frozen
    dataclass ``__init__`` costs more than the rest of its fold. TypeError if the state does
    not have exactly the event's fields, or its chain fields are not text."""
    if state.keys() != _STATE_FIELDS:
        raise TypeError(f"stored fields differ from an event's: "
                        f"{sorted(state.keys() ^ _STATE_FIELDS)}")
    if type(state["hash"]) is not str or type(state["prev_hash"]) is not str:
        raise TypeError("hash and prev_hash must be strings")
    event: LedgerEvent = object.__new__(LedgerEvent)
    vars(event).update(state, originator_id=originator_id, originator_version=version)
    return event


def chain_hash(
    prev_hash: str, aggregate_id: UUID | str, version: int, topic: str, state: dict[str, Any]
) -> str:
    """The hash of one stored event; ``state`` is every stored field except ``hash``.

    The definition; ``hash_state`` computes the same from ``canonical(state)``."""
    body = canonical(
        {"aggregate_id": str(aggregate_id), "version": version, "topic": topic, "state": state}
    )
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


_TOPIC_JSON = canonical(TOPIC)


def hash_state(prev_hash: str, aggregate_id: str, version: int, state: bytes) -> str:
    """``chain_hash`` of a LedgerEvent from the canonical bytes of its state without the
    hash: the canonical body spelled out (keys in sorted order), so the state is encoded
    once, not re-encoded inside an enclosing object."""
    body = b'{"aggregate_id":"%s","state":%s,"topic":%s,"version":%d}' % (
        aggregate_id.encode(), state, _TOPIC_JSON, version)
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


def unhashed(stored: bytes, event_hash: str) -> bytes | None:
    """The stored state's bytes without its ``hash`` field: what the hash was taken over.

    In canonical order the hash sits between ``data`` and ``key``; cutting it out of the
    stored bytes saves a decode and re-encode, and commits to the exact stored bytes. None
    if the field is not where canonical JSON puts it (the caller re-encodes instead)."""
    field_bytes = b'"hash":"%s",' % event_hash.encode()
    cut = stored.replace(field_bytes, b"", 1)
    return cut if len(cut) != len(stored) else None


@lru_cache(maxsize=4096)
def aggregate_id_of(aggregate: str, key: str) -> tuple[UUID, str]:
    """The aggregate id of a key, and its text (uuid5 is slow enough to be worth caching:
    every event of a task needs it, while the task is open). Sized for the open tasks: an
    entry is ~400 bytes, and 65,536 of them made the coordinator's memory grow by ~2.5 MB
    per 100k events until they were all filled (measured)."""
    uuid = (task_aggregate_id(key) if aggregate == Aggregate.TASK
            else checkpoint_aggregate_id(key) if aggregate == Aggregate.CHECKPOINT
            else principal_aggregate_id(key))
    return uuid, str(uuid)


class Sealed(NamedTuple):
    """A stamped event and its stored state: the bytes the ledger's transcoder would make
    of it (canonical JSON of every field but the originator's), so it is encoded once."""

    event: LedgerEvent
    stored: bytes


def stamp(draft: Draft, *, version: int, prev_hash: str, recorded_at: str) -> Sealed:
    """Place a draft in its sequence and seal it into the chain."""
    aggregate_id, aggregate_text = aggregate_id_of(draft.aggregate, draft.key)
    p = draft.provenance
    state: dict[str, Any] = {  # exactly what stored_state() gives, minus the hash
        "aggregate": draft.aggregate,
        "key": draft.key,
        "kind": draft.kind,
        "data": draft.data,
        "msg_id": p.msg_id,
        "sender": p.sender,
        "sent_at": p.sent_at,
        "recorded_at": recorded_at,
        "causation_id": p.causation_id,
        "trace": p.trace,
        "raw": p.raw,
        "prev_hash": prev_hash,
    }
    body = canonical(state)
    digest = hash_state(prev_hash, aggregate_text, version, body)
    # Built as eventsourcing's mapper builds events (the frozen dataclass __init__ sets each
    # of its 15 fields through object.__setattr__: a measurable share of the write path).
    event: LedgerEvent = object.__new__(LedgerEvent)
    event.__dict__.update(state, originator_id=aggregate_id, originator_version=version,
                       hash=digest)
    return Sealed(event, with_hash(body, digest))


def with_hash(unhashed_state: bytes, event_hash: str) -> bytes:
    """The canonical state with its ``hash`` field put back: the inverse of ``unhashed``.

    In canonical order the hash goes right before the top-level ``key``, the last field
    before it that can hold an object being ``data``: every field after ``key`` is text or
    null, whose quotes are escaped, so the last ``,"key":`` is the top-level one."""
    at = unhashed_state.rindex(b',"key":')
    return b'%s,"hash":"%s"%s' % (unhashed_state[:at], event_hash.encode(),
                                  unhashed_state[at:])


def stored_state(event: LedgerEvent) -> dict[str, Any]:
    """Exactly the fields eventsourcing's mapper stores as the event's state."""
    state = dict(vars(event))
    del state["originator_id"], state["originator_version"]
    return state

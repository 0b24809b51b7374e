"""Rebuild every aggregate from the notification log alone, and verify every hash chain.

Replay never decides anything: it folds what was recorded, in ledger order.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from uuid import UUID

import msgspec
from eventsourcing.persistence import Notification

from coordinator.ledger.checkpoints import CHECKPOINTS_KEY, Checkpoint, GlobalChain
from coordinator.ledger.events import (
    GENESIS,
    TOPIC,
    Aggregate,
    Kind,
    LedgerEvent,
    event_from_state,
    hash_state,
    stored_state,
    unhashed,
)
from coordinator.ledger.state import PrincipalState, TaskState, digest
from coordinator.ledger.store import Ledger
from schemas import LedgermeshError, canonical


class ChainBrokenError(LedgermeshError):
    """A stored event does not match its hash chain."""


@dataclass(frozen=True)
class Break:
    """Where a chain stops verifying, and why."""

    position: int
    aggregate: str
    key: str
    kind: str
    problem: str


@dataclass
class Replay:
    events: int = 0
    position: int = 0
    tasks: dict[str, TaskState] = field(default_factory=dict)
    principals: dict[str, PrincipalState] = field(default_factory=dict)
    breaks: list[Break] = field(default_factory=list)
    chain: GlobalChain = field(default_factory=GlobalChain)  # global chain, checkpoints

    @property
    def verified(self) -> bool:
        return not self.breaks

    @property
    def digest(self) -> str:
        return digest(self.tasks, self.principals)


_decoder = msgspec.json.Decoder()


def replay(ledger: Ledger, *, to: int | None = None, page: int = 2000,
           progress: Callable[[int], None] | None = None,
           trusted_keys: Iterable[str] | None = None,
           against: Iterable[Checkpoint] = ()) -> Replay:
    """Fold the whole log (or up to position ``to``) and check each event's chain link,
    the global chain and every signed checkpoint (only ``trusted_keys``' if given), and
    that the log matches the external checkpoints ``against`` (not truncated or rewritten).
    """
    result = Replay(chain=GlobalChain(trusted_keys, against))
    heads: dict[UUID | str, tuple[int, str, str]] = {}
    after = 0
    with _collector_paused():
        while True:
            notifications = ledger.read(after, page)
            if not notifications:
                break
            for n in notifications:
                if to is not None and n.id > to:
                    return _finish(result, to)
                _fold(result, heads, n)
                after = n.id
            if progress is not None:
                progress(after)
    return _finish(result, to)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Replay allocates millions of short-lived, acyclic objects while the states it keeps
    grow: the cyclic garbage collector's passes over them cost about a quarter of the
    time and free nothing. Reference counting still frees everything as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def verify_against(ledger: Ledger, checkpoint: Checkpoint,
                   trusted_keys: Iterable[str] | None = None) -> list[Break]:
    """Every break of the ledger, checked against an external signed checkpoint too (the
    newest from the LEDGER stream, or one saved to a file)."""
    return replay(ledger, trusted_keys=trusted_keys, against=[checkpoint]).breaks


def _finish(result: Replay, to: int | None) -> Replay:
    result.breaks += [Break(position, Aggregate.CHECKPOINT.value, CHECKPOINTS_KEY,
                            Kind.CHECKPOINTED.value, why)
                      for position, why in result.chain.finish(to)]
    return result


def link_problem(event: LedgerEvent, version: int, head: str,
                 stored: bytes | None = None, aggregate_id: str | None = None) -> str | None:
    """Why ``event`` does not follow (version, head) in its chain, or None if it does.

    ``stored``: the event's state as stored, if at hand (replay): hashed as it is;
    ``aggregate_id``: the text of ``event.originator_id``, if at hand."""
    if event.originator_version != version + 1:
        return f"version {event.originator_version} follows {version}: an event is missing"
    if event.prev_hash != head:
        return f"prev_hash {event.prev_hash[:8]}… ≠ previous hash {head[:8]}…"
    body = None if stored is None else unhashed(stored, event.hash)
    if body is None:
        state = stored_state(event)
        del state["hash"]
        body = canonical(state)
    recomputed = hash_state(event.prev_hash, aggregate_id or str(event.originator_id),
                            event.originator_version, body)
    if recomputed != event.hash:
        return f"stored hash {event.hash[:8]}… ≠ recomputed {recomputed[:8]}…"
    return None


def verify_history(events: list[LedgerEvent]) -> str | None:
    """Check one aggregate's events (from the event store) link up; the first problem."""
    version, head = 0, GENESIS
    for event in events:
        problem = link_problem(event, version, head)
        if problem is not None:
            return f"version {event.originator_version} ({event.kind}): {problem}"
        version, head = event.originator_version, event.hash
    return None


def _fold(result: Replay, heads: dict[UUID | str, tuple[int, str, str]], n: Notification) -> None:
    """Check one event's links and fold it (the hot loop of replay: kept lean)."""
    result.events += 1
    result.position = n.id
    try:
        event = event_from_state(n.originator_id, n.originator_version,  # type: ignore[arg-type]
                                 _decoder.decode(n.state))
    except (msgspec.DecodeError, TypeError) as exc:
        result.breaks.append(Break(n.id, "?", str(n.originator_id), "?",
                                   f"stored event is unreadable: {exc}"))
        return
    # Keyed by the UUID, with its text kept: formatting a UUID costs more than hashing one.
    head = heads.get(n.originator_id)
    version, previous, aggregate_id = (0, GENESIS, str(n.originator_id)) if head is None else head
    problem = (f"unexpected topic {n.topic}" if n.topic != TOPIC
               else link_problem(event, version, previous,
                                 # (a hand-edited row can come back as text, not bytes)
                                 n.state if type(n.state) is bytes else None, aggregate_id))
    if problem is not None:
        result.breaks.append(Break(n.id, event.aggregate, event.key, event.kind, problem))
    heads[n.originator_id] = (n.originator_version,
                              event.hash, aggregate_id)
    problems = result.chain.link(n.id, event.hash)
    if problems:
        result.breaks += [Break(n.id, event.aggregate, event.key, event.kind, why)
                          for why in problems]
    aggregate = event.aggregate
    if aggregate == Aggregate.TASK:
        task = result.tasks.get(event.key)
        if task is None:
            task = result.tasks[event.key] = TaskState(task_id=event.key)
        task.apply(event)
    elif aggregate == Aggregate.CHECKPOINT:
        problem = result.chain.check(n.id, event.data)
        if problem is not None:
            result.breaks.append(Break(n.id, event.aggregate, event.key, event.kind, problem))
    else:
        principal = result.principals.get(event.key)
        if principal is None:
            principal = result.principals[event.key] = PrincipalState(name=event.key)
        principal.apply(event)

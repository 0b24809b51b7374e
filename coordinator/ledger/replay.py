"""Rebuild every aggregate from the notification log alone, and verify every hash chain.

Replay never decides anything: it folds what was recorded, in ledger order. Two passes
share nothing but the log: the *fold* (each event follows its predecessor's version and
hash; the global chain and signed checkpoints; state) and the *check* (each stored hash is
the hash of what is stored, event by event). Over a long log the check runs in a helper
process, reading the log itself, while this one folds, so the two cores of a small machine
share the work; over a short one, both passes take each page as it is read.
"""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
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
    hash_state,
    stored_state,
    unhashed,
)
from coordinator.ledger.state import PrincipalState, TaskState, digest
from coordinator.ledger.store import Ledger, LedgerError
from schemas import LedgermeshError, canonical

# From this many events on, the check runs in a helper process: below it, starting one
# (~0.3 s) costs more than the check (~6 us an event) saves.
HELPER_FROM_EVENTS = 50_000


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
           against: Iterable[Checkpoint] = (), helper: bool | None = None) -> Replay:
    """Fold the whole log (or up to position ``to``) and check each event's chain link,
    the global chain and every signed checkpoint (only ``trusted_keys``' if given), and
    that the log matches the external checkpoints ``against`` (not truncated or rewritten).

    ``helper``: check in a helper process (None: when the log holds at least
    ``HELPER_FROM_EVENTS`` events). The result is the same either way.
    """
    fold = _Fold(GlobalChain(trusted_keys, against))
    # Both passes read the same log, even if the coordinator appends meanwhile.
    last = ledger.last_position()
    stop = last if to is None else min(to, last)
    if helper is None:
        helper = stop >= HELPER_FROM_EVENTS
    with _collector_paused():
        if not helper:  # one read of each page, for both passes
            check = _Check()
            for notifications in _pages(ledger, stop, page, progress):
                fold.add(notifications)
                check.add(notifications)
        else:
            with _CheckProcess(dict(ledger.env), stop, page) as process:
                for notifications in _pages(ledger, stop, page, progress):
                    fold.add(notifications)
                check = process.result()
    result = fold.replay
    if check.events != result.events:  # never silently verify some other log
        raise LedgerError(f"the replay's check read {check.events} events where the fold "
                          f"read {result.events}: is the ledger location a real file?")
    result.breaks = _merged(fold, check) + [
        Break(position, Aggregate.CHECKPOINT.value, CHECKPOINTS_KEY, Kind.CHECKPOINTED.value,
              why) for position, why in fold.replay.chain.finish(to)]
    return result


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


def link_problem(event: LedgerEvent, version: int, head: str,
                 stored: bytes | str | None = None) -> str | None:
    """Why ``event`` does not follow (version, head) in its chain, or None if it does.

    ``stored``: the event's state as stored, if at hand: its hash is checked over that."""
    problem = _sequence_problem(event.originator_version, event.prev_hash, version, head)
    if problem is not None:
        return problem
    if stored is None:
        state = stored_state(event)
        del state["hash"]
        body = canonical(state)
    else:
        body = hashed_body(stored, event.hash)
    return _hash_problem(event.prev_hash, str(event.originator_id), event.originator_version,
                         event.hash, body)


def hashed_body(stored: bytes | str, event_hash: str) -> bytes:
    """What the hash of a stored event was taken over: the stored bytes without the hash
    field when they are canonical (no decoding; commits to those exact bytes), else (a
    hand-edited row, or one that comes back as text) its state re-encoded canonically."""
    body = unhashed(stored, event_hash) if type(stored) is bytes else None
    if body is None:
        state = _decoder.decode(stored)
        state.pop("hash", None)
        body = canonical(state)
    return body


def verify_history(events: list[LedgerEvent]) -> str | None:
    """Check one aggregate's events (from the event store) link up; the first problem."""
    version, head = 0, GENESIS
    for event in events:
        problem = link_problem(event, version, head)
        if problem is not None:
            return f"version {event.originator_version} ({event.kind}): {problem}"
        version, head = event.originator_version, event.hash
    return None


def _sequence_problem(event_version: int, prev_hash: str, version: int,
                      head: str) -> str | None:
    """Why an event does not come next after (version, head) in its chain, or None."""
    if event_version != version + 1:
        return f"version {event_version} follows {version}: an event is missing"
    if prev_hash != head:
        return f"prev_hash {prev_hash[:8]}… ≠ previous hash {head[:8]}…"
    return None


def _hash_problem(prev_hash: str, aggregate_id: str, version: int, event_hash: str,
                  body: bytes) -> str | None:
    """Why ``event_hash`` is not the hash of an event whose state without the hash is
    ``body`` (canonical JSON), or None."""
    recomputed = hash_state(prev_hash, aggregate_id, version, body)
    if recomputed != event_hash:
        return f"stored hash {event_hash[:8]}… ≠ recomputed {recomputed[:8]}…"
    return None


class _Stored(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A stored event as the fold reads it: what folding uses is decoded, the rest only
    checked to be JSON (``Raw``). Decoding all of it (the received envelope above all)
    was most of the cost of a replay; the check's hash covers those bytes exactly.
    Exactly the stored fields of a ``LedgerEvent``, or the event is unreadable."""

    aggregate: str
    key: str
    kind: str
    data: Any
    msg_id: Any
    sender: Any
    sent_at: msgspec.Raw
    recorded_at: msgspec.Raw
    causation_id: msgspec.Raw
    trace: msgspec.Raw
    raw: msgspec.Raw
    prev_hash: str
    hash: str
    # Not part of the stored state: set from the notification. (A stored state that has
    # it anyway is read, then fails its hash check like any other added field would.)
    originator_version: int = 0


class _Sealed(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A stored event as the check reads it: only what names it and its chain fields.

    It reads every event the fold reads (so no folded event goes unchecked), and a few
    more: invalid UTF-8 in a text field, which the fold reports as unreadable; the merge
    drops what the check says of those."""

    aggregate: str
    key: str
    kind: str
    data: msgspec.Raw
    msg_id: msgspec.Raw
    sender: msgspec.Raw
    sent_at: msgspec.Raw
    recorded_at: msgspec.Raw
    causation_id: msgspec.Raw
    trace: msgspec.Raw
    raw: msgspec.Raw
    prev_hash: str
    hash: str
    originator_version: Any = None  # accepted where the fold accepts it (and ignored)


_read_stored = msgspec.json.Decoder(_Stored).decode
_read_sealed = msgspec.json.Decoder(_Sealed).decode


def _pages(ledger: Ledger, stop: int, page: int,
           progress: Callable[[int], None] | None = None) -> Iterator[Sequence[Notification]]:
    """The log in order, a page at a time, up to position ``stop``."""
    after = 0
    while notifications := ledger.read(after, page):
        if notifications[-1].id > stop:
            notifications = [n for n in notifications if n.id <= stop]
            if notifications:
                yield notifications
            return
        yield notifications
        after = notifications[-1].id
        if progress is not None:
            progress(after)


class _Fold:
    """The fold pass: each event next in its chain's sequence, linked into the global
    chain (checkpoints checked against it), and folded into state.

    Keeps the breaks of each event's link (out of sequence, unreadable) apart from those
    of the global chain and checkpoints, so that a wrong hash the check finds can go
    between them, as one pass would find it."""

    def __init__(self, chain: GlobalChain) -> None:
        self.replay = Replay(chain=chain)
        self.links: list[Break] = []
        self.chain_breaks: list[Break] = []
        self._heads: dict[UUID | str, tuple[int, str]] = {}

    def add(self, notifications: Sequence[Notification]) -> None:
        """The hot loop of replay: kept lean (locals, no calls it can do without)."""
        result, links, chain_breaks, heads = (self.replay, self.links, self.chain_breaks,
                                              self._heads)
        chain, tasks, principals = result.chain, result.tasks, result.principals
        for n in notifications:
            result.events += 1
            result.position = n.id
            try:
                event = _read_stored(n.state)
            except msgspec.DecodeError as exc:
                links.append(Break(n.id, "?", str(n.originator_id), "?",
                                   f"stored event is unreadable: {exc}"))
                continue
            event.originator_version = n.originator_version
            version, previous = heads.get(n.originator_id, (0, GENESIS))
            problem = (f"unexpected topic {n.topic}" if n.topic != TOPIC
                       else _sequence_problem(event.originator_version, event.prev_hash,
                                              version, previous))
            if problem is not None:
                links.append(Break(n.id, event.aggregate, event.key, event.kind, problem))
            heads[n.originator_id] = (event.originator_version, event.hash)
            problems = chain.link(n.id, event.hash)
            if problems:
                chain_breaks += [Break(n.id, event.aggregate, event.key, event.kind, why)
                                 for why in problems]
            aggregate = event.aggregate
            if aggregate == Aggregate.TASK:
                task = tasks.get(event.key)
                if task is None:
                    task = tasks[event.key] = TaskState(task_id=event.key)
                task.apply(event)
            elif aggregate == Aggregate.CHECKPOINT:
                problem = chain.check(n.id, event.data)
                if problem is not None:
                    chain_breaks.append(Break(n.id, event.aggregate, event.key, event.kind,
                                              problem))
            else:
                principal = principals.get(event.key)
                if principal is None:
                    principal = principals[event.key] = PrincipalState(name=event.key)
                principal.apply(event)


class _Check:
    """The check pass: each stored hash recomputed from the stored bytes. Each event on
    its own (it carries its ``prev_hash``): that is what lets it run beside the fold.
    Counts the events it read; keeps each wrong hash by position."""

    def __init__(self) -> None:
        self.events = 0
        self.hashes: dict[int, Break] = {}
        self._ids: dict[UUID | str, str] = {}  # formatting a UUID costs more than hashing

    def add(self, notifications: Sequence[Notification]) -> None:
        hashes, ids = self.hashes, self._ids
        self.events += len(notifications)
        for n in notifications:
            if n.topic != TOPIC:
                continue  # the fold reports it
            try:
                event = _read_sealed(n.state)
            except msgspec.DecodeError:
                continue  # the fold reports it; there is no hash to check
            aggregate_id = ids.get(n.originator_id)
            if aggregate_id is None:
                aggregate_id = ids[n.originator_id] = str(n.originator_id)
            problem = _hash_problem(event.prev_hash, aggregate_id, n.originator_version,
                                    event.hash, hashed_body(n.state, event.hash))
            if problem is not None:
                hashes[n.id] = Break(n.id, event.aggregate, event.key, event.kind, problem)


class _CheckProcess:
    """The check pass in a helper process, over its own connection to the ledger.

    A plain child interpreter, not ``multiprocessing``: that would re-import the caller's
    main module, which breaks any script that calls ``replay`` without a main guard.
    Arguments (the ledger's settings, a password among them) go through a pipe, not argv.
    """

    def __init__(self, *arguments: object) -> None:
        # The child must import what this process imports, from the same places.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        read_end, write_end = os.pipe()
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-c", "from coordinator.ledger.replay import serve_check; "
                                       "serve_check()"],
                stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        finally:
            os.close(read_end)
        with open(write_end, "wb") as arguments_pipe:
            arguments_pipe.write(pickle.dumps(arguments))

    def __enter__(self) -> _CheckProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._child.poll() is None:  # the fold failed or was interrupted
            self._child.kill()
        self._child.communicate()

    def result(self) -> _Check:
        out, err = self._child.communicate()
        if self._child.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise LedgerError(f"the replay's check process failed (exit "
                              f"{self._child.returncode}): {last[0]}")
        check: _Check = pickle.loads(out)  # our own child's output
        return check


def serve_check() -> None:
    """The helper process: arguments from stdin, the check pass, its result to stdout."""
    env, stop, page = pickle.load(sys.stdin.buffer)
    ledger = Ledger(env=env)
    check = _Check()
    try:
        with _collector_paused():
            for notifications in _pages(ledger, stop, page):
                check.add(notifications)
    finally:
        ledger.close()
    sys.stdout.buffer.write(pickle.dumps(check))


def _merged(folded: _Fold, checked: _Check) -> list[Break]:
    """The breaks in log order, as one pass would find them: for each event, a broken link
    (or else a wrong hash: the first thing wrong with it), then the global chain's and the
    checkpoints'."""
    linked = {b.position for b in folded.links}
    hashes = [b for position, b in checked.hashes.items() if position not in linked]
    sources: Sequence[list[Break]] = (folded.links, hashes, folded.chain_breaks)
    ranked = sorted((b.position, rank, i)
                    for rank, source in enumerate(sources) for i, b in enumerate(source))
    return [sources[rank][i] for _, rank, i in ranked]

"""Rebuild every aggregate from the notification log alone, and verify every hash chain.

Replay never decides anything: it folds what was recorded, in ledger order. Two passes
share nothing but the log: the *fold* (each event follows its predecessor's version and
hash; the global chain and signed checkpoints; state) and the *check* (each stored hash is
the hash of what is stored, event by event: ``hashcheck.py``). Over a long log the check
runs in a helper process, reading the log itself, while this one folds, so the two cores
of a small machine share the work; over a short one, both passes take each page as it is
read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import msgspec

from coordinator.ledger.checkpoints import CHECKPOINTS_KEY, Checkpoint, GlobalChain
from coordinator.ledger.events import GENESIS, TOPIC, Aggregate, Kind, LedgerEvent, stored_state
from coordinator.ledger.hashcheck import (
    CheckProcess,
    HashCheck,
    collector_paused,
    hash_problem,
    hashed_body,
    log_pages,
)
from coordinator.ledger.state import PrincipalState, TaskState, digest
from coordinator.ledger.store import Ledger, LedgerError, LogRow, aggregate_text
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
    with collector_paused():
        if not helper:  # one read of each page, for both passes
            check = HashCheck()
            for notifications in log_pages(ledger, stop, page, progress):
                fold.add(notifications)
                check.add(notifications)
        else:
            with CheckProcess(dict(ledger.env), stop, page) as process:
                for notifications in log_pages(ledger, stop, page, progress):
                    fold.add(notifications)
                check = process.result()
    result = fold.replay
    if check.events != result.events:  # never silently verify some other log
        raise LedgerError(f"the replay's check read {check.events} events where the fold "
                          f"read {result.events}: is the ledger location a real file?")
    result.breaks = _merged(fold, check) + [
        Break(position, Aggregate.CHECKPOINT, CHECKPOINTS_KEY, Kind.CHECKPOINTED,
              why) for position, why in fold.replay.chain.finish(to)]
    return result


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
    return hash_problem(event.prev_hash, str(event.originator_id), event.originator_version,
                         event.hash, body)


def verify_history(events: list[LedgerEvent]) -> str | None:
    """Check one aggregate's events (from the event store) link up; the first problem."""
    broken = first_broken(events)
    if broken is None:
        return None
    event, problem = broken
    return f"version {event.originator_version} ({event.kind}): {problem}"


def first_broken(events: list[LedgerEvent]) -> tuple[LedgerEvent, str] | None:
    """The first of one aggregate's events that does not link up, and why."""
    version, head = 0, GENESIS
    for event in events:
        problem = link_problem(event, version, head)
        if problem is not None:
            return event, problem
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


_read_stored = msgspec.json.Decoder(_Stored).decode


class _Fold:
    """The fold pass: each event next in its chain's sequence, linked into the global
    chain (checkpoints checked against it), and folded into state.

    Keeps the breaks of each event's link (out of sequence, unreadable) apart from those
    of its fold and of the global chain and checkpoints, so that a wrong hash the check
    finds can go between them, as one pass would find it."""

    def __init__(self, chain: GlobalChain) -> None:
        self.replay = Replay(chain=chain)
        self.links: list[Break] = []
        self.chain_breaks: list[Break] = []
        self.unfoldable: list[Break] = []
        # Keyed by the aggregate id as stored (SQLite's text) or its UUID's integer.
        self._heads: dict[int | str, tuple[int, str]] = {}

    def add(self, rows: Sequence[LogRow]) -> None:
        """The hot loop of replay: kept lean (locals, no calls it can do without)."""
        result, links, chain_breaks, heads = (self.replay, self.links, self.chain_breaks,
                                              self._heads)
        chain, tasks, principals = result.chain, result.tasks, result.principals
        if rows:
            result.events += len(rows)
            result.position = rows[-1][0]
        for position, originator_id, version, topic, state in rows:
            # A UUID key would hash and compare in Python; its integer or the text do not.
            aggregate_id = (originator_id.int if isinstance(originator_id, UUID)
                            else originator_id)
            try:
                event = _read_stored(state)
            except msgspec.DecodeError as exc:
                links.append(Break(position, "?", aggregate_text(originator_id), "?",
                                   f"stored event is unreadable: {exc}"))
                continue
            event.originator_version = version
            last_version, previous = heads.get(aggregate_id, (0, GENESIS))
            problem = (f"unexpected topic {topic}" if topic != TOPIC
                       else _sequence_problem(version, event.prev_hash, last_version,
                                              previous))
            if problem is not None:
                links.append(Break(position, event.aggregate, event.key, event.kind, problem))
            heads[aggregate_id] = (version, event.hash)
            problems = chain.link(position, event.hash)
            if problems:
                chain_breaks += [Break(position, event.aggregate, event.key, event.kind, why)
                                 for why in problems]
            aggregate = event.aggregate
            try:
                if aggregate == Aggregate.TASK:
                    task = tasks.get(event.key)
                    if task is None:
                        task = tasks[event.key] = TaskState(task_id=event.key)
                    task.apply(event)
                elif aggregate == Aggregate.CHECKPOINT:
                    problem = chain.check(position, event.data)
                    if problem is not None:
                        chain_breaks.append(Break(position, event.aggregate, event.key,
                                                  event.kind, problem))
                else:
                    principal = principals.get(event.key)
                    if principal is None:
                        principal = principals[event.key] = PrincipalState(name=event.key)
                    principal.apply(event)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # Data the coordinator never writes (an edited kind, a missing field): the
                # hash check says the event was changed; if its hash was made to match,
                # the fold says what it met.
                why = f"stored event cannot be folded: {type(exc).__name__} {exc}"
                self.unfoldable.append(Break(position, event.aggregate, event.key, event.kind,
                                             why))


def _merged(folded: _Fold, checked: HashCheck) -> list[Break]:
    """The breaks in log order, as one pass would find them: for each event, a broken link
    (or else a wrong hash, or else data the fold cannot take: the first thing wrong with
    it), then the global chain's and the checkpoints'."""
    linked = {b.position for b in folded.links}
    hashes = [Break(*w) for position, w in checked.wrong.items() if position not in linked]
    found = linked | checked.wrong.keys()
    unfoldable = [b for b in folded.unfoldable if b.position not in found]
    sources: Sequence[list[Break]] = (folded.links, hashes, unfoldable, folded.chain_breaks)
    ranked = sorted((b.position, rank, i)
                    for rank, source in enumerate(sources) for i, b in enumerate(source))
    return [sources[rank][i] for _, rank, i in ranked]

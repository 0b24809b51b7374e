"""Replay's hash check: each stored event's hash recomputed from its stored bytes.

Each event on its own (it carries its ``prev_hash``), so the check can run beside the
fold (``replay.py``): in the same process, page by page, or in a helper process that
reads the log itself. A plain child interpreter, not ``multiprocessing``: that would
re-import the caller's main module, which breaks any script that calls ``replay``
without a main guard.
"""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple
from uuid import UUID

import msgspec

from coordinator.ledger.events import TOPIC, hash_state, unhashed
from coordinator.ledger.store import Ledger, LedgerError, LogRow, aggregate_text
from schemas import canonical

_decoder = msgspec.json.Decoder()


class WrongHash(NamedTuple):
    """A stored event whose hash is not the hash of what is stored."""

    position: int
    aggregate: str
    key: str
    kind: str
    problem: str


@contextmanager
def collector_paused() -> Iterator[None]:
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


def log_pages(ledger: Ledger, stop: int, page: int, progress: Callable[[int], None] | None = None,
              *, after: int = 0) -> Iterator[Sequence[LogRow]]:
    """The log in order, a page of rows at a time, after position ``after`` up to ``stop``."""
    while after < stop and (rows := ledger.read_rows(after, page)):
        if rows[-1][0] > stop:
            rows = [row for row in rows if row[0] <= stop]
            if rows:
                yield rows
            return
        yield rows
        after = rows[-1][0]
        if progress is not None:
            progress(after)


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


def hash_problem(prev_hash: str, aggregate_id: str, version: int, event_hash: str,
                  body: bytes) -> str | None:
    """Why ``event_hash`` is not the hash of an event whose state without the hash is
    ``body`` (canonical JSON), or None."""
    recomputed = hash_state(prev_hash, aggregate_id, version, body)
    if recomputed != event_hash:
        return f"stored hash {event_hash[:8]}… ≠ recomputed {recomputed[:8]}…"
    return None


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


_read_sealed = msgspec.json.Decoder(_Sealed).decode


class HashCheck:
    """The check pass, fed a page at a time: counts the events it read, and keeps each
    wrong hash by position."""

    def __init__(self) -> None:
        self.events = 0
        self.wrong: dict[int, WrongHash] = {}
        self._ids: dict[UUID | str, str] = {}  # formatting an id costs more than hashing

    def __getstate__(self) -> dict[str, Any]:
        # What the helper process sends back: the findings, not its cache of ids.
        return {"events": self.events, "wrong": self.wrong, "_ids": {}}

    def add(self, rows: Sequence[LogRow]) -> None:
        wrong, ids = self.wrong, self._ids
        self.events += len(rows)
        for position, originator_id, version, topic, state in rows:
            if topic != TOPIC:
                continue  # the fold reports it
            try:
                event = _read_sealed(state)
            except msgspec.DecodeError:
                continue  # the fold reports it; there is no hash to check
            aggregate_id = ids.get(originator_id)
            if aggregate_id is None:
                aggregate_id = ids[originator_id] = aggregate_text(originator_id)
            problem = hash_problem(event.prev_hash, aggregate_id, version, event.hash,
                                   hashed_body(state, event.hash))
            if problem is not None:
                wrong[position] = WrongHash(position, event.aggregate, event.key, event.kind,
                                            problem)


class CheckProcess:
    """The check pass in a helper process (``serve_check``), over its own connection to
    the ledger. Arguments (the ledger's settings, a password among them) go through a
    pipe, not argv; the result comes back pickled on its stdout."""

    def __init__(self, *arguments: object) -> None:
        # The child must import what this process imports, from the same places.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        read_end, write_end = os.pipe()
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-c", "from coordinator.ledger.hashcheck import serve_check; "
                                       "serve_check()"],
                stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        finally:
            os.close(read_end)
        with open(write_end, "wb") as arguments_pipe:
            arguments_pipe.write(pickle.dumps(arguments))

    def __enter__(self) -> CheckProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._child.poll() is None:  # the fold failed or was interrupted
            self._child.kill()
        self._child.communicate()

    def result(self) -> HashCheck:
        out, err = self._child.communicate()
        if self._child.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise LedgerError(f"the replay's check process failed (exit "
                              f"{self._child.returncode}): {last[0]}")
        check: HashCheck = pickle.loads(out)  # our own child's output
        return check


def serve_check() -> None:
    """The helper process: arguments from stdin, the check pass, its result to stdout."""
    env, stop, page = pickle.load(sys.stdin.buffer)
    ledger = Ledger(env=env)
    check = HashCheck()
    try:
        with collector_paused():
            for notifications in log_pages(ledger, stop, page):
                check.add(notifications)
    finally:
        ledger.close()
    sys.stdout.buffer.write(pickle.dumps(check))



"""``ledgermesh export``: the ledger as JSON Lines, for auditors and the tools they use.

One line per recorded event, in ledger order: a ``LedgerRecord`` exactly as the relay
publishes it on ``<prefix>.ledger.…`` (the stored event state is copied, not re-encoded),
so whatever reads the live stream reads an export the same way, and each event's hash can
be recomputed from its line alone. ``--after`` the last position of a previous export
gives the next one: exports can be shipped incrementally.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import msgspec

from coordinator.ledger.events import task_aggregate_id
from coordinator.ledger.hashcheck import log_pages
from coordinator.ledger.store import Ledger, aggregate_text, open_ledger
from ledgermesh.style import Style
from schemas import LedgermeshError, LedgerRecord

_SQLITE_HEADER = b"SQLite format 3\x00"


class Exported(msgspec.Struct, frozen=True):
    """What an export wrote: how many events, and the positions of the first and last."""

    events: int
    first: int | None
    last: int | None


def export_ledger(ledger: Ledger, out: BinaryIO, *, after: int = 0, to: int | None = None,
                  task_id: str | None = None, page: int = 2000,
                  progress: Callable[[int], None] | None = None) -> Exported:
    """Write the events at positions after ``after`` (up to ``to``), one task's only if
    ``task_id`` is given, to ``out`` as JSON Lines."""
    encode = msgspec.json.Encoder().encode
    # Each stored state is copied as it is, once checked to be one JSON value (a syntax
    # check, ~1 µs): a damaged row must not become a line no reader can parse.
    check = msgspec.json.Decoder(msgspec.Raw).decode
    wanted = None if task_id is None else str(task_aggregate_id(task_id))
    last = ledger.last_position()
    stop = last if to is None else min(to, last)
    count, first, latest = 0, None, None
    for rows in log_pages(ledger, stop, page, progress, after=after):
        lines = []
        for position, originator_id, version, topic, state in rows:
            aggregate_id = aggregate_text(originator_id)
            if wanted is not None and aggregate_id != wanted:
                continue
            try:
                event = check(state)
            except msgspec.DecodeError as exc:
                raise LedgermeshError(
                    f"position {position} holds no JSON event ({exc}): the ledger is "
                    "damaged there (`ledgermesh replay --verify` tells more); export "
                    f"around it with {_around(position)}") from None
            lines.append(encode(LedgerRecord(position=position, aggregate_id=aggregate_id,
                                             version=version, topic=topic, event=event)))
            first = position if first is None else first
            latest = position
        if lines:
            out.write(b"\n".join(lines) + b"\n")
            count += len(lines)
    return Exported(count, first, latest)


def export_command(location: str, out: Path | None, *, after: int, to: int | None,
                   task_id: str | None) -> int:
    """Export to ``out`` (written whole or not at all) or to stdout; a summary on stderr."""
    if after < 0 or (to is not None and to < 0):
        raise ValueError("--after and --to are ledger positions: 0 or more")
    if to is not None and to <= after:
        raise ValueError(f"--to {to} is not after --after {after}: nothing between them")
    if out is not None:
        _refuse_to_overwrite_a_database(out)
    err = Style.for_stream(sys.stderr)
    ledger = open_ledger(location, create=False)
    try:
        total = ledger.last_position() if to is None else min(to, ledger.last_position())
        shown = [0.0]

        def progress(position: int) -> None:
            now = time.monotonic()
            if err.live and out is not None and now - shown[0] > 0.2:
                shown[0] = now
                print(f"\r  exporting… position {position:,} of {total:,}", end="",
                      file=sys.stderr, flush=True)

        if out is None:
            exported = export_ledger(ledger, sys.stdout.buffer, after=after, to=to,
                                     task_id=task_id)
            sys.stdout.buffer.flush()
        else:
            exported = _export_to_file(ledger, out, after, to, task_id, progress)
        if err.live and out is not None:
            print("\r\033[K", end="", file=sys.stderr)
    finally:
        ledger.close()
    where = "" if out is None else f" to {out}"
    if exported.events == 0:
        span = "".join([f" after position {after}" if after else "",
                        "" if to is None else f" up to position {to}"])
        if task_id is not None:  # as `audit` does: most likely a mistyped id
            raise LedgermeshError(f"no events of task {task_id!r}{span} in {location}")
        print(f"no events{span}{where}", file=sys.stderr)
        return 0
    print(f"exported {exported.events:,} events (positions {exported.first:,}–"
          f"{exported.last:,}){where}", file=sys.stderr)
    return 0


def _around(position: int) -> str:
    after = f"--after {position}"
    return after if position == 1 else f"--to {position - 1} and {after}"


def _refuse_to_overwrite_a_database(out: Path) -> None:
    """An export replaces its output file: never one that is a database (the ledger itself,
    given as --out by a slip of the shell's history)."""
    try:
        with out.open("rb") as existing:
            header = existing.read(len(_SQLITE_HEADER))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return  # nothing there to lose, or an error _export_to_file reports
    if header == _SQLITE_HEADER:
        raise LedgermeshError(f"--out {out} is a SQLite database (a ledger?): an export "
                              "would replace it; give a new file name")


def _export_to_file(ledger: Ledger, out: Path, after: int, to: int | None,
                    task_id: str | None, progress: Callable[[int], None]) -> Exported:
    # A crash or an error leaves no half export under the name a complete one would have.
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("wb") as stream:
            exported = export_ledger(ledger, stream, after=after, to=to, task_id=task_id,
                                     progress=progress)
            stream.flush()
            os.fsync(stream.fileno())
        if exported.events == 0 and task_id is not None:
            partial.unlink()  # nothing of that task: an error, not an empty file
        else:
            os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LedgermeshError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return exported

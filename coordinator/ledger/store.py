"""The ledger's persistence: the one module that configures eventsourcing.

``open_ledger("path/ledger.db")`` opens (or creates) a SQLite file;
``open_ledger("postgresql://user@host:5432/db")`` a PostgreSQL database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qs, unquote, urlsplit
from uuid import UUID

import msgspec
from eventsourcing.application import Application
from eventsourcing.persistence import (
    Notification,
    ProcessRecorder,
    ProgrammingError,
    StoredEvent,
    Tracking,
    Transcoder,
)
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import Environment, EnvType

from bus.urls import redact_url
from coordinator.ledger.events import TOPIC, LedgerEvent, Sealed
from schemas import LedgermeshError

_T = TypeVar("_T")

LogRow = tuple[int, "UUID | str", int, str, bytes]
"""A notification as replay reads it: (position, aggregate id, version, topic, state)."""


@runtime_checkable
class _SelectsRows(Protocol):
    def select_rows(self, after: int, limit: int) -> Sequence[LogRow]: ...


class LedgerError(LedgermeshError):
    """The ledger cannot be opened, read or written."""


class CanonicalTranscoder(Transcoder):
    """Stores event state as canonical JSON (sorted keys): the bytes the chain hashes."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(order="sorted")
        self._decoder = msgspec.json.Decoder()

    def encode(self, obj: Any) -> bytes:
        return self._encoder.encode(obj)

    def decode(self, data: bytes) -> Any:
        return self._decoder.decode(data)


class Ledger(Application[UUID]):
    """Append-only store of LedgerEvents with a notification log and intake tracking."""

    name = "ledger"

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        # Only the settings we pass: the process environment must not reconfigure the
        # system of record behind the user's back.
        return Environment(name, dict(env or {}))

    def construct_transcoder(self) -> Transcoder:
        return CanonicalTranscoder()

    def construct_recorder(self) -> ProcessRecorder:
        # A process recorder stores tracking records in the same transaction as events:
        # that is what makes intake exactly-once.
        return self.factory.process_recorder()

    @property
    def process_recorder(self) -> ProcessRecorder:
        assert isinstance(self.recorder, ProcessRecorder)
        return self.recorder

    def append(self, sealed: Sequence[Sealed],
               tracking: Tracking | None) -> list[Notification]:
        """Store events (and the tracking position) in one transaction; as the log now
        holds them (positions, and the very bytes stored).

        Each event's stored state is the one it was sealed with (the bytes its hash was
        taken over, plus the hash): eventsourcing's mapper would encode it once more."""
        stored = [_built(StoredEvent, {"originator_id": s.event.originator_id,
                                       "originator_version": s.event.originator_version,
                                       "topic": TOPIC, "state": s.stored}) for s in sealed]
        positions = self.process_recorder.insert_events(stored, tracking=tracking) or []
        if len(positions) != len(stored):
            raise LedgerError(f"the recorder returned {len(positions)} positions for "
                              f"{len(stored)} events")
        return [_built(Notification, {**s.__dict__, "id": position})
                for s, position in zip(stored, positions, strict=True)]

    def tracking_position(self, name: str) -> int:
        return self.process_recorder.max_tracking_id(name) or 0

    def read(self, after: int, limit: int) -> Sequence[Notification]:
        """Notifications with positions greater than ``after``, in order."""
        return self.recorder.select_notifications(start=after, limit=limit,
                                                  inclusive_of_start=False)

    def read_rows(self, after: int, limit: int) -> Sequence[LogRow]:
        """``read`` as plain tuples, for replay, which reads every event once.

        They are selected without eventsourcing's Notification objects, which took twice as
        long as reading the rows on SQLite (where the aggregate id stays the stored text,
        its UUID's 32 hex digits: ``aggregate_text`` formats it) and three times as long on
        PostgreSQL (whose recorder selects them)."""
        recorder = self.recorder
        if isinstance(recorder, _SelectsRows):  # PostgreSQL (coordinator/ledger/postgres.py)
            return recorder.select_rows(after, limit)
        if not isinstance(recorder, SQLiteApplicationRecorder):
            return [(n.id, n.originator_id, n.originator_version, n.topic, n.state)
                    for n in self.read(after, limit)]
        with recorder.datastore.transaction(commit=False) as cursor:
            cursor.sqlite_cursor.row_factory = None  # tuples, not sqlite3.Row
            cursor.execute("SELECT rowid, originator_id, originator_version, topic, state "
                           f"FROM {recorder.events_table_name} WHERE rowid>? "
                           "ORDER BY rowid LIMIT ?", (after, limit))
            rows: list[LogRow] = cursor.fetchall()
            return rows

    def last_position(self) -> int:
        return self.recorder.max_notification_id() or 0

    def history(self, aggregate_id: UUID) -> list[LedgerEvent]:
        return [e for e in self.events.get(aggregate_id) if isinstance(e, LedgerEvent)]


def _built(cls: type[_T], fields: dict[str, Any]) -> _T:
    """An eventsourcing record (a frozen dataclass) with these fields, built as its mapper
    builds events: without ``__init__``, which sets each field through
    ``object.__setattr__``, at twice the cost (each event makes two)."""
    record = object.__new__(cls)
    record.__dict__.update(fields)
    return record


def aggregate_text(aggregate_id: UUID | str) -> str:
    """An aggregate id as events and hashes spell it (a UUID's canonical form), from a
    ``LogRow``'s (as stored; text that is not a UUID stays as it is)."""
    if isinstance(aggregate_id, str):
        try:
            return str(UUID(aggregate_id))
        except ValueError:  # a damaged row: its hash check will say so
            return aggregate_id
    return str(aggregate_id)


# eventsourcing's PostgreSQL recorder with a faster batch insert (imported only when used).
POSTGRES_RECORDER = "coordinator.ledger.postgres:ArrayInsertRecorder"


def is_postgres(location: str) -> bool:
    """Whether a ledger location names a PostgreSQL database (else: a SQLite file)."""
    return location.startswith(("postgresql://", "postgres://"))


def ledger_env(location: str, create: bool = True) -> dict[str, str]:
    """eventsourcing settings for a ledger location (a SQLite path or a postgresql:// URL)."""
    if is_postgres(location):
        url = urlsplit(location)
        query = parse_qs(url.query)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": url.path.lstrip("/") or "postgres",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": unquote(url.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(url.password or ""),
            "CREATE_TABLE": "y" if create else "n",
            "PROCESS_RECORDER_TOPIC": POSTGRES_RECORDER,
        }
        if "schema" in query:
            env["POSTGRES_SCHEMA"] = query["schema"][0]
        unread = sorted(set(query) - {"schema"})
        if unread:
            # Ignored, sslmode=verify-full would connect in plain text.
            raise LedgerError(
                f"ledger URL {redacted(location)}: {', '.join(unread)} "
                f"{'is' if len(unread) == 1 else 'are'} not read here (only schema is): "
                "give libpq's settings in its environment instead, e.g. PGSSLMODE=verify-full, "
                "and the password as user:password@ or PGPASSWORD")
        return env
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": location,
            "CREATE_TABLE": "y"}


def check_location(location: str) -> None:
    """LedgerError unless ``location`` is a SQLite file path or a postgresql:// URL."""
    if not is_postgres(location) and "://" in location:
        # Not a path: taken as one, "sqlite:///x.db" would create a directory "sqlite:".
        raise LedgerError(f"unsupported ledger location {redacted(location)}: give a SQLite "
                          "file path (e.g. ledgermesh-data/ledger.db) or a postgresql:// URL")


def open_ledger(location: str, *, create: bool) -> Ledger:
    """Open the ledger at ``location``; with ``create=False`` it must already exist."""
    check_location(location)
    postgres = is_postgres(location)
    if not postgres:
        path = Path(location)
        if not create and not path.is_file():
            raise LedgerError(f"no ledger at {location} (expected a SQLite file made by "
                              "ledgermesh, or postgresql://…)")
        if not create or (path.is_file() and path.stat().st_size > 0):
            _check_sqlite_ledger(path, empty_ok=create)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
    env = ledger_env(location, create)
    if postgres:
        _check_reachable(location, env)
    try:
        ledger = Ledger(env=env)
    except Exception as exc:  # eventsourcing wraps driver errors in its own types
        raise LedgerError(f"cannot open ledger at {redacted(location)}: {exc}") from exc
    if postgres and not create:
        try:
            ledger.last_position()
        except ProgrammingError:
            ledger.close()
            raise LedgerError(f"no ledger at {redacted(location)} (no ledgermesh tables "
                              "in that database/schema)") from None
    return ledger


def connection_args(env: dict[str, str]) -> dict[str, Any]:
    """psycopg's connection arguments for a PostgreSQL ledger's ``ledger_env``."""
    return {"host": env["POSTGRES_HOST"], "port": env["POSTGRES_PORT"],
            "dbname": env["POSTGRES_DBNAME"], "user": env["POSTGRES_USER"],
            "password": env["POSTGRES_PASSWORD"] or None}


def _check_reachable(location: str, env: dict[str, str], timeout_s: int = 5) -> None:
    """LedgerError with the server's own reason (no such database, refused, bad password)
    within seconds: eventsourcing's pool says only that it had no connection after 30 s."""
    import psycopg  # (only for a PostgreSQL ledger)

    try:
        psycopg.connect(**connection_args(env), connect_timeout=timeout_s).close()
    except psycopg.OperationalError as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise LedgerError(f"cannot open ledger at {redacted(location)}: "
                          f"{reason or type(exc).__name__}") from None


def _check_sqlite_ledger(path: Path, empty_ok: bool) -> None:
    """LedgerError unless the file is a SQLite database with a ledger's events table (or,
    ``empty_ok``, no table at all), looked at read-only: the recorder creates its tables
    where they are missing, and must not turn another application's database, or any
    file a reader was pointed at, into a ledger."""
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise LedgerError(f"{path} is not a ledger: {exc}") from None
    if "stored_events" not in tables and not (empty_ok and not tables):
        raise LedgerError(f"{path} is a SQLite database but not a ledgermesh ledger (it has "
                          "no stored_events table)")


def redacted(location: str) -> str:
    """The location without its password, to show or log."""
    return redact_url(location)

"""One writer per ledger: a coordinator holds a lock on its ledger for as long as it runs.

Two coordinators on one ledger (a second ``coordinator run`` by mistake, a rolling update
that starts the new one before the old one stops) would split the intake between them,
each deciding on its own cached states: conflicting versions, two timers firing for one
deadline, two relays racing for the ledger stream. So the second one is refused, with the
first one's whereabouts. The lock goes with its process, even at a kill -9:

- SQLite: ``flock`` on ``<ledger>.lock`` beside the file (which names the holder);
- PostgreSQL: a session advisory lock, keyed by the ledger's schema, on a connection of
  its own (``application_name`` names the holder).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coordinator.ledger.store import LedgerError, is_postgres, ledger_env


class LedgerInUseError(LedgerError):
    """Another coordinator is writing this ledger."""


def holder_name() -> str:
    return f"ledgermesh coordinator pid {os.getpid()} on {socket.gethostname()}"


@contextmanager
def sole_writer(location: str) -> Iterator[None]:
    """Hold the ledger's writer lock while the body runs; LedgerInUseError if another
    process holds it."""
    lock = _postgres_lock if is_postgres(location) else _file_lock
    with lock(location):
        yield


@contextmanager
def _file_lock(location: str) -> Iterator[None]:
    path = Path(f"{location}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LedgerInUseError(
                f"{location} is being written by {holder} (lock {path}): a ledger has "
                "exactly one coordinator; stop that one first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder_name()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (its name is all it is)


def advisory_key(schema: str) -> int:
    """The advisory lock's key: a signed 64-bit number of the ledger's schema (locks are
    per database already)."""
    digest = hashlib.blake2b(f"ledgermesh ledger {schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def _postgres_lock(location: str) -> Iterator[None]:
    import psycopg  # only with a PostgreSQL ledger

    env = ledger_env(location)
    schema = env.get("POSTGRES_SCHEMA", "public")
    key = advisory_key(schema)
    try:
        conn = psycopg.connect(host=env["POSTGRES_HOST"], port=env["POSTGRES_PORT"],
                               dbname=env["POSTGRES_DBNAME"], user=env["POSTGRES_USER"],
                               password=env["POSTGRES_PASSWORD"] or None,
                               application_name=holder_name(), autocommit=True,
                               connect_timeout=10)
    except psycopg.Error as exc:
        raise LedgerError(f"cannot reach the PostgreSQL ledger to lock it: {exc}") from exc
    try:
        row: Any = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not row[0]:
            raise LedgerInUseError(
                f"the ledger in schema {schema!r} of database {env['POSTGRES_DBNAME']!r} is "
                f"being written by {_postgres_holder(conn, key)}: a ledger has exactly one "
                "coordinator; stop that one first")
        yield
    finally:
        conn.close()  # ends the session, and its lock


def _postgres_holder(conn: Any, key: int) -> str:
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(
        "SELECT a.application_name, a.client_addr FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1",
        (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
    if row is None:
        return "another process (gone since?)"
    name, address = row
    return f"{name or 'another process'}" + (f" from {address}" if address else "")

"""One writer per ledger: a coordinator holds a lock on its ledger for as long as it runs.

Two coordinators on one ledger (a second ``coordinator run`` by mistake, a rolling update
that starts the new one before the old one stops) would split the intake between them,
each deciding on its own cached states: conflicting versions, two timers firing for one
deadline, two relays racing for the ledger stream. So the second one is refused, with the
first one's whereabouts.

- SQLite: ``flock`` on ``<ledger>.lock`` beside the file (which names the holder); the
  kernel drops it with its process, kill -9 included. A lock file removed under a running
  coordinator is made and locked again at its next check.
- PostgreSQL: a session advisory lock, keyed by the ledger's schema, on a connection of
  its own (``application_name`` names the holder). The session ends with its process's
  connection; a host that dies without closing it is noticed by TCP keepalives within
  ~30 s. The coordinator checks the lock every few seconds: a session that ended under it
  (a restart of PostgreSQL) is replaced and the lock taken again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

from coordinator.ledger.store import (
    LedgerError,
    check_location,
    connection_args,
    is_postgres,
    ledger_env,
)

log = logging.getLogger("ledgermesh.coordinator.ledger")

# On the lock's session: the server gives up a client that went silent within ~30 s
# (its default waits for the kernel's, ~2 h), and so does the client (below).
_SERVER_KEEPALIVES = ("SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                      "SET tcp_keepalives_count = 3")


class LedgerInUseError(LedgerError):
    """Another coordinator is writing this ledger."""


def holder_name() -> str:
    return f"ledgermesh coordinator pid {os.getpid()} on {socket.gethostname()}"


class WriterLock(Protocol):
    def check(self) -> str | None:
        """Take the lock again if it was lost: LedgerInUseError if another process holds
        it now; why it is not held (the database unreachable), or None."""


@contextmanager
def sole_writer(location: str) -> Iterator[WriterLock]:
    """Hold the ledger's writer lock while the body runs; LedgerInUseError if another
    process holds it, LedgerError if it cannot be taken at all."""
    check_location(location)
    lock = _PostgresLock(location) if is_postgres(location) else _FileLock(location)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


class _FileLock:
    """``flock`` on ``<ledger>.lock``; ``check`` makes and takes the file again if someone
    removed or replaced it (else a second coordinator would lock a new file and start)."""

    def __init__(self, location: str) -> None:
        self._location = location
        # Beside the file itself: a symlink to a ledger names the same lock as the ledger.
        self._path = Path(f"{os.path.realpath(location)}.lock")
        self._fd = -1

    def acquire(self) -> None:
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerError(f"cannot lock the ledger at {self._location}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LedgerInUseError(
                f"{self._location} is being written by {holder or 'another process'} "
                f"(lock {path}): a ledger has exactly one coordinator; stop that one "
                "first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder_name()}\n".encode(), 0)
        self._fd = fd

    def check(self) -> str | None:
        try:
            named, held = os.stat(self._path), os.fstat(self._fd)
            if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                return None  # the kernel's lock, on the file of that name: nothing to do
        except FileNotFoundError:
            pass
        log.warning("the ledger's lock file %s was removed or replaced: taking it again",
                    self._path)
        held_before = self._fd
        self.acquire()  # LedgerInUseError if another coordinator locked the new file
        os.close(held_before)
        return None

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock; the file stays (its name is all it is)
            self._fd = -1


def advisory_key(schema: str) -> int:
    """The advisory lock's key: a signed 64-bit number of the ledger's schema (locks are
    per database already)."""
    digest = hashlib.blake2b(f"ledgermesh ledger {schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _PostgresLock:
    """A session advisory lock on a connection of its own; ``check`` takes it again on a
    new connection if the session ended, unless another coordinator was quicker."""

    def __init__(self, location: str) -> None:
        env = ledger_env(location)
        self._env = env
        self._schema = env.get("POSTGRES_SCHEMA", "public")
        self._key = advisory_key(self._schema)
        self._conn: Any = None
        self._session = 0  # the server's pid of the session that took the lock last

    def acquire(self) -> None:
        import psycopg  # only with a PostgreSQL ledger

        env = self._env
        try:
            conn = psycopg.connect(**connection_args(env),
                                   application_name=holder_name(), autocommit=True,
                                   connect_timeout=10, keepalives=1, keepalives_idle=10,
                                   keepalives_interval=5, keepalives_count=3,
                                   tcp_user_timeout=20_000)  # ms: a check cannot hang
        except psycopg.Error as exc:
            raise LedgerError(f"cannot reach the PostgreSQL ledger to lock it: {exc}") from exc
        try:
            conn.execute(_SERVER_KEEPALIVES)
            holder = self._try_lock(conn)
            if holder is not None and holder[0] == self._session:
                # Our own session before, given up on our side only (the connection failed
                # here, not there): end it, then take the lock on this one.
                conn.execute("SELECT pg_terminate_backend(%s)", (holder[0],))
                holder = self._try_lock(conn, wait_s=5.0)
            row: Any = conn.execute("SELECT pg_backend_pid()").fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise LedgerError(f"cannot lock the PostgreSQL ledger: {exc}") from exc
        if holder is not None:
            conn.close()
            _, name, address = holder
            who = f"{name} from {address}" if address else name
            raise LedgerInUseError(
                f"the ledger in schema {self._schema!r} of database "
                f"{env['POSTGRES_DBNAME']!r} is being written by {who}: a ledger has "
                "exactly one coordinator; stop that one first")
        self._conn, self._session = conn, int(row[0])

    def _try_lock(self, conn: Any, wait_s: float = 0.0) -> tuple[int, str, str] | None:
        """None once this session holds the lock, else the session that does (pid, name,
        address), after ``wait_s`` of trying."""
        deadline = time.monotonic() + wait_s
        while True:
            row: Any = conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
            if row[0]:
                return None
            holder = _postgres_holder(conn, self._key)
            if holder is not None and time.monotonic() >= deadline:
                return holder
            time.sleep(0.1)  # (a holder that just went: try again)

    def check(self) -> str | None:
        import psycopg

        if self._conn is not None:
            try:
                self._conn.execute("SELECT 1")
                return None
            except psycopg.Error:
                self.release()
            log.warning("the connection holding the ledger's lock was lost: taking it again")
        try:
            self.acquire()
        except LedgerInUseError:
            raise
        except LedgerError as exc:  # unreachable: so is the ledger; try again next time
            log.warning("%s", exc)
            return str(exc)
        return None

    def release(self) -> None:
        if self._conn is not None:
            with suppress(Exception):
                self._conn.close()  # ends the session, and its lock
            self._conn = None


def _postgres_holder(conn: Any, key: int) -> tuple[int, str, str] | None:
    """(pid, application name, client address) of the session holding the lock ``key``."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(
        "SELECT a.pid, a.application_name, a.client_addr FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1 "
        # advisory locks are per database: the same key in another one is another ledger's
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
    if row is None:
        return None
    pid, name, address = row
    return pid, name or "another process", str(address or "")

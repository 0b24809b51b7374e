"""The ledger's writer lock (coordinator/ledger/owner.py) where no database is needed."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.embedded import free_port
from coordinator.health import Health
from coordinator.ledger.owner import LedgerInUseError, WriterLock, _PostgresLock, sole_writer
from coordinator.ledger.store import LedgerError


def test_a_postgresql_lock_whose_server_is_unreachable_waits_instead_of_crashing(
        caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL down for longer than a check: every check says so and returns (the
    coordinator's writes wait for it too); none raises."""
    lock = _PostgresLock(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    lock.check()
    lock.check()
    assert sum("cannot reach the PostgreSQL ledger" in r.getMessage()
               for r in caplog.records) == 2


def test_a_location_that_is_no_ledger_is_refused_before_anything_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LedgerError, match="unsupported ledger location"), \
            sole_writer("sqlite:///ledger.db"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_ledger_directory_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a directory should be")
    with pytest.raises(LedgerError, match="cannot lock the ledger"), \
            sole_writer(str(blocked / "ledger.db")):
        pass


def _lock_elsewhere(path: Path) -> int:
    """Lock the file as another coordinator would (a lock of its own open file)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.fixture
def lock_file_removed(tmp_path: Path) -> Iterator[tuple[str, WriterLock, Path]]:
    """A ledger whose running coordinator's lock file was just deleted."""
    ledger = str(tmp_path / "ledger.db")
    with sole_writer(ledger) as lock:
        lock_file = tmp_path / "ledger.db.lock"
        lock_file.unlink()
        yield ledger, lock, lock_file


def test_a_lock_file_removed_under_a_coordinator_is_locked_again_at_its_check(
        lock_file_removed: tuple[str, WriterLock, Path]) -> None:
    ledger, lock, lock_file = lock_file_removed
    lock.check()
    assert f"pid {os.getpid()}" in lock_file.read_text()
    with pytest.raises(LedgerInUseError, match=f"pid {os.getpid()}"), sole_writer(ledger):
        pass
    lock.check()  # the file it holds: nothing to do


def test_a_coordinator_whose_lock_file_was_taken_by_another_stops_at_its_check(
        lock_file_removed: tuple[str, WriterLock, Path]) -> None:
    _, lock, lock_file = lock_file_removed
    other = _lock_elsewhere(lock_file)  # a second coordinator, started in the gap
    try:
        with pytest.raises(LedgerInUseError, match="exactly one coordinator"):
            lock.check()
    finally:
        os.close(other)


def test_the_lock_is_released_with_its_block(tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.db")
    with sole_writer(ledger):
        pass
    os.close(_lock_elsewhere(tmp_path / "ledger.db.lock"))  # (BlockingIOError if still held)


def test_a_lock_that_cannot_be_checked_says_why_and_the_coordinator_is_degraded() -> None:
    """The PostgreSQL server gone while nothing is recorded: no intake error says so, so
    the lock's periodic check does (status said ok)."""
    lock = _PostgresLock(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    problem = lock.check()
    assert problem is not None
    assert problem.startswith("cannot reach the PostgreSQL ledger to lock it")
    health = Health()
    health.problem("lock", problem)
    assert (health.report().status, health.report().last_error) == ("degraded", problem)
    health.problem("lock", None)  # reached again, and locked
    assert health.report().status == "ok"

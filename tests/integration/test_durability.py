"""The ledger is the system of record: it must fsync. Check what SQLite really does."""

from __future__ import annotations

from pathlib import Path

from coordinator.ledger.store import open_ledger


def test_the_sqlite_ledger_uses_wal_with_full_sync(tmp_path: Path) -> None:
    ledger = open_ledger(str(tmp_path / "ledger.db"), create=True)
    try:
        datastore = ledger.recorder.datastore  # type: ignore[attr-defined]
        with datastore.transaction(commit=False) as cursor:
            cursor.execute("PRAGMA journal_mode")
            journal = cursor.fetchone()[0]
            cursor.execute("PRAGMA synchronous")
            synchronous = cursor.fetchone()[0]
    finally:
        ledger.close()
    assert journal == "wal"
    # 2 = FULL: in WAL mode every commit syncs the WAL, so an acknowledged (acked) intake
    # message is on disk before its ack; NORMAL (1) could lose the last commits on power loss.
    assert synchronous == 2

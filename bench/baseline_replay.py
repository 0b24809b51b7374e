"""Replay figures over a ledger: ``ledgermesh replay --verify`` as a user runs it, and
baseline (c), the raw notification-log read + decode through ``eventsourcing``.

(c′), the same over the log's rows as replay reads them (``Ledger.read_rows``): replay's
own cost beyond reading, apart from eventsourcing's Notification objects.

``replay --verify`` runs as a child process (the real CLI); its events/s come from the
``seconds`` it reports, which exclude interpreter start-up and opening the ledger.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import msgspec

from coordinator.ledger.store import open_ledger


def replay_verify(location: str, timeout: float = 300.0) -> dict[str, float]:
    """Run ``python -m ledgermesh replay --ledger L --verify --json``; events, s, events/s."""
    proc = subprocess.run([sys.executable, "-m", "ledgermesh", "replay", "--ledger", location,
                           "--verify", "--json"], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"replay --verify exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    report = json.loads(proc.stdout)
    if not report["verified"]:
        raise RuntimeError(f"replay --verify: chains not verified: {report['first_break']}")
    return {"events": report["events"], "seconds": report["seconds"],
            "events_per_s": report["events"] / max(report["seconds"], 1e-9)}


def raw_read_decode(location: str, page: int = 2000) -> dict[str, float]:
    """Read the whole notification log through eventsourcing and decode every state."""
    decode = msgspec.json.Decoder().decode
    ledger = open_ledger(location, create=False)
    try:
        t0 = time.perf_counter()
        count = after = 0
        while notifications := ledger.read(after, page):
            for n in notifications:
                decode(n.state)
            count += len(notifications)
            after = notifications[-1].id
        seconds = time.perf_counter() - t0
    finally:
        ledger.close()
    return {"events": count, "seconds": seconds, "events_per_s": count / max(seconds, 1e-9)}


def rows_read_decode(location: str, page: int = 2000) -> dict[str, float]:
    """(c′): read the log's rows as replay does and decode every state."""
    decode = msgspec.json.Decoder().decode
    ledger = open_ledger(location, create=False)
    try:
        t0 = time.perf_counter()
        count = after = 0
        while rows := ledger.read_rows(after, page):
            for row in rows:
                decode(row[4])
            count += len(rows)
            after = rows[-1][0]
        seconds = time.perf_counter() - t0
    finally:
        ledger.close()
    return {"events": count, "seconds": seconds, "events_per_s": count / max(seconds, 1e-9)}

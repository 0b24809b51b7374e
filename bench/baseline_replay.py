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
from collections.abc import Callable, Iterator

import msgspec

from coordinator.ledger.hashcheck import log_pages
from coordinator.ledger.store import Ledger, open_ledger


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
    def states(ledger: Ledger) -> Iterator[list[bytes]]:
        after = 0
        while notifications := ledger.read(after, page):
            yield [n.state for n in notifications]
            after = notifications[-1].id

    return _timed_decode(location, states)


def rows_read_decode(location: str, page: int = 2000) -> dict[str, float]:
    """(c′): read the log's rows as replay does (``log_pages``) and decode every state."""
    def states(ledger: Ledger) -> Iterator[list[bytes]]:
        for rows in log_pages(ledger, ledger.last_position(), page):
            yield [row[4] for row in rows]

    return _timed_decode(location, states)


def _timed_decode(location: str,
                  states: Callable[[Ledger], Iterator[list[bytes]]]) -> dict[str, float]:
    """Events, seconds and events/s of reading ``states`` page by page and decoding each."""
    decode = msgspec.json.Decoder().decode
    ledger = open_ledger(location, create=False)
    try:
        t0 = time.perf_counter()
        count = 0
        for page in states(ledger):
            for state in page:
                decode(state)
            count += len(page)
        seconds = time.perf_counter() - t0
    finally:
        ledger.close()
    return {"events": count, "seconds": seconds, "events_per_s": count / max(seconds, 1e-9)}

"""What a sender refused without end costs the coordinator: ``python -m bench.refusals``.

One principal's submissions are refused (it may not submit) in batches of 1,000 through
``LedgerWriter.record``, the coordinator's real write path minus NATS, on a SQLite ledger
in a temporary directory. Prints the memory the writer holds (tracemalloc) as the refusals
grow, then what a restart costs: the writer's pass over the log, and that principal's
first message after it. Memory should stay flat however many refusals there are.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

from coordinator.ledger.store import Ledger, open_ledger
from coordinator.ledger.writer import IntakeMessage, LedgerWriter
from coordinator.policy import parse_policy
from schemas import Codec, Envelope, Subjects, SubmitTask

POLICY = parse_policy('submitters = ["client"]\n[agents.triage]\n', "bench refusals policy")
SUBJECTS = Subjects("lm")
NOW = datetime(2026, 1, 2, tzinfo=UTC)
BATCH = 1000


def refuse(writer: LedgerWriter, first: int, count: int) -> None:
    """``count`` submissions from ``mallory``, numbered from ``first``: each refused."""
    codec, subject = Codec(), SUBJECTS.intake("mallory")
    batch = []
    for seq in range(first, first + count):
        envelope = Envelope(id=f"m{seq}", sender="mallory", task_id=f"t{seq}", sent_at=NOW,
                            body=SubmitTask(to="triage", title="x"))
        batch.append(IntakeMessage(seq, subject, codec.encode(envelope), envelope.id))
    writer.record(batch)


def held_mb(base: int) -> float:
    gc.collect()
    return (tracemalloc.get_traced_memory()[0] - base) / 1e6


def run(total: int, ledger: Ledger) -> None:
    writer = LedgerWriter(ledger, POLICY, SUBJECTS, lambda: NOW)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    marks = {total // 4, total // 2, total}
    started = time.perf_counter()
    for first in range(1, total + 1, BATCH):
        refuse(writer, first, min(BATCH, total + 1 - first))
        done = min(first + BATCH - 1, total)
        if done in marks:
            print(f"{done:>9,} refusals: the writer holds +{held_mb(base):.2f} MB")
    tracemalloc.stop()
    print(f"recorded at {total / (time.perf_counter() - started):,.0f} refusals/s")
    started = time.perf_counter()
    restarted = LedgerWriter(ledger, POLICY, SUBJECTS, lambda: NOW)
    scanned = time.perf_counter()
    refuse(restarted, total + 1, 1)  # its first message after the restart
    print(f"restart: pass over the log {scanned - started:.2f} s; that principal's first "
          f"message after it {time.perf_counter() - scanned:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.refusals", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refusals", type=int, default=100_000,
                        help="how many refusals (default 100,000: ~20 s)")
    args = parser.parse_args()
    if args.refusals < BATCH:
        parser.error(f"--refusals: at least {BATCH}")
    root = "/dev/shm" if Path("/dev/shm").is_dir() else None  # no fsync cost to measure
    with tempfile.TemporaryDirectory(dir=root) as work:
        ledger = open_ledger(str(Path(work) / "ledger.db"), create=True)
        try:
            run(args.refusals, ledger)
        finally:
            ledger.close()


if __name__ == "__main__":
    main()

"""Baseline (a): the physical limit of this design on this machine.

The same 5-hop chain, with the least machinery that still has the design's shape: a
*recorder* process (the coordinator's role) and five *hop* processes (the agents), talking
plain core-NATS request/reply through nats-py — no JetStream, no eventsourcing, no
decisions, no hash chain. Every hop is one row, group-committed with raw ``sqlite3``
(WAL, synchronous=FULL) **before** the next hop is delivered:

    client ──req──▶ recorder ──commit──▶ reply + publish bl.hop.1
    hop k  ──req──▶ recorder ──commit──▶ reply + publish bl.hop.k+1   (k = 1..4)
    hop 5  ──req──▶ recorder ──commit──▶ reply + publish bl.done

Each hop process runs ``CONCURRENCY`` handlers at once, like an agent's default. The
recorder commits whatever arrived while the previous commit was running (group commit).
Per-hop latency is taken like the real system's: the time between two consecutive rows of
one task, both stamped by the recorder's clock.

Run a process: ``python -m bench.baseline_limit recorder|hop URL ...`` (started for you by
:func:`measure`).
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import nats

HOPS = 5
CONCURRENCY = 8
PAYLOAD = b"x" * 300  # about the size of a small envelope


# -- the processes ------------------------------------------------------------------------

async def _pong(msg: Any) -> None:
    await msg.respond(b"pong")


async def run_recorder(url: str, db: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS hops (id INTEGER PRIMARY KEY, task TEXT NOT NULL,"
                 " hop INTEGER NOT NULL, at REAL NOT NULL, body BLOB NOT NULL)")
    nc = await nats.connect(url, name="bl_recorder")
    pending: list[Any] = []
    wake = anyio.Event()

    async def on_request(msg: Any) -> None:
        pending.append(msg)
        wake.set()

    def commit(rows: list[tuple[str, int, float, bytes]]) -> None:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO hops (task, hop, at, body) VALUES (?, ?, ?, ?)", rows)
        conn.execute("COMMIT")

    await nc.subscribe("bl.rec", cb=on_request)
    await nc.subscribe("bl.ping", cb=_pong)
    await nc.flush()
    while True:
        await wake.wait()
        wake = anyio.Event()
        batch, pending[:] = list(pending), []
        rows = []
        now = time.time()
        for msg in batch:
            task, hop, body = msg.data.split(b"|", 2)
            rows.append((task.decode(), int(hop), now, body))
        # Inline: the recorder has nothing else to do meanwhile (requests wait in the
        # socket and make the next group). A thread hop measured slower here: anyio's
        # to_thread 7.0-8.6k handoffs/s, a dedicated thread 7.5-8.0k, inline 8.6-9.3k.
        commit(rows)
        for msg, (task, hop, _, body) in zip(batch, rows, strict=True):
            await msg.respond(b"ok")
            target = "bl.done" if hop == HOPS else f"bl.hop.{hop + 1}"
            await nc.publish(target, f"{task}|{hop + 1}|".encode() + body)


async def run_hop(url: str, index: int) -> None:
    nc = await nats.connect(url, name=f"bl_hop{index}")
    send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=10_000)

    async def on_delivery(msg: Any) -> None:
        await send.send(msg.data)

    async def work() -> None:
        async for data in receive.clone():
            task, _, body = data.split(b"|", 2)
            # The handler "says" and hands off: one request to the recorder, which answers
            # once the hop is committed (like a JetStream publish ack).
            await nc.request("bl.rec", task + f"|{index}|".encode() + body, timeout=30)

    await nc.subscribe(f"bl.hop.{index}", cb=on_delivery)
    await nc.subscribe(f"bl.ping.{index}", cb=_pong)
    await nc.flush()
    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(work)


# -- the measurement ------------------------------------------------------------------------

def _new_db(workdir: Path) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    return str(workdir / f"limit-{uuid.uuid4().hex[:6]}.db")


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "bench.baseline_limit", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


async def _wait_ready(nc: Any, subjects: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
    with anyio.fail_after(60):
        for subject in subjects:
            while True:
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a baseline process exited during start-up")
                try:
                    await nc.request(subject, b"", timeout=0.5)
                    break
                except Exception:  # not subscribed yet
                    await anyio.sleep(0.05)


class _Client:
    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.callbacks: dict[str, Callable[[float], None]] = {}

    async def on_done(self, msg: Any) -> None:
        now = time.perf_counter()
        callback = self.callbacks.pop(msg.data.split(b"|", 1)[0].decode(), None)
        if callback is not None:
            callback(now)

    async def closed_loop(self, tag: str, in_flight: int, tasks: int,
                          max_seconds: float) -> tuple[dict[str, float], dict[str, float]]:
        """Keep ``in_flight`` tasks going; submissions run concurrently with each other."""
        submitted: dict[str, float] = {}
        done: dict[str, float] = {}
        send, receive = anyio.create_memory_object_stream[str](max_buffer_size=tasks + 1)
        deadline = time.perf_counter() + max_seconds
        counter = 0
        outstanding = 0

        async def submit(task: str) -> None:
            await self.nc.request("bl.rec", f"{task}|0|".encode() + PAYLOAD, timeout=30)

        def start_one(tg: anyio.abc.TaskGroup) -> None:
            nonlocal counter, outstanding
            counter += 1
            outstanding += 1
            task = f"{tag}-{counter}"

            def finished(when: float, task: str = task) -> None:
                done[task] = when
                send.send_nowait(task)

            self.callbacks[task] = finished
            submitted[task] = time.perf_counter()
            tg.start_soon(submit, task)

        def more() -> bool:
            return counter < tasks and time.perf_counter() < deadline

        with anyio.fail_after(max_seconds + 60):
            async with anyio.create_task_group() as tg:
                while outstanding < in_flight and more():
                    start_one(tg)
                async for _ in receive:
                    outstanding -= 1
                    while outstanding < in_flight and more():
                        start_one(tg)
                    if outstanding == 0:
                        break
        return submitted, done


def _hop_latencies(db: str, tag: str) -> list[float]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT task, at FROM hops WHERE task LIKE ? ORDER BY id",
                            (f"{tag}-%",)).fetchall()
    finally:
        conn.close()
    by_task: dict[str, list[float]] = {}
    for task, at in rows:
        by_task.setdefault(task, []).append(at)
    out: list[float] = []
    for times in by_task.values():
        if len(times) == HOPS + 1:
            out += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    return out


def _rate(done: dict[str, float]) -> float:
    times = sorted(done.values())
    if len(times) < 10:
        return (len(times) - 1) / max(times[-1] - times[0], 1e-9) if len(times) > 1 else 0.0
    i, j = int(len(times) * 0.1), int(len(times) * 0.9) - 1
    return (j - i) / max(times[j] - times[i], 1e-9)


async def measure(url: str, workdir: Path, *, latency_tasks: int, throughput_tasks: int,
                  max_seconds: float) -> dict[str, Any]:
    """Start the recorder and five hop processes on ``url``; measure; stop them."""
    db = _new_db(workdir)
    procs = [_spawn(["recorder", url, db], workdir / "bl-recorder.log")]
    procs += [_spawn(["hop", url, str(i)], workdir / f"bl-hop{i}.log")
              for i in range(1, HOPS + 1)]
    try:
        nc = await nats.connect(url, name="bl_client")
        try:
            client = _Client(nc)
            await nc.subscribe("bl.done", cb=client.on_done)
            await _wait_ready(nc, ["bl.ping"] + [f"bl.ping.{i}" for i in range(1, HOPS + 1)],
                              procs)
            await client.closed_loop("warm", 8, 50, max_seconds)
            _, _lat_done = await client.closed_loop("lat", 1, latency_tasks, max_seconds)
            _, thr_done = await client.closed_loop("thr", 64, throughput_tasks, max_seconds)
        finally:
            await nc.drain()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "handoffs_per_s": _rate(thr_done) * HOPS,
        "hop_ms_1": _hop_latencies(db, "lat"),
        "hop_ms_64": _hop_latencies(db, "thr"),
    }


def main(argv: list[str]) -> None:
    role, url, *rest = argv
    if role == "recorder":
        anyio.run(run_recorder, url, rest[0])
    elif role == "hop":
        anyio.run(run_hop, url, int(rest[0]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])

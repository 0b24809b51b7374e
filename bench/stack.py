"""The real system under load: embedded nats-server, ``ledgermesh coordinator run`` and the
five chain agents, each its own OS process, driven by a client in this process.

Nothing here takes a shortcut the production path does not: tasks are submitted with
``agents.client.submit_task`` (a JetStream publish on the submitter's intake subject), the
coordinator records every message and handoff before the relay delivers it, and the
client learns that a task finished from the relayed ledger stream (``task.completed``).

Latency is measured two ways:

* **per hop, from the ledger**: a hop is the time between the ledger recording the
  assignment to hop *k* and recording the next assignment (or the completion after hop 5),
  i.e. relay → deliver → agent handler (say + handoff, two acked intake publishes) →
  intake → decide → commit. Both timestamps are ``recorded_at`` stamped by the one
  coordinator clock. Five samples per task.
* **end to end, at the client**: submit → ``task.completed`` observed, divided by 5 hops
  (reported as ``task_ms``; it also contains the relay of the completion to the client).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from agents.client import submit_task
from bench import chain
from bus.client import Bus, BusSettings, Observed, open_bus
from bus.embedded import open_embedded_nats
from coordinator.ledger.store import is_postgres, open_ledger
from coordinator.service import utc_now
from ledgermesh.processes import Child, spawn, stop_all, wait_ready
from schemas import Subjects

PREFIX = "bench"


class BenchError(RuntimeError):
    """The benchmark could not run to the end; the message says where."""


def read_proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (kB) of a process, from /proc; empty where /proc is not available."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 where /proc is not available)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Stack:
    bus: Bus
    subjects: Subjects
    ledger: str
    coordinator: Child
    children: list[Child]
    nats_version: str
    nats_pid: int

    def pids(self) -> dict[str, int]:
        return {"nats-server": self.nats_pid, **{c.name: c.pid for c in self.children}}

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids().items()}

    async def coordinator_health(self) -> dict[str, object] | None:
        raw = await self.bus.service_status(self.subjects.service("coordinator"))
        return None if raw is None else msgspec.json.decode(raw)

    async def events_recorded(self) -> int:
        health = await self.coordinator_health()
        return int(health["events_recorded"]) if health else -1  # type: ignore[call-overload]


@asynccontextmanager
async def open_stack(workdir: Path, ledger: str, *, agent_concurrency: int | None = None,
                     nats_config: Path | None = None) -> AsyncIterator[Stack]:
    """Embedded NATS (with ``nats_config``, if given) + coordinator + hop1..hop5, each its
    own process; stopped on exit."""
    subjects = Subjects(PREFIX)
    policy = chain.write_policy(workdir)
    logs = workdir / "logs"
    async with open_embedded_nats(workdir / "nats", config_file=nats_config) as server:
        common = ["--nats", server.url, "--prefix", PREFIX]
        children: list[Child] = []
        try:
            coordinator = spawn("coordinator", ["coordinator", "run", *common, "--ledger",
                                                ledger, "--config", str(policy)], logs)
            children.append(coordinator)
            extra = [] if agent_concurrency is None else ["--concurrency",
                                                          str(agent_concurrency)]
            for name in chain.NAMES:
                children.append(spawn(name, ["agent", "run", f"bench.chain:{name}", *common,
                                             *extra], logs))
            async with open_bus(BusSettings(url=server.url, name="bench_client")) as bus:
                await wait_ready(bus, subjects, children, timeout=60.0)
                yield Stack(bus, subjects, ledger, coordinator, children, server.version,
                            server.pid)
        finally:
            await stop_all(children)


# -- driving load ---------------------------------------------------------------------

@dataclass
class PhaseResult:
    """What one load phase observed at the client."""

    tag: str
    submitted: dict[str, float] = field(default_factory=dict)  # task id -> perf_counter
    done: dict[str, float] = field(default_factory=dict)
    failed: int = 0
    start_position: int = 0  # ledger events recorded before the phase began

    def completion_rate(self, lo: float = 0.1, hi: float = 0.9) -> float:
        """Tasks/s over the steady middle of the phase (completions lo..hi quantile)."""
        times = sorted(self.done.values())
        if len(times) < 10:
            if len(times) < 2:
                return 0.0
            return (len(times) - 1) / max(times[-1] - times[0], 1e-9)
        i, j = int(len(times) * lo), int(len(times) * hi) - 1
        return (j - i) / max(times[j] - times[i], 1e-9)

    def task_ms(self) -> list[float]:
        return [(self.done[t] - self.submitted[t]) * 1000 for t in self.done]


class Driver:
    """Submits tasks and learns of their completion from the relayed ledger stream."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self._waiting: dict[str, Callable[[str, float, bool], None]] = {}
        self._run = uuid.uuid4().hex[:6]

    @asynccontextmanager
    async def observing(self) -> AsyncIterator[None]:
        subjects = self.stack.subjects
        send, receive = anyio.create_memory_object_stream[Observed](max_buffer_size=100_000)
        async with anyio.create_task_group() as tg:
            for kind in ("task.completed", "task.failed", "task.dead_lettered"):
                await tg.start(self.stack.bus.serve_observe, subjects.ledger_stream,
                               f"{subjects.prefix}.ledger.task.*.{kind}", send.clone(), False)
            send.close()
            tg.start_soon(self._dispatch, receive)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def _dispatch(self, receive: MemoryObjectReceiveStream[Observed]) -> None:
        async with receive:
            async for message in receive:
                now = time.perf_counter()
                parts = message.subject.split(".")
                task_id, ok = parts[3], parts[-1] == "completed"
                callback = self._waiting.pop(task_id, None)
                if callback is not None:
                    callback(task_id, now, ok)

    def _start(self, tg: anyio.abc.TaskGroup, task_id: str, result: PhaseResult,
               done: MemoryObjectSendStream[str]) -> None:
        """Submit one task without waiting for its ack (submissions overlap)."""
        def finished(tid: str, when: float, ok: bool) -> None:
            if ok:
                result.done[tid] = when
            else:
                result.failed += 1
            done.send_nowait(tid)

        self._waiting[task_id] = finished
        result.submitted[task_id] = time.perf_counter()
        tg.start_soon(self._publish, task_id, len(result.submitted))

    async def _publish(self, task_id: str, n: int) -> None:
        await submit_task(self.stack.bus, self.stack.subjects, task_id=task_id, to="hop1",
                          title="bench chain", payload={"n": n},
                          principal=chain.SUBMITTER, msg_id=str(uuid.uuid4()), clock=utc_now)

    def _stuck(self, tag: str, result: PhaseResult, what: str) -> BenchError:
        return BenchError(f"{tag}: {what}; see logs in {self.stack.coordinator.log_file.parent}")

    async def closed_loop(self, tag: str, in_flight: int, *, tasks: int, max_seconds: float,
                          on_progress: Callable[[int], object] | None = None) -> PhaseResult:
        """Keep ``in_flight`` tasks going until ``tasks`` were submitted (or time is up)."""
        result = PhaseResult(tag, start_position=await self.stack.events_recorded())
        send, receive = anyio.create_memory_object_stream[str](max_buffer_size=tasks + 1)
        deadline = time.perf_counter() + max_seconds
        counter = outstanding = 0

        def top_up(tg: anyio.abc.TaskGroup) -> None:
            nonlocal counter, outstanding
            while (outstanding < in_flight and counter < tasks
                   and time.perf_counter() < deadline):
                counter += 1
                outstanding += 1
                self._start(tg, f"{tag}-{self._run}-{counter}", result, send)

        with anyio.move_on_after(max_seconds + 60) as scope:
            async with anyio.create_task_group() as tg:
                top_up(tg)
                async for _ in receive:
                    outstanding -= 1
                    if on_progress is not None:
                        on_progress(len(result.done))
                    top_up(tg)
                    if outstanding == 0:
                        break
        if scope.cancelled_caught:
            raise self._stuck(tag, result, f"{outstanding} tasks did not finish")
        if result.failed:
            raise self._stuck(tag, result, f"{result.failed} tasks failed")
        return result

    async def open_loop(self, tag: str, rate: float, *, seconds: float) -> PhaseResult:
        """Submit at a fixed rate (tasks/s) for ``seconds``, then wait for all to finish."""
        result = PhaseResult(tag, start_position=await self.stack.events_recorded())
        count = max(int(rate * seconds), 1)
        send, receive = anyio.create_memory_object_stream[str](max_buffer_size=count + 1)
        with anyio.move_on_after(seconds + 60) as scope:
            async with anyio.create_task_group() as tg:
                start = time.perf_counter()
                for i in range(count):
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    self._start(tg, f"{tag}-{self._run}-{i + 1}", result, send)
                finished = 0
                async for _ in receive:
                    finished += 1
                    if finished >= count:
                        break
        if scope.cancelled_caught:
            raise self._stuck(tag, result, f"{count - len(result.done)} of {count} tasks did "
                                           "not finish")
        if result.failed:
            raise self._stuck(tag, result, f"{result.failed} tasks failed")
        return result


# -- reading the ledger afterwards ----------------------------------------------------------

_decoder = msgspec.json.Decoder()


def hop_latencies_ms(ledger_location: str, phases: list[PhaseResult]) -> dict[str, list[float]]:
    """Per-hop latencies (ms) for each phase's tasks, from ``recorded_at`` in the ledger."""
    wanted = {t: p.tag for p in phases for t in p.done}
    stamps: dict[str, list[datetime]] = {}
    after = min((p.start_position for p in phases), default=0)
    ledger = open_ledger(ledger_location, create=False)
    try:
        while notifications := ledger.read(after, 5000):
            for n in notifications:
                after = n.id
                state = _decoder.decode(n.state)
                if state["aggregate"] != "task" or state["key"] not in wanted:
                    continue
                if state["kind"] in ("task.assigned", "task.completed"):
                    stamps.setdefault(state["key"], []).append(
                        datetime.fromisoformat(state["recorded_at"]))
    finally:
        ledger.close()
    out: dict[str, list[float]] = {p.tag: [] for p in phases}
    for task_id, times in stamps.items():
        if len(times) != chain.HOPS + 1:
            continue
        out[wanted[task_id]] += [(b - a).total_seconds() * 1000
                                 for a, b in itertools.pairwise(times)]
    return out


def ledger_bytes(location: str) -> int:
    """Bytes the ledger occupies: SQLite file + WAL, or PostgreSQL relation sizes."""
    if is_postgres(location):
        from bench.pg import schema_bytes

        return schema_bytes(location)
    total = 0
    for suffix in ("", "-wal"):
        path = Path(location + suffix)
        if path.exists():
            total += os.path.getsize(path)
    return total

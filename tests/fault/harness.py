"""The fault suite's harness: processes, a workload, faults, a history, a checker.

- ``Deployment`` runs the coordinator and agents as OS processes (``python -m ledgermesh``,
  the way they are deployed), each with its own log file and environment (crash points
  are armed through ``LEDGERMESH_CRASH_AT`` in one child's environment only).
- ``workload`` makes a reproducible mix of tasks; ``Client`` submits them (retrying with
  the same message id until JetStream acks), and ``observe`` reads the relayed ledger the
  way a subscriber would. Both append what they did and saw to ``History`` (JSONL), as do
  the agents (``tests/fault/workload.py``) and the fault injector.
- ``drain`` waits until the faults healed and the system is idle; ``check`` then asserts
  the invariants from the history, the ledger and the LM_LEDGER stream, prints a summary
  and saves it as JSON (``REPORT_DIR/<scenario>.json`` and ``REPORT_DIR/summary.json``).
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
from anyio.abc import SocketStream, TaskStatus
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from bus import faults
from bus.client import Bus, BusError, BusSettings, open_bus
from bus.embedded import EmbeddedNats, free_port
from bus.topology import coordinator_consumer
from coordinator.ledger.events import Kind
from coordinator.ledger.replay import replay
from coordinator.ledger.store import open_ledger
from ledgermesh.processes import Child, stop_all, wait_ready
from schemas import Codec, Envelope, LedgerRecord, Subjects, SubmitTask

from .workload import HISTORY_ENV

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = "tests.fault.workload"
REPORT_DIR = Path(os.environ.get("LEDGERMESH_FAULT_REPORTS",
                                 Path(tempfile.gettempdir()) / "ledgermesh-fault"))
CRASH_ENV = faults.ENV  # LEDGERMESH_CRASH_AT=point[@substring]
CRASH_EXIT = faults.EXIT_CODE  # what a process reaching an armed crash point exits with
TERMINAL = ("completed", "failed")

POLICY = """\
submitters = ["client"]
retry_backoff_s = 0.2

[agents.worker]
handoff_to = ["finisher"]
deadline_s = {deadline}
max_attempts = {attempts}

[agents.finisher]
deadline_s = {deadline}
max_attempts = {attempts}

[agents.flaky]
deadline_s = {deadline}
max_attempts = 3

[agents.ghost]  # declared but never run: its tasks time out and are dead-lettered
deadline_s = 1
max_attempts = 2
"""


def policy_text(deadline_s: float = 3.0, max_attempts: int = 4) -> str:
    return POLICY.format(deadline=deadline_s, attempts=max_attempts)


# -- history --------------------------------------------------------------------------
class History:
    """What every client saw, one JSON object a line, appended atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.started = time.time()

    def write(self, op: str, process: str = "client", **fields: Any) -> None:
        line = {"at": time.time(), "process": process, "op": op, **fields}
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


# -- processes and faults ---------------------------------------------------------------
class Deployment:
    """One ledgermesh deployment under its own prefix: coordinator and agents as processes.

    Also the fault injector: every fault it applies is written to the history.
    """

    def __init__(self, nats_url: str, subjects: Subjects, root: Path, history: History,
                 policy: str) -> None:
        self.nats_url = nats_url
        self.subjects = subjects
        self.root = root
        self.history = history
        self.ledger = root / "ledger.db"
        self.policy_file = root / "ledgermesh.toml"
        self.policy_file.write_text(policy)
        self.logs = root / "logs"
        self.children: list[Child] = []
        self.exits: list[dict[str, Any]] = []
        self.faults: list[str] = []
        self._serial: Counter[str] = Counter()

    def _spawn(self, name: str, args: list[str], env: dict[str, str], *,
               nats_url: str | None = None) -> Child:
        self._serial[name] += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        log_file = self.logs / f"{name}-{self._serial[name]}.log"
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("LEDGERMESH_NKEY", CRASH_ENV)}
        child_env.update({
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            HISTORY_ENV: str(self.history.path),
            **env,
        })
        with log_file.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "ledgermesh", *args, "--nats", nats_url or self.nats_url,
                 "--prefix", self.subjects.prefix],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                cwd=self.root)
        child = Child(name, process, log_file, service=name)
        self.children.append(child)
        self.history.write("spawn", process="nemesis", name=name, pid=child.pid,
                           log=str(log_file),
                           env={k: v for k, v in env.items()})
        return child

    def coordinator(self, crash_at: str | None = None, *, nats_url: str | None = None) -> Child:
        """``nats_url``: another way to the server (a proxy) for this process alone."""
        env = {CRASH_ENV: crash_at} if crash_at else {}
        return self._spawn("coordinator", ["coordinator", "run", "--ledger", str(self.ledger),
                                           "--config", str(self.policy_file)], env,
                           nats_url=nats_url)

    def agent(self, name: str, crash_at: str | None = None, *,
              nats_url: str | None = None) -> Child:
        env = {CRASH_ENV: crash_at} if crash_at else {}
        return self._spawn(name, ["agent", "run", f"{WORKLOAD}:{name}"], env,
                           nats_url=nats_url)

    def submit_cli(self, task_id: str, to: str) -> Child:
        """``ledgermesh submit`` as a user runs it: it waits for the ledger's verdict."""
        return self._spawn(f"submit-{task_id}", ["submit", "--to", to, "--title", task_id,
                                                 "--task-id", task_id], {})

    def tail_cli(self) -> Child:
        """``ledgermesh tail --json --from-start`` as a user leaves it running."""
        return self._spawn("tail", ["tail", "--json", "--from-start"], {})

    async def ready(self, bus: Bus, *children: Child) -> None:
        await wait_ready(bus, self.subjects, list(children), timeout=30.0)

    def running(self, name: str) -> list[Child]:
        return [c for c in self.children if c.name == name and c.alive()]

    # -- faults ---------------------------------------------------------------------
    def fault(self, what: str, **fields: Any) -> None:
        self.faults.append(what)
        self.history.write("fault", process="nemesis", what=what, **fields)

    def kill9(self, child: Child) -> int:
        return self.signal(child, signal.SIGKILL)

    def signal(self, child: Child, how: signal.Signals) -> int:
        """Send ``how`` (SIGKILL: kill -9, SIGTERM: a routine stop) and wait for the exit."""
        what = "kill -9" if how == signal.SIGKILL else f"kill -{how.name}"
        self.fault(f"{what} {child.name}", pid=child.pid)
        child.process.send_signal(how)
        return self.reap(child)

    def reap(self, child: Child) -> int:
        code = child.process.wait()
        self.exits.append({"name": child.name, "pid": child.pid, "code": code})
        self.history.write("exit", process="nemesis", name=child.name, pid=child.pid,
                           code=code)
        return code

    async def exited(self, child: Child) -> int:
        """Until ``child`` exits on its own (a crash point); its exit code."""
        await until(lambda: not child.alive(), within=20.0)
        return self.reap(child)

    def pause(self, child: Child) -> None:
        self.fault(f"SIGSTOP {child.name}", pid=child.pid)
        os.kill(child.pid, signal.SIGSTOP)

    def resume(self, child: Child) -> None:
        self.fault(f"SIGCONT {child.name}", pid=child.pid)
        os.kill(child.pid, signal.SIGCONT)

    def limit_writes(self, child: Child, max_bytes: int) -> None:
        """A real write failure in a running process: RLIMIT_FSIZE on it (prlimit(2)).

        Python ignores SIGXFSZ, so a write past ``max_bytes`` into any file fails with
        EFBIG (a short write), which SQLite reports like a full disk: the commit fails.
        """
        self.fault(f"RLIMIT_FSIZE={max_bytes} on {child.name}", pid=child.pid)
        resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (max_bytes, resource.RLIM_INFINITY))

    def unlimit_writes(self, child: Child) -> None:
        self.fault(f"RLIMIT_FSIZE=unlimited on {child.name}", pid=child.pid)
        resource.prlimit(child.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    async def stop(self) -> list[dict[str, Any]]:
        """SIGTERM whatever still runs (SIGCONT first); their exit codes."""
        alive = [c for c in self.children if c.alive()]
        for child in alive:
            os.kill(child.pid, signal.SIGCONT)
        await stop_all(alive)
        stopped = [{"name": c.name, "pid": c.pid, "code": c.process.returncode}
                   for c in alive]
        for entry in stopped:
            self.history.write("exit", process="nemesis", **entry)
        return stopped


class SilentPartition:
    """A TCP proxy in front of nats-server. ``cut`` makes every connection through it so
    far go silent both ways without closing: no FIN, no RST, as when a NAT entry is
    dropped or a link fails somewhere between. Neither end is told; connections made
    after the cut pass."""

    def __init__(self, upstream: EmbeddedNats) -> None:
        self._upstream = upstream
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._cuts = 0  # a connection made before the last cut is silent

    def cut(self) -> None:
        self._cuts += 1

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        async with listener:
            task_status.started()
            await listener.serve(self._forward)

    async def _forward(self, client: SocketStream) -> None:
        made = self._cuts
        server = await anyio.connect_tcp(self._upstream.host, self._upstream.port)
        async with client, server, anyio.create_task_group() as tg:
            tg.start_soon(self._pipe, client, server, made)
            tg.start_soon(self._pipe, server, client, made)

    async def _pipe(self, source: SocketStream, sink: SocketStream, made: int) -> None:
        with suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                chunk = await source.receive()
                if self._cuts != made:
                    await anyio.sleep_forever()  # hold both sockets open, pass nothing
                await sink.send(chunk)


# -- workload ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    to: str
    input: dict[str, Any]

    @property
    def title(self) -> str:
        return f"fault suite task {self.task_id}"


def workload(tag: str, n: int, seed: int, *, flaky: float = 0.0, ghost: float = 0.0,
             handoff: float = 0.3) -> list[TaskSpec]:
    """``n`` tasks: plain ones (say 0-2 things, complete), handoffs worker → finisher, and
    optionally tasks for the agent that always raises or the one that never runs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        roll = rng.random()
        task_id = f"{tag}-{i:03d}"
        if roll < flaky:
            out.append(TaskSpec(task_id, "flaky", {}))
        elif roll < flaky + ghost:
            out.append(TaskSpec(task_id, "ghost", {}))
        elif roll < flaky + ghost + handoff:
            out.append(TaskSpec(task_id, "worker", {"says": rng.randint(0, 2),
                                                    "then": "finisher"}))
        else:
            out.append(TaskSpec(task_id, "worker", {"says": rng.randint(0, 2)}))
    return out


# -- the client ---------------------------------------------------------------------------
_codec = Codec()


class Client:
    """Submits tasks as principal ``client``; one envelope per task, resent as is (same id,
    same bytes) until JetStream acks it or ``give_up_s`` passes."""

    principal = "client"

    def __init__(self, bus: Bus, subjects: Subjects, history: History) -> None:
        self.bus = bus
        self.subjects = subjects
        self.history = history
        self.specs: dict[str, TaskSpec] = {}
        self.envelopes: dict[str, bytes] = {}  # msg id -> bytes as sent
        self.msg_ids: dict[str, str] = {}  # task id -> msg id
        self.acked: dict[str, int] = {}  # task id -> intake stream seq
        self.failed: set[str] = set()
        self.tries = 0

    def envelope(self, spec: TaskSpec) -> tuple[str, bytes]:
        if spec.task_id not in self.msg_ids:
            msg_id = uuid_for(spec.task_id)
            env = Envelope(id=msg_id, sender=self.principal, task_id=spec.task_id,
                           sent_at=datetime.now(UTC),
                           body=SubmitTask(to=spec.to, title=spec.title, payload=spec.input))
            self.specs[spec.task_id] = spec
            self.msg_ids[spec.task_id] = msg_id
            self.envelopes[msg_id] = _codec.encode(env)
        msg_id = self.msg_ids[spec.task_id]
        return msg_id, self.envelopes[msg_id]

    async def submit(self, spec: TaskSpec, give_up_s: float = 30.0) -> bool:
        msg_id, data = self.envelope(spec)
        deadline = time.monotonic() + give_up_s
        attempt = 0
        while True:
            attempt += 1
            self.tries += 1
            try:
                ack = await self.bus.publish(self.subjects.intake(self.principal), data,
                                             msg_id=msg_id)
            except (BusError, TimeoutError) as exc:
                self.history.write("submit", task_id=spec.task_id, msg_id=msg_id,
                                   to=spec.to, try_=attempt, ok=False,
                                   error=f"{type(exc).__name__}: {exc}")
                if time.monotonic() > deadline:
                    self.failed.add(spec.task_id)
                    return False
                await anyio.sleep(0.25)
                continue
            self.acked[spec.task_id] = ack.seq
            self.failed.discard(spec.task_id)
            self.history.write("submit", task_id=spec.task_id, msg_id=msg_id, to=spec.to,
                               try_=attempt, ok=True, seq=ack.seq, duplicate=ack.duplicate)
            return True

    async def submit_all(self, specs: Sequence[TaskSpec], *, concurrency: int = 8,
                         pace_s: float = 0.0) -> None:
        slots = anyio.Semaphore(concurrency)

        async def one(spec: TaskSpec) -> None:
            async with slots:
                await self.submit(spec)

        async with anyio.create_task_group() as tg:
            for spec in specs:
                tg.start_soon(one, spec)
                if pace_s:
                    await anyio.sleep(pace_s)

    async def resend(self, subject_principal: str, data: bytes, msg_id: str) -> bool:
        """Publish bytes again under ``msg_id`` (a duplicate the dedup window forgot)."""
        ack = await self.bus.publish(self.subjects.intake(subject_principal), data,
                                     msg_id=msg_id)
        self.history.write("resend", principal=subject_principal, msg_id=msg_id,
                           seq=ack.seq, duplicate=ack.duplicate)
        return ack.duplicate


def uuid_for(task_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ledgermesh-fault:{task_id}"))


# -- reading NATS -----------------------------------------------------------------------
class Inspector:
    """A raw nats-py connection for reading streams (what observers and the checker see)."""

    def __init__(self, nc: NatsClient, subjects: Subjects) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=3.0)
        self.subjects = subjects

    @classmethod
    async def connect(cls, url: str, subjects: Subjects) -> Inspector:
        nc = await nats.connect(url, name=f"{subjects.prefix}-inspector",
                                max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                allow_reconnect=True)
        return cls(nc, subjects)

    async def close(self) -> None:
        await self.nc.close()

    async def last_seq(self, stream: str) -> int:
        info = await self.js.stream_info(stream)
        return int(info.state.last_seq)

    async def messages(self, stream: str, after: int = 0) -> list[Any]:
        info = await self.js.stream_info(stream)
        out = []
        for seq in range(max(after + 1, info.state.first_seq), info.state.last_seq + 1):
            out.append(await self.js.get_msg(stream, seq=seq))
        return out

    async def intake_pending(self) -> int:
        """Intake messages not yet acked by the coordinator (delivered or not)."""
        spec = coordinator_consumer(self.subjects)
        info = await self.js.consumer_info(spec.stream, spec.durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def agent_backlog(self, agent: str) -> int:
        """Deliveries to ``agent`` not yet acked by it (delivered or not)."""
        info = await self.js.consumer_info(self.subjects.deliver_stream,
                                           self.subjects.agent_consumer(agent))
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def short_ack_wait(inspector: Inspector, seconds: float = 1.0) -> None:
    """Make the coordinator's intake consumer redeliver unacked messages after ``seconds``
    instead of 30, so a scenario sees its redeliveries happen (and handled) in time.

    The coordinator sets 30 s again whenever it starts: call this after each start.
    """
    spec = coordinator_consumer(inspector.subjects)
    config = (await inspector.js.consumer_info(spec.stream, spec.durable)).config
    config.ack_wait = seconds
    await inspector.js.add_consumer(spec.stream, config)


DEDUP_WINDOW = 0.2  # seconds: JetStream's duplicate window in the scenarios that shorten it


async def short_dedup_window(inspector: Inspector) -> None:
    """Create the streams before the coordinator does, with a 0.2 s duplicate window (the
    coordinator keeps existing streams as they are), so a copy sent again a moment later
    gets past JetStream's deduplication and only the ledger's own can stop it."""
    subjects = inspector.subjects
    for name, subject, retention in (
        (subjects.intake_stream, subjects.intake_all, api.RetentionPolicy.LIMITS),
        (subjects.deliver_stream, subjects.deliver_all, api.RetentionPolicy.WORK_QUEUE),
        (subjects.ledger_stream, subjects.ledger_all, api.RetentionPolicy.LIMITS),
    ):
        await inspector.js.add_stream(api.StreamConfig(
            name=name, subjects=[subject], retention=retention,
            storage=api.StorageType.FILE, duplicate_window=DEDUP_WINDOW))


async def observe(inspector: Inspector, history: History, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """A subscriber's reads: poll LM_LEDGER for new copies and note each one seen.

    Polling by sequence (not a push consumer) survives a server restart on its own: a
    read that fails is retried from where it left off.
    """
    seen = 0
    task_status.started()
    while True:
        try:
            for msg in await inspector.messages(inspector.subjects.ledger_stream, seen):
                record = msgspec.json.decode(msg.data, type=LedgerRecord)
                event = msgspec.json.decode(record.event)
                history.write("observe", process="observer", seq=msg.seq,
                              position=record.position, key=event["key"], kind=event["kind"],
                              msg_id=event["msg_id"], hash=event["hash"])
                seen = msg.seq
        except Exception as exc:
            history.write("observe_error", process="observer",
                          error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(0.5)
        await anyio.sleep(0.1)


# -- drain ------------------------------------------------------------------------------
def ledger_state(path: Path) -> tuple[dict[str, str], int, int]:
    """(task id -> status, last position, intake tracking position) from the ledger file.

    A submission the ledger rejected counts as a task with status ``rejected`` (under the
    submission's message id, since no task exists): that is its recorded outcome.
    """
    if not path.exists():
        return {}, 0, 0
    ledger = open_ledger(str(path), create=False)
    try:
        # Positions first, statuses after: the coordinator commits meanwhile, and statuses
        # older than the tracking position would show a task it recorded as never recorded
        # (lost) while everything looks idle.
        position, tracking = ledger.last_position(), ledger.tracking_position("intake")
        state = replay(ledger)
        statuses = {k: t.status for k, t in state.tasks.items()}
        for n in ledger.read(0, 1_000_000):
            event = msgspec.json.decode(n.state)
            if event["kind"] == Kind.REJECTED:
                statuses.setdefault(f"msg:{event['msg_id']}", "rejected")
        return statuses, position, tracking
    finally:
        ledger.close()


def outcome(statuses: dict[str, str], client: Client, task_id: str) -> str | None:
    """What the ledger says became of a submitted task (None: nothing recorded)."""
    return statuses.get(task_id) or statuses.get(f"msg:{client.msg_ids[task_id]}")


async def drain(dep: Deployment, client: Client, inspector: Inspector,
                within: float = 45.0, *, redelivered: bool = False) -> dict[str, Any]:
    """Until the system is idle: every acked task terminal, the relay caught up, and every
    intake message delivered to the coordinator and behind its tracking position.

    Messages still awaiting their ack may be redelivered later; behind the tracking
    position that is a no-op, so it is not waited for (it takes the consumer's ack wait,
    30 s) unless ``redelivered``: scenarios that shorten the ack wait (``short_ack_wait``)
    wait for every redelivery to be handled too. An acked task that is not in the ledger
    once all that holds can never be recorded any more: that is a loss, and waiting
    longer would not change it.
    """
    started = time.monotonic()
    spec = coordinator_consumer(dep.subjects)
    last: dict[str, Any] = {}
    with anyio.move_on_after(within):
        while True:
            statuses, position, tracking = await anyio.to_thread.run_sync(
                ledger_state, dep.ledger)
            open_tasks = sorted(t for t in client.acked
                                if outcome(statuses, client, t) not in (*TERMINAL, "rejected"))
            try:
                relayed = await inspector.last_seq(dep.subjects.ledger_stream)
                intake_last = await inspector.last_seq(dep.subjects.intake_stream)
                consumer = await inspector.js.consumer_info(spec.stream, spec.durable)
            except Exception as exc:
                last = {"error": f"{type(exc).__name__}: {exc}"}
                await anyio.sleep(0.2)
                continue
            # (The tracking position stays above the stream's end after the stream lost
            # its tail, until new messages reach past it: their sequences are reused.)
            idle = (relayed == position and tracking >= intake_last
                    and not consumer.num_pending
                    and not (redelivered and consumer.num_ack_pending))
            lost = [t for t in open_tasks if outcome(statuses, client, t) is None]
            last = {"open": open_tasks[:10], "open_count": len(open_tasks),
                    "lost": lost[:10], "position": position, "relayed": relayed,
                    "tracking": tracking, "intake_last": intake_last,
                    "intake_undelivered": consumer.num_pending,
                    "intake_unacked": consumer.num_ack_pending, "idle": idle}
            if idle and (not open_tasks or (lost and len(lost) == len(open_tasks))):
                break
            await anyio.sleep(0.2)
    last["drained"] = bool(last.get("idle")) and not last.get("open_count")
    last["seconds"] = round(time.monotonic() - started, 2)
    dep.history.write("drained", process="checker", **last)
    return last


# -- the checker ----------------------------------------------------------------------------
@dataclass
class Summary:
    scenario: str
    counts: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def violate(self, invariant: str, detail: str) -> None:
        if sum(v.startswith(invariant) for v in self.violations) < 20:  # keep it readable
            self.violations.append(f"{invariant}: {detail}")


async def check(scenario: str, dep: Deployment, client: Client, inspector: Inspector,
                drained: dict[str, Any], *, started: float,
                expect_open: Iterable[str] = ()) -> Summary:
    """Assert the invariants after the system drained; print and save the summary.

    1. every task whose submission was acked is completed or failed (dead letters fail);
    2. no message id is recorded twice, no task has two accepted results;
    3. the ledger's events and LM_LEDGER's copies agree one to one, in order;
    4. replay gives the same digest twice and every hash chain verifies.
    Plus what the history lets us check: every delivery an agent ran was recorded first
    (write-ahead), and every copy a subscriber saw is the ledger's event at that position.
    """
    summary = Summary(scenario)
    history = dep.history.read()
    ledger = open_ledger(str(dep.ledger), create=False)
    try:
        notifications = list(ledger.read(0, 1_000_000))
        first = replay(ledger)
        tracking = ledger.tracking_position("intake")
    finally:
        ledger.close()
    again = open_ledger(str(dep.ledger), create=False)  # a second, independent replay
    try:
        second = replay(again)
    finally:
        again.close()
    events = [msgspec.json.decode(n.state) for n in notifications]
    expect_open = set(expect_open)

    # 1. acked submissions reach a terminal state
    terminal: Counter[str] = Counter()
    rejected_ids = {e["msg_id"] for e in events if e["kind"] == Kind.REJECTED}
    for task_id, _seq in sorted(client.acked.items()):
        task = first.tasks.get(task_id)
        if task is None and client.msg_ids[task_id] in rejected_ids:
            terminal["rejected"] += 1  # the submission itself was refused, and recorded
            continue
        if task is None:
            summary.violate("1-terminal", f"acked task {task_id} is not in the ledger")
            continue
        terminal[task.status] += 1
        if task.status not in TERMINAL and task_id not in expect_open:
            summary.violate("1-terminal", f"acked task {task_id} is still {task.status} "
                                          f"(owner {task.owner}, attempt {task.attempt})")
    terminal["submit_gave_up"] = len(client.failed)

    # 2. no message recorded twice, at most one accepted result per task
    said = Counter(e["msg_id"] for e in events if e["sender"] != "coordinator")
    said_twice = {m: n for m, n in said.items() if n > 1}
    for msg_id, n in sorted(said_twice.items()):
        kinds = [(e["key"], e["kind"]) for e in events if e["msg_id"] == msg_id
                 and e["sender"] != "coordinator"]
        summary.violate("2-duplicate", f"message {msg_id} recorded {n} times: {kinds}")
    same = Counter((e["msg_id"], e["kind"], e["key"]) for e in events)
    repeated = {k: n for k, n in same.items() if n > 1}
    for (msg_id, kind, key), n in sorted(repeated.items()):
        summary.violate("2-duplicate", f"{kind} for {msg_id} on {key} recorded {n} times")
    per_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["aggregate"] == "task":
            per_task[e["key"]].append(e)
    double_results = 0
    for key, task_events in per_task.items():
        ends = [e for e in task_events if e["kind"] in (Kind.COMPLETED, Kind.FAILED)]
        if len(ends) > 1:
            double_results += 1
            summary.violate("2-one-result", f"task {key} ended {len(ends)} times: "
                                            f"{[e['kind'] for e in ends]}")
        if ends:
            after = task_events[task_events.index(ends[0]) + 1:]
            late = [e["kind"] for e in after if e["kind"] != Kind.REJECTED]
            if late:
                summary.violate("2-one-result", f"task {key} recorded {late} after it ended")

    # 3. LM_LEDGER holds exactly the ledger, in order
    copies = await inspector.messages(dep.subjects.ledger_stream)
    mismatched = 0
    if len(copies) != len(notifications):
        summary.violate("3-copies", f"{len(notifications)} ledger events but "
                                    f"{len(copies)} copies in {dep.subjects.ledger_stream}")
    for i, (msg, stored) in enumerate(zip(copies, notifications, strict=False), start=1):
        problem = None
        headers = msg.headers or {}
        record = msgspec.json.decode(msg.data, type=LedgerRecord)
        state = msgspec.json.decode(stored.state)
        if not (msg.seq == i == stored.id == record.position):
            problem = (f"stream seq {msg.seq} holds position {record.position}, ledger has "
                       f"{stored.id}")
        elif headers.get("Nats-Msg-Id") != dep.subjects.ledger_msg_id(stored.id):
            problem = f"Nats-Msg-Id {headers.get('Nats-Msg-Id')}"
        elif (bytes(record.event) != stored.state
              or record.version != stored.originator_version):
            problem = "copy differs from the stored event"
        elif msg.subject != dep.subjects.ledger(state["aggregate"], state["key"], state["kind"]):
            problem = f"subject {msg.subject}"
        if problem:
            mismatched += 1
            summary.violate("3-copies", f"position {stored.id}: {problem}")

    # 4. replay is deterministic and every chain verifies
    if first.digest != second.digest:
        summary.violate("4-replay", f"two replays disagree: {first.digest} ≠ {second.digest}")
    for b in first.breaks + second.breaks:
        summary.violate("4-replay", f"chain break at {b.position} ({b.kind}): {b.problem}")

    # 5. write-ahead: agents only ever ran deliveries the ledger had recorded
    recorded_deliveries = {e["data"]["delivery"]["id"]: e for e in events
                           if e["kind"] == Kind.ASSIGNED}
    runs = [h for h in history if h["op"] in ("start", "raise")]
    for run in runs:
        if run["delivery_id"] not in recorded_deliveries:
            summary.violate("5-write-ahead", f"{run['process']} ran delivery "
                                             f"{run['delivery_id']} the ledger never recorded")

    # 6. what subscribers read is what the ledger holds
    by_position = {n.id: msgspec.json.decode(n.state) for n in notifications}
    observed = [h for h in history if h["op"] == "observe"]
    bad_reads = 0
    for read in observed:
        event = by_position.get(read["position"])
        if event is None or event["hash"] != read["hash"] or read["seq"] != read["position"]:
            bad_reads += 1
            summary.violate("6-reads", f"observer read {read} but the ledger has {event}")

    # intake consumed: everything in the stream is behind the tracking position
    try:
        intake_last = await inspector.last_seq(dep.subjects.intake_stream)
    except Exception as exc:
        intake_last = -1
        summary.violate("drain", f"cannot read the intake stream: {exc}")
    if tracking < intake_last:  # (above it after the stream lost its tail: see drain)
        summary.violate("drain", f"intake tracking position {tracking}, stream last "
                                 f"{intake_last}")
    if not drained.get("drained"):
        summary.violate("drain", f"the system did not drain: {drained}")

    kinds_count = Counter(e["kind"] for e in events)
    rejected = Counter(e["data"]["code"] for e in events if e["kind"] == Kind.REJECTED)
    submits = [h for h in history if h["op"] == "submit"]
    summary.counts = {
        "tasks_submitted": len(client.msg_ids),
        "submissions_acked": len(client.acked),
        "submit_tries": len(submits),
        "submit_errors": sum(not h["ok"] for h in submits),
        "submissions_gave_up": len(client.failed),
        "tasks_in_ledger": len(first.tasks),
        "completed": terminal["completed"],
        "failed": terminal["failed"],
        "submissions_rejected": terminal["rejected"],
        "dead_lettered": kinds_count[Kind.DEAD_LETTERED],
        "open": sum(n for s, n in terminal.items()
                    if s not in (*TERMINAL, "rejected", "submit_gave_up")),
        "lost": len(client.acked) - sum(terminal.values()) + terminal["submit_gave_up"],
        "events": len(events),
        "relayed_copies": len(copies),
        "copy_mismatches": mismatched + abs(len(copies) - len(notifications)),
        "assignments": kinds_count[Kind.ASSIGNED],
        "timed_out": kinds_count[Kind.TIMED_OUT],
        "attempts_failed": kinds_count[Kind.ATTEMPT_FAILED],
        "rejections": dict(sorted(rejected.items())),
        "duplicate_msg_ids": len(set(said_twice) | {m for m, _, _ in repeated}),
        "double_results": double_results,
        "chain_breaks": len(first.breaks),
        "digest": first.digest,
        "digest_repeatable": first.digest == second.digest,
        "intake_tracking": tracking,
        "handler_runs": len(runs),
        "observed_copies": len(observed),
        "observed_mismatches": bad_reads,
        "faults": dep.faults,
        "exits": dep.exits,
        "drain_seconds": drained.get("seconds"),
        "seconds": round(time.monotonic() - started, 2),
    }
    return summary


def save(summary: Summary, dep: Deployment) -> None:
    """``REPORT_DIR/<scenario>.json`` (with a copy of the history next to it) and the
    scenario's entry in ``REPORT_DIR/summary.json``; each file replaced atomically, so a
    concurrent run can only overwrite an entry, never leave a torn file."""
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    history_copy = REPORT_DIR / f"{summary.scenario}.history.jsonl"
    payload = {"scenario": summary.scenario, "ok": not summary.violations,
               "violations": summary.violations, **summary.counts,
               "history": str(history_copy), "ledger": str(dep.ledger),
               "logs": str(dep.logs)}
    if dep.history.path.exists():
        _replace(history_copy, dep.history.path.read_bytes())
    _replace(REPORT_DIR / f"{summary.scenario}.json",
             (json.dumps(payload, indent=2) + "\n").encode())
    index = REPORT_DIR / "summary.json"
    try:
        everything = json.loads(index.read_text())
    except (OSError, ValueError):
        everything = {}
    everything[summary.scenario] = {k: v for k, v in payload.items()
                                    if k not in ("digest", "history", "ledger", "logs")}
    _replace(index, (json.dumps(everything, indent=2, sort_keys=True) + "\n").encode())
    c = summary.counts
    print(f"\n[{summary.scenario}] tasks {c['tasks_submitted']} (acked "
          f"{c['submissions_acked']}, submit errors {c['submit_errors']}): completed "
          f"{c['completed']}, failed {c['failed']} (dead-lettered {c['dead_lettered']}), "
          f"open {c['open']}, lost {c['lost']}; events {c['events']}, copies {c['relayed_copies']} "
          f"(mismatches {c['copy_mismatches']}); duplicates {c['duplicate_msg_ids']}, "
          f"double results {c['double_results']}, chain breaks {c['chain_breaks']}, "
          f"digest repeatable {c['digest_repeatable']}; rejections {c['rejections']}; "
          f"handler runs {c['handler_runs']}; faults {c['faults']}; "
          f"{len(summary.violations)} violations; {c['seconds']} s")
    for v in summary.violations:
        print(f"  VIOLATION {v}")


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def decode_raw(event: dict[str, Any]) -> bytes:
    return base64.b64decode(event["raw"])


def ledger_events(path: Path) -> list[dict[str, Any]]:
    ledger = open_ledger(str(path), create=False)
    try:
        return [msgspec.json.decode(n.state) for n in ledger.read(0, 1_000_000)]
    finally:
        ledger.close()


async def until(predicate: Any, within: float = 20.0, poll: float = 0.05) -> Any:
    """Poll a predicate (sync or async) until it returns something truthy; that value."""
    with anyio.fail_after(within):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await anyio.sleep(poll)


# -- one scenario's world -------------------------------------------------------------------
@dataclass
class World:
    scenario: str
    dep: Deployment
    client: Client
    inspector: Inspector
    bus: Bus
    started: float

    @property
    def history(self) -> History:
        return self.dep.history

    async def verify(self, *, drain_within: float = 45.0, redelivered: bool = False,
                     expect_open: Iterable[str] = ()) -> Summary:
        """Drain, check the invariants (on the running system: a clean stop records a
        final checkpoint that is relayed only at the next start), then stop every process
        and check that each stopped cleanly."""
        drained = await drain(self.dep, self.client, self.inspector, drain_within,
                              redelivered=redelivered)
        summary = await check(self.scenario, self.dep, self.client, self.inspector, drained,
                              started=self.started, expect_open=expect_open)
        stopped = await self.dep.stop()
        for entry in stopped:
            if entry["code"] != 0:
                summary.violate("clean-stop", f"{entry['name']} (pid {entry['pid']}) exited "
                                              f"{entry['code']} on SIGTERM")
        summary.counts["stopped"] = stopped
        summary.counts["seconds"] = round(time.monotonic() - self.started, 2)
        save(summary, self.dep)
        return summary


async def degraded(w: World) -> dict[str, Any]:
    """The coordinator's status report, once it says it is degraded."""
    with anyio.fail_after(10):
        while True:
            reply = await w.bus.service_status(w.dep.subjects.service("coordinator"))
            status: dict[str, Any] = msgspec.json.decode(reply) if reply else {}
            if status.get("status") == "degraded":
                return status
            await anyio.sleep(0.1)


@asynccontextmanager
async def open_world(scenario: str, nats_url: str, prefix: str, root: Path, *,
                     policy: str | None = None,
                     request_timeout: float = 2.0) -> AsyncIterator[World]:
    """A deployment, a client and an observer for one scenario; everything stopped after.

    The ledger, logs and history go in ``root`` (the test's own tmp_path: concurrent runs
    never share a ledger), where they stay for a post-mortem.
    """
    subjects = Subjects(prefix)
    root.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a local tmp dir, once
    history = History(root / "history.jsonl")
    dep = Deployment(nats_url, subjects, root, history, policy or policy_text())
    started = time.monotonic()
    inspector = await Inspector.connect(nats_url, subjects)
    settings = BusSettings(url=nats_url, name=f"{prefix}-client",
                           request_timeout=request_timeout)
    try:
        async with open_bus(settings) as bus, anyio.create_task_group() as tg:
            world = World(scenario, dep, Client(bus, subjects, history), inspector, bus,
                          started)
            try:
                tg.start_soon(observe, inspector, history)
                yield world
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await dep.stop()
    finally:
        with anyio.CancelScope(shield=True):
            await inspector.close()

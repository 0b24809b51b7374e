"""``ledgermesh demo``: the whole system on this machine, end to end.

Embedded NATS, the coordinator and each example agent as its own OS process; submit a few
tasks, watch them move through the team, stop everything, then replay and audit the ledger.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

import agents.examples
from agents.client import submit_task
from bus.client import Bus, BusSettings, Observed, open_bus
from bus.embedded import EmbeddedNats, open_embedded_nats
from bus.faults import EXIT_CODE as CRASH_EXIT
from coordinator.ledger.owner import LedgerInUseError, sole_writer
from coordinator.ledger.replay import replay
from coordinator.ledger.store import open_ledger
from coordinator.policy import load_policy
from coordinator.service import utc_now
from ledgermesh.audit import audit_task, render_audit
from ledgermesh.auth import (
    COORDINATOR,
    OBSERVER,
    TOOLS,
    GeneratedAuth,
    generate,
    load_credentials,
    write_server_config,
)
from ledgermesh.live import bus_settings
from ledgermesh.processes import Child, spawn, stop_all, wait_ready
from ledgermesh.style import Style, short, stdout_style
from schemas import LedgermeshError, LedgerRecord, Subjects

TEAM = ("triage", "researcher", "writer", "reviewer")
QUESTIONS = (
    "Can I get a refund for order 1182?",
    "When will my shipping confirmation arrive?",
    "How do I reset my password?",
    "Where is my invoice for March?",
    "Is my keyboard still under warranty?",
)
POLICY = Path(agents.examples.__file__).parent / "ledgermesh.toml"
CLIENT = "client"  # the demo's submitter (a `submitters` principal of the policy)
MARKER = ".ledgermesh-demo"
# The first research attempt of the warranty task runs at attempt 2 (submit=1, triage → 2).
CRASH = {"LEDGERMESH_CRASH_AT": 'agent.handler@warranty@"attempt":2'}


class DemoError(LedgermeshError):
    """The demo could not run to the end; the message says where it stopped."""


class DemoResult(msgspec.Struct, frozen=True, kw_only=True):
    tasks_submitted: int
    tasks_completed: int
    tasks_failed: int
    events: int
    rejected: int
    digest: str
    verified: bool
    unsigned: int  # events no signed checkpoint covers (the stop signs them: 0)
    ledger: str
    nats_url: str
    seconds: float
    exited: dict[str, int] = {}  # processes that died while the tasks ran: their exit codes


@dataclass
class Board:
    """What the demo knows of each task, from the relayed ledger stream."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: int = 0
    rejected: int = 0
    notices: list[str] = field(default_factory=list)  # what went wrong, as it happened
    exited: dict[str, int] = field(default_factory=dict)  # processes that died: exit code

    def apply(self, event: dict[str, Any]) -> str | None:
        """Fold one relayed event; returns the task id if that task just finished."""
        self.events += 1
        if event["kind"] == "message.rejected":
            self.rejected += 1
        if event["aggregate"] != "task":
            return None
        notice = _notice(event)
        if notice is not None:
            self.notices.append(notice)
        task = self.tasks.setdefault(event["key"], {"status": "submitted", "owner": "",
                                                    "hops": 0, "last": ""})
        data = event["data"]
        kind = event["kind"]
        if kind == "task.assigned":
            task["owner"] = data["agent"]
        elif kind == "handoff.requested":
            task["hops"] += 1
            task["last"] = f"{event['sender']} → {data['to']}: {data['reason']}"
        elif kind == "handoff.declined":
            task["last"] = f"{event['sender']} → {data['to']}: declined \"{data['reason']}\""
        elif kind in ("task.completed", "task.failed"):
            task["status"] = "completed" if kind == "task.completed" else "failed"
            task["owner"] = ""
            task["last"] = f"{event['sender']} → {task['status']}"
            return str(event["key"])
        return None

    def done(self) -> int:
        return sum(1 for t in self.tasks.values() if t["status"] != "submitted")


def _notice(event: dict[str, Any]) -> str | None:
    """A line worth showing live: failures handled, policy enforced."""
    data, key = event["data"], short(event["key"], 11)
    if event["kind"] == "attempt.timed_out":
        again = ("retrying (another instance may take it)" if data.get("retry_at")
                 else "no tries left")
        return (f"  {key:<12} {data['agent']} missed its deadline (try {data['tries']} of "
                f"this step) — {again}")
    if event["kind"] == "tool.denied":
        return (f"  {key:<12} {event['data']['tool']} DENIED ({data['rule']}): task labelled "
                f"{', '.join(data['task_labels']) or '—'}")
    if event["kind"] == "task.dead_lettered":
        return f"  {key:<12} dead-lettered: {data['reason']}"
    return None


def run_demo(data_dir: Path, tasks: int, *, as_json: bool, timeout: float = 120.0,
             auth: bool = True) -> int:
    style = stdout_style()
    say = (lambda _text="": None) if as_json else style.out
    prepare(data_dir)
    result = anyio.run(_run, data_dir, tasks, style, say, timeout, auth)
    if as_json:
        print(msgspec.json.encode(result).decode())
    return 0 if result.verified and result.tasks_completed == tasks else 1


def prepare(data_dir: Path) -> None:
    """Start from an empty demo directory; never delete a directory the demo did not make."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DemoError(f"--data-dir {data_dir} is a file, not a directory; pass a new or "
                        "demo-made directory")
    if data_dir.exists() and any(data_dir.iterdir()):
        if not (data_dir / MARKER).exists():
            raise DemoError(f"{data_dir} exists and was not made by the demo; "
                            "pass --data-dir with a new or demo-made directory")
        try:  # another demo's coordinator still writing there: not to be pulled from under it
            with sole_writer(str(data_dir / "ledger.db")):
                pass
        except LedgerInUseError as exc:
            raise DemoError(f"another demo is running in {data_dir} ({exc}); wait for it, or "
                            "pass --data-dir with another directory") from None
        shutil.rmtree(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / MARKER).write_text("made by ledgermesh demo; deleted by the next demo run\n")
    except OSError as exc:
        raise DemoError(f"cannot make the demo's directory {data_dir}: "
                        f"{exc.strerror or exc}") from None


async def _run(data_dir: Path, count: int, style: Style, say: Any, timeout: float,
               auth: bool) -> DemoResult:
    ledger_path = data_dir / "ledger.db"
    subjects = Subjects("lm")
    started = time.monotonic()
    policy = load_policy(POLICY)  # fail early, in this process, on a broken policy file
    # With auth: one NATS account and nkey per process, as in production (ledgermesh/auth.py);
    # JetStream comes from the embedded server's -js -sd flags.
    creds = generate(policy, subjects, data_dir / "auth", source=str(POLICY)) if auth else None
    config = write_server_config(data_dir / "nats.conf", creds) if creds is not None else None
    async with open_embedded_nats(data_dir / "nats", config_file=config) as nats_server:
        say(f"{style.bold('ledgermesh demo')} — embedded NATS {nats_server.version} on "
            f"{nats_server.host}:{nats_server.port}, ledger {ledger_path}")
        if creds is not None:
            say(f"  auth on: {len(creds.seeds)} NATS accounts, one nkey each "
                f"({creds.config.parent}); --no-auth to compare")
        children: list[Child] = []
        try:
            children = _start_services(nats_server, ledger_path, data_dir / "logs", creds)
            agents_line = " ".join(f"{c.name}({c.pid})" for c in children[1:-1])
            say(f"  started coordinator (pid {children[0].pid}), {len(children) - 2} agent "
                f"processes: {agents_line}, and a tool host ({children[-1].pid})")
            # The demo itself is two principals: the observer (pings services, reads the
            # ledger) and the client that submits tasks.
            async with (open_bus(_settings(nats_server, "lm_demo", creds, subjects, OBSERVER))
                        as observer,
                        open_bus(_settings(nats_server, "lm_demo_client", creds, subjects,
                                           CLIENT)) as client):
                await wait_ready(observer, subjects, children)
                board = await _drive(observer, client, subjects, count, style, say, timeout,
                                     children)
        finally:
            await stop_all(children)
        say(f"  stopped {len(children)} processes; logs in {data_dir / 'logs'}")
    return _finish(ledger_path, board, count, style, say, nats_server, started)


def _settings(nats_server: EmbeddedNats, name: str, creds: GeneratedAuth | None,
              subjects: Subjects, principal: str) -> BusSettings:
    if creds is None:
        return BusSettings(url=nats_server.url, name=name)
    return bus_settings(nats_server.url, name,
                        load_credentials(creds.seed_file(principal), subjects, principal))


def _start_services(nats_server: EmbeddedNats, ledger_path: Path, logs: Path,
                    creds: GeneratedAuth | None) -> list[Child]:
    def connect(principal: str) -> list[str]:
        # Each process gets only its own seed file.
        nkey = [] if creds is None else ["--nkey", str(creds.seed_file(principal))]
        return ["--nats", nats_server.url, *nkey]

    children = [spawn("coordinator", ["coordinator", "run", *connect(COORDINATOR),
                                      "--ledger", str(ledger_path), "--config", str(POLICY),
                                      "--checkpoint-every", "1"],
                      logs)]
    for name in TEAM:
        if name != "researcher":
            children.append(spawn(name, ["agent", "run", f"agents.examples.support:{name}",
                                         *connect(name)], logs))
    # Two researcher instances share one durable consumer. Both are armed to die (os._exit,
    # like kill -9) on the first research attempt of the warranty question: whichever gets
    # it crashes, its deadline passes, the coordinator records the timeout and retries,
    # and the survivor finishes the task.
    for name in ("researcher", "researcher-2"):
        children.append(spawn(name, ["agent", "run", "agents.examples.support:researcher",
                                     *connect("researcher")], logs, service="researcher",
                              env=CRASH))
    children.append(spawn("tools", ["tools", "run", "agents.examples.support:desk_tools",
                                    *connect(TOOLS)], logs, service=TOOLS))
    return children


async def _drive(bus: Bus, client: Bus, subjects: Subjects, count: int, style: Style, say: Any,
                 timeout: float, children: list[Child]) -> Board:
    board = Board()
    decode_record = msgspec.json.Decoder(LedgerRecord).decode
    decode_event = msgspec.json.Decoder().decode
    send, receive = anyio.create_memory_object_stream[Observed](max_buffer_size=1024)
    started = time.monotonic()
    async with anyio.create_task_group() as tg, receive:
        await tg.start(bus.serve_observe, subjects.ledger_stream, subjects.ledger_all, send, True)
        ids = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(count)]
        for i, task_id in enumerate(ids):
            question = QUESTIONS[i % len(QUESTIONS)]
            await submit_task(client, subjects, task_id=task_id, to="triage", title=question,
                              payload={"question": question}, principal=CLIENT,
                              msg_id=str(uuid.uuid4()), clock=utc_now)
        say(f"  submitted {count} tasks to triage")
        tg.start_soon(_tell_exits, children, board, style, say)
        with anyio.move_on_after(timeout) as scope:
            async for message in receive:
                record = decode_record(message.data)
                finished = board.apply(decode_event(record.event))
                while board.notices:
                    if style.live:
                        sys.stdout.write("\r\033[K")
                    say(style.yellow(board.notices.pop(0)))
                if finished is not None:
                    task = board.tasks[finished]
                    line = (f"  {short(finished, 11):<12} {task['status']:<10} "
                            f"{task['hops']} hops   {task['last']}")
                    if style.live:
                        sys.stdout.write("\r\033[K")
                    say(line)
                if style.live:
                    sys.stdout.write(_bar(board.done(), count, time.monotonic() - started))
                    sys.stdout.flush()
                if board.done() >= count:
                    break
        if style.live:
            sys.stdout.write("\r\033[K")
        tg.cancel_scope.cancel()
    if scope.cancelled_caught:
        dead = [c.name for c in children if not c.alive()]
        raise DemoError(f"only {board.done()} of {count} tasks finished within {timeout:.0f} s"
                        + (f"; exited: {', '.join(dead)}" if dead else "")
                        + f"; see logs in {children[0].log_file.parent}")
    return board


async def _tell_exits(children: list[Child], board: Board, style: Style, say: Any) -> None:
    """Say when a process dies while the tasks run: the ledger sees only what follows
    (deadlines passing), so the cause would be in its log alone."""
    while True:
        for child in children:
            code = child.process.poll()
            if code is None or child.name in board.exited:
                continue
            board.exited[child.name] = code
            why = (" at the demo's planted crash point: the deliveries it held wait for "
                   "their deadlines, then go to another instance" if code == CRASH_EXIT
                   else f"; see {child.log_file}")
            if style.live:
                sys.stdout.write("\r\033[K")
            say(style.yellow(f"  {child.name} (pid {child.pid}) exited with code {code}{why}"))
        await anyio.sleep(0.2)


def _bar(done: int, total: int, seconds: float, width: int = 40) -> str:
    filled = int(width * done / total) if total else width
    return f"\r  {'━' * filled}{'╌' * (width - filled)}  {done}/{total} tasks done  {seconds:4.1f}s"


def _finish(ledger_path: Path, board: Board, count: int, style: Style, say: Any,
            nats_server: EmbeddedNats, started: float) -> DemoResult:
    ledger = open_ledger(str(ledger_path), create=False)
    try:
        t0 = time.perf_counter()
        rebuilt = replay(ledger)
        seconds = time.perf_counter() - t0
        # Feature the task with the most to tell: a crash and retry, else a denial.
        ranked = sorted(rebuilt.tasks.values(), key=lambda t: (-t.attempt, t.task_id))
        declined = [t.task_id for t in ranked]
        audit = audit_task(ledger, declined[0]) if declined else None
        denied = [t.task_id for t in ranked
                  if any(c["state"] == "denied" for c in t.tool_calls.values())]
    finally:
        ledger.close()
    completed = sum(1 for t in rebuilt.tasks.values() if t.status == "completed")
    failed = sum(1 for t in rebuilt.tasks.values() if t.status == "failed")
    rejected = sum(t.rejections for t in rebuilt.tasks.values()) + sum(
        p.rejections for p in rebuilt.principals.values())
    say()
    say(f"  {style.bold(f'{completed} of {count} tasks completed')} · {rebuilt.events} events "
        f"recorded · {rejected} rejected")
    check = style.green("chains verified ✓") if rebuilt.verified else style.red("chains BROKEN ✗")
    unsigned = rebuilt.chain.unsigned
    signed = (style.green("signed to the last event ✓") if unsigned == 0 and rebuilt.events
              else style.yellow(f"{unsigned} events after the last signed checkpoint"))
    say(f"  replay: rebuilt {len(rebuilt.tasks)} tasks from {rebuilt.events} events in "
        f"{seconds:.2f} s · digest {rebuilt.digest[:12]}… · {check} · {signed}")
    if audit is not None:
        say()
        say(f"  audit of {audit.task_id} (ledgermesh audit {audit.task_id} --ledger {ledger_path})")
        for line in render_audit(audit, style, indent="  "):
            say(line)
    if denied:
        say()
        say(f"  policy held: payments.refund was refused on {len(denied)} task(s) whose "
            f"knowledge-base document planted an instruction (kb.search results are "
            f"untrusted); see ledgermesh audit {denied[0]} --ledger {ledger_path}")
    say()
    say(f"  try next:  ledgermesh replay --ledger {ledger_path} --verify")
    featured = declined[0] if declined else "TASK"
    say(f"             ledgermesh audit {featured} --ledger {ledger_path}")
    say(f"             ledgermesh audit --ledger {ledger_path} --agent researcher")
    return DemoResult(tasks_submitted=count, tasks_completed=completed, tasks_failed=failed,
                      events=rebuilt.events, rejected=rejected, digest=rebuilt.digest,
                      verified=rebuilt.verified, unsigned=unsigned, ledger=str(ledger_path),
                      nats_url=nats_server.url, seconds=round(time.monotonic() - started, 3),
                      exited=board.exited)

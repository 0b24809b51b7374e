"""An agent stopped with SIGTERM (a deploy, a scale-down) finishes the work in hand before
it exits: the task completes, with no timeout and no retry spent on the stop."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import anyio

from bus.client import BusSettings, open_bus
from bus.embedded import EmbeddedNats
from coordinator.service import utc_now
from ledgermesh.processes import Child, spawn, stop_all, wait_ready
from schemas import Codec, Envelope, Subjects, SubmitTask
from tests.live import envelope, say

POLICY = """submitters = ["client"]
[agents.slowpoke]
deadline_s = 60
"""
AGENT = '''
import anyio
from agents import Agent, Context
from schemas import SubmitTask

slowpoke = Agent("slowpoke")
one_at_a_time = Agent("slowpoke", concurrency=1)

@slowpoke.on(SubmitTask)
async def work(ctx: Context, task: SubmitTask) -> None:
    await ctx.say("started")
    await anyio.sleep(3)
    await ctx.complete("done after 3 s")

@one_at_a_time.on(SubmitTask)
async def one(ctx: Context, task: SubmitTask) -> None:
    await ctx.say("started")
    await anyio.sleep(0.5)
    await ctx.complete("done after 0.5 s")
'''


async def until(condition: Callable[[], bool], seconds: float) -> None:
    """Poll ``condition`` (a file, a process: nothing to wait on) for up to ``seconds``."""
    with anyio.fail_after(seconds):
        while True:
            if condition():
                return
            await anyio.sleep(0.1)


def kinds(ledger: Path, task_id: str) -> list[str]:
    db = sqlite3.connect(ledger)
    try:
        return [kind for (kind,) in db.execute(
            "SELECT json_extract(state, '$.kind') FROM stored_events WHERE "
            "json_extract(state, '$.key') = ? ORDER BY rowid", (task_id,))]
    finally:
        db.close()


async def test_sigterm_lets_the_handler_in_hand_finish(nats_server: EmbeddedNats, prefix: str,
                                                       tmp_path: Path) -> None:
    (tmp_path / "ledgermesh.toml").write_text(POLICY)
    (tmp_path / "slow_agents.py").write_text(AGENT)
    ledger, logs = tmp_path / "ledger.db", tmp_path / "logs"
    common = ["--nats", nats_server.url, "--prefix", prefix]
    env = {"PYTHONPATH": str(tmp_path)}
    children: list[Child] = [
        spawn("coordinator", ["coordinator", "run", *common, "--ledger", str(ledger),
                              "--config", str(tmp_path / "ledgermesh.toml")], logs),
        spawn("slowpoke", ["agent", "run", "slow_agents:slowpoke", *common], logs, env=env),
    ]
    subjects = Subjects(prefix)
    try:
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, subjects, children)
            submit = Envelope(id="s-1", sender="client", task_id="t-stop", sent_at=utc_now(),
                              body=SubmitTask(to="slowpoke", title="take your time"))
            await bus.publish(subjects.intake("client"), Codec().encode(submit),
                              msg_id=submit.id)
            await until(lambda: "message.said" in kinds(ledger, "t-stop"), 20)  # it runs
            agent = children[1]
            agent.process.send_signal(signal.SIGTERM)
            await until(lambda: not agent.alive(), 15)
            await until(lambda: "task.completed" in kinds(ledger, "t-stop"), 10)
    finally:
        await stop_all(children)
    assert agent.process.returncode == 0, agent.log_tail()
    assert kinds(ledger, "t-stop") == ["task.submitted", "task.assigned", "message.said",
                                       "task.completed"]  # no timeout, no second assignment
    log = agent.log_file.read_text()
    assert "stopping on SIGTERM: finishing the work in hand" in log
    assert "slowpoke: finished the work in hand (1 handled in all); stopping" in log


async def test_sigterm_hands_back_what_was_sent_ahead(nats_server: EmbeddedNats, prefix: str,
                                                      tmp_path: Path) -> None:
    """The server sends an instance more deliveries than it runs at once (one here). As it
    stops, those go back to the server, and the instance that replaces it takes them
    within seconds (once the stopped one's pull requests have expired): none waits out the
    30 s ack wait, which would end this test's wait."""
    (tmp_path / "ledgermesh.toml").write_text(POLICY)
    (tmp_path / "slow_agents.py").write_text(AGENT)
    ledger, logs = tmp_path / "ledger.db", tmp_path / "logs"
    common = ["--nats", nats_server.url, "--prefix", prefix]
    env = {"PYTHONPATH": str(tmp_path)}
    run_one = ["agent", "run", "slow_agents:one_at_a_time", *common]
    children: list[Child] = [
        spawn("coordinator", ["coordinator", "run", *common, "--ledger", str(ledger),
                              "--config", str(tmp_path / "ledgermesh.toml")], logs),
        spawn("first", run_one, logs, service="slowpoke", env=env),
    ]
    subjects = Subjects(prefix)
    tasks = [f"t-ahead-{n}" for n in range(6)]
    try:
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, subjects, children)
            for task_id in tasks:
                await say(bus, prefix, envelope("client", task_id,
                                                SubmitTask(to="slowpoke", title="x")))
            await until(lambda: all("task.assigned" in kinds(ledger, t) for t in tasks), 20)
            await until(lambda: any("message.said" in kinds(ledger, t) for t in tasks), 20)
            first = children[1]
            first.process.send_signal(signal.SIGTERM)
            await until(lambda: not first.alive(), 15)
            children.append(spawn("second", run_one, logs, service="slowpoke", env=env))
            await wait_ready(bus, subjects, children[2:])
            # Handed back for 6 s, then one at a time, 0.5 s each: well inside the ack wait.
            await until(lambda: all("task.completed" in kinds(ledger, t) for t in tasks), 22)
    finally:
        await stop_all(children)
    assert first.process.returncode == 0, first.log_tail()
    for task_id in tasks:  # each ran once: no timeout, no second assignment
        assert kinds(ledger, task_id) == ["task.submitted", "task.assigned", "message.said",
                                          "task.completed"]


async def test_sigterm_to_the_coordinator_in_a_burst_stops_it_cleanly(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    """Stopped while intake is busy: it exits 0 with a signed checkpoint, no traceback
    (the intake loop could find the pull closed under it between two commits)."""
    (tmp_path / "ledgermesh.toml").write_text(POLICY)
    ledger, logs = tmp_path / "ledger.db", tmp_path / "logs"
    common = ["--nats", nats_server.url, "--prefix", prefix]
    coordinator = spawn("coordinator", ["coordinator", "run", *common, "--ledger", str(ledger),
                                        "--config", str(tmp_path / "ledgermesh.toml")], logs)
    subjects = Subjects(prefix)
    try:
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, subjects, [coordinator])
            pending = []
            for n in range(3000):
                submit = Envelope(id=f"s-{n}", sender="client", task_id=f"t-burst-{n}",
                                  sent_at=utc_now(), body=SubmitTask(to="slowpoke", title="x"))
                pending.append(await bus.start_publish(subjects.intake("client"),
                                                       Codec().encode(submit), msg_id=submit.id))
            for ack in pending:
                await ack.wait()
            await until(lambda: ledger.exists() and len(kinds(ledger, "t-burst-0")) > 0, 20)
            coordinator.process.send_signal(signal.SIGTERM)  # mid-burst
            await until(lambda: not coordinator.alive(), 20)
    finally:
        await stop_all([coordinator])
    log = coordinator.log_file.read_text()
    assert coordinator.process.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    assert "stopping: signed a checkpoint at position" in log

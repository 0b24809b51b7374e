"""Mistakes in an agent's own code show up at once, with the reason on the task: not as a
silent wait for the attempt's deadline, or a failure only when a task comes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio
import pytest

from agents import Agent, Context
from agents.sdk import Outbox
from bus.client import BusSettings, open_bus
from bus.embedded import EmbeddedNats
from coordinator.service import utc_now
from ledgermesh.processes import Child, spawn, stop_all, wait_ready
from schemas import Delivery, Envelope, Subjects, SubmitTask
from tests.live import envelope, say

POLICY = """submitters = ["client"]
[agents.forgetful]
deadline_s = 60
max_attempts = 2
"""
AGENT = '''
from agents import Agent, Context
from schemas import SubmitTask

forgetful = Agent("forgetful")

@forgetful.on(SubmitTask)
async def work(ctx: Context, task: SubmitTask) -> dict[str, str]:
    await ctx.say("summarised")
    return {"summary": "a result returned, where ctx.complete(...) was meant"}
'''


def events(ledger: Path, task_id: str) -> list[tuple[str, dict[str, object]]]:
    db = sqlite3.connect(ledger)
    try:
        return [(kind, json.loads(data)) for kind, data in db.execute(
            "SELECT json_extract(state, '$.kind'), json_extract(state, '$.data') "
            "FROM stored_events WHERE json_extract(state, '$.key') = ? ORDER BY rowid",
            (task_id,))]
    finally:
        db.close()


async def test_a_handler_that_returns_without_finishing_fails_the_attempt_at_once(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    (tmp_path / "ledgermesh.toml").write_text(POLICY)
    (tmp_path / "forgetful_agents.py").write_text(AGENT)
    ledger, logs = tmp_path / "ledger.db", tmp_path / "logs"
    common = ["--nats", nats_server.url, "--prefix", prefix]
    children: list[Child] = [
        spawn("coordinator", ["coordinator", "run", *common, "--ledger", str(ledger),
                              "--config", str(tmp_path / "ledgermesh.toml")], logs),
        spawn("forgetful", ["agent", "run", "forgetful_agents:forgetful", *common], logs,
              env={"PYTHONPATH": str(tmp_path)}),
    ]
    subjects = Subjects(prefix)
    try:
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, subjects, children)
            await say(bus, prefix, envelope("client", "t-forgot",
                                            SubmitTask(to="forgetful", title="summarise")))
            with anyio.fail_after(20):  # the deadline is 60 s: this is no timeout
                while "task.dead_lettered" not in [  # noqa: ASYNC110 - the ledger is polled
                        k for k, _ in events(ledger, "t-forgot")]:
                    await anyio.sleep(0.1)
    finally:
        await stop_all(children)
    recorded = events(ledger, "t-forgot")
    assert [k for k, _ in recorded].count("attempt.failed") == 2  # tried twice, as allowed
    assert "task.timed_out" not in [k for k, _ in recorded]
    reason = next(d for k, d in recorded if k == "attempt.failed")["reason"]
    assert reason == ("forgetful's handler for SubmitTask returned without finishing the "
                      "task (ctx.complete, handoff, decline or fail)")
    assert f"task t-forgot: {reason}" in children[1].log_file.read_text()


def test_a_handler_that_is_not_async_is_refused_when_registered() -> None:
    agent = Agent("plain")
    with pytest.raises(TypeError, match="the handler for SubmitTask must be an async def"):
        @agent.on(SubmitTask)  # type: ignore[arg-type]
        def work(ctx: Context, task: SubmitTask) -> None:  # forgot the async
            pass
    assert agent.handlers == {}


class _Unused(Outbox):
    async def send(self, envelope: Envelope) -> object:  # type: ignore[override]
        raise AssertionError(f"nothing should be sent: {envelope}")

    async def call_tool(self, envelope: Envelope, timeout: float) -> object:  # type: ignore[override]
        raise AssertionError("no tool call")


async def test_a_handoff_to_a_name_no_agent_can_have_raises_in_the_handler() -> None:
    """The coordinator would refuse it as malformed, where the task's audit does not
    show it (the envelope could not be read): the handler hears of it instead."""
    delivery = Delivery(id="d-1", task_id="t-1", agent="a", attempt=1, title="x", input={},
                        envelope=Envelope(id="e-1", sender="client", task_id="t-1",
                                          sent_at=utc_now(), body=SubmitTask(to="a", title="x")))
    ctx = Context("a", delivery, _Unused(), utc_now)
    with pytest.raises(ValueError, match="cannot hand off to 'no body': agent names are"):
        await ctx.handoff("no body", reason="to whom?")
    assert not ctx.finished

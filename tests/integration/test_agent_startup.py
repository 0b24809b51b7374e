"""An agent started before the coordinator: its pull requests are refused (no consumer
yet), it says so and keeps asking, and it serves as soon as the coordinator made it."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from agents import Agent, Context
from agents.runtime import AgentSettings, run_agent
from bus.client import BusSettings, open_bus
from bus.embedded import EmbeddedNats
from coordinator.ledger.events import Kind
from coordinator.policy import parse_policy
from coordinator.service import CoordinatorSettings, run_coordinator
from schemas import Subjects, SubmitTask
from tests import live
from tests.live import envelope, kinds, of, say

POLICY = parse_policy('submitters = ["client"]\n[agents.early]\n')


async def test_an_agent_started_before_its_consumer_exists_waits_then_serves(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    early = Agent("early")
    handled: list[str] = []

    @early.on(SubmitTask)
    async def finish(ctx: Context, task: SubmitTask) -> None:
        handled.append(ctx.task_id)
        await ctx.complete("done")

    subjects = Subjects(prefix)
    ledger = str(tmp_path / "ledger.db")
    caplog.set_level(logging.WARNING, logger="ledgermesh")
    async with anyio.create_task_group() as tg:
        await tg.start(run_agent, early, AgentSettings(nats_server.url, subjects))
        with anyio.fail_after(10):  # no streams, no consumer: the server refuses its pulls
            while True:
                if "consumer" in caplog.text and "does not exist yet" in caplog.text:
                    break
                await anyio.sleep(0.05)
        await tg.start(run_coordinator, CoordinatorSettings(nats_server.url, ledger, POLICY,
                                                            subjects))
        async with open_bus(BusSettings(url=nats_server.url, name="test-client")) as bus:
            await say(bus, prefix, envelope("client", "t-early", SubmitTask(to="early",
                                                                          title="x")))
            events = await live.until(ledger, lambda events: Kind.COMPLETED in kinds(
                of(events, "t-early")))
        tg.cancel_scope.cancel()
    assert kinds(of(events, "t-early")) == [Kind.SUBMITTED, Kind.ASSIGNED, Kind.COMPLETED]
    assert handled == ["t-early"]

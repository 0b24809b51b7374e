"""Receipts: an agent acks a delivery only once the ledger recorded what its handler sent
(agents/receipts.py), and publishes again what the intake stream lost before that."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from agents import Agent, Context
from agents.runtime import AgentSettings, run_agent
from bus.client import Bus, BusSettings, open_bus
from bus.embedded import EmbeddedNats
from bus.topology import agent_consumer
from coordinator.ledger.events import Kind
from coordinator.policy import parse_policy
from coordinator.service import CoordinatorSettings, run_coordinator
from schemas import Receipt, Subjects, SubmitTask
from tests import live
from tests.live import envelope, kinds, of, say

# A long deadline: a task that completes within seconds was not saved by a retry.
POLICY = parse_policy('submitters = ["client"]\n[agents.triage]\ndeadline_s = 60\n',
                      "receipts test policy")


@asynccontextmanager
async def running_coordinator(nats: EmbeddedNats, ledger: str,
                              subjects: Subjects) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(run_coordinator, CoordinatorSettings(nats.url, ledger, POLICY, subjects))
        yield
        tg.cancel_scope.cancel()


def gated_triage() -> tuple[Agent, anyio.Event, anyio.Event]:
    """A triage agent whose handler says it started, then completes once let go."""
    agent = Agent("triage")
    started, go = anyio.Event(), anyio.Event()

    @agent.on(SubmitTask)
    async def finish(ctx: Context, task: SubmitTask) -> None:
        started.set()
        await go.wait()
        await ctx.complete("done")

    return agent, started, go


def client(nats: EmbeddedNats) -> AbstractAsyncContextManager[Bus]:
    return open_bus(BusSettings(url=nats.url, name="test-client"))


async def submitted_and_started(nats: EmbeddedNats, prefix: str, started: anyio.Event) -> None:
    """A client submits task t1 to triage; until its handler has started."""
    async with client(nats) as bus:
        await say(bus, prefix, envelope("client", "t1", SubmitTask(to="triage", title="x")))
    with anyio.fail_after(10):
        await started.wait()


async def acked(nats: EmbeddedNats, subjects: Subjects) -> None:
    """Until the agent's delivery consumer has nothing waiting for an ack."""
    nc = NatsClient()
    await nc.connect(nats.url)
    try:
        spec = agent_consumer(subjects, "triage")
        with anyio.fail_after(10):
            while True:
                info = await nc.jetstream().consumer_info(spec.stream, spec.durable)
                if info.delivered.stream_seq and not info.num_ack_pending:
                    return
                await anyio.sleep(0.05)
    finally:
        await nc.close()


async def one_task(nats: EmbeddedNats, prefix: str, ledger: str, agent: Agent,
                   until: str) -> tuple[live.Events, list[Receipt]]:
    """Submit task t1 to ``agent`` (triage), wait until its events hold ``until`` and its
    delivery is acked; its events, and every receipt triage got meanwhile."""
    subjects = Subjects(prefix)
    receipts: list[Receipt] = []
    async with live.system(nats, prefix, ledger, POLICY, agent) as bus:
        async def note(data: bytes) -> None:
            receipts.append(msgspec.json.decode(data, type=Receipt))

        async with anyio.create_task_group() as tg:
            await tg.start(bus.serve_notices, subjects.receipt("triage"), note)
            await say(bus, prefix, envelope("client", "t1", SubmitTask(to="triage", title="x")))
            events = await live.until(ledger, lambda e: until in kinds(of(e, "t1")))
            await acked(nats, subjects)
            tg.cancel_scope.cancel()
    return events, receipts


async def test_a_delivery_is_acked_after_the_receipt_for_its_outputs(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.db")
    agent = Agent("triage")

    @agent.on(SubmitTask)
    async def finish(ctx: Context, task: SubmitTask) -> None:
        await ctx.say("working")
        await ctx.complete("done")

    events, receipts = await one_task(nats_server, prefix, ledger, agent, Kind.COMPLETED)
    assert kinds(of(events, "t1")) == [
        Kind.SUBMITTED, Kind.ASSIGNED, Kind.SAID, Kind.COMPLETED]
    # One turn, one intake message, one receipt naming it (not the client's submission).
    assert len(receipts) == 1
    assert len(receipts[0].ids) == 1


async def test_an_output_the_intake_stream_lost_is_published_again_and_recorded(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    """The stream acked the output, then lost it before the coordinator recorded it (as a
    NATS machine crash before its sync does): no receipt comes, so the agent publishes it
    again, and the task completes long before its deadline would have retried it."""
    ledger = str(tmp_path / "ledger.db")
    subjects = Subjects(prefix)
    agent, started, go = gated_triage()
    settings = AgentSettings(nats_server.url, subjects, receipt_wait_s=0.5)
    async with anyio.create_task_group() as agents:
        async with running_coordinator(nats_server, ledger, subjects):
            await agents.start(run_agent, agent, settings)
            await submitted_and_started(nats_server, prefix, started)
        # The coordinator is stopped: the output is stored by the stream, not recorded.
        async with client(nats_server) as bus:
            before = await bus.last_seq(subjects.intake_stream)
            go.set()
            with anyio.fail_after(10):
                while True:
                    lost = await bus.last_seq(subjects.intake_stream)
                    if lost != before:
                        break
                    await anyio.sleep(0.02)
            stored = await bus.stored(subjects.intake_stream, lost)
            assert stored is not None
            assert stored[0] == subjects.intake("triage")
        nc = NatsClient()
        await nc.connect(nats_server.url)
        await nc.jetstream().delete_msg(subjects.intake_stream, lost)
        await nc.close()
        async with running_coordinator(nats_server, ledger, subjects):
            events = await live.until(ledger, lambda e: Kind.COMPLETED in kinds(of(e, "t1")),
                                      timeout=15)
            await acked(nats_server, subjects)
        agents.cancel_scope.cancel()
    assert kinds(of(events, "t1")) == [Kind.SUBMITTED, Kind.ASSIGNED, Kind.COMPLETED]


async def test_past_the_deadline_an_agent_stops_publishing_again_and_leaves_it_unacked(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """No coordinator answers: the agent publishes its output again a few times, ever
    more slowly, and gives up once the attempt's deadline has passed (the coordinator's
    retry is the way on from there), without acking the delivery."""
    policy = parse_policy('submitters = ["client"]\n[agents.triage]\ndeadline_s = 1\n',
                          "short deadline")
    ledger = str(tmp_path / "ledger.db")
    subjects = Subjects(prefix)
    agent, started, go = gated_triage()
    caplog.set_level(logging.INFO, logger="ledgermesh.agent")
    settings = AgentSettings(nats_server.url, subjects, receipt_wait_s=0.2)
    async with anyio.create_task_group() as agents:
        async with anyio.create_task_group() as coordinator:
            await coordinator.start(run_coordinator,
                                    CoordinatorSettings(nats_server.url, ledger, policy, subjects))
            await agents.start(run_agent, agent, settings)
            await submitted_and_started(nats_server, prefix, started)
            coordinator.cancel_scope.cancel()
        go.set()
        with anyio.fail_after(10):
            while True:
                if "by the attempt's deadline" in caplog.text:
                    break
                await anyio.sleep(0.05)
        again = caplog.text.count("publishing it again")
        await anyio.sleep(1.0)
        assert caplog.text.count("publishing it again") == again  # it stopped
        assert 1 <= again <= 3
        # Not acked: the delivery comes again after its ack wait (2 x the deadline), and
        # that copy, stale, is what gets acked.
        await acked(nats_server, subjects)
        assert "dropping stale attempt 1 of task t1" in caplog.text
        agents.cancel_scope.cancel()


async def test_a_refused_output_is_named_in_its_receipt_and_the_agent_logs_why(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A handoff to an agent the policy does not know is recorded as refused; the
    receipt that names the agent's message says so, and the agent logs it: the developer
    sees why the task went nowhere where they look, not only in the ledger."""
    ledger = str(tmp_path / "ledger.db")
    agent = Agent("triage")

    @agent.on(SubmitTask)
    async def hand_off(ctx: Context, task: SubmitTask) -> None:
        await ctx.handoff("nobody", reason="misspelt")

    caplog.set_level(logging.WARNING, logger="ledgermesh.agent.receipts")
    events, receipts = await one_task(nats_server, prefix, ledger, agent, Kind.REJECTED)
    rejected = next(e for e in of(events, "t1") if e["kind"] == Kind.REJECTED)
    refused = [r for receipt in receipts for r in receipt.refused]
    assert [(r.task_id, r.id, r.code) for r in refused] == [
        ("t1", rejected["msg_id"], "unknown_agent")]
    assert refused[0].message in receipts[0].ids  # the turn's intake message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("task t1" in w and "unknown_agent" in w for w in warnings), warnings

"""Deadlines, retries, dead letters and fencing: decisions the coordinator records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from agents import Agent, Context
from bus.embedded import EmbeddedNats
from coordinator.ledger.events import Kind
from coordinator.ledger.replay import replay
from coordinator.ledger.store import open_ledger
from coordinator.policy import parse_policy
from schemas import Complete, HandoffRequest, Say, SubmitTask
from tests import live
from tests.live import Events, envelope, kinds, of, recorded, say, system

POLICY = parse_policy("""
retry_backoff_s = 0.05
[agents.slow]
deadline_s = 0.4
max_attempts = 2
[agents.flaky]
deadline_s = 5
max_attempts = 3
handoff_to = ["slow"]
[agents.stuck]
deadline_s = 2
max_attempts = 3
""")


def history(ledger: str, task_id: str) -> Events:
    return of(recorded(ledger), task_id)


async def until(ledger: str, task_id: str, done: Callable[[Events], bool]) -> Events:
    return of(await live.until(ledger, lambda events: done(of(events, task_id))), task_id)


def closed(events: Events) -> bool:
    return any(e["kind"] in (Kind.COMPLETED, Kind.FAILED) for e in events)


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.db")


async def test_an_unanswered_assignment_times_out_is_retried_then_dead_lettered(
        nats_server: EmbeddedNats, prefix: str, ledger: str) -> None:
    async with system(nats_server, prefix, ledger, POLICY) as bus:  # no agent runs: nobody answers
        await say(bus, prefix, envelope("client", "t-slow", SubmitTask(to="slow", title="x")))
        events = await until(ledger, "t-slow", closed)
    assert kinds(events) == [
        Kind.SUBMITTED, Kind.ASSIGNED,
        Kind.TIMED_OUT, Kind.ASSIGNED,  # retried once: max_attempts = 2
        Kind.TIMED_OUT, Kind.DEAD_LETTERED, Kind.FAILED,
    ]
    first, retry = events[1]["data"], events[3]["data"]
    assert (first["attempt"], first["tries"]) == (1, 1)
    assert (retry["attempt"], retry["tries"]) == (2, 2)
    assert retry["delivery"]["id"] != first["delivery"]["id"]  # a new delivery, not a dup
    assert events[2]["data"]["retry_at"] is not None
    assert events[4]["data"]["retry_at"] is None
    assert "after 2 of 2 attempts" in events[-1]["data"]["reason"]
    # Timer decisions are recorded facts: replay folds them and verifies.
    opened = open_ledger(ledger, create=False)
    try:
        rebuilt = replay(opened)
    finally:
        opened.close()
    assert rebuilt.verified
    assert rebuilt.tasks["t-slow"].status == "failed"


async def test_a_handler_that_always_raises_is_dead_lettered_after_max_attempts(
        nats_server: EmbeddedNats, prefix: str, ledger: str) -> None:
    flaky = Agent("flaky")
    calls: list[int] = []

    @flaky.on(SubmitTask)
    async def explode(ctx: Context, task: SubmitTask) -> None:
        calls.append(ctx.delivery.attempt)
        raise RuntimeError("model returned garbage")

    async with system(nats_server, prefix, ledger, POLICY, flaky) as bus:
        await say(bus, prefix, envelope("client", "t-raise", SubmitTask(to="flaky", title="x")))
        events = await until(ledger, "t-raise", closed)
    assert kinds(events) == [
        Kind.SUBMITTED, Kind.ASSIGNED,
        Kind.ATTEMPT_FAILED, Kind.ASSIGNED,
        Kind.ATTEMPT_FAILED, Kind.ASSIGNED,
        Kind.ATTEMPT_FAILED, Kind.DEAD_LETTERED, Kind.FAILED,
    ]
    assert calls == [1, 2, 3]  # each try was a new attempt, seen by the agent
    failures = [e for e in events if e["kind"] == Kind.ATTEMPT_FAILED]
    assert all("RuntimeError: model returned garbage" in e["data"]["reason"] for e in failures)
    assert all(e["sender"] == "flaky" for e in failures)


async def test_a_non_retryable_failure_dead_letters_at_once(
        nats_server: EmbeddedNats, prefix: str, ledger: str) -> None:
    flaky = Agent("flaky")

    @flaky.on(SubmitTask)
    async def give_up(ctx: Context, task: SubmitTask) -> None:
        await ctx.fail("customer record is gone", retryable=False)

    async with system(nats_server, prefix, ledger, POLICY, flaky) as bus:
        await say(bus, prefix, envelope("client", "t-gone", SubmitTask(to="flaky", title="x")))
        events = await until(ledger, "t-gone", closed)
    assert kinds(events) == [Kind.SUBMITTED, Kind.ASSIGNED, Kind.ATTEMPT_FAILED,
                             Kind.DEAD_LETTERED, Kind.FAILED]
    assert events[-1]["data"]["reason"] == "customer record is gone (not retryable)"


async def test_output_from_a_stale_attempt_is_fenced_off(
        nats_server: EmbeddedNats, prefix: str, ledger: str) -> None:
    """An agent paused past its deadline wakes up: its result is rejected as stale."""
    async with system(nats_server, prefix, ledger, POLICY) as bus:
        await say(bus, prefix, envelope("client", "t-fence", SubmitTask(to="flaky", title="x")))
        await until(ledger, "t-fence", lambda e: Kind.ASSIGNED in kinds(e))
        await say(bus, prefix, envelope("flaky", "t-fence",
                                        HandoffRequest(to="slow", reason="yours"), attempt=1))
        # slow never answers within 0.4 s: its attempt 2 times out, attempt 3 is the retry.
        await until(ledger, "t-fence", lambda e: kinds(e).count(Kind.ASSIGNED) == 3)
        await say(bus, prefix, envelope("slow", "t-fence", Complete(result="late"), attempt=2))
        await say(bus, prefix, envelope("slow", "t-fence", Say(text="late too"), attempt=2))
        await say(bus, prefix, envelope("slow", "t-fence", Complete(result="on time"), attempt=3))
        await say(bus, prefix, envelope("slow", "t-fence", Complete(result="twice"), attempt=3))
        events = await until(ledger, "t-fence",
                             lambda e: closed(e) and kinds(e).count(Kind.REJECTED) >= 3)
    results = [e["data"]["result"] for e in events if e["kind"] == Kind.COMPLETED]
    assert results == ["on time"]  # exactly one result is ever accepted
    codes = [e["data"]["code"] for e in events if e["kind"] == Kind.REJECTED]
    assert codes == ["stale_attempt", "stale_attempt", "task_closed"]


async def test_a_restarted_coordinator_still_keeps_deadlines(
        nats_server: EmbeddedNats, prefix: str, ledger: str) -> None:
    async with system(nats_server, prefix, ledger, POLICY) as bus:
        await say(bus, prefix, envelope("client", "t-later", SubmitTask(to="flaky", title="x")))
        await until(ledger, "t-later", lambda e: Kind.ASSIGNED in kinds(e))
    # The coordinator is gone; flaky's 5 s deadline passes while nothing runs... or soon
    # after the restart: the new process must know the deadline from the ledger alone.
    async with system(nats_server, prefix, ledger, POLICY) as bus:
        events = await until(ledger, "t-later", lambda e: Kind.TIMED_OUT in kinds(e))
    assert kinds(events)[:3] == [Kind.SUBMITTED, Kind.ASSIGNED, Kind.TIMED_OUT]




async def test_a_handler_that_never_returns_is_cancelled_past_its_deadline(
        nats_server: EmbeddedNats, prefix: str, ledger: str) -> None:
    """A handler stuck for good (a model call without a timeout) would hold its worker
    for good: with one worker, the coordinator's retries could never run and the task
    would be dead-lettered. The runtime cancels it well past its attempt's deadline, so a
    retry runs and completes."""
    agent = Agent("stuck", concurrency=1)
    attempts: list[int] = []
    cancelled: list[int] = []

    @agent.on(SubmitTask)
    async def hang_the_first_time(ctx: Context, task: SubmitTask) -> None:
        attempts.append(ctx.delivery.attempt)
        if len(attempts) == 1:
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.append(ctx.delivery.attempt)
        await ctx.complete("another time")

    async with system(nats_server, prefix, ledger, POLICY, agent) as bus:
        await say(bus, prefix, envelope("client", "t-hang", SubmitTask(to="stuck", title="x")))
        events = await until(ledger, "t-hang", closed)
        assert cancelled == [1]  # by the runtime, before the system stops
    assert kinds(events)[:4] == [Kind.SUBMITTED, Kind.ASSIGNED, Kind.TIMED_OUT, Kind.ASSIGNED]
    assert kinds(events)[-1] == Kind.COMPLETED

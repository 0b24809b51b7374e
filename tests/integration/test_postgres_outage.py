"""A running coordinator whose PostgreSQL sessions are all ended (as a restart or a
failover ends them): it records on new connections, nothing is lost or recorded twice,
and it takes its writer lock again.

Runs when ``LEDGERMESH_TEST_POSTGRES`` names a DSN, in a schema of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import anyio
import psycopg
import pytest

from agents import Agent, Context
from bus.embedded import EmbeddedNats
from coordinator.ledger.owner import holder_name
from coordinator.ledger.replay import Replay, replay
from coordinator.ledger.store import open_ledger
from coordinator.policy import parse_policy
from schemas import SubmitTask
from tests.live import envelope, say, system

DSN = os.environ.get("LEDGERMESH_TEST_POSTGRES", "")
POLICY = parse_policy('submitters = ["client"]\n[agents.triage]\ndeadline_s = 30\n',
                      "postgres outage test policy")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not DSN, reason="set LEDGERMESH_TEST_POSTGRES=postgresql://postgres@"
                                       "127.0.0.1:5432/test to run it"),
]


@pytest.fixture
def schema() -> Iterator[str]:
    name = "lmtest_" + uuid.uuid4().hex[:12]
    with psycopg.connect(DSN, autocommit=True) as db:
        db.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(DSN, autocommit=True) as db:
            db.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def replayed(location: str) -> Replay:
    ledger = open_ledger(location, create=False)
    try:
        return replay(ledger, helper=False)
    finally:
        ledger.close()


def completed(location: str) -> set[str]:
    return {k for k, t in replayed(location).tasks.items() if t.status == "completed"}


def end_the_coordinators_sessions(schema: str) -> int:
    """pg_terminate_backend on every session that last spoke to this schema, and on the
    one holding the writer lock (named after this process); how many."""
    with psycopg.connect(DSN, autocommit=True) as db:
        row = db.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND (position(%s in query) > 0 "
            "OR application_name = %s)", (schema, holder_name())).fetchone()
    assert row is not None
    return int(row[0])


def lock_sessions() -> int:
    with psycopg.connect(DSN, autocommit=True) as db:
        row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                         (holder_name(),)).fetchone()
    assert row is not None
    return int(row[0])


async def test_the_coordinator_outlives_the_end_of_its_postgresql_sessions(
        nats_server: EmbeddedNats, prefix: str, schema: str) -> None:
    location = f"{DSN}{'&' if '?' in DSN else '?'}schema={schema}"
    agent = Agent("triage")

    @agent.on(SubmitTask)
    async def finish(ctx: Context, task: SubmitTask) -> None:
        await ctx.say("on it")
        await ctx.complete("done")

    async with system(nats_server, prefix, location, POLICY, agent) as bus:
        async def submit(tag: str) -> set[str]:
            ids = {f"{tag}-{i}" for i in range(10)}
            for task_id in sorted(ids):
                await say(bus, prefix, envelope("client", task_id,
                                                SubmitTask(to="triage", title=tag)))
            return ids

        async def all_completed(ids: set[str]) -> None:
            with anyio.fail_after(30):
                while True:
                    if ids <= await anyio.to_thread.run_sync(completed, location):
                        return
                    await anyio.sleep(0.2)

        await all_completed(await submit("before"))
        assert lock_sessions() == 1
        assert end_the_coordinators_sessions(schema) >= 2  # the lock's and the ledger's
        await all_completed(await submit("after"))
        with anyio.fail_after(15):  # the lock is checked every 5 s
            while True:
                if lock_sessions() == 1:
                    break
                await anyio.sleep(0.2)
    state = replayed(location)
    assert state.breaks == []
    assert sorted(t.status for t in state.tasks.values()) == ["completed"] * 20


async def test_sessions_ended_again_and_again_under_load_do_not_end_the_coordinator(
        nats_server: EmbeddedNats, prefix: str, schema: str) -> None:
    """Every 0.3 s, for 15 rounds, while tasks flow, then while it is quiet: the relay's
    reads fail too, and are retried as intake's writes are (a failed read ended the
    coordinator)."""
    location = f"{DSN}{'&' if '?' in DSN else '?'}schema={schema}"
    agent = Agent("triage")

    @agent.on(SubmitTask)
    async def finish(ctx: Context, task: SubmitTask) -> None:
        await ctx.complete("done")

    ids = {f"flow-{i:03d}" for i in range(150)}
    async with system(nats_server, prefix, location, POLICY, agent) as bus:
        async def submit_all() -> None:
            for task_id in sorted(ids):
                await say(bus, prefix, envelope("client", task_id,
                                                SubmitTask(to="triage", title="flow")))
                await anyio.sleep(0.02)

        async with anyio.create_task_group() as tg:
            tg.start_soon(submit_all)
            for _ in range(15):
                await anyio.sleep(0.3)
                await anyio.to_thread.run_sync(end_the_coordinators_sessions, schema)
        # And while it is quiet: the relay then reads the log itself each second.
        for _ in range(4):
            await anyio.to_thread.run_sync(end_the_coordinators_sessions, schema)
            await anyio.sleep(1.3)
        with anyio.fail_after(60):
            while not ids <= await anyio.to_thread.run_sync(completed, location):  # noqa: ASYNC110
                await anyio.sleep(0.3)
    state = replayed(location)
    assert state.breaks == []
    assert {k for k, t in state.tasks.items() if t.status == "completed"} == ids

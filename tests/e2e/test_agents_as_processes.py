"""Agents as separate OS processes, over a real nats-server, recorded in a real SQLite ledger."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import anyio
import pytest

import agents.examples
from bus.client import BusSettings, open_bus
from bus.embedded import EmbeddedNats
from coordinator.ledger.replay import Replay, replay
from coordinator.ledger.store import open_ledger
from ledgermesh.processes import Child, spawn, stop_all, wait_ready
from schemas import Subjects

POLICY = Path(agents.examples.__file__).parent / "ledgermesh.toml"
TEAM = ("triage", "researcher", "writer", "reviewer")
# One task's life in the example team, in ledger order.
STORY = [
    "task.submitted", "task.assigned",
    "message.said", "handoff.requested", "task.assigned",            # triage
    # researcher: no tool host runs here, so its kb.search is recorded as unavailable
    "handoff.accepted", "tool.requested", "tool.authorized", "tool.completed",
    "message.said", "message.said", "handoff.requested", "task.assigned",
    "handoff.accepted", "handoff.requested", "task.assigned",        # writer
    "handoff.declined", "task.assigned",                             # reviewer declines
    "message.said", "handoff.requested", "task.assigned",            # writer revises
    "handoff.accepted", "task.completed",                            # reviewer completes
]


@pytest.fixture
async def stack(nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> AsyncIterator[Path]:
    ledger = tmp_path / "ledger.db"
    common = ["--nats", nats_server.url, "--prefix", prefix]
    children: list[Child] = [spawn("coordinator", ["coordinator", "run", *common, "--ledger",
                                                   str(ledger), "--config", str(POLICY)],
                                   tmp_path / "logs")]
    try:
        children += [spawn(name, ["agent", "run", f"agents.examples.support:{name}", *common],
                           tmp_path / "logs") for name in TEAM]
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, Subjects(prefix), children)
        yield ledger
    finally:
        await stop_all(children)
        for child in children:  # a clean stop, not a kill: SIGTERM is handled
            assert child.process.returncode == 0, f"{child.name}:\n{child.log_tail()}"


def submit(nats_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ledgermesh", "submit", "--nats", nats_url,
                           "--prefix", prefix, *args], capture_output=True, text=True,
                          timeout=60, check=False)


async def wait_for(ledger: Path, done: int) -> Replay:
    with anyio.fail_after(60):
        while True:
            if await anyio.Path(ledger).exists():
                opened = open_ledger(str(ledger), create=False)
                try:
                    state = replay(opened)
                finally:
                    opened.close()
                if sum(t.status == "completed" for t in state.tasks.values()) >= done:
                    return state
            await anyio.sleep(0.2)


async def test_tasks_flow_through_the_team_exactly_once(stack: Path, nats_server: EmbeddedNats,
                                                        prefix: str) -> None:
    ids = [f"e2e-{n}" for n in range(3)]
    for task_id in ids:
        done = await anyio.to_thread.run_sync(partial(
            submit, nats_server.url, prefix, "--to", "triage", "--title", "Refund?",
            "--task-id", task_id, "--payload", '{"question": "Can I get a refund?"}'))
        assert done.returncode == 0, done.stderr
        assert f"submitted {task_id} to triage (recorded)" in done.stdout
    state = await wait_for(stack, done=3)
    assert state.verified
    assert sorted(state.tasks) == ids

    opened = open_ledger(str(stack), create=False)
    try:
        from coordinator.ledger.events import task_aggregate_id

        for task_id in ids:
            history = opened.history(task_aggregate_id(task_id))
            assert [e.kind for e in history] == STORY
            # Every message an agent or client said is recorded exactly once.
            said = Counter(e.msg_id for e in history if e.sender != "coordinator")
            assert said
            assert max(said.values()) == 1
            # Causal order: each output names the message that caused its delivery, and
            # that message was recorded earlier.
            seen: set[str] = set()
            for event in history:
                if event.causation_id is not None and event.sender != "coordinator":
                    assert event.causation_id in seen
                seen.add(event.msg_id)
    finally:
        opened.close()


async def test_submitting_to_an_unknown_agent_is_rejected_clearly(
        stack: Path, nats_server: EmbeddedNats, prefix: str) -> None:
    done = await anyio.to_thread.run_sync(lambda: submit(
        nats_server.url, prefix, "--to", "nobody", "--title", "x"))
    assert done.returncode == 2
    assert "rejected (unknown_agent): no agent named 'nobody' in the policy" in done.stderr
    assert "Traceback" not in done.stderr

"""``ledgermesh tail --task T --until-closed``: follow one task to its end, as a script
waiting for a result would, and exit with what became of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
from anyio.abc import Process

from agents import Agent, Context
from bus.embedded import EmbeddedNats
from coordinator.policy import parse_policy
from schemas import SubmitTask
from tests.live import envelope, of, say, system, until
from tests.live import kinds as kinds_of

POLICY = parse_policy('submitters = ["client"]\n[agents.triage]\nmax_attempts = 1\n',
                      "tail test policy")


def tail_until_closed(nats: EmbeddedNats, prefix: str, task_id: str) -> list[str]:
    return [sys.executable, "-m", "ledgermesh", "tail", "--nats", nats.url, "--prefix", prefix,
            "--task", task_id, "--until-closed", "--json"]


async def finished(process: Process) -> tuple[int, list[str]]:
    """Its exit code and the kinds of the events it printed."""
    assert process.stdout is not None
    out = b""
    with anyio.fail_after(30):
        async for chunk in process.stdout:
            out += chunk
        code = await process.wait()
    return code, [json.loads(line)["kind"] for line in out.decode().splitlines()]


async def test_tail_until_closed_exits_with_what_became_of_the_task(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.db")
    agent = Agent("triage")
    go = anyio.Event()

    @agent.on(SubmitTask)
    async def work(ctx: Context, task: SubmitTask) -> None:
        if task.title == "slow":
            await go.wait()
        if task.title == "bad":
            await ctx.fail("cannot", retryable=False)
        else:
            await ctx.complete("done")

    async with system(nats_server, prefix, ledger, POLICY, agent) as bus:
        # Followed while it runs: it stops on its own once the task completes.
        async with await anyio.open_process(tail_until_closed(nats_server, prefix, "t-slow"),
                                            stderr=subprocess.DEVNULL) as following:
            await say(bus, prefix, envelope("client", "t-slow",
                                            SubmitTask(to="triage", title="slow")))
            await anyio.sleep(1.0)
            assert following.returncode is None  # still waiting for the task
            go.set()
            code, kinds = await finished(following)
        assert (code, kinds[0], kinds[-1]) == (0, "task.submitted", "task.completed")

        # Closed already, and failed: told at once, exit 1.
        await say(bus, prefix, envelope("client", "t-bad", SubmitTask(to="triage", title="bad")))
        await until(ledger, lambda events: "task.failed" in kinds_of(of(events, "t-bad")))
        async with await anyio.open_process(tail_until_closed(nats_server, prefix, "t-bad"),
                                            stderr=subprocess.DEVNULL) as after:
            code, kinds = await finished(after)
        assert (code, kinds[-1]) == (1, "task.failed")

        # A task nobody submitted (a mistyped id): it waits, and says why it is silent.
        async with await anyio.open_process(tail_until_closed(nats_server, prefix, "t-typo"),
                                            stderr=subprocess.PIPE) as waiting:
            assert waiting.stderr is not None
            with anyio.fail_after(20):
                note = await waiting.stderr.receive()
            assert waiting.returncode is None
            waiting.terminate()
        assert b"no event of task t-typo yet: waiting for it" in note


def test_until_closed_without_a_task_is_a_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "ledgermesh", "tail", "--until-closed"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --until-closed follows one task: give it with "
                                   "--task TASK_ID")

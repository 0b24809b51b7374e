"""The fault suite's agents, run as OS processes: ``ledgermesh agent run
tests.fault.workload:worker`` (the harness puts the repository root on PYTHONPATH).

What a handler does is decided by the task's input, so one agent module serves every
scenario:

- ``says``: how many ``Say`` outputs before finishing;
- ``sleep``: seconds to wait before finishing (a slow handler, to be paused or killed);
- ``hang_once``: a file path; the first run anywhere creates it, says one thing and hangs
  for ``hang_s`` seconds (so it can be killed mid-handler), every later run goes on;
- ``then``: hand the task to that agent instead of completing it.

Every handler run is appended to the history file named by ``LEDGERMESH_FAULT_HISTORY``
(one JSON line per ``os.write`` on an ``O_APPEND`` descriptor: lines from several
processes never interleave).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import anyio

from agents import Agent, Context
from schemas import HandoffRequest, SubmitTask

HISTORY_ENV = "LEDGERMESH_FAULT_HISTORY"

worker = Agent("worker", description="fault suite: says, sleeps, completes or hands off",
               concurrency=8)
finisher = Agent("finisher", description="fault suite: completes what it is handed",
                 concurrency=8)
flaky = Agent("flaky", description="fault suite: always raises", concurrency=4)


def note(op: str, ctx: Context, **fields: Any) -> None:
    path = os.environ.get(HISTORY_ENV)
    if not path:
        return
    line = {"at": time.time(), "process": f"{ctx.agent}:{os.getpid()}", "op": op,
            "agent": ctx.agent, "pid": os.getpid(), "task_id": ctx.task_id,
            "attempt": ctx.delivery.attempt, "delivery_id": ctx.delivery.id, **fields}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def _first_run(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


async def _run(ctx: Context, plan: dict[str, Any]) -> None:
    note("start", ctx)
    outputs = 0
    hang = plan.get("hang_once")
    if hang and _first_run(str(hang)):
        await ctx.say("working on it")
        await ctx.settle()  # stored before the hang (a say goes out at the next wait)
        outputs += 1
        note("hanging", ctx, outputs=[ctx.output_id(1)])
        await anyio.sleep(float(plan.get("hang_s", 60)))
    for n in range(int(plan.get("says", 0))):
        await ctx.say(f"step {n}")
        outputs += 1
    if plan.get("sleep"):
        await anyio.sleep(float(plan["sleep"]))
    then = plan.get("then")
    if then and then != ctx.agent:
        await ctx.handoff(str(then), {"from": ctx.agent}, reason="finish it")
        finish = "handoff"
    else:
        await ctx.complete(f"done by {ctx.agent} on attempt {ctx.delivery.attempt}")
        finish = "complete"
    outputs += 1
    note("end", ctx, finish=finish,
         outputs=[ctx.output_id(n) for n in range(1, outputs + 1)])


@worker.on(SubmitTask)
async def work(ctx: Context, task: SubmitTask) -> None:
    await _run(ctx, dict(ctx.input))


@finisher.on(HandoffRequest)
async def finish(ctx: Context, request: HandoffRequest) -> None:
    await _run(ctx, {})


@flaky.on(SubmitTask)
async def explode(ctx: Context, task: SubmitTask) -> None:
    note("raise", ctx)
    raise RuntimeError(f"flaky always raises (attempt {ctx.delivery.attempt})")

"""The "handoff chain" workload: a task enters ``hop1``, each hop says one thing and hands
the task to the next, and ``hop5`` completes it.

Each agent runs as its own OS process (``ledgermesh agent run bench.chain:hopN``), exactly
like a production agent; the policy that allows the chain is written at run time.

Per task the ledger records 20 events from 6 intake messages (the submission, and each
hop's say + handoff or completion as one batch): submitted + assigned, then
for hop1 said + handoff.requested + assigned, for hop2..hop4 handoff.accepted (implicit) +
said + handoff.requested + assigned, and for hop5 handoff.accepted + said + completed.
A task therefore makes **5 hops** (submission → hop1, and four handoffs), each one
recorded in the ledger before it is delivered.
"""

from __future__ import annotations

from pathlib import Path

from agents import Agent, Context
from schemas import HandoffRequest, SubmitTask

HOPS = 5
NAMES = tuple(f"hop{i}" for i in range(1, HOPS + 1))
SUBMITTER = "bench"
EVENTS_PER_TASK = 20
INTAKE_MESSAGES_PER_TASK = 6  # 11 envelopes


def _make(index: int) -> Agent:
    name = NAMES[index]
    agent = Agent(name, description=f"bench chain hop {index + 1} of {HOPS}")
    last = index == HOPS - 1

    async def step(ctx: Context) -> None:
        await ctx.say(f"{name} working on {ctx.task_id}")
        if last:
            await ctx.complete("done")
        else:
            await ctx.handoff(NAMES[index + 1], {"from": name}, reason="next hop")

    # hop1 receives the submission; every later hop a handoff.
    if index == 0:
        @agent.on(SubmitTask)
        async def submitted(ctx: Context, body: SubmitTask) -> None:
            await step(ctx)
    else:
        @agent.on(HandoffRequest)
        async def handed(ctx: Context, body: HandoffRequest) -> None:
            await step(ctx)
    return agent


hop1, hop2, hop3, hop4, hop5 = (_make(i) for i in range(HOPS))


def policy_toml(deadline_s: float = 120.0) -> str:
    """The policy of the chain: ``bench`` submits, hopN may hand off only to hopN+1."""
    lines = [f'submitters = ["{SUBMITTER}"]', ""]
    for i, name in enumerate(NAMES):
        lines.append(f"[agents.{name}]")
        lines.append(f'description = "bench chain hop {i + 1}"')
        following = f'"{NAMES[i + 1]}"' if i + 1 < HOPS else ""
        lines.append(f"handoff_to = [{following}]")
        lines.append(f"deadline_s = {deadline_s}")
        lines.append("")
    return "\n".join(lines)


def write_policy(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench-chain.toml"
    path.write_text(policy_toml(), encoding="utf-8")
    return path

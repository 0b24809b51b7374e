"""``ledgermesh replay-agent``: run agent code (changed or not) against what a task recorded,
and show where it would now act differently.

For every delivery the ledger holds for the agent in the task, the agent's handler runs
again on that exact delivery. Its tool calls are answered from the ledger, never run; what
it says is collected, never sent. Its outputs are then compared, in order, with the ones
the ledger recorded for that delivery: the n-th output of a delivery has the same id on
every run, so the recorded one is found by id. A workflow replayer's check, for agents.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec

from agents.runtime import handle
from agents.sdk import Agent, Context, load_agent
from coordinator.decide import recorded_answer
from coordinator.ledger.events import Kind, LedgerEvent, task_aggregate_id
from coordinator.ledger.replay import ChainBrokenError, verify_history
from coordinator.ledger.state import TaskState
from coordinator.ledger.store import Ledger, open_ledger
from ledgermesh.style import Style, stdout_style
from schemas import (
    Codec,
    Complete,
    Delivery,
    Envelope,
    Fail,
    Failure,
    HandoffDecision,
    HandoffRequest,
    LedgermeshError,
    ToolOutcome,
    canonical,
)


def _finishes(envelope: Envelope) -> bool:
    """Whether this output ends the agent's attempt (nothing may follow it)."""
    body = envelope.body
    return (isinstance(body, HandoffRequest | Complete | Fail)
            or (isinstance(body, HandoffDecision) and not body.accept))


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One recorded delivery, replayed: its outputs then and now (bodies, in order)."""

    delivery_id: str
    attempt: int
    cause: str  # the body type of the message that made the agent the owner
    recorded: list[dict[str, Any]]
    replayed: list[dict[str, Any]]
    unrecorded_tool_calls: list[str]  # calls the ledger has no answer for
    # "same"; "stopped": the recording ends early (the attempt crashed or timed out) and
    # agrees as far as it goes; "differs".
    verdict: str


class ReplayedTask(msgspec.Struct, frozen=True, kw_only=True):
    agent: str
    task_id: str
    steps: list[Step]

    @property
    def differs(self) -> int:
        return sum(step.verdict == "differs" for step in self.steps)


def replay_agent(ledger: Ledger, agent: Agent, task_id: str) -> ReplayedTask:
    history = [e for e in ledger.history(task_aggregate_id(task_id))
               if isinstance(e, LedgerEvent)]
    if not history:
        raise LedgermeshError(f"no task {task_id!r} in this ledger")
    broken = verify_history(history)
    if broken is not None:  # a replay against an edited record would prove nothing
        raise ChainBrokenError(f"the chain of task {task_id!r} is broken at {broken}: the ledger "
                               "was modified after it was written (`ledgermesh replay "
                               "--verify` tells more); nothing replayed")
    task = TaskState(task_id=task_id)
    for event in history:
        task.apply(event)
    codec = Codec()
    deliveries = [codec.decode_delivery(canonical(e.data["delivery"]), "ledger")
                  for e in history if e.kind == Kind.ASSIGNED and e.data["agent"] == agent.name]
    if not deliveries:
        owners = sorted({e.data["agent"] for e in history if e.kind == Kind.ASSIGNED})
        raise LedgermeshError(f"task {task_id!r} was never delivered to {agent.name} (it "
                              f"went to: {', '.join(owners) or 'nobody'})")
    said = _outputs_of(history, agent.name, codec)
    steps = [anyio.run(_replay_one, agent, delivery, task, said) for delivery in deliveries]
    return ReplayedTask(agent=agent.name, task_id=task_id, steps=steps)


def _outputs_of(history: list[LedgerEvent], agent: str, codec: Codec) -> dict[str, Envelope]:
    """What the agent sent on this task, by envelope id, as it was received (the raw
    bytes each event keeps)."""
    out: dict[str, Envelope] = {}
    for event in history:
        if event.sender == agent and event.raw and event.msg_id not in out:
            out[event.msg_id] = codec.decode_envelope(base64.b64decode(event.raw), "ledger")
    return out


async def _replay_one(agent: Agent, delivery: Delivery, task: TaskState,
                      said: dict[str, Envelope]) -> Step:
    outbox = _Collect(task)
    ctx = Context(agent.name, delivery, outbox, _clock(delivery))
    await handle(agent, ctx)
    replayed = [_body(env) for env in outbox.sent]
    recorded = []
    for n in range(1, len(said) + 1):  # the recorded outputs of this delivery, in order
        envelope = said.get(ctx.output_id(n))
        if envelope is None:
            break
        recorded.append(envelope)
    bodies = [_body(env) for env in recorded]
    if bodies == replayed:
        verdict = "same"
    elif (replayed[:len(bodies)] == bodies
          and not any(_finishes(env) for env in recorded)):
        verdict = "stopped"
    else:
        verdict = "differs"
    return Step(delivery_id=delivery.id, attempt=delivery.attempt,
                cause=type(delivery.envelope.body).__name__, recorded=bodies,
                replayed=replayed, unrecorded_tool_calls=outbox.unrecorded, verdict=verdict)


class _Collect:
    """The outbox of a replay: outputs are kept, tool calls answered from the ledger."""

    def __init__(self, task: TaskState) -> None:
        self.sent: list[Envelope] = []
        self.unrecorded: list[str] = []
        self._task = task

    async def send(self, envelope: Envelope) -> _Stored:
        self.sent.append(envelope)
        return _Stored()

    async def call_tool(self, envelope: Envelope, timeout: float) -> ToolOutcome:
        self.sent.append(envelope)
        known = self._task.tool_calls.get(envelope.id)
        answer = None if known is None else recorded_answer(known)
        if answer is not None:
            return answer
        self.unrecorded.append(envelope.id)
        return ToolOutcome(ok=False, error=Failure(
            type="not_recorded", message="the ledger holds no answer to this call, and a "
                                         "replay never runs tools"))


class _Stored:
    async def wait(self, timeout: float = 10.0) -> object:
        return None


def _clock(delivery: Delivery) -> Callable[[], datetime]:
    # Handlers that read the clock see the time the delivery was made, not today's.
    sent_at = delivery.envelope.sent_at
    return lambda: sent_at if sent_at.tzinfo else sent_at.replace(tzinfo=UTC)


def _body(envelope: Envelope) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.to_builtins(envelope.body)
    return body


def replay_agent_command(spec: str, location: str, task_id: str, *, as_json: bool) -> int:
    agent = load_agent(spec)
    ledger = open_ledger(location, create=False)
    try:
        result = replay_agent(ledger, agent, task_id)
    finally:
        ledger.close()
    if as_json:
        print(msgspec.json.encode(result).decode())
    else:
        for line in render(result, stdout_style()):
            print(line)
    return 1 if result.differs else 0


def render(result: ReplayedTask, style: Style) -> list[str]:
    lines = [style.bold(f"{result.agent} replayed on task {result.task_id}: "
                        f"{_count(len(result.steps), 'recorded delivery', 'recorded deliveries')}")]
    for i, step in enumerate(result.steps, start=1):
        head = (f"  delivery {i} (attempt {step.attempt}, after a {step.cause}): "
                f"{_count(len(step.replayed), 'output')}")
        if step.verdict == "same":
            lines.append(f"{head}, {style.green('same as recorded')}")
        elif step.verdict == "stopped":
            lines.append(f"{head}; the recorded attempt stopped after "
                         f"{_count(len(step.recorded), 'output')} (it crashed or timed "
                         f"out): {style.green('the same up to there')}")
            continue  # what came after was never asked: no answers to expect
        else:
            lines.append(f"{head}, {style.red(f'{len(step.recorded)} recorded: differs')}")
            for n in range(max(len(step.recorded), len(step.replayed))):
                then = step.recorded[n] if n < len(step.recorded) else None
                now = step.replayed[n] if n < len(step.replayed) else None
                if then != now:
                    lines.append(f"    output {n + 1}: recorded {_said(then)}")
                    lines.append(f"    {' ' * len(str(n + 1))}        now      {_said(now)}")
        for call in step.unrecorded_tool_calls:
            lines.append(style.yellow(f"    tool call {call} has no recorded answer: it was "
                                      f"answered 'not_recorded'"))
    if result.differs:
        verdict = style.red(f"{result.differs} of {len(result.steps)} deliveries differ")
    elif not any(step.recorded for step in result.steps):
        verdict = style.yellow(f"nothing to compare: no attempt of {result.agent} on this "
                               "task recorded an output")
    else:
        verdict = style.green("the code does what the ledger recorded")
    lines.append(verdict)
    return lines


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _said(body: dict[str, Any] | None) -> str:
    if body is None:
        return "nothing"
    fields = {k: v for k, v in body.items() if k != "type"}
    return f"{body['type']} {msgspec.json.encode(fields).decode()}"

"""The tool gateway: agents ask here to run a tool; every call is authorized against the
policy and recorded — request, decision, result — before the agent hears the answer.

A call's envelope id is its idempotency key: a repeated call is answered from the ledger,
or, while its tool still runs, waits for that run's answer; it never runs twice. (A call
authorized but never answered — a crash in between — is run again with the same key,
which the tool host honours: it answers a call id it knows instead of running it again.)
"""

from __future__ import annotations

import logging

import anyio
import msgspec
from anyio.abc import TaskStatus

from bus.client import Bus, BusError
from coordinator.ledger.writer import LedgerWriter
from coordinator.ledger_writes import LedgerWrites
from coordinator.policy import Policy
from coordinator.signals import Doorbell
from schemas import Failure, LedgermeshError, Subjects, ToolInvocation, ToolOutcome

log = logging.getLogger("ledgermesh.coordinator.gateway")

_outcome = msgspec.json.Decoder(ToolOutcome)
_encode = msgspec.json.Encoder().encode


async def serve_gateway(bus: Bus, writer: LedgerWriter, writes: LedgerWrites,
                        subjects: Subjects, policy: Policy, relay: Doorbell, *,
                        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:

    running: dict[str, _Running] = {}  # call id -> the run in progress

    async def handle(subject: str, data: bytes) -> bytes:
        principal = subject.rsplit(".", 1)[-1]
        try:
            verdict = await writes.run(writer.record_tool_call, principal, data)
        except LedgermeshError as exc:  # unreadable call: answered, and nothing recorded
            return _encode(ToolOutcome(ok=False, error=Failure(type="malformed",
                                                               message=str(exc))))
        relay.ring()
        if verdict.answer is not None:
            return _encode(verdict.answer)
        call = verdict.run
        assert call is not None
        ongoing = running.get(call.call_id)
        if ongoing is not None:
            # Its caller stopped waiting and asked again while the tool still runs: the
            # answer of that run, not a second run (the ledger has no answer to give yet).
            return await ongoing.answer()
        ongoing = running[call.call_id] = _Running()
        try:
            outcome = await _run(bus, subjects, policy, call)
            outcome = await writes.run(writer.record_tool_result, call.task_id, call.call_id,
                                       outcome)
            relay.ring()
            ongoing.reply = _encode(outcome)
        finally:
            del running[call.call_id]
            ongoing.done.set()
        return ongoing.reply

    await bus.serve_requests(subjects.tool_gateway_all, "ledgermesh-gateway", handle,
                             task_status=task_status)


class _Running:
    """A tool call being run; repeats of it wait here for its answer."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.reply = b""

    async def answer(self) -> bytes:
        await self.done.wait()
        if not self.reply:  # the run ended without a recorded answer: try again later
            return _encode(ToolOutcome(ok=False, error=Failure(
                type="unavailable", message="the call's run ended without an answer",
                retryable=True)))
        return self.reply


async def _run(bus: Bus, subjects: Subjects, policy: Policy,
               call: ToolInvocation) -> ToolOutcome:
    """Ask a tool host to run the call; failures become recorded outcomes, not exceptions."""
    spec = policy.tools[call.tool]
    try:
        reply = await bus.request(subjects.tool(call.tool), _encode(call), spec.timeout_s)
    except BusError as exc:
        log.warning("tool %s for task %s: %s", call.tool, call.task_id, exc)
        return ToolOutcome(ok=False, error=Failure(type="unavailable", message=str(exc),
                                                   retryable=True))
    try:
        return _outcome.decode(reply)
    except msgspec.DecodeError as exc:
        return ToolOutcome(ok=False, error=Failure(type="tool_error",
                                                   message=f"unreadable answer: {exc}"))

"""What a handler says reaches intake turn by turn: everything said before the handler
next waits on something goes out as one message (a batch, when there is more than one
output), and the ledger records it all in the order said."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import anyio

from agents import Agent, Context
from agents.runtime import AgentSettings, run_agent
from bus.embedded import EmbeddedNats
from coordinator.ledger.events import Kind
from schemas import (
    Codec,
    Complete,
    HandoffRequest,
    Subjects,
    SubmitTask,
    batch_msg_id,
    is_batch,
    uuid5_text,
)
from tests import live
from tests.live import envelope, kinds, of, say, team_policy

# The documented namespace of the Python SDK's output ids (docs/protocol.md §14).
NS_OUTPUT = UUID("3c9f1a7e-5b2d-5f4e-8a6c-7d8e9f0a1b2c")

_codec = Codec()


def chatty_team() -> tuple[Agent, Agent]:
    triage = Agent("triage")

    @triage.on(SubmitTask)
    async def work(ctx: Context, task: SubmitTask) -> None:
        await ctx.say("one")
        await ctx.say("two")
        await anyio.sleep(0.05)  # the handler waits: its first turn goes out meanwhile
        await ctx.say("three")
        await ctx.handoff("researcher", reason="next")

    researcher = Agent("researcher")

    @researcher.on(HandoffRequest)
    async def finish(ctx: Context, request: HandoffRequest) -> None:
        await ctx.complete("done")

    return triage, researcher


async def test_a_handlers_turns_reach_intake_as_one_message_each(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.db")
    subjects = Subjects(prefix)
    async with live.system(nats_server, prefix, ledger, team_policy(), *chatty_team()) as bus:
        await say(bus, prefix, envelope("client", "t1", SubmitTask(to="triage", title="x")))
        events = await live.until(ledger, lambda e: Kind.COMPLETED in kinds(of(e, "t1")))
        intake = []
        for seq in range(1, 5):
            stored = await bus.stored(subjects.intake_stream, seq)
            assert stored is not None
            intake.append(stored)
        assert await bus.stored(subjects.intake_stream, 5) is None

    assert kinds(of(events, "t1")) == [
        Kind.SUBMITTED, Kind.ASSIGNED, Kind.SAID, Kind.SAID, Kind.SAID,
        Kind.HANDOFF_REQUESTED, Kind.ASSIGNED, Kind.HANDOFF_ACCEPTED, Kind.COMPLETED]
    assert [e["data"]["text"] for e in of(events, "t1") if e["kind"] == Kind.SAID] == [
        "one", "two", "three"]
    # The submission, triage's two turns (two outputs each), the researcher's one output.
    assert [subject for subject, _, _ in intake] == [
        subjects.intake("client"), subjects.intake("triage"), subjects.intake("triage"),
        subjects.intake("researcher")]
    turns = []
    for _, data, headers in intake[1:]:
        # Every turn is a batch, even of one envelope, under an id keyed with the agent's
        # secret: not the envelope id, not the unkeyed batch id (nobody else can take it).
        assert is_batch(data)
        parts = [_codec.decode_envelope(part) for part in _codec.split_batch(data)]
        ids = [p.id for p in parts]
        assert headers["Nats-Msg-Id"] not in {*ids, batch_msg_id(ids)}
        turns.append(parts)
    assert [len(parts) for parts in turns] == [2, 2, 1]
    recorded = {e["msg_id"] for e in of(events, "t1")}
    assert all(p.id in recorded for parts in turns for p in parts)
    assert isinstance(turns[2][0].body, Complete)


async def test_an_output_id_another_principal_took_first_does_not_stop_the_output(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    """JetStream deduplicates by Nats-Msg-Id across the whole intake stream. Another
    principal who knows a delivery can compute the ids of its outputs, and publishes junk
    under each id the agent could have used first: the agent's output is recorded all
    the same (its intake messages' ids are keyed with a secret of its own)."""
    ledger = str(tmp_path / "ledger.db")
    subjects = Subjects(prefix)
    triage = Agent("triage")

    @triage.on(SubmitTask)
    async def finish(ctx: Context, task: SubmitTask) -> None:
        await ctx.complete("done")

    async with live.system(nats_server, prefix, ledger, team_policy()) as bus:
        await say(bus, prefix, envelope("client", "t1", SubmitTask(to="triage", title="x")))
        events = await live.until(ledger, lambda e: Kind.ASSIGNED in kinds(of(e, "t1")))
        delivery = next(e for e in of(events, "t1")
                        if e["kind"] == Kind.ASSIGNED)["data"]["delivery"]
        output = uuid5_text(NS_OUTPUT, f"{delivery['id']}:1")  # its first output's id
        for taken in (output, batch_msg_id([output])):
            ack = await bus.publish(subjects.intake("writer"), b"junk", msg_id=taken)
            assert not ack.duplicate
        async with anyio.create_task_group() as tg:
            await tg.start(run_agent, triage, AgentSettings(nats_server.url, subjects))
            events = await live.until(ledger, lambda e: Kind.COMPLETED in kinds(of(e, "t1")))
            tg.cancel_scope.cancel()
    completed = [e for e in of(events, "t1") if e["kind"] == Kind.COMPLETED]
    assert [e["msg_id"] for e in completed] == [output]

"""What a handler says reaches intake turn by turn: everything said before the handler
next waits on something goes out as one message (a batch, when there is more than one
output), and the ledger records it all in the order said."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec

from agents import Agent, Context
from bus.embedded import EmbeddedNats
from coordinator.ledger.events import Kind
from schemas import Codec, HandoffRequest, Subjects, SubmitTask, batch_msg_id, is_batch
from tests import live
from tests.live import envelope, kinds, of, say, team_policy

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
    for _, data, headers in intake[1:3]:
        assert is_batch(data)
        parts = [_codec.decode_envelope(part) for part in _codec.split_batch(data)]
        assert len(parts) == 2
        assert headers["Nats-Msg-Id"] == batch_msg_id([p.id for p in parts])
    _, alone, headers = intake[3]
    assert not is_batch(alone)
    assert headers["Nats-Msg-Id"] == _codec.decode_envelope(alone).id
    recorded = {e["msg_id"] for e in of(events, "t1")}
    assert all(p.id in recorded for _, data, _ in intake[1:3]
               for p in map(_codec.decode_envelope, _codec.split_batch(data)))
    assert msgspec.json.decode(intake[3][1])["body"]["type"] == "task.complete"

"""The coordinator in-process against a real nats-server and a real SQLite ledger.

Each test runs ``run_coordinator`` in a task group under its own subject prefix, speaks to it
as a client would (raw bytes on intake subjects, through ``Bus``), and checks what it
recorded (the ledger, read back) and what it relayed (the JetStream streams, read with
nats-py directly).
"""

from __future__ import annotations

import base64
import gc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.js import JetStreamContext, api

from bus.client import Bus, BusSettings, PubAck, open_bus
from bus.embedded import EmbeddedNats
from bus.topology import coordinator_consumer
from coordinator.ledger.events import Kind
from coordinator.ledger.replay import replay
from coordinator.ledger.store import Ledger, open_ledger
from coordinator.ledger.writer import IntakeMessage, LedgerWriter
from coordinator.policy import Policy, load_policy, parse_policy
from coordinator.service import CoordinatorSettings, run_coordinator
from schemas import (
    Body,
    Codec,
    Complete,
    Envelope,
    HandoffDecision,
    HandoffRequest,
    LedgerRecord,
    Say,
    Subjects,
    SubmitTask,
    batch_msg_id,
    canonical,
)

TIMEOUT = 15.0
POLL = 0.02
DEDUP_WINDOW = 0.2  # seconds, for the streams of the restart tests
EXAMPLE_POLICY = load_policy(
    Path(__file__).resolve().parents[2] / "agents" / "examples" / "ledgermesh.toml"
)
SENT_AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
_codec = Codec()


# -- harness ------------------------------------------------------------------------------
async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds; TimeoutError after TIMEOUT seconds."""
    with anyio.fail_after(TIMEOUT):
        while True:
            if await check():
                return
            await anyio.sleep(POLL)


@dataclass
class Harness:
    """One coordinator's world: its subjects, its ledger file, a client bus and a reader."""

    subjects: Subjects
    settings: CoordinatorSettings
    bus: Bus
    js: JetStreamContext
    ledger: Ledger | None = None  # a second, read-only handle on the coordinator's ledger

    @property
    def reader(self) -> Ledger:
        if self.ledger is None:
            self.ledger = open_ledger(self.settings.ledger, create=False)
        return self.ledger

    async def say(
        self, principal: str, message: Envelope | bytes, msg_id: str | None = None
    ) -> PubAck:
        """Publish on ``principal``'s intake subject, as that principal would."""
        if isinstance(message, Envelope):
            data = _codec.encode(message)
            msg_id = msg_id or message.id
        else:
            data = message
        assert msg_id is not None
        return await self.bus.publish(self.subjects.intake(principal), data, msg_id=msg_id)

    async def recorded(self, ack: PubAck) -> None:
        """Wait until the coordinator committed the intake message ``ack`` stands for."""

        async def committed() -> bool:
            return self.reader.tracking_position("intake") >= ack.seq

        await eventually(committed)

    async def intake_acked(self, seq: int) -> Any:
        """Wait until the coordinator's intake consumer has acked up to ``seq``; its info."""
        with anyio.fail_after(TIMEOUT):
            while True:
                info = await self.js.consumer_info(
                    self.subjects.intake_stream, self.subjects.coordinator_consumer)
                if info.ack_floor.stream_seq == seq:
                    return info
                await anyio.sleep(POLL)

    async def relayed(self) -> int:
        """Wait until the ledger stream holds every ledger position; return that count."""
        with anyio.fail_after(TIMEOUT):
            while True:
                last = self.reader.last_position()
                info = await self.js.stream_info(self.subjects.ledger_stream)
                if last and info.state.last_seq >= last:
                    return last
                await anyio.sleep(POLL)

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        return [(n.id, msgspec.json.decode(n.state)) for n in self.reader.read(0, 100_000)]

    def of(self, key: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            s for _, s in self.events() if s["key"] == key and (kind is None or s["kind"] == kind)
        ]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.db")


@asynccontextmanager
async def coordinator(settings: CoordinatorSettings) -> AsyncIterator[None]:
    """A running coordinator; cancelled (as a crash or a stop would) on exit."""
    async with anyio.create_task_group() as tg:
        await tg.start(run_coordinator, settings)
        yield
        tg.cancel_scope.cancel()
    gc.collect()  # whatever it leaked is reported here, under this module's filters


async def test_a_stopped_coordinator_leaves_no_unclosed_stream(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    settings = CoordinatorSettings(nats_server.url, db, EXAMPLE_POLICY, Subjects(prefix))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with anyio.create_task_group() as tg:
            await tg.start(run_coordinator, settings)
            tg.cancel_scope.cancel()
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


@asynccontextmanager
async def harness(
    nats_server: EmbeddedNats, prefix: str, db: str, policy: Policy = EXAMPLE_POLICY
) -> AsyncIterator[Harness]:
    subjects = Subjects(prefix)
    settings = CoordinatorSettings(nats_server.url, db, policy, subjects)
    nc = await nats.connect(nats_server.url, name=f"{prefix}-inspector")
    try:
        async with open_bus(BusSettings(nats_server.url, f"{prefix}-client")) as bus:
            h = Harness(subjects, settings, bus, nc.jetstream())
            try:
                yield h
            finally:
                if h.ledger is not None:
                    h.ledger.close()
    finally:
        await nc.close()


def envelope(id: str, sender: str, task_id: str, body: Body, attempt: int = 0) -> Envelope:
    return Envelope(
        id=id, sender=sender, task_id=task_id, sent_at=SENT_AT, body=body, attempt=attempt
    )


def submit(id: str, task_id: str, to: str = "triage", sender: str = "client") -> Envelope:
    return envelope(
        id,
        sender,
        task_id,
        SubmitTask(to=to, title=f"title of {task_id}", payload={"question": "refund?"}),
    )


async def stream_messages(js: JetStreamContext, stream: str) -> list[Any]:
    """Every message a (limits or not-yet-consumed work queue) stream holds, in order."""
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        out.append(await js.get_msg(stream, seq=seq))
    assert len(out) == info.state.messages
    return out


def kinds(events: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


# -- exactly-once intake ------------------------------------------------------------------
async def test_same_envelope_sent_twice_is_recorded_once(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    async with harness(nats_server, prefix, db) as h, coordinator(h.settings):
        task = submit("env-1", "t1")
        first = await h.say("client", task)
        again = await h.say("client", task)  # same Nats-Msg-Id: JetStream drops it
        assert again.duplicate
        assert again.seq == first.seq
        other = await h.say("client", task, msg_id="another-nats-msg-id")  # not dropped
        assert not other.duplicate
        assert other.seq > first.seq
        await h.recorded(other)

        assert kinds(h.of("t1")) == [Kind.SUBMITTED, Kind.ASSIGNED]
        assert [e["msg_id"] for e in h.of("t1")] == ["env-1", "env-1"]
        assert not [s for _, s in h.events() if s["kind"] == Kind.REJECTED]
        assert h.reader.last_position() == 2
        await h.relayed()
        deliveries = await stream_messages(h.js, h.subjects.deliver_stream)
        assert [m.subject for m in deliveries] == [h.subjects.deliver("triage")]


async def test_an_intake_consumer_with_per_message_acks_is_replaced_after_the_record(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    """A consumer made by an older coordinator (explicit acks, delivering everything) is
    replaced by one acking whole batches, which starts after the recorded position: the
    history is not delivered again, and what comes next is recorded and acked."""
    async with harness(nats_server, prefix, db) as h:
        async with coordinator(h.settings):
            for i in range(3):
                ack = await h.say("client", submit(f"env-{i}", f"t{i}"))
            await h.recorded(ack)
        recorded = ack.seq
        await h.js.delete_consumer(h.subjects.intake_stream, h.subjects.coordinator_consumer)
        await h.js.add_consumer(h.subjects.intake_stream, api.ConsumerConfig(
            durable_name=h.subjects.coordinator_consumer, ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL, filter_subject=h.subjects.intake_all,
            ack_wait=30, max_ack_pending=10_000, max_deliver=-1))
        before = h.events()

        async with coordinator(h.settings):
            info = await h.js.consumer_info(h.subjects.intake_stream,
                                            h.subjects.coordinator_consumer)
            assert info.config.ack_policy == api.AckPolicy.ALL
            assert info.config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE
            assert info.config.opt_start_seq == recorded + 1
            late = await h.say("client", submit("env-9", "t9"))
            await h.recorded(late)
            info = await h.intake_acked(late.seq)
            assert info.delivered.consumer_seq == 1  # only the new message
            assert info.num_ack_pending == 0
        after = h.events()
        assert after[: len(before)] == before
        assert [(s["key"], s["kind"]) for _, s in after[len(before):]] == [
            ("t9", Kind.SUBMITTED), ("t9", Kind.ASSIGNED),
            ("checkpoints", Kind.CHECKPOINTED)]  # signed as it stopped


async def test_redelivered_intake_after_restart_is_a_no_op(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    """Restart on the same ledger with the intake consumer reset: every intake message is
    delivered again, and the tracking position recorded with the events skips them."""
    async with harness(nats_server, prefix, db) as h:
        async with coordinator(h.settings):
            for i in range(3):
                ack = await h.say("client", submit(f"env-{i}", f"t{i}"))
            await h.recorded(ack)
            await h.say("triage", envelope("say-0", "triage", "t0", Say(text="hi"), 1))
            ack = await h.say(
                "triage", envelope("done-0", "triage", "t0", Complete(result="ok"), 1)
            )
            await h.recorded(ack)
            await h.relayed()
        before = h.events()
        assert len(before) == 8 + 1  # and the checkpoint signed as it stopped

        # The durable consumer forgets what was acked: made anew delivering from seq 1 (a
        # coordinator would start it after the recorded position), it delivers it all again.
        await h.js.delete_consumer(h.subjects.intake_stream, h.subjects.coordinator_consumer)
        await h.bus.ensure_consumer(coordinator_consumer(h.subjects))

        async with coordinator(h.settings):
            # Same envelope again, under a new Nats-Msg-Id (past JetStream's dedup), after
            # a restart (a cold cache: the writer must find the id in the stored history).
            resent = await h.say("client", submit("env-1", "t1"), msg_id="resent-env-1")
            late = await h.say("client", submit("env-9", "t9"))
            await h.recorded(late)
            info = await h.js.consumer_info(
                h.subjects.intake_stream, h.subjects.coordinator_consumer
            )
            # Everything in the stream went through the new consumer, old messages included.
            assert info.delivered.stream_seq == late.seq
            assert info.delivered.consumer_seq == late.seq
            info = await h.intake_acked(late.seq)
            assert info.num_ack_pending == 0
            after = h.events()
            assert after[: len(before)] == before
            assert [(s["key"], s["kind"]) for _, s in after[len(before) :]] == [
                ("t9", Kind.SUBMITTED),
                ("t9", Kind.ASSIGNED),
            ]
            assert resent.seq < late.seq
            relayed = await h.relayed()
            assert relayed == len(after)
            copies = await stream_messages(h.js, h.subjects.ledger_stream)
            assert len(copies) == len(after)


async def test_a_coordinator_whose_intake_stream_was_lost_records_what_comes_next(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    """The intake stream and its consumer are gone (a server that lost its store): made
    anew, the stream numbers messages from 1 again, below the recorded position. The new
    consumer starts at the stream's end, not the ledger's, and what arrives is recorded."""
    async with harness(nats_server, prefix, db) as h:
        async with coordinator(h.settings):
            for i in range(3):
                ack = await h.say("client", submit(f"env-{i}", f"t{i}"))
            await h.recorded(ack)
        before = h.events()
        await h.js.delete_stream(h.subjects.intake_stream)

        async with coordinator(h.settings):
            again = await h.say("client", submit("env-1", "t1"))  # said before: a no-op
            late = await h.say("client", submit("env-9", "t9"))
            assert (again.seq, late.seq) == (1, 2)

            async def t9_recorded() -> bool:
                return bool(h.of("t9"))

            await eventually(t9_recorded)
            await h.intake_acked(late.seq)
            after = h.events()
            assert after[: len(before)] == before
            assert [(s["key"], s["kind"]) for _, s in after[len(before):]] == [
                ("t9", Kind.SUBMITTED), ("t9", Kind.ASSIGNED)]
            assert h.reader.tracking_position("intake") == ack.seq  # not moved back


# -- rejections ---------------------------------------------------------------------------
SMALL_POLICY = parse_policy(
    """
submitters = ["client"]
max_payload_bytes = 1024
[agents.triage]
handoff_to = ["researcher"]
[agents.researcher]
handoff_to = ["writer"]
[agents.writer]
""",
    "inline test policy",
)


async def test_bad_input_is_rejected_with_a_reason_and_the_coordinator_keeps_serving(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    async with harness(nats_server, prefix, db, SMALL_POLICY) as h, coordinator(h.settings):
        ack = await h.say("client", submit("t1-submit", "t1"))
        await h.recorded(ack)
        assert kinds(h.of("t1")) == [Kind.SUBMITTED, Kind.ASSIGNED]

        good = _codec.encode(submit("x", "tx"))
        unknown_body = good.replace(b'"task.submit"', b'"task.explode"')
        int_task_id = good.replace(b'"task_id":"tx"', b'"task_id":42')
        assert unknown_body != good
        assert int_task_id != good
        bad: list[tuple[str, Envelope | bytes, str, str, str]] = [
            # (published by, message, expected code, aggregate, key)
            (
                "client",
                submit("spoof-1", "t-spoof", sender="triage"),
                "spoofed_sender",
                "principal",
                "client",
            ),
            ("client", b"this is not json {", "malformed", "principal", "client"),
            ("client", unknown_body, "malformed", "principal", "client"),
            ("client", int_task_id, "malformed", "principal", "client"),
            ("client", b'{"pad":"' + b"x" * 1500 + b'"}', "oversize", "principal", "client"),
            (
                "triage",
                envelope("h-1", "triage", "t1", HandoffRequest(to="writer", reason="r"), 1),
                "handoff_denied",
                "task",
                "t1",
            ),
            (
                # Not a participant of t1: recorded on its own record, not t1's chain.
                "researcher",
                envelope("n-1", "researcher", "t1", Say(text="mine now"), 1),
                "not_owner",
                "principal",
                "researcher",
            ),
            (
                "triage",
                envelope("u-1", "triage", "no-such-task", Say(text="?"), 1),
                "unknown_task",
                "principal",
                "triage",
            ),
            (
                "triage",
                envelope("d-1", "triage", "t1", HandoffDecision(accept=True), 1),
                "no_pending_handoff",
                "task",
                "t1",
            ),
            (
                "triage",
                envelope("s-1", "triage", "t1", Say(text="old"), 0),
                "stale_attempt",
                "task",
                "t1",
            ),
            ("client", submit("dup-submit", "t1"), "task_exists", "task", "t1"),
        ]
        mismatched = envelope("m-1", "triage", "t1", Say(text="id games"), 1)
        for n, (principal, message, *_) in enumerate(bad):
            # Envelopes go out with their own id as Nats-Msg-Id, as every sender must.
            ack = await h.say(principal, message,
                              msg_id=None if isinstance(message, Envelope) else f"bad-{n}")
        ack = await h.say("triage", mismatched, msg_id="not-the-envelope-id")
        bad.append(("triage", mismatched, "msg_id_mismatch", "task", "t1"))
        await h.recorded(ack)

        rejected = [s for _, s in h.events() if s["kind"] == Kind.REJECTED]
        got = [(r["data"]["code"], r["aggregate"], r["key"]) for r in rejected]
        assert got == [(code, agg, key) for *_, code, agg, key in bad]
        for r, (principal, message, *_) in zip(rejected, bad, strict=True):
            assert r["data"]["reason"], r
            assert r["data"]["subject_principal"] == principal
            if r["data"]["code"] != "oversize":  # the raw bytes, exactly as received
                data = message if isinstance(message, bytes) else _codec.encode(message)
                assert base64.b64decode(r["raw"]) == data
        reasons = {r["data"]["code"]: r["data"]["reason"] for r in rejected}
        assert "task.explode" in str([r["data"]["reason"] for r in rejected])
        assert "triage" in reasons["handoff_denied"]
        assert "writer" in reasons["handoff_denied"]
        assert "1024" in reasons["oversize"]

        # Nothing rejected changed t1, and the coordinator still serves: t1's owner can
        # still act, and a new task gets its first assignment, delivery and completion.
        assert h.of("t1", Kind.SUBMITTED)[0]["msg_id"] == "t1-submit"
        await h.say("client", submit("t2-submit", "t2"))
        ack = await h.say(
            "triage", envelope("t2-done", "triage", "t2", Complete(result="answered"), 1)
        )
        await h.recorded(ack)
        assert kinds(h.of("t2")) == [Kind.SUBMITTED, Kind.ASSIGNED, Kind.COMPLETED]
        state = replay(h.reader)
        assert state.verified
        assert state.tasks["t2"].status == "completed"
        assert state.tasks["t1"].status == "assigned"
        assert state.tasks["t1"].owner == "triage"
        await h.relayed()
        deliveries = await stream_messages(h.js, h.subjects.deliver_stream)
        assert [m.subject for m in deliveries] == [h.subjects.deliver("triage")] * 2
        assert [msgspec.json.decode(m.data)["task_id"] for m in deliveries] == ["t1", "t2"]


# -- batches ------------------------------------------------------------------------------
async def test_a_batch_is_recorded_as_its_envelopes_alone_would_be(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    """Envelopes in one intake message (a JSON array) are each decided as if alone, in
    order: a bad one is rejected on its own, a resent batch adds nothing."""
    async with harness(nats_server, prefix, db, SMALL_POLICY) as h, coordinator(h.settings):
        await h.recorded(await h.say("client", submit("t1-submit", "t1")))
        say = _codec.encode(envelope("t1-say", "triage", "t1", Say(text="looking"), 1))
        handoff = _codec.encode(envelope("t1-handoff", "triage", "t1",
                                         HandoffRequest(to="researcher", reason="r"), 1))
        garbage = b'{"pad":"not an envelope"}'
        oversize = b'{"pad":"' + b"x" * 1100 + b'"}'  # over SMALL_POLICY's 1024, alone
        batch = b"[" + b",".join([say, garbage, oversize, handoff]) + b"]"
        batch_id = batch_msg_id(["t1-say", "t1-handoff"])
        ack = await h.say("triage", batch, msg_id=batch_id)
        await h.recorded(ack)

        assert kinds(h.of("t1")) == [Kind.SUBMITTED, Kind.ASSIGNED, Kind.SAID,
                                     Kind.HANDOFF_REQUESTED, Kind.ASSIGNED]
        said = h.of("t1", Kind.SAID)[0]
        assert said["msg_id"] == "t1-say"
        assert base64.b64decode(said["raw"]) == say  # the element's own bytes, as received
        rejected = h.of("triage", Kind.REJECTED)
        assert [(r["data"]["code"], r["msg_id"]) for r in rejected] == [
            ("malformed", f"{batch_id}/1"), ("oversize", f"{batch_id}/2")]
        assert base64.b64decode(rejected[0]["raw"]) == garbage
        before = h.reader.last_position()

        # The same batch again under another Nats-Msg-Id (JetStream stores it): the
        # recorded envelopes are known by their ids; the bad ones, as bad messages sent
        # anew, are rejected anew. An empty batch is one rejection.
        again = await h.say("triage", batch, msg_id=batch_id + "-again")
        assert not again.duplicate
        empty = await h.say("triage", b" []", msg_id="empty")
        await h.recorded(empty)
        rejected = h.of("triage", Kind.REJECTED)
        assert [(r["data"]["code"], r["msg_id"]) for r in rejected[2:]] == [
            ("malformed", f"{batch_id}-again/1"), ("oversize", f"{batch_id}-again/2"),
            ("malformed", "empty")]
        assert "empty batch" in rejected[-1]["data"]["reason"]
        assert kinds(h.of("t1"))[-1] == Kind.ASSIGNED
        assert h.reader.last_position() == before + 3
        assert replay(h.reader).verified


# -- relay --------------------------------------------------------------------------------
async def check_relayed(h: Harness) -> list[tuple[int, dict[str, Any]]]:
    """Every ledger event exactly once in the ledger stream, in ledger order, and every
    assignment exactly once on its agent's deliver subject."""
    total = await h.relayed()
    events = h.events()
    assert [p for p, _ in events] == list(range(1, total + 1))
    notifications = {n.id: n for n in h.reader.read(0, 100_000)}

    copies = await stream_messages(h.js, h.subjects.ledger_stream)
    assert len(copies) == total
    for seq, (msg, (position, state)) in enumerate(zip(copies, events, strict=True), start=1):
        assert msg.seq == seq == position
        assert msg.headers["Nats-Msg-Id"] == f"{h.subjects.prefix}:{position}"
        if position > 1:  # the guard that keeps two relays from interleaving
            expected = msg.headers["Nats-Expected-Last-Msg-Id"]
            assert expected == f"{h.subjects.prefix}:{position - 1}"
        assert msg.subject == h.subjects.ledger(state["aggregate"], state["key"], state["kind"])
        record = msgspec.json.decode(msg.data, type=LedgerRecord)
        assert record.position == position
        assert record.version == notifications[position].originator_version
        assert bytes(record.event) == notifications[position].state

    assigned = [s for _, s in events if s["kind"] == Kind.ASSIGNED]
    deliveries = await stream_messages(h.js, h.subjects.deliver_stream)
    assert len(deliveries) == len(assigned)
    for msg, event in zip(deliveries, assigned, strict=True):
        delivery = event["data"]["delivery"]
        assert msg.subject == h.subjects.deliver(event["data"]["agent"])
        assert msg.headers["Nats-Msg-Id"] == delivery["id"]
        assert msg.data == canonical(delivery)
        decoded = _codec.decode_delivery(msg.data)
        assert (decoded.agent, decoded.task_id, decoded.attempt) == (
            event["data"]["agent"],
            event["key"],
            event["data"]["attempt"],
        )
    return events


async def short_dedup_streams(h: Harness) -> None:
    """Create the ledger and deliver streams with a tiny dedup window, so that a relay that
    republished what was already relayed would show up as duplicates (with the default
    window of two minutes JetStream would hide them)."""
    for name, subject, retention in (
        (h.subjects.ledger_stream, h.subjects.ledger_all, api.RetentionPolicy.LIMITS),
        (h.subjects.deliver_stream, h.subjects.deliver_all, api.RetentionPolicy.WORK_QUEUE),
    ):
        await h.js.add_stream(
            api.StreamConfig(
                name=name,
                subjects=[subject],
                retention=retention,
                storage=api.StorageType.FILE,
                duplicate_window=DEDUP_WINDOW,
            )
        )


async def dedup_window_passes() -> None:
    # Not synchronisation: JetStream must forget the ids, and only time does that.
    await anyio.sleep(DEDUP_WINDOW * 3)


async def test_relay_publishes_every_event_once_in_order_across_restarts(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    async with harness(nats_server, prefix, db) as h:
        await short_dedup_streams(h)
        async with coordinator(h.settings):
            for i in range(3):
                await h.say("client", submit(f"s{i}", f"t{i}"))
            await h.say(
                "triage",
                envelope("h0", "triage", "t0", HandoffRequest(to="researcher", reason="lookup"), 1),
            )
            ack = await h.say(
                "researcher",
                envelope("d0", "researcher", "t0", HandoffDecision(accept=False, reason="no"), 2),
            )
            await h.recorded(ack)
            ack = await h.say("client", b"garbage", msg_id="g1")  # relayed like any event
            await h.recorded(ack)
            first = await check_relayed(h)
            assert len(first) == 11
            deliveries = await stream_messages(h.js, h.subjects.deliver_stream)
            assert sorted(m.subject.rsplit(".", 1)[1] for m in deliveries) == [
                "researcher",
                "triage",
                "triage",
                "triage",
                "triage",
            ]
        await dedup_window_passes()

        # Restart on the same ledger: the relay resumes after the stream's last message.
        async with coordinator(h.settings):
            ack = await h.say("client", submit("s9", "t9"))
            await h.recorded(ack)
            second = await check_relayed(h)
            assert second[: len(first)] == first
            # The first stop signed a checkpoint and relayed it; then the new task.
            assert [s["kind"] for _, s in second[len(first):]] == [
                Kind.CHECKPOINTED, Kind.SUBMITTED, Kind.ASSIGNED]
        await dedup_window_passes()

        # And once more with nothing new: still nothing relayed twice.
        async with coordinator(h.settings):
            ack = await h.say("triage", envelope("c9", "triage", "t9", Complete(result="ok"), 1))
            await h.recorded(ack)
            third = await check_relayed(h)
            assert [s["kind"] for _, s in third[len(second):]] == [
                Kind.CHECKPOINTED, Kind.COMPLETED]


async def test_events_committed_but_not_relayed_before_a_crash_are_relayed_once(
    nats_server: EmbeddedNats, prefix: str, db: str
) -> None:
    """A crash after the commit and before the relay and the ack: on restart the relay
    publishes what the stream lacks, and the intake redelivery is skipped by tracking."""
    async with harness(nats_server, prefix, db) as h:
        await short_dedup_streams(h)
        async with coordinator(h.settings):
            ack = await h.say("client", submit("s1", "t1"))
            await h.recorded(ack)
            await check_relayed(h)
        await dedup_window_passes()

        # While it is down, a message arrives and gets recorded, as the crashed coordinator
        # would have done, but nothing is relayed or acked.
        data = _codec.encode(submit("s2", "t2"))
        pending = await h.bus.publish(h.subjects.intake("client"), data, msg_id="s2")
        ledger = open_ledger(db, create=False)
        try:
            writer = LedgerWriter(ledger, h.settings.policy, h.subjects, h.settings.clock)
            done = writer.record(
                [IntakeMessage(pending.seq, h.subjects.intake("client"), data, "s2")]
            )
            assert len(done.events) == 2
        finally:
            ledger.close()
        info = await h.js.stream_info(h.subjects.ledger_stream)
        assert info.state.messages == 3  # t1's two and the checkpoint its stop signed
        assert h.reader.last_position() == 5

        async with coordinator(h.settings):
            events = await check_relayed(h)
            assert [(s["key"], s["kind"]) for _, s in events] == [
                ("t1", Kind.SUBMITTED),
                ("t1", Kind.ASSIGNED),
                ("checkpoints", Kind.CHECKPOINTED),
                ("t2", Kind.SUBMITTED),
                ("t2", Kind.ASSIGNED),
            ]

            async def all_acked() -> bool:  # the redelivered message is acked, not re-recorded
                return await h.bus.consumer_pending(coordinator_consumer(h.subjects)) == 0

            await eventually(all_acked)
            ack = await h.say("client", submit("s3", "t3"))
            await h.recorded(ack)
            events = await check_relayed(h)
            assert len(events) == 7
            assert len(h.of("t2")) == 2

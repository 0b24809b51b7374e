"""A flood of generated bad messages on the intake subjects of a running coordinator (real
nats-server, real SQLite ledger), interleaved with a good task flow.

The coordinator must stay up (its task group keeps running and a task submitted after the
flood is recorded), record every bad message it received as exactly one
``message.rejected`` with a reason (unique Nats-Msg-Ids, so JetStream's deduplication drops
none), and record the good tasks exactly as their flow says. Messages larger than the
intake stream's ``max_msg_size`` never reach it: the broker refuses the publish.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.js.errors
from anyio.abc import TaskStatus
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext

from bus.embedded import EmbeddedNats
from bus.topology import streams
from coordinator.ledger.events import Aggregate, Kind
from coordinator.ledger.replay import replay
from coordinator.ledger.store import Ledger, open_ledger
from coordinator.ledger.writer import UNKNOWN_PRINCIPAL
from coordinator.policy import parse_policy
from coordinator.service import CoordinatorSettings, run_coordinator
from schemas import (
    Body,
    Complete,
    Envelope,
    HandoffDecision,
    HandoffRequest,
    Say,
    Subjects,
    SubmitTask,
)
from tests.strategies import TEMPLATE_POOL, BadIntake, as_json_dict, bad_intake, match_rejections

POLICY = parse_policy(
    """
submitters = ["client"]
operators = ["operator"]
max_payload_bytes = 4096
[agents.triage]
handoff_to = ["researcher"]
[agents.researcher]
handoff_to = ["writer"]
[agents.writer]
""",
    "fuzz intake policy",
)
LIMIT = POLICY.max_payload_bytes
MAX_MSG_SIZE = streams(Subjects(), LIMIT)[0].max_msg_size  # the intake stream's
PRINCIPALS = ("client", "triage", "researcher", "writer", "mallory")
GOOD_TASKS = ("g1", "g2", "g3")
STALL_S = 8.0  # a healthy coordinator records the whole flood in well under a second
PRODUCTION_RECURSION_LIMIT = 1000  # Hypothesis raises the limit while a test runs
SENT_AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
MSG_ID = "Nats-Msg-Id"

BAD = bad_intake(
    max_payload_bytes=LIMIT,
    principals=PRINCIPALS,
    submitter="client",
    stranger="mallory",
    outsider="writer",
    agent="triage",
    task_ids=st.sampled_from(GOOD_TASKS),
    templates=st.sampled_from(TEMPLATE_POOL),
    max_random_bytes=24,
    max_excess=MAX_MSG_SIZE + 1024,  # some above the stream's limit: refused by the broker
)


# Always in the flood, whatever was drawn: one message the coordinator must reject as
# oversize, one the broker must refuse.
OVER_POLICY = BadIntake("huge", "client", b'{"pad":"' + b"x" * (LIMIT + 100) + b'"}',
                        "edge-over-policy", frozenset({"malformed"}))
OVER_STREAM = BadIntake("huge", "client", b'{"pad":"' + b"x" * (MAX_MSG_SIZE + 100) + b'"}',
                        "edge-over-stream", frozenset({"malformed"}))


def _unique(message: BadIntake) -> object:
    # Unique Nats-Msg-Ids: JetStream would drop a repeated one as a duplicate.
    return message.msg_id if message.msg_id is not None else (message.tail, message.data)


@st.composite
def floods(draw: st.DrawFn) -> tuple[list[BadIntake], str]:
    """A few hundred bad messages over the examples, and where the good ones go among them
    ("g": the next good message, each task's in order; "b": the next bad one)."""
    flood = draw(st.lists(BAD, min_size=90, max_size=110, unique_by=_unique))
    flood[draw(st.integers(0, len(flood))):0] = [OVER_POLICY]
    flood[draw(st.integers(0, len(flood))):0] = [OVER_STREAM]
    slots = draw(st.permutations("g" * len(DURING) + "b" * len(flood)))
    return flood, "".join(slots)


def envelope(id: str, sender: str, task_id: str, body: Body, attempt: int = 0) -> Envelope:
    return Envelope(id=id, sender=sender, task_id=task_id, sent_at=SENT_AT, body=body,
                    attempt=attempt)


@dataclass(frozen=True)
class Good:
    sender: str
    data: bytes
    msg_id: str


def good(env: Envelope, extra: dict[str, Any] | None = None) -> Good:
    obj = as_json_dict(env)
    if extra:  # unknown fields: a newer sender's, which must be accepted
        obj.update(extra)
        obj["body"].update(extra)
    return Good(env.sender, msgspec.json.encode(obj), env.id)


# Two tasks during the flood (a declined handoff, unknown fields); a third after it.
DURING = [
    good(envelope("g1-0", "client", "g1", SubmitTask(to="triage", title="Refund?"))),
    good(envelope("g2-0", "client", "g2", SubmitTask(to="triage", title="Hi", payload={"a": 1})),
         {"x-schema": 2, "x-meta": {"via": "newer-sdk"}}),
    good(envelope("g1-1", "triage", "g1", HandoffRequest(to="researcher", reason="lookup"), 1)),
    good(envelope("g2-1", "triage", "g2", Complete(result="hello"), 1), {"x-extra": [1, 2]}),
    good(envelope("g1-2", "researcher", "g1", HandoffDecision(accept=False, reason="no"), 2)),
    good(envelope("g1-3", "triage", "g1", Say(text="I'll answer myself"), 3)),
    good(envelope("g1-4", "triage", "g1", Complete(result="refunded"), 3)),
]
AFTER = [
    good(envelope("g3-0", "client", "g3", SubmitTask(to="triage", title="Still there?"))),
    good(envelope("g3-1", "triage", "g3", Complete(result="yes"), 1)),
]
K = Kind
EXPECTED_KINDS = {
    "g1": [K.SUBMITTED, K.ASSIGNED, K.HANDOFF_REQUESTED, K.ASSIGNED, K.HANDOFF_DECLINED,
           K.ASSIGNED, K.SAID, K.COMPLETED],
    "g2": [K.SUBMITTED, K.ASSIGNED, K.COMPLETED],
    "g3": [K.SUBMITTED, K.ASSIGNED, K.COMPLETED],
}


# -- harness ------------------------------------------------------------------------------
@dataclass
class Coordinator:
    settings: CoordinatorSettings
    stopped: BaseException | str | None = None  # why run_coordinator ended, if it did
    log: list[str] = field(default_factory=list)  # its warnings and errors


@asynccontextmanager
async def running(settings: CoordinatorSettings) -> AsyncIterator[Coordinator]:
    """``run_coordinator`` in a task group, as the service runs it; cancelled on exit."""
    coordinator = Coordinator(settings)

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            coordinator.log.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("ledgermesh.coordinator")
    logger.addHandler(handler)

    async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await run_coordinator(settings, task_status=task_status)
        except BaseException as exc:
            coordinator.stopped = exc
            raise
        coordinator.stopped = "run_coordinator returned"

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            yield coordinator
            tg.cancel_scope.cancel()
    finally:
        logger.removeHandler(handler)


@contextmanager
def production_recursion_limit() -> Iterator[None]:
    """The coordinator's worker threads must judge deep nesting as in production."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(PRODUCTION_RECURSION_LIMIT)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


async def publish(js: JetStreamContext, subject: str, data: bytes,
                  msg_id: str | None) -> int | None:
    """Publish to the intake stream; its sequence, or None if the broker refused it."""
    try:
        ack = await js.publish(subject, data, headers=None if msg_id is None
                               else {MSG_ID: msg_id})
    except nats.js.errors.APIError as exc:
        refusal = str(exc.description)
    else:
        refusal = ""
    if refusal:
        assert "maximum" in refusal, refusal  # "message size exceeds maximum allowed"
        return None
    assert not ack.duplicate, f"JetStream dropped {msg_id!r} as a duplicate"
    return int(ack.seq)


async def recorded(ledger: Ledger, seq: int, coordinator: Coordinator) -> None:
    """Until the intake tracking position reaches ``seq``; fails if intake stalls."""
    with anyio.move_on_after(STALL_S):
        while ledger.tracking_position("intake") < seq:
            assert coordinator.stopped is None, f"the coordinator stopped: {coordinator.stopped!r}"
            # It retries a batch it cannot record forever: nothing behind it gets through.
            stuck = [line for line in coordinator.log if "cannot record" in line]
            assert not stuck, f"intake is stuck at position " \
                f"{ledger.tracking_position('intake')} of {seq}: {stuck[0]}"
            await anyio.sleep(0.02)
        return
    raise AssertionError(
        f"intake stalled at position {ledger.tracking_position('intake')} of {seq} for "
        f"{STALL_S:g} s; coordinator log:\n  " + "\n  ".join(coordinator.log[-5:]))


def principal_key(subjects: Subjects, tail: str) -> str:
    return subjects.principal_of(subjects.intake(tail)) or UNKNOWN_PRINCIPAL


# -- the test -----------------------------------------------------------------------------
@settings(
    max_examples=3,
    deadline=None,
    # Each example runs a coordinator; a stalled one costs STALL_S, so no shrinking.
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example,
                           HealthCheck.function_scoped_fixture],
)
@given(scenario=floods())
async def test_a_flood_of_bad_messages_is_rejected_and_the_coordinator_keeps_serving(
    nats_server: EmbeddedNats, scenario: tuple[list[BadIntake], str],
) -> None:
    flood, slots = scenario
    prefix = "fz" + uuid.uuid4().hex[:8]
    subjects = Subjects(prefix)
    with tempfile.TemporaryDirectory(prefix="lm-fuzz-intake-") as tmp, \
            production_recursion_limit():
        db = str(Path(tmp) / "ledger.db")
        settings_ = CoordinatorSettings(nats_server.url, db, POLICY, subjects)
        nc = await nats.connect(nats_server.url, name=f"{prefix}-fuzzer")
        reader: Ledger | None = None
        try:
            async with running(settings_) as coordinator:
                js = nc.jetstream()
                reader = open_ledger(db, create=False)
                sent: list[tuple[BadIntake, int]] = []  # bad messages in the stream, by seq
                refused: list[BadIntake] = []
                good_left, bad_left = iter(DURING), iter(flood)
                last = 0
                for slot in slots:
                    if slot == "g":
                        g = next(good_left)
                        seq = await publish(js, subjects.intake(g.sender), g.data, g.msg_id)
                        assert seq is not None
                        last = seq
                        continue
                    bad = next(bad_left)
                    seq = await publish(js, f"{prefix}.intake.{bad.tail}", bad.data, bad.msg_id)
                    if seq is None:
                        refused.append(bad)
                    else:
                        sent.append((bad, seq))
                        last = seq
                await recorded(reader, last, coordinator)
                # Still serving: a task submitted after the flood goes through.
                for g in AFTER:
                    seq = await publish(js, subjects.intake(g.sender), g.data, g.msg_id)
                    assert seq is not None
                    last = seq
                await recorded(reader, last, coordinator)
                assert coordinator.stopped is None

                # The broker stopped exactly what exceeds the stream's max_msg_size.
                assert OVER_STREAM in refused
                assert OVER_POLICY in [b for b, _ in sent]
                assert all(len(b.data) > LIMIT for b in refused)
                assert [b for b, _ in sent if len(b.data) > MAX_MSG_SIZE] == []
                assert len(sent) + len(refused) == len(flood)

                events = [msgspec.json.decode(n.state) for n in reader.read(0, 1_000_000)]
                check_rejections(subjects, events, sent)
                for task_id, kinds in EXPECTED_KINDS.items():
                    assert [e["kind"] for e in events if e["key"] == task_id] == kinds, task_id
                assert {e["key"] for e in events if e["aggregate"] == Aggregate.TASK} == \
                    set(GOOD_TASKS), "no task came from a bad message"
                result = replay(reader)
                assert result.verified, result.breaks
                assert result.tasks["g1"].status == "completed"
                assert result.tasks["g1"].participants == ["triage", "researcher"]
        finally:
            if reader is not None:
                reader.close()
            await nc.close()


def check_rejections(subjects: Subjects, events: list[dict[str, Any]],
                     sent: list[tuple[BadIntake, int]]) -> None:
    """One ``message.rejected`` per bad message in the stream (per element, for one that
    reads as a batch), with an acceptable code and a reason, on the publishing principal's
    record."""
    expected, got = match_rejections(
        events, ((principal_key(subjects, bad.tail), bad, bad.data, bad.msg_id or f"seq-{seq}")
                 for bad, seq in sent), LIMIT)
    assert sum(got.values()) >= len(sent), "a rejection for each bad message in the stream"
    assert got == expected

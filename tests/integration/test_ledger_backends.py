"""The ledger contract, run against every backend (eventsourcing's tests/persistence.py pattern).

``LedgerContract`` holds the tests; each backend subclass says how to make a fresh ledger
location and how to reach behind the ledger's back into the database (to tamper with it).
SQLite always runs; PostgreSQL runs when ``LEDGERMESH_TEST_POSTGRES`` names a DSN such as
``postgresql://postgres@127.0.0.1:5432/test`` (each test gets its own schema).
"""

from __future__ import annotations

import io
import os
import sqlite3
import time
import uuid
from collections.abc import Generator, Iterator
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, Tracking

from bus.client import EXPECTED_LAST_MSG_ID, MSG_ID, BusSettings, open_bus
from bus.embedded import EmbeddedNats
from coordinator.ledger.events import (
    Aggregate,
    Draft,
    Kind,
    LedgerEvent,
    Provenance,
    Sealed,
    chain_hash,
    principal_aggregate_id,
    stamp,
    task_aggregate_id,
)
from coordinator.ledger.feed import CommitFeed
from coordinator.ledger.owner import (
    LedgerInUseError,
    _PostgresLock,
    advisory_key,
    sole_writer,
)
from coordinator.ledger.replay import replay, verify_history
from coordinator.ledger.state import PrincipalState, TaskState, digest
from coordinator.ledger.store import Ledger, LedgerError, aggregate_text, open_ledger
from coordinator.ledger.writer import IntakeMessage, LedgerWriter, Recorded
from coordinator.policy import Policy
from coordinator.relay import outbox_items
from coordinator.service import CoordinatorSettings, run_coordinator
from ledgermesh.export import export_ledger
from schemas import (
    ApproveTool,
    Body,
    Codec,
    Complete,
    Envelope,
    Fail,
    HandoffDecision,
    HandoffRequest,
    LedgerRecord,
    ResumeAgent,
    Say,
    Subjects,
    SubmitTask,
    SuspendAgent,
    canonical,
)
from tests.live import team_policy

POSTGRES_ENV = "LEDGERMESH_TEST_POSTGRES"
POSTGRES_DSN = os.environ.get(POSTGRES_ENV, "")

POLICY: Policy = team_policy()
SUBJECTS = Subjects("lm")
SENT_AT = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
RECORDED_AT = datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC)
_codec = Codec()


def _said(key: str, first: int, last: int) -> list[Sealed]:
    """Versions ``first``..``last`` of task ``key``, each a Said event."""
    return [stamp(Draft(aggregate=Aggregate.TASK, key=key, kind=Kind.SAID, data={"text": "x"},
                        provenance=Provenance(msg_id=f"{key}-{v}", sender="hop", raw="eA==")),
                  version=v, prev_hash="00" * 32, recorded_at=RECORDED_AT.isoformat())
            for v in range(first, last + 1)]


def fixed_clock() -> datetime:
    return RECORDED_AT


def _env(n: int, sender: str, task_id: str, body: Body, attempt: int = 0) -> Envelope:
    return Envelope(
        id=f"m{n:02d}", sender=sender, task_id=task_id, sent_at=SENT_AT, body=body, attempt=attempt
    )


def scenario() -> list[IntakeMessage]:
    """Intake messages of a small, varied history (seq = stream sequence, from 1)."""
    said: list[tuple[str, Envelope | bytes]] = [
        (
            "client",
            _env(
                1,
                "client",
                "t1",
                SubmitTask(to="triage", title="refund?", payload={"question": "refund?"}),
            ),
        ),
        ("triage", _env(2, "triage", "t1", Say(text="routing to research"), 1)),
        (
            "triage",
            _env(
                3,
                "triage",
                "t1",
                HandoffRequest(to="researcher", reason="lookup", payload={"q": 1}),
                1,
            ),
        ),
        (
            "researcher",
            _env(4, "researcher", "t1", HandoffDecision(accept=False, reason="too vague"), 2),
        ),
        ("triage", _env(5, "triage", "t1", HandoffRequest(to="researcher", reason="again"), 3)),
        ("researcher", _env(6, "researcher", "t1", Say(text="policy 4.2 applies"), 4)),
        ("researcher", _env(7, "researcher", "t1", Complete(result="approved"), 4)),
        ("client", _env(8, "client", "t2", SubmitTask(to="writer", title="shipping"))),
        ("writer", _env(9, "writer", "t2", Fail(reason="no data", retryable=False), 1)),
        # Spoofed: says it is the writer but arrives on the client's subject.
        ("client", _env(10, "writer", "t2", Say(text="not me"), 1)),
        ("mallory", b"{not json"),
        ("client", _env(12, "client", "t3", SubmitTask(to="reviewer", title="invoice"))),
    ]
    out: list[IntakeMessage] = []
    for seq, (principal, message) in enumerate(said, start=1):
        data = message if isinstance(message, bytes) else _codec.encode(message)
        msg_id = message.id if isinstance(message, Envelope) else f"raw-{seq}"
        out.append(IntakeMessage(seq, SUBJECTS.intake(principal), data, msg_id))
    return out


def fold(events: list[LedgerEvent]) -> str:
    """The state digest of events folded as the writer produced them (not read back)."""
    tasks: dict[str, TaskState] = {}
    principals: dict[str, PrincipalState] = {}
    for event in events:
        if event.aggregate == Aggregate.TASK:
            tasks.setdefault(event.key, TaskState(task_id=event.key)).apply(event)
        else:
            principals.setdefault(event.key, PrincipalState(name=event.key)).apply(event)
    return digest(tasks, principals)


def record_scenario(ledger: Ledger) -> list[Recorded]:
    """Record the scenario in two group commits."""
    writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
    messages = scenario()
    return [writer.record(messages[:6]), writer.record(messages[6:])]


def positions_of(ledger: Ledger) -> list[tuple[int, dict[str, object]]]:
    return [(n.id, msgspec.json.decode(n.state)) for n in ledger.read(0, 10_000)]


def export_ledger_lines(ledger: Ledger, **options: Any) -> list[bytes]:
    out = io.BytesIO()
    export_ledger(ledger, out, **options)
    return out.getvalue().splitlines()


def position_where(ledger: Ledger, key: str, kind: str, nth: int = 0) -> int:
    found = [p for p, s in positions_of(ledger) if s["key"] == key and s["kind"] == kind]
    return found[nth]


class LedgerContract:
    """Behaviour every ledger backend must have. Subclasses provide the fixtures below."""

    @pytest.fixture
    def location(self) -> Iterator[str]:
        raise NotImplementedError

    @pytest.fixture
    def missing_location(self) -> Iterator[str]:
        """Somewhere reachable that holds no ledger."""
        raise NotImplementedError

    def overwrite_state(self, location: str, position: int, state: bytes) -> None:
        raise NotImplementedError

    def delete_event(self, location: str, position: int) -> None:
        raise NotImplementedError

    def stored_state(self, location: str, position: int) -> bytes:
        raise NotImplementedError

    def holds_tables(self, location: str) -> bool:
        raise NotImplementedError

    def set_aggregate_id(self, location: str, position: int, aggregate_id: uuid.UUID) -> None:
        raise NotImplementedError

    @pytest.fixture
    def ledgers(self) -> Iterator[list[Ledger]]:
        """Ledgers opened by a test, closed at its end (so the database can be dropped)."""
        opened: list[Ledger] = []
        yield opened
        for ledger in opened:
            ledger.close()

    def test_a_ledger_has_one_writer_at_a_time(self, location: str) -> None:
        """A second coordinator on a ledger is refused, told who holds it; the lock goes
        with its holder."""
        refused = pytest.raises(LedgerInUseError, match=f"pid {os.getpid()} on ")
        with sole_writer(location), refused, sole_writer(location):
            pass
        with sole_writer(location):  # released
            pass

    @pytest.fixture
    def recorded(self, location: str, ledgers: list[Ledger]) -> list[Recorded]:
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        return record_scenario(ledger)

    def reopen(self, location: str, ledgers: list[Ledger]) -> Ledger:
        ledger = open_ledger(location, create=False)
        ledgers.append(ledger)
        return ledger

    # -- append and replay ----------------------------------------------------------
    def test_replay_rebuilds_the_state_the_writer_folded(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        written = [e for r in recorded for e in r.events]
        ledger = self.reopen(location, ledgers)
        result = replay(ledger)

        assert result.verified, result.breaks
        assert result.events == len(written) == ledger.last_position()
        assert [p for r in recorded for p in r.positions] == list(range(1, len(written) + 1))
        assert result.digest == fold(written)

        t1, t2, t3 = result.tasks["t1"], result.tasks["t2"], result.tasks["t3"]
        assert (t1.status, t1.result, t1.owner, t1.attempt, t1.hops) == (
            "completed",
            "approved",
            None,
            4,
            2,
        )
        assert t1.seen == {"m01", "m02", "m03", "m04", "m05", "m06", "m07"}
        assert (t2.status, t2.failure, t2.rejections) == ("failed", "no data (not retryable)", 0)
        # The spoof is on the record of the subject it came from, not on t2's chain.
        assert result.principals["client"].rejections == 1
        assert (t3.status, t3.owner, t3.attempt) == ("assigned", "reviewer", 1)
        assert result.principals["mallory"].rejections == 1
        kinds = [s["kind"] for _, s in positions_of(ledger) if s["key"] == "t1"]
        assert kinds == [
            Kind.SUBMITTED,
            Kind.ASSIGNED,
            Kind.SAID,
            Kind.HANDOFF_REQUESTED,
            Kind.ASSIGNED,
            Kind.HANDOFF_DECLINED,
            Kind.ASSIGNED,
            Kind.HANDOFF_REQUESTED,
            Kind.ASSIGNED,
            Kind.HANDOFF_ACCEPTED,
            Kind.SAID,
            Kind.COMPLETED,
        ]
        for task_id in ("t1", "t2", "t3"):
            assert verify_history(ledger.history(task_aggregate_id(task_id))) is None
        assert verify_history(ledger.history(principal_aggregate_id("mallory"))) is None

    def test_two_replays_have_the_same_digest(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        first = replay(self.reopen(location, ledgers))
        second = replay(self.reopen(location, ledgers), page=3)  # other page boundaries
        assert first.verified
        assert second.verified
        assert first.digest == second.digest
        assert first.tasks == second.tasks
        assert first.principals == second.principals
        assert (first.events, first.position) == (second.events, second.position)

    def test_replay_to_a_position_stops_there(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        upto = len(recorded[0].events)
        partial = replay(self.reopen(location, ledgers), to=upto)
        assert (partial.events, partial.position) == (upto, upto)
        assert partial.digest == fold(recorded[0].events)
        assert partial.tasks["t1"].status == "assigned"

    def test_the_commit_feed_hands_the_relay_exactly_what_the_log_holds(
        self, location: str, ledgers: list[Ledger]
    ) -> None:
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        feed = CommitFeed()
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock,
                              on_commit=lambda stored, _: feed.add(stored))
        messages = scenario()
        writer.record(messages[:6])
        writer.record(messages[6:])
        from_log = list(ledger.read(0, 10_000))
        assert feed.after(0, 10_000) == from_log  # same positions, ids, topics, bytes
        assert feed.after(len(from_log), 10) == []  # drained: nothing new is known

        # Entries the relay already took from the log are skipped; a gap is not vouched for.
        feed.add(from_log[-3:])
        assert feed.after(len(from_log) - 1, 10) == from_log[-1:]
        feed.add(from_log[-3:])
        assert feed.after(len(from_log) - 5, 10) is None
        # The relay then reads the log up to its end; what the feed still holds is older.
        assert feed.after(len(from_log), 10) == []
        # A bounded feed that overflowed has lost its oldest entries: a gap, again.
        small = CommitFeed(maxlen=2)
        small.add(from_log[-3:])
        assert small.after(len(from_log) - 3, 10) is None
        # A limit leaves the rest for the next call.
        feed.add(from_log[-3:])
        assert feed.after(len(from_log) - 3, 2) == from_log[-3:-1]
        assert feed.after(len(from_log) - 1, 2) == from_log[-1:]

    def test_the_relay_publishes_what_the_log_holds(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        log = list(self.reopen(location, ledgers).read(2, 10_000))
        states = [msgspec.json.decode(n.state) for n in log]
        assigned = [s["data"] for s in states if s["kind"] == Kind.ASSIGNED]
        assert assigned
        deliveries, copies = outbox_items(log, SUBJECTS, 2)
        # Each delivery as its delivery's canonical bytes, deduplicated by its id; one
        # ledger copy per event, in order, each expecting the one before.
        assert deliveries == [
            (SUBJECTS.deliver(a["agent"]), canonical(a["delivery"]),
             {MSG_ID: a["delivery"]["id"]}) for a in assigned]
        assert [subject for subject, _, _ in copies] == [
            SUBJECTS.ledger(s["aggregate"], s["key"], s["kind"]) for s in states]
        assert [h for _, _, h in copies] == [
            {MSG_ID: SUBJECTS.ledger_msg_id(n.id),
             EXPECTED_LAST_MSG_ID: SUBJECTS.ledger_msg_id(n.id - 1)} for n in log]
        records = [msgspec.json.decode(data, type=LedgerRecord) for _, data, _ in copies]
        assert [(r.position, bytes(r.event)) for r in records] == [(n.id, n.state) for n in log]

    def test_an_export_holds_the_relayed_records(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        ledger = self.reopen(location, ledgers)
        _, copies = outbox_items(list(ledger.read(0, 10_000)), SUBJECTS, 0)
        out = io.BytesIO()
        done = export_ledger(ledger, out, page=4)  # several pages
        assert out.getvalue().splitlines() == [data for _, data, _ in copies]
        assert (done.events, done.first, done.last) == (len(copies), 1, len(copies))
        t1 = [msgspec.json.decode(line, type=LedgerRecord) for line in
              export_ledger_lines(ledger, task_id="t1")]
        assert [r.aggregate_id for r in t1] == [str(task_aggregate_id("t1"))] * 12

    def test_restarted_writer_records_nothing_twice(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        messages = scenario()
        ledger = self.reopen(location, ledgers)
        before = ledger.last_position()
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
        assert writer.position == len(messages)

        again = writer.record(messages)  # the whole intake redelivered after a restart
        assert (again.events, again.positions, again.reused) == ([], [], 0)
        assert ledger.last_position() == before

        # A resend of a recorded envelope under a new stream sequence (a different
        # Nats-Msg-Id, so JetStream did not drop it): the ledger knows the envelope id.
        resent = messages[0]
        seq = len(messages) + 1
        dup = writer.record([IntakeMessage(seq, resent.subject, resent.data, "other-id")])
        assert dup.events == []
        assert ledger.last_position() == before
        assert ledger.tracking_position("intake") == seq

        fresh = self.reopen(location, ledgers)  # a third process: cold caches
        later = LedgerWriter(fresh, POLICY, SUBJECTS, fixed_clock)
        assert later.position == seq
        dup2 = later.record([IntakeMessage(seq + 1, resent.subject, resent.data, "third-id")])
        assert dup2.events == []
        assert replay(fresh).digest == fold([e for r in recorded for e in r.events])
        # A new submission reusing a recorded task id: the cold writer must know the task
        # exists (from its start-up scan), not take it for a new one.
        reuse = _env(99, "client", "t1", SubmitTask(to="triage", title="again"))
        taken = later.record([IntakeMessage(seq + 2, SUBJECTS.intake("client"),
                                            _codec.encode(reuse), reuse.id)])
        assert [(e.kind, e.data["code"]) for e in taken.events] == [
            (Kind.REJECTED, "task_exists")]

    def test_operator_commands_sent_again_are_recorded_once(
        self, location: str, ledgers: list[Ledger]
    ) -> None:
        """An approval lands on the task, a suspension on the agent's record: each is
        known by its id there, redelivered or resent after JetStream forgot it."""
        policy = team_policy('operators = ["operator"]\n'
                             '[tools."payments.refund"]\nprivileged = true\n')
        said = [_env(1, "client", "t1", SubmitTask(to="triage", title="refund?")),
                _env(2, "operator", "t1", ApproveTool(tool="payments.refund", reason="ok")),
                _env(3, "operator", "-", SuspendAgent(agent="writer", reason="odd")),
                _env(4, "operator", "-", ResumeAgent(agent="writer"))]
        messages = [IntakeMessage(seq, SUBJECTS.intake(e.sender), _codec.encode(e), e.id)
                    for seq, e in enumerate(said, start=1)]
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        writer = LedgerWriter(ledger, policy, SUBJECTS, fixed_clock)
        first = writer.record(messages)
        assert [e.kind for e in first.events] == [
            Kind.SUBMITTED, Kind.ASSIGNED, Kind.TOOL_APPROVED, Kind.SUSPENDED, Kind.RESUMED]
        before = ledger.last_position()

        assert writer.record(messages).events == []  # redelivered
        resent = [IntakeMessage(m.seq + len(messages), m.subject, m.data, m.msg_id)
                  for m in messages]
        assert writer.record(resent).events == []  # resent past the dedup window
        cold = LedgerWriter(self.reopen(location, ledgers), policy, SUBJECTS, fixed_clock)
        assert cold.record(messages).events == []  # and to a restarted writer
        assert ledger.last_position() == before

    def test_sequences_a_stream_hands_out_again_are_new_messages(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        """An intake stream that lost its tail (a server crash before its sync) gives its
        sequences to new messages: they are recorded, not taken for redeliveries."""
        ledger = self.reopen(location, ledgers)
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
        position = writer.position
        new = _env(50, "client", "t50", SubmitTask(to="triage", title="after the crash"))
        old = scenario()[0]
        out = writer.record([
            IntakeMessage(1, old.subject, old.data, old.msg_id),  # a real redelivery
            IntakeMessage(2, SUBJECTS.intake("client"), _codec.encode(new), new.id),
        ])
        assert [(e.key, e.kind) for e in out.events] == [
            ("t50", Kind.SUBMITTED), ("t50", Kind.ASSIGNED)]
        assert out.reused == 1
        assert writer.position == position == ledger.tracking_position("intake")

    # -- tamper detection -------------------------------------------------------------
    @pytest.mark.parametrize(
        ("key", "kind", "old", "new"),
        [
            pytest.param(
                "t1", Kind.SUBMITTED, b'"title":"refund?"', b'"title":"refund!"', id="data"
            ),
            pytest.param(
                "t1",
                Kind.COMPLETED,
                b'"sender":"researcher"',
                b'"sender":"reseArcher"',
                id="sender",
            ),
            pytest.param(
                "t2", Kind.FAILED, b'"recorded_at":"2025', b'"recorded_at":"2024', id="recorded_at"
            ),
            pytest.param("t1", Kind.SAID, b'"raw":"ey', b'"raw":"eY', id="raw-envelope"),
        ],
    )
    def test_an_edited_stored_event_breaks_its_chain(
        self,
        location: str,
        recorded: list[Recorded],
        ledgers: list[Ledger],
        key: str,
        kind: str,
        old: bytes,
        new: bytes,
    ) -> None:
        ledger = self.reopen(location, ledgers)
        clean = replay(ledger)
        assert clean.verified
        position = position_where(ledger, key, kind)
        state = self.stored_state(location, position)
        assert state.count(old) == 1, state
        self.overwrite_state(location, position, state.replace(old, new))

        result = replay(self.reopen(location, ledgers), helper=False)
        assert replay(self.reopen(location, ledgers), helper=True).breaks == result.breaks
        assert not result.verified
        assert len(result.breaks) == 1, result.breaks  # later links still follow the stored hash
        found = result.breaks[0]
        assert (found.position, found.aggregate, found.key, found.kind) == (
            position,
            "task",
            key,
            kind,
        )
        assert "hash" in found.problem

    def test_a_deleted_middle_event_is_detected(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        ledger = self.reopen(location, ledgers)
        gone = position_where(ledger, "t1", Kind.HANDOFF_DECLINED)
        successor = position_where(ledger, "t1", Kind.ASSIGNED, nth=2)
        assert successor > gone
        self.delete_event(location, gone)

        reopened = self.reopen(location, ledgers)
        result = replay(reopened, helper=False)
        assert replay(reopened, helper=True).breaks == result.breaks
        assert not result.verified
        first = result.breaks[0]
        assert (first.position, first.aggregate, first.key, first.kind) == (
            successor,
            "task",
            "t1",
            Kind.ASSIGNED,
        )
        assert "missing" in first.problem
        problem = verify_history(reopened.history(task_aggregate_id("t1")))
        assert problem is not None
        assert "missing" in problem
        # The other tasks are untouched.
        assert all(b.key == "t1" for b in result.breaks)

    @pytest.mark.parametrize(
        ("change", "why"),
        [
            pytest.param(lambda s: s[:-9], "truncated", id="cut-short"),
            pytest.param(lambda s: s.replace(b'"trace":', b'"tracer":'), "unknown field",
                         id="renamed-field"),
            pytest.param(lambda s: s.replace(b'"hash":"', b'"hash":7,"h":"'), "str",
                         id="hash-not-text"),
        ],
    )
    def test_an_unreadable_stored_event_is_a_break_and_the_replay_goes_on(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger],
        change: Any, why: str
    ) -> None:
        ledger = self.reopen(location, ledgers)
        position = position_where(ledger, "t2", Kind.FAILED)
        self.overwrite_state(location, position, change(self.stored_state(location, position)))

        reopened = self.reopen(location, ledgers)
        result = replay(reopened, helper=False)
        assert replay(reopened, helper=True).breaks == result.breaks
        assert result.events == reopened.last_position()  # read to the end
        first = result.breaks[0]
        assert (first.position, first.aggregate) == (position, "?")
        assert first.problem.startswith("stored event is unreadable")
        assert why in first.problem
        assert result.tasks["t2"].status != "failed"  # the unreadable event is not folded
        assert result.tasks["t1"].status == "completed"

    def test_an_edited_kind_the_fold_cannot_take_is_a_break_not_a_crash(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        """A task.failed turned into a tool.authorized (whose fold needs data it lacks):
        the changed hash is the break; with the hash made to match, the fold says what it
        could not take, and the replay reads on."""
        ledger = self.reopen(location, ledgers)
        position = position_where(ledger, "t2", Kind.FAILED)
        [row] = ledger.read(position - 1, 1)
        state = msgspec.json.decode(self.stored_state(location, position))
        state["kind"] = Kind.TOOL_AUTHORIZED
        self.overwrite_state(location, position, msgspec.json.encode(state))

        reopened = self.reopen(location, ledgers)
        result = replay(reopened, helper=False)
        assert [(b.position, b.kind) for b in result.breaks][:1] == [
            (position, Kind.TOOL_AUTHORIZED)]
        assert "recomputed" in result.breaks[0].problem
        assert result.events == reopened.last_position()

        del state["hash"]
        state["hash"] = chain_hash(state["prev_hash"], row.originator_id,
                                   row.originator_version, row.topic, state)
        self.overwrite_state(location, position, msgspec.json.encode(state))
        result = replay(self.reopen(location, ledgers), helper=False)
        first = result.breaks[0]
        assert (first.position, first.kind) == (position, Kind.TOOL_AUTHORIZED)
        assert first.problem == "stored event cannot be folded: KeyError 'tool'"
        assert result.tasks["t1"].status == "completed"

    def test_an_added_field_named_like_a_notification_field_is_still_hash_checked(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        # Replay sets an event's version from its notification; a stored state that
        # carries one of its own must not slip past the hash check.
        ledger = self.reopen(location, ledgers)
        position = position_where(ledger, "t1", Kind.SAID)
        state = self.stored_state(location, position)
        edited = state.replace(b'"prev_hash":', b'"originator_version":99,"prev_hash":', 1)
        self.overwrite_state(location, position, edited.replace(b"research", b"elsewhere", 1))

        reopened = self.reopen(location, ledgers)
        result = replay(reopened, helper=False)
        assert replay(reopened, helper=True).breaks == result.breaks
        assert [(b.position, b.kind) for b in result.breaks] == [(position, Kind.SAID)]
        assert "recomputed" in result.breaks[0].problem

    def test_a_batch_is_stored_in_the_order_it_was_sealed(
        self, location: str, ledgers: list[Ledger]
    ) -> None:
        """Positions follow the batch's order, also across interleaved aggregates: each
        aggregate's versions must come in order in the log, and the relay publishes the
        positions ``append`` returns."""
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        keys = [f"t{i % 7}" for i in range(300)]
        versions: dict[str, int] = {}
        sealed: list[Sealed] = []
        for key in keys:
            versions[key] = versions.get(key, 0) + 1
            draft = Draft(aggregate=Aggregate.TASK, key=key, kind=Kind.SAID,
                          data={"text": "ü" * (versions[key] % 5)},
                          provenance=Provenance(msg_id=f"m{len(sealed)}", sender="hop",
                                                raw="eA=="))
            sealed.append(stamp(draft, version=versions[key], prev_hash="00" * 32,
                                recorded_at=RECORDED_AT.isoformat()))
        stored = ledger.append(sealed, Tracking("intake", 300))
        log = ledger.read(0, 1000)
        assert [n.id for n in stored] == [n.id for n in log]
        assert [n.id for n in log] == sorted(n.id for n in log)
        assert [(n.originator_id, n.originator_version, bytes(n.state)) for n in log] == [
            (s.event.originator_id, s.event.originator_version, s.stored) for s in sealed]
        assert ledger.tracking_position("intake") == 300

    def test_a_tracking_position_that_does_not_advance_refuses_the_whole_batch(
        self, location: str, ledgers: list[Ledger]
    ) -> None:
        """Exactly-once intake: a batch recorded again under a position already recorded
        (a redelivery a writer failed to skip) stores none of its events."""
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        ledger.append(_said("t1", 1, 2), Tracking("intake", 5))
        for stale in (5, 4):
            with pytest.raises(IntegrityError):
                ledger.append(_said("t2", 1, 2), Tracking("intake", stale))
        assert [n.originator_id for n in ledger.read(0, 10)] == [task_aggregate_id("t1")] * 2
        assert ledger.tracking_position("intake") == 5

    def test_an_event_version_already_stored_refuses_the_whole_batch(
        self, location: str, ledgers: list[Ledger]
    ) -> None:
        """Two writers racing on one aggregate: the batch holding the conflicting version
        stores nothing, not its other events and not its tracking position."""
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        ledger.append(_said("t1", 1, 2), Tracking("intake", 1))
        with pytest.raises(IntegrityError):
            ledger.append(_said("t2", 1, 1) + _said("t1", 2, 2), Tracking("intake", 2))
        assert ledger.last_position() == 2
        assert ledger.tracking_position("intake") == 1

    def test_replay_reads_the_rows_the_log_holds(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        ledger = self.reopen(location, ledgers)
        rows = ledger.read_rows(3, 5)
        notifications = ledger.read(3, 5)
        assert [r[0] for r in rows] == [n.id for n in notifications] == [4, 5, 6, 7, 8]
        for (position, aggregate_id, version, topic, state), n in zip(rows, notifications,
                                                                      strict=True):
            assert (position, version, topic, bytes(state)) == (
                n.id, n.originator_version, n.topic, bytes(n.state))
            assert aggregate_text(aggregate_id) == str(n.originator_id)

    def test_an_event_moved_to_another_aggregate_breaks_both_chains(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        ledger = self.reopen(location, ledgers)
        moved = position_where(ledger, "t1", Kind.SAID)
        self.set_aggregate_id(location, moved, task_aggregate_id("t9"))  # no such task

        reopened = self.reopen(location, ledgers)
        result = replay(reopened, helper=False)
        assert replay(reopened, helper=True).breaks == result.breaks
        assert result.events == reopened.last_position()
        assert moved in {b.position for b in result.breaks}
        later_t1 = [b for b in result.breaks if b.key == "t1" and b.position > moved]
        assert later_t1, result.breaks
        assert "missing" in later_t1[0].problem

    # -- configuration ---------------------------------------------------------------
    def test_the_process_environment_does_not_reconfigure_the_ledger(
        self, location: str, ledgers: list[Ledger], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """open_ledger passes eventsourcing an explicit env; variables that happen to be
        set in the process (eventsourcing reads ``LEDGER_<KEY>`` before ``<KEY>``) must not
        move the ledger elsewhere or change the bytes the hash chain is taken over."""
        monkeypatch.setenv("LEDGER_PERSISTENCE_MODULE", "eventsourcing.popo")  # in memory
        monkeypatch.setenv("COMPRESSOR_TOPIC", "eventsourcing.compressor:ZlibCompressor")
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        written = [e for r in record_scenario(ledger) for e in r.events]
        monkeypatch.delenv("LEDGER_PERSISTENCE_MODULE")
        monkeypatch.delenv("COMPRESSOR_TOPIC")

        result = replay(self.reopen(location, ledgers))
        assert result.events == len(written)
        assert result.verified, result.breaks[:1]
        assert self.stored_state(location, 1).startswith(b"{")  # canonical JSON, as hashed

    # -- a stop -----------------------------------------------------------------------
    async def test_a_stopped_coordinator_has_signed_up_to_its_last_event(
        self, location: str, ledgers: list[Ledger], nats_server: EmbeddedNats, prefix: str
    ) -> None:
        """Its last checkpoint goes through the backend's own write path (on PostgreSQL,
        the writer thread) after the rest has stopped."""
        subjects = Subjects(prefix)
        settings = CoordinatorSettings(nats_server.url, location, POLICY, subjects,
                                       checkpoint_every=1000, checkpoint_interval_s=3600)
        submit = Envelope(id="stop-1", sender="client", task_id="t-stop", sent_at=SENT_AT,
                          body=SubmitTask(to="triage", title="stop"))
        async with anyio.create_task_group() as tg:
            await tg.start(run_coordinator, settings)
            async with open_bus(BusSettings(nats_server.url, f"{prefix}-client")) as bus:
                ack = await bus.publish(subjects.intake("client"), Codec().encode(submit),
                                        msg_id=submit.id)
                reader = self.reopen(location, ledgers)
                with anyio.fail_after(15):
                    while reader.tracking_position("intake") < ack.seq:  # noqa: ASYNC110 - polled
                        await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        ledger = self.reopen(location, ledgers)
        assert [s["kind"] for _, s in positions_of(ledger)] == [
            Kind.SUBMITTED, Kind.ASSIGNED, Kind.CHECKPOINTED]
        result = replay(ledger)
        assert result.verified
        assert result.chain.unsigned == 0

    # -- opening ---------------------------------------------------------------------
    def test_opening_a_missing_ledger_fails_clearly(
        self, missing_location: str, ledgers: list[Ledger]
    ) -> None:
        with pytest.raises(LedgerError, match=r"^no ledger at "):
            ledgers.append(open_ledger(missing_location, create=False))
        assert not self.holds_tables(missing_location)  # and nothing was created there

    def test_create_then_open_existing(self, location: str, ledgers: list[Ledger]) -> None:
        created = open_ledger(location, create=True)
        ledgers.append(created)
        assert created.last_position() == 0
        assert replay(created).events == 0
        reopened = self.reopen(location, ledgers)
        assert reopened.last_position() == 0
        assert reopened.tracking_position("intake") == 0


class TestSqliteLedger(LedgerContract):
    @pytest.fixture
    def location(self, tmp_path: Path) -> str:
        return str(tmp_path / "ledger" / "ledger.db")

    @pytest.fixture
    def missing_location(self, tmp_path: Path) -> str:
        return str(tmp_path / "nowhere" / "ledger.db")

    @pytest.mark.parametrize("url", ["sqlite:///ledger.db", "file:///tmp/ledger.db",
                                     "mysql://root@127.0.0.1/test"])
    def test_a_url_that_is_not_a_path_or_postgres_is_refused(
        self, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        for create in (True, False):
            with pytest.raises(LedgerError, match=r"^unsupported ledger location .*postgresql"):
                open_ledger(url, create=create)
        assert list(tmp_path.iterdir()) == []  # no "sqlite:" directory, nothing at all

    def test_a_check_that_reads_another_log_is_an_error_not_a_pass(self) -> None:
        # An in-memory ledger exists only in this process: the helper would open an empty
        # one of its own and find nothing wrong.
        ledger = open_ledger(":memory:", create=True)
        try:
            LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock).record(scenario())
            assert replay(ledger, helper=False).verified
            with pytest.raises(LedgerError, match="check read 0 events"):
                replay(ledger, helper=True)
        finally:
            ledger.close()

    def _connect(self, location: str) -> sqlite3.Connection:
        return sqlite3.connect(location, isolation_level=None)

    def stored_state(self, location: str, position: int) -> bytes:
        with self._connect(location) as db:
            row = db.execute(
                "SELECT state FROM stored_events WHERE rowid = ?", (position,)
            ).fetchone()
        db.close()
        return bytes(row[0])

    def overwrite_state(self, location: str, position: int, state: bytes) -> None:
        db = self._connect(location)
        try:
            changed = db.execute(
                "UPDATE stored_events SET state = ? WHERE rowid = ?", (state, position)
            ).rowcount
        finally:
            db.close()
        assert changed == 1

    def delete_event(self, location: str, position: int) -> None:
        db = self._connect(location)
        try:
            changed = db.execute("DELETE FROM stored_events WHERE rowid = ?", (position,)).rowcount
        finally:
            db.close()
        assert changed == 1

    def holds_tables(self, location: str) -> bool:
        return Path(location).exists()

    def set_aggregate_id(self, location: str, position: int, aggregate_id: uuid.UUID | str,
                         ) -> None:
        text = aggregate_id.hex if isinstance(aggregate_id, uuid.UUID) else aggregate_id
        db = self._connect(location)
        try:
            changed = db.execute("UPDATE stored_events SET originator_id = ? WHERE rowid = ?",
                                 (text, position)).rowcount
        finally:
            db.close()
        assert changed == 1

    def test_an_aggregate_id_that_is_not_a_uuid_is_a_break_not_a_crash(
        self, location: str, recorded: list[Recorded], ledgers: list[Ledger]
    ) -> None:
        ledger = self.reopen(location, ledgers)
        position = position_where(ledger, "t2", Kind.FAILED)
        self.set_aggregate_id(location, position, "not-a-uuid")

        reopened = self.reopen(location, ledgers)
        result = replay(reopened, helper=False)
        assert replay(reopened, helper=True).breaks == result.breaks
        assert result.events == reopened.last_position()
        found = [b for b in result.breaks if b.position == position]
        assert found, result.breaks
        assert (found[0].key, found[0].kind) == ("t2", Kind.FAILED)


@pytest.mark.postgres
@pytest.mark.skipif(
    not POSTGRES_DSN,
    reason=f"set {POSTGRES_ENV}=postgresql://postgres@127.0.0.1:5432/test "
    "to run the ledger contract on PostgreSQL",
)
class TestPostgresLedger(LedgerContract):
    TABLE = "ledger_events"  # eventsourcing: "<application name>_events"

    def _schema_url(self, schema: str) -> str:
        sep = "&" if "?" in POSTGRES_DSN else "?"
        return f"{POSTGRES_DSN}{sep}schema={schema}"

    @staticmethod
    def _schema_of(location: str) -> str:
        return location.rsplit("schema=", 1)[1]

    def _admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(POSTGRES_DSN.split("?", 1)[0], autocommit=True)

    def _lock_holders(self, location: str) -> list[int]:
        """The sessions holding this ledger's writer lock."""
        unsigned = advisory_key(self._schema_of(location)) & 0xFFFF_FFFF_FFFF_FFFF
        with self._admin() as db:
            rows = db.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND "
                              "granted AND classid = %s AND objid = %s AND objsubid = 1",
                              (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchall()
        return [row[0] for row in rows]

    def test_a_database_that_is_not_there_is_said_at_once(self) -> None:
        """An offline command on a mistyped database name: the server's own reason, where
        the connection pool said only, after 30 s, that it had no connection."""
        base = POSTGRES_DSN.split("?", 1)[0].rsplit("/", 1)[0]
        with pytest.raises(LedgerError, match='database "lm_no_such_db" does not exist'):
            open_ledger(f"{base}/lm_no_such_db", create=False)

    def test_the_holder_named_is_the_one_in_this_database(self, location: str) -> None:
        """Another database of the cluster, with a ledger in a schema of the same name,
        has a lock of the same key, held by another deployment's coordinator: a second
        coordinator here is told of this ledger's holder, not of that one (which it would
        be told to stop)."""
        schema = self._schema_of(location)
        other = "lmtest_db_" + uuid.uuid4().hex[:10]
        with self._admin() as db:
            db.execute(f'CREATE DATABASE "{other}"')
        try:
            base = POSTGRES_DSN.split("?", 1)[0].rsplit("/", 1)[0]
            with psycopg.connect(f"{base}/{other}", autocommit=True,
                                 application_name="the other deployment's coordinator") as them:
                them.execute("SELECT pg_advisory_lock(%s)", (advisory_key(schema),))
                refused = pytest.raises(LedgerInUseError, match=f"pid {os.getpid()} on ")
                with sole_writer(location), refused, sole_writer(location):
                    pass
        finally:
            with self._admin() as db:
                db.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')

    def test_a_lock_whose_session_ended_is_taken_again_unless_another_has_it(
            self, location: str) -> None:
        """PostgreSQL ends the lock's session (a restart; here pg_terminate_backend), and
        the lock goes with it: the coordinator's next check takes it again, or, if another
        coordinator was quicker, says so (the coordinator then stops)."""
        with sole_writer(location) as lock:
            [first] = self._lock_holders(location)
            self._end_session(location, first)
            lock.check()
            [second] = self._lock_holders(location)
            assert second != first
            self._end_session(location, second)
            with sole_writer(location), pytest.raises(LedgerInUseError):
                lock.check()

    def test_a_session_given_up_on_our_side_only_is_ended_and_the_lock_taken_again(
            self, location: str) -> None:
        """The lock's connection failed on the coordinator's side while its session lives
        on at the server, lock and all (until keepalives end it): the next check ends that
        session, known to be its own, instead of calling itself another coordinator."""
        with sole_writer(location) as lock:
            [first] = self._lock_holders(location)
            assert isinstance(lock, _PostgresLock)
            stale, lock._conn = lock._conn, None  # the client forgets it; the server does not
            try:
                lock.check()
                [second] = self._lock_holders(location)
                assert second != first
            finally:
                with suppress(psycopg.Error):
                    stale.close()

    def _end_session(self, location: str, pid: int) -> None:
        with self._admin() as db:
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + 10
        while self._lock_holders(location):  # the backend exits, then its lock is free
            assert time.monotonic() < deadline, "the terminated session kept its lock"
            time.sleep(0.02)

    def _fresh_schema(self) -> Generator[str, None, None]:
        schema = "lmtest_" + uuid.uuid4().hex[:12]
        with self._admin() as db:
            db.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield self._schema_url(schema)
        finally:
            with self._admin() as db:
                db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    @pytest.fixture
    def location(self) -> Iterator[str]:
        yield from self._fresh_schema()

    @pytest.fixture
    def missing_location(self) -> Iterator[str]:
        yield from self._fresh_schema()  # the schema exists, the ledger does not

    def stored_state(self, location: str, position: int) -> bytes:
        with self._admin() as db:
            row = db.execute(
                f'SELECT state FROM "{self._schema_of(location)}".{self.TABLE} '
                "WHERE notification_id = %s",
                (position,),
            ).fetchone()
        assert row is not None
        return bytes(row[0])

    def overwrite_state(self, location: str, position: int, state: bytes) -> None:
        with self._admin() as db:
            cur = db.execute(
                f'UPDATE "{self._schema_of(location)}".{self.TABLE} SET state = %s '
                "WHERE notification_id = %s",
                (state, position),
            )
            assert cur.rowcount == 1

    def delete_event(self, location: str, position: int) -> None:
        with self._admin() as db:
            cur = db.execute(
                f'DELETE FROM "{self._schema_of(location)}".{self.TABLE} '
                "WHERE notification_id = %s",
                (position,),
            )
            assert cur.rowcount == 1

    def set_aggregate_id(self, location: str, position: int, aggregate_id: uuid.UUID) -> None:
        with self._admin() as db:
            cur = db.execute(
                f'UPDATE "{self._schema_of(location)}".{self.TABLE} SET originator_id = %s '
                "WHERE notification_id = %s",
                (aggregate_id, position),
            )
            assert cur.rowcount == 1

    def holds_tables(self, location: str) -> bool:
        with self._admin() as db:
            row = db.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
                (self._schema_of(location),),
            ).fetchone()
        assert row is not None
        return bool(row[0])

    def test_schemas_isolate_ledgers(self, location: str, ledgers: list[Ledger]) -> None:
        """Two schemas on one database are two ledgers (what keeps these tests apart)."""
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        record_scenario(ledger)
        other_gen = self._fresh_schema()
        other = next(other_gen)
        try:
            empty = open_ledger(other, create=True)
            try:
                assert empty.last_position() == 0
                assert ledger.last_position() > 0
            finally:
                empty.close()
        finally:
            other_gen.close()

    def test_a_ledger_made_before_the_append_function_gets_it_when_opened(
        self, location: str, ledgers: list[Ledger]
    ) -> None:
        """The writer opens its ledger with ``create=True``, which (re)creates the append
        function beside the tables: a ledger made by an older ledgermesh takes writes."""
        first = open_ledger(location, create=True)
        ledgers.append(first)
        first.append(_said("t1", 1, 1), Tracking("intake", 1))
        first.close()
        with self._admin() as db:
            db.execute(f'DROP FUNCTION "{self._schema_of(location)}".ledger_events_append')
        ledger = open_ledger(location, create=True)
        ledgers.append(ledger)
        stored = ledger.append(_said("t1", 2, 3), Tracking("intake", 2))
        assert [n.id for n in stored] == [2, 3]
        assert ledger.tracking_position("intake") == 2

"""Fuzzing the write path: ``LedgerWriter.record`` on batches that mix good envelopes with
random and mutated ones (no NATS; a real SQLite ledger in a temporary directory).

Invariants, for every generated batch sequence:

- ``record`` never raises;
- every bad message becomes exactly one ``message.rejected`` event, with a code the
  message calls for and a non-empty reason, on the record of the principal whose subject it
  came on (``_unknown`` for a subject that names none) — never on a good task's chain;
- every good message is recorded exactly as it is without the bad ones around it (a control
  ledger fed only the good messages): same kinds per task, same replayed task states;
- unknown fields are accepted, not rejected (newer senders must keep working);
- ``replay`` verifies every chain.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from coordinator.ledger.events import Aggregate, Kind
from coordinator.ledger.replay import replay
from coordinator.ledger.state import digest
from coordinator.ledger.store import Ledger, open_ledger
from coordinator.ledger.writer import UNKNOWN_PRINCIPAL, IntakeMessage, LedgerWriter
from schemas import (
    Body,
    Codec,
    Complete,
    Envelope,
    Fail,
    HandoffDecision,
    HandoffRequest,
    MalformedMessageError,
    Say,
    Subjects,
    SubmitTask,
    canonical,
)
from tests.live import team_policy
from tests.strategies import (
    TEMPLATE_POOL,
    WRONG_VALUES,
    BadIntake,
    as_json_dict,
    bad_intake,
    envelopes,
    json_values,
    match_rejections,
    timestamps,
    tokens,
    with_extra_fields,
)

POLICY = team_policy('operators = ["operator"]\nmax_payload_bytes = 8192\n', "fuzz test policy")
LIMIT = POLICY.max_payload_bytes
SUBJECTS = Subjects("lm")
RECORDED_AT = datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC)
# Who publishes the bad messages: never an operator ("writer" never takes part in a good
# task, "mallory" is no agent and may not submit).
PRINCIPALS = ("client", "triage", "researcher", "writer", "mallory")
GOOD_TASKS = ("good-0", "good-1", "good-2")

# CPython's default, which ledgermesh never changes. Hypothesis raises the limit while a
# test runs; deep nesting must be judged under the limit the coordinator really has.
PRODUCTION_RECURSION_LIMIT = 1000
# Each record commits a transaction: on a RAM disk, fsync costs nothing.
TMP_ROOT = "/dev/shm" if Path("/dev/shm").is_dir() else None
T = TypeVar("T")

FUZZ = settings(
    max_examples=100,
    deadline=None,
    # No explain phase: it re-runs a failing example hundreds of times to annotate it.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fixed_clock() -> datetime:
    return RECORDED_AT


def bad_messages(task_ids: Sequence[str] = GOOD_TASKS,
                 templates: st.SearchStrategy[Envelope] | None = None,
                 ) -> st.SearchStrategy[BadIntake]:
    return bad_intake(
        max_payload_bytes=LIMIT,
        principals=PRINCIPALS,
        submitter="client",
        stranger="mallory",
        outsider="writer",
        agent="triage",
        task_ids=st.sampled_from(task_ids),
        templates=templates,
    )


# Built once (building strategies per draw is slow). Around good tasks the templates come
# from a fixed pool, which keeps examples small enough to shrink quickly; alone, from any
# envelope.
BAD_AROUND = {n: bad_messages(GOOD_TASKS[:n], st.sampled_from(TEMPLATE_POOL))
              for n in range(1, len(GOOD_TASKS) + 1)}
BAD_ALONE = bad_messages()


# -- good flows ---------------------------------------------------------------------------
K = Kind
# name -> [(sender, attempt, body factory)], and the kinds it records.
FLOWS: dict[str, tuple[list[tuple[str, int, str]], list[str]]] = {
    "say_complete": (
        [("client", 0, "submit"), ("triage", 1, "say"), ("triage", 1, "complete")],
        [K.SUBMITTED, K.ASSIGNED, K.SAID, K.COMPLETED],
    ),
    "handoff_accepted": (
        [("client", 0, "submit"), ("triage", 1, "handoff"), ("researcher", 2, "accept"),
         ("researcher", 2, "complete")],
        [K.SUBMITTED, K.ASSIGNED, K.HANDOFF_REQUESTED, K.ASSIGNED, K.HANDOFF_ACCEPTED,
         K.COMPLETED],
    ),
    "handoff_declined": (
        [("client", 0, "submit"), ("triage", 1, "handoff"), ("researcher", 2, "decline"),
         ("triage", 3, "fail")],
        [K.SUBMITTED, K.ASSIGNED, K.HANDOFF_REQUESTED, K.ASSIGNED, K.HANDOFF_DECLINED,
         K.ASSIGNED, K.ATTEMPT_FAILED, K.DEAD_LETTERED, K.FAILED],
    ),
    "implicit_accept": (
        [("client", 0, "submit"), ("triage", 1, "handoff"), ("researcher", 2, "say")],
        [K.SUBMITTED, K.ASSIGNED, K.HANDOFF_REQUESTED, K.ASSIGNED, K.HANDOFF_ACCEPTED,
         K.SAID],
    ),
}


class Message:
    """A good message (a plain class: Hypothesis prints it with the short repr)."""

    __slots__ = ("data", "msg_id", "subject")

    def __init__(self, subject: str, data: bytes, msg_id: str | None) -> None:
        self.subject = subject
        self.data = data
        self.msg_id = msg_id

    def __repr__(self) -> str:
        data = self.data if len(self.data) <= 200 else self.data[:160] + b"..."
        return f"Message({self.subject!r}, {self.msg_id!r}, {len(self.data)}B {data!r})"


@dataclass(frozen=True)
class GoodTask:
    task_id: str
    flow: str
    messages: list[Message]

    @property
    def kinds(self) -> list[str]:
        return list(FLOWS[self.flow][1])


TEXTS = st.text(max_size=12)
PAYLOADS = st.dictionaries(st.text(max_size=6), json_values(4), max_size=2)
SENT_ATS = timestamps()
LABELS = st.lists(tokens(10), max_size=2).map(tuple)


def _body(draw: st.DrawFn, what: str) -> Body:
    text = draw(TEXTS)
    if what == "submit":
        return SubmitTask(to="triage", title=text, payload=draw(PAYLOADS))
    if what == "say":
        return Say(text=text)
    if what == "handoff":
        return HandoffRequest(to="researcher", reason=text, payload=draw(PAYLOADS))
    if what in ("accept", "decline"):
        return HandoffDecision(accept=what == "accept", reason=text)
    if what == "complete":
        return Complete(result=text, payload=draw(PAYLOADS))
    assert what == "fail"
    return Fail(reason=text, retryable=False)


@st.composite
def good_tasks(draw: st.DrawFn, task_id: str) -> GoodTask:
    """One task's messages, each as a correct sender would publish it — sometimes with
    unknown fields, sometimes without a Nats-Msg-Id, and the submission sometimes exactly
    ``max_payload_bytes`` long."""
    flow = draw(st.sampled_from(sorted(FLOWS)))
    messages = []
    for n, (sender, attempt, what) in enumerate(FLOWS[flow][0]):
        env = Envelope(id=f"{task_id}-{n}", sender=sender, task_id=task_id,
                       sent_at=draw(SENT_ATS), body=_body(draw, what), attempt=attempt,
                       labels=draw(LABELS))
        data = draw(st.just(canonical(env)) | with_extra_fields(env))
        if what == "submit" and draw(st.booleans()):
            obj = msgspec.json.decode(data)
            obj["body"]["title"] += "x" * (LIMIT - len(data))  # exactly at the limit
            data = msgspec.json.encode(obj)
            assert len(data) == LIMIT
        msg_id = draw(st.sampled_from((env.id, env.id, env.id, None)))
        messages.append(Message(SUBJECTS.intake(sender), data, msg_id))
    return GoodTask(task_id, flow, messages)


@dataclass(frozen=True)
class Scenario:
    good: list[GoodTask]
    bad: list[BadIntake]
    order: list[Message | BadIntake]  # every message, in intake order
    cuts: list[bool]  # a batch ends after message i
    cache_size: int  # of the fuzzed writer (1: every state is reloaded from the ledger)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n_tasks = draw(st.integers(1, len(GOOD_TASKS)))
    good = [draw(good_tasks(task_id)) for task_id in GOOD_TASKS[:n_tasks]]
    bad = draw(st.lists(BAD_AROUND[n_tasks], min_size=1, max_size=10))
    # Interleave, keeping each task's messages in order.
    slots = [i for i, task in enumerate(good) for _ in task.messages] + [-1] * len(bad)
    slots = draw(st.permutations(slots))
    queues = [list(task.messages) for task in good]
    bad_left = list(bad)
    order: list[Message | BadIntake] = [
        queues[i].pop(0) if i >= 0 else bad_left.pop(0) for i in slots]
    cuts = [n == 0 for n in draw(st.lists(st.integers(0, 3), min_size=len(order),
                                          max_size=len(order)))]
    return Scenario(good, bad, order, cuts, draw(st.sampled_from((1, 10_000))))


# -- harness ------------------------------------------------------------------------------
def like_production(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn`` as the coordinator calls the writer: in a worker thread (it uses
    anyio.to_thread), under CPython's default recursion limit."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("ok", fn(*args)))
        except BaseException as exc:
            outcome.append(("error", exc))

    before = sys.getrecursionlimit()
    sys.setrecursionlimit(PRODUCTION_RECURSION_LIMIT)
    try:
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    finally:
        sys.setrecursionlimit(before)
    how, value = outcome[0]
    if how == "error":
        raise value
    return value  # type: ignore[no-any-return]


@contextmanager
def ledger_file(name: str) -> Iterator[Ledger]:
    with tempfile.TemporaryDirectory(prefix="lm-fuzz-", dir=TMP_ROOT) as tmp:
        ledger = open_ledger(str(Path(tmp) / name), create=True)
        try:
            yield ledger
        finally:
            ledger.close()


def intake_message(seq: int, message: Message | BadIntake) -> IntakeMessage:
    if isinstance(message, BadIntake):
        return IntakeMessage(seq, f"lm.intake.{message.tail}", message.data, message.msg_id)
    return IntakeMessage(seq, message.subject, message.data, message.msg_id)


def record_all(writer: LedgerWriter, messages: Sequence[Message | BadIntake],
               cuts: Sequence[bool]) -> list[IntakeMessage]:
    """Record in batches (a batch ends where ``cuts`` says), as the coordinator does;
    ``record`` must not raise."""
    sent = [intake_message(seq, m) for seq, m in enumerate(messages, start=1)]

    def record_batches() -> None:
        batch: list[tuple[IntakeMessage, Message | BadIntake]] = []
        for message, original, cut in zip(sent, messages, cuts, strict=True):
            batch.append((message, original))
            if cut or message is sent[-1]:
                try:
                    writer.record([m for m, _ in batch])
                except Exception as exc:
                    exc.add_note("record raised on a batch of: " + ", ".join(
                        m.category if isinstance(m, BadIntake) else "good" for _, m in batch))
                    raise
                batch = []

    like_production(record_batches)
    return sent


def stored(ledger: Ledger) -> list[dict[str, Any]]:
    return [msgspec.json.decode(n.state) for n in ledger.read(0, 1_000_000)]


def principal_key(subject: str) -> str:
    return SUBJECTS.principal_of(subject) or UNKNOWN_PRINCIPAL


def check_rejections(events: list[dict[str, Any]], bad: Sequence[tuple[IntakeMessage,
                     BadIntake]]) -> None:
    expected, got = match_rejections(
        events, ((principal_key(sent.subject), message, sent.data, sent.msg_id or f"seq-{sent.seq}")
                 for sent, message in bad), LIMIT)
    assert got == expected, "every bad message is rejected exactly once"


# -- tests --------------------------------------------------------------------------------
@FUZZ
@given(scenarios())
def test_bad_messages_are_rejected_and_good_ones_recorded_as_without_them(
    scenario: Scenario,
) -> None:
    good_only = [m for task in scenario.good for m in task.messages]
    with ledger_file("fuzz.db") as fuzzed, ledger_file("control.db") as control:
        writer = LedgerWriter(fuzzed, POLICY, SUBJECTS, fixed_clock,
                              cache_size=scenario.cache_size)
        sent = record_all(writer, scenario.order, scenario.cuts)
        record_all(LedgerWriter(control, POLICY, SUBJECTS, fixed_clock), good_only,
                   [False] * len(good_only))

        events, control_events = stored(fuzzed), stored(control)
        check_rejections(events, [(s, m) for s, m in zip(sent, scenario.order, strict=True)
                                  if isinstance(m, BadIntake)])
        # Unknown fields, a missing Nats-Msg-Id, a submission of exactly the size limit:
        # all accepted, each task recorded as its flow says.
        assert not [e for e in control_events if e["kind"] == Kind.REJECTED]
        for task in scenario.good:
            mine = [e["kind"] for e in events if e["key"] == task.task_id]
            assert mine == [e["kind"] for e in control_events if e["key"] == task.task_id]
            assert mine == task.kinds, task.flow
        # Nothing else: no task came from a bad message.
        good_ids = {task.task_id for task in scenario.good}
        assert {e["key"] for e in events if e["aggregate"] == Aggregate.TASK} == good_ids

        fuzz_replay, control_replay = like_production(replay, fuzzed), replay(control)
        assert fuzz_replay.verified, fuzz_replay.breaks
        assert control_replay.verified, control_replay.breaks
        assert digest({k: fuzz_replay.tasks[k] for k in good_ids}, {}) == \
            digest(control_replay.tasks, {})
        assert writer.position == len(scenario.order)


def test_every_wrong_value_is_refused_by_the_decoder() -> None:
    """The table the ``wrong_type`` mutations draw from: each value really is wrong for
    its field in every body that has the field (else a "bad" message could be valid)."""
    codec = Codec()
    accepted = []
    for template in TEMPLATE_POOL:
        for name, values in WRONG_VALUES.items():
            for value in values:
                obj = as_json_dict(template)
                target = obj if name in obj else obj["body"]
                if name not in target:
                    continue
                target[name] = value
                try:
                    codec.decode_envelope(msgspec.json.encode(obj))
                except MalformedMessageError:
                    continue
                accepted.append((obj["body"].get("type"), name, value))
    assert accepted == []


@FUZZ
@given(BAD_ALONE)
def test_each_bad_message_alone_is_rejected(message: BadIntake) -> None:
    """One bad message in a batch of its own, on an empty ledger: one rejection."""
    with ledger_file("one.db") as ledger:
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
        sent = record_all(writer, [message], [True])
        check_rejections(stored(ledger), [(sent[0], message)])
        assert like_production(replay, ledger).verified


SAY_OR_SUBMIT = envelopes(st.sampled_from([Say(text="hello"),
                                           SubmitTask(to="triage", title="t")]))


@st.composite
def plain_and_extended(draw: st.DrawFn) -> tuple[Envelope, bytes]:
    env = draw(SAY_OR_SUBMIT)
    env = msgspec.structs.replace(env, sender=draw(st.sampled_from(("client", env.sender))))
    return env, draw(with_extra_fields(env))


@FUZZ
@given(plain_and_extended())
def test_unknown_fields_are_accepted_like_the_plain_envelope(
    pair: tuple[Envelope, bytes],
) -> None:
    """A newer sender's extra fields change nothing about the decision."""
    env, extended = pair
    plain = canonical(env)
    outcomes = []
    for data in (plain, extended):
        with ledger_file("x.db") as ledger:
            writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
            done = like_production(writer.record, [
                IntakeMessage(1, SUBJECTS.intake(env.sender), data, env.id)])
            outcomes.append([(e.aggregate, e.key, e.kind, e.data.get("code"))
                             for e in done.events])
    assert outcomes[0] == outcomes[1]
    assert all(code != "malformed" for *_, code in outcomes[1])  # (a sender may be so named)


# Deterministic cases for what the fuzzer found (see the module docstring's invariants).
SUBMIT = Envelope(id="deep-1", sender="client", task_id="deep", sent_at=RECORDED_AT,
                  body=SubmitTask(to="triage", title="t"))


def _submit_with(path: tuple[str, ...], raw: bytes) -> bytes:
    obj = as_json_dict(SUBMIT)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "__here__"
    return msgspec.json.encode(obj).replace(b'"__here__"', raw)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("invalid UTF-8 in the envelope id", _submit_with(("id",), b'"\xff"')),
        ("invalid UTF-8 in the title", _submit_with(("body", "title"), b'"caf\xc3"')),
        ("an encoded surrogate in the task id", _submit_with(("task_id",), b'"\xed\xa0\x80"')),
        ("a payload nested 1000 deep", _submit_with(("body", "payload"),
                                                    b'{"k":' + b"[" * 1000 + b"]" * 1000 + b"}")),
        ("an unknown field nested 2000 deep", _submit_with(("x-new",),
                                                          b"[" * 2000 + b"]" * 2000)),
    ],
)
def test_undecodable_bytes_are_rejected_as_malformed(name: str, data: bytes) -> None:
    assert len(data) <= LIMIT
    with ledger_file("m.db") as ledger:
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
        done = like_production(writer.record, [
            IntakeMessage(1, SUBJECTS.intake("client"), data, "m-1")])
        assert [(e.kind, e.key, e.data["code"]) for e in done.events] == [
            (Kind.REJECTED, "client", "malformed")], name
        # ... and the writer goes on: a good message right after is recorded.
        good = canonical(msgspec.structs.replace(SUBMIT, id="ok-1", task_id="ok"))
        done = like_production(writer.record, [
            IntakeMessage(2, SUBJECTS.intake("client"), good, "ok-1")])
        assert [e.kind for e in done.events] == [Kind.SUBMITTED, Kind.ASSIGNED]


@pytest.mark.parametrize("depth", [100, 500, 900, 960, 975, 985, 990, 999])
def test_a_deep_but_decodable_payload_is_recorded_or_rejected_never_raises(
    depth: int,
) -> None:
    """Depth that the decoder takes must not break encoding, hashing or replay later."""
    data = _submit_with(("body", "payload"), b'{"k":' + b"[" * depth + b"]" * depth + b"}")
    with ledger_file("d.db") as ledger:
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock, cache_size=1)
        done = like_production(writer.record, [
            IntakeMessage(1, SUBJECTS.intake("client"), data, "deep-1")])
        kinds = [e.kind for e in done.events]
        assert kinds in ([Kind.SUBMITTED, Kind.ASSIGNED], [Kind.REJECTED])
        # The task's state is read back from the ledger (cache of 1) and replayed.
        like_production(writer.record, [IntakeMessage(2, SUBJECTS.intake("client"), canonical(
            msgspec.structs.replace(SUBMIT, id="other", task_id="other")), "other")])
        like_production(writer.record, [IntakeMessage(3, SUBJECTS.intake("triage"), canonical(
            Envelope(id="c", sender="triage", task_id="deep", sent_at=RECORDED_AT,
                     body=Complete(result="ok"), attempt=1)), "c")])
        assert like_production(replay, ledger).verified


def test_a_small_cache_does_not_forget_what_the_batch_in_progress_decided() -> None:
    """Two tasks in one batch with a cache of one state: the second task's lookup must not
    evict the first task's state while its events are still uncommitted."""
    def env(id: str, sender: str, task_id: str, body: Body, attempt: int = 0) -> IntakeMessage:
        data = canonical(Envelope(id=id, sender=sender, task_id=task_id, sent_at=RECORDED_AT,
                                  body=body, attempt=attempt))
        return IntakeMessage(int(id[1:]), SUBJECTS.intake(sender), data, id)

    with ledger_file("cache.db") as ledger:
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock, cache_size=1)
        done = writer.record([
            env("m1", "client", "a", SubmitTask(to="triage", title="a")),
            env("m2", "client", "b", SubmitTask(to="triage", title="b")),
            env("m3", "triage", "a", Complete(result="done"), attempt=1),
        ])
        assert [(e.key, e.kind) for e in done.events] == [
            ("a", Kind.SUBMITTED), ("a", Kind.ASSIGNED), ("b", Kind.SUBMITTED),
            ("b", Kind.ASSIGNED), ("a", Kind.COMPLETED)]


@pytest.mark.parametrize(("excess", "kinds"), [
    (0, [Kind.SUBMITTED, Kind.ASSIGNED]),
    (1, [Kind.REJECTED]),
])
def test_max_payload_bytes_is_the_last_size_accepted(excess: int, kinds: list[str]) -> None:
    obj = as_json_dict(SUBMIT)
    obj["body"]["title"] = ""
    obj["body"]["title"] = "x" * (LIMIT + excess - len(msgspec.json.encode(obj)))
    data = msgspec.json.encode(obj)
    assert len(data) == LIMIT + excess
    with ledger_file("size.db") as ledger:
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
        done = like_production(writer.record, [
            IntakeMessage(1, SUBJECTS.intake("client"), data, SUBMIT.id)])
        assert [e.kind for e in done.events] == kinds
        if excess:
            assert done.events[0].data["code"] == "oversize"
            assert str(LIMIT) in done.events[0].data["reason"]


@pytest.mark.parametrize(("principal", "sender", "codes"), [
    ("writer", "writer", {"not_owner", "duplicate_id"}),  # an outsider, in its own name
    ("writer", "client", {"spoofed_sender"}),  # the submitter's name, on writer's subject
])
def test_a_message_reusing_a_recorded_id_from_someone_else_is_rejected_not_dropped(
    principal: str, sender: str, codes: set[str],
) -> None:
    """Only the principal that said it may resend a message id (and is then ignored): the
    same id from anybody else is a bad message, recorded like any other."""
    with ledger_file("reuse.db") as ledger:
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
        like_production(writer.record, [IntakeMessage(1, SUBJECTS.intake("client"),
                                                      canonical(SUBMIT), SUBMIT.id)])
        before = stored(ledger)
        reuse = canonical(Envelope(id=SUBMIT.id, sender=sender, task_id=SUBMIT.task_id,
                                   sent_at=RECORDED_AT, body=Say(text="mine now")))
        done = like_production(writer.record, [
            IntakeMessage(2, SUBJECTS.intake(principal), reuse, SUBMIT.id)])
        assert [(e.kind, e.aggregate, e.key) for e in done.events] == [
            (Kind.REJECTED, Aggregate.PRINCIPAL, principal)]
        assert done.events[0].data["code"] in codes
        assert stored(ledger)[: len(before)] == before

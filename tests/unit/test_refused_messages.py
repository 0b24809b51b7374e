"""What the coordinator keeps of a principal's refused messages: bounded however often it
is refused, without forgetting anything that matters, and named where it explains a
timeout (a real SQLite ledger, no NATS)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest

from coordinator.ledger.events import Kind, LedgerEvent
from coordinator.ledger.replay import replay
from coordinator.ledger.state import REMEMBERED_REJECTIONS
from coordinator.ledger.store import Ledger, open_ledger
from coordinator.ledger.writer import IntakeMessage, LedgerWriter
from schemas import (
    Codec,
    Envelope,
    HandoffRequest,
    ResumeAgent,
    Say,
    Subjects,
    SubmitTask,
    SuspendAgent,
)
from tests.live import team_policy

POLICY = team_policy('operators = ["operator"]\n', "principal memory test policy")
SUBJECTS = Subjects("lm")
CODEC = Codec()
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = open_ledger(str(tmp_path / "ledger.db"), create=True)
    try:
        yield ledger
    finally:
        ledger.close()


class Sender:
    """Publishes on one principal's intake subject, numbering the stream as it goes."""

    seq = 0

    def __init__(self, principal: str) -> None:
        self.principal = principal

    def message(self, env: Envelope) -> IntakeMessage:
        Sender.seq += 1
        return IntakeMessage(Sender.seq, SUBJECTS.intake(self.principal), CODEC.encode(env),
                             env.id)

    def envelope(self, msg_id: str, body: object, task_id: str = "t") -> Envelope:
        return Envelope(id=msg_id, sender=self.principal, task_id=task_id, sent_at=NOW,
                        body=body)  # type: ignore[arg-type]


def writer(ledger: Ledger, cache_size: int = 10_000) -> LedgerWriter:
    return LedgerWriter(ledger, POLICY, SUBJECTS, lambda: NOW, cache_size=cache_size)


def count_history_reads(ledger: Ledger) -> list[str]:
    """The aggregate ids whose history is read from now on (a state not in memory)."""
    reads: list[str] = []
    history = ledger.history

    def counted(aggregate_id: UUID) -> list[LedgerEvent]:
        reads.append(str(aggregate_id))
        return history(aggregate_id)

    ledger.history = counted  # type: ignore[method-assign]
    return reads


def test_a_sender_refused_without_end_is_remembered_by_its_newest_rejections(
        ledger: Ledger) -> None:
    mallory = Sender("mallory")  # no agent, may not submit: each submission is refused
    count = REMEMBERED_REJECTIONS + 50
    refused = [mallory.envelope(f"m{i:05}", SubmitTask(to="triage", title=str(i)),
                                task_id=f"t{i}") for i in range(count)]
    recorded = writer(ledger).record([mallory.message(e) for e in refused])
    assert [e.kind for e in recorded.events] == [Kind.REJECTED] * count

    state = replay(ledger).principals["mallory"]
    assert state.rejections == count
    assert list(state.rejected) == [e.id for e in refused[-REMEMBERED_REJECTIONS:]]

    # Resent after JetStream's dedup window, to a coordinator that restarted: the newest
    # rejections are still known and change nothing; the forgotten ones are judged again.
    # Its state was folded in the restart's pass over the log: no reading its history.
    again = writer(ledger)
    reads = count_history_reads(ledger)
    assert again.record([mallory.message(refused[-1]),
                         mallory.message(refused[-REMEMBERED_REJECTIONS])]).events == []
    judged = again.record([mallory.message(refused[0])]).events
    assert [(e.kind, e.msg_id) for e in judged] == [(Kind.REJECTED, refused[0].id)]
    assert replay(ledger).principals["mallory"].rejections == count + 1
    assert reads == []


def test_an_old_resumption_resent_after_a_later_suspension_changes_nothing(
        ledger: Ledger) -> None:
    operator, triage = Sender("operator"), Sender("triage")
    suspend = operator.envelope("s1", SuspendAgent(agent="triage", reason="looping"))
    resume = operator.envelope("r1", ResumeAgent(agent="triage"))
    suspend_again = operator.envelope("s2", SuspendAgent(agent="triage", reason="again"))
    # One state per kind in memory: every touch of a principal reloads it from the ledger.
    w = writer(ledger, cache_size=1)
    for env in (suspend, resume, suspend_again):
        w.record([operator.message(env)])
    # The suspended agent keeps talking: more refusals than the state remembers.
    w.record([triage.message(triage.envelope(f"x{i}", Say(text="still here")))
              for i in range(REMEMBERED_REJECTIONS + 10)])

    assert w.record([operator.message(resume)]).events == []
    assert w.suspended == frozenset({"triage"})
    assert replay(ledger).principals["triage"].suspended


def test_principals_past_the_cache_are_reloaded_with_what_they_said(ledger: Ledger) -> None:
    w = writer(ledger, cache_size=3)
    strangers = [Sender(f"stranger-{i}") for i in range(10)]
    sent = [s.envelope(f"{s.principal}-1", Say(text="hello")) for s in strangers]
    for s, e in zip(strangers, sent, strict=True):  # one at a time: each evicts the oldest
        assert [e.kind for e in w.record([s.message(e)]).events] == [Kind.REJECTED]
    # Each resend finds its principal evicted, reloads it and knows the message.
    reads = count_history_reads(ledger)
    for s, e in zip(strangers, sent, strict=True):
        assert w.record([s.message(e)]).events == []
    assert len(reads) == len(strangers)  # none was still in memory
    assert all(replay(ledger).principals[s.principal].rejections == 1 for s in strangers)


def test_a_restart_keeps_the_principals_active_last_and_reloads_the_others(
        ledger: Ledger) -> None:
    strangers = [Sender(f"stranger-{i}") for i in range(6)]
    sent = [s.envelope(f"{s.principal}-1", Say(text="hello")) for s in strangers]
    writer(ledger).record([s.message(e) for s, e in zip(strangers, sent, strict=True)])
    restarted = writer(ledger, cache_size=4)
    reads = count_history_reads(ledger)
    for s, e in reversed(list(zip(strangers, sent, strict=True))):
        assert restarted.record([s.message(e)]).events == []
    # The four active last were folded at the restart; the two before them are read from
    # the ledger, and still know their message.
    assert len(reads) == 2


def test_a_principal_pushed_out_during_the_restart_is_not_folded_from_its_middle(
        ledger: Ledger) -> None:
    first, *others = [Sender(f"stranger-{i}") for i in range(5)]
    early = first.envelope("early", Say(text="hello"))
    w = writer(ledger)
    w.record([first.message(early)])
    w.record([s.message(s.envelope(f"{s.principal}-1", Say(text="hi"))) for s in others])
    w.record([first.message(first.envelope("late", Say(text="me again")))])
    # At the restart, "first" leaves the two kept states and comes back at its second
    # event: kept from there, it would not know its first message.
    assert writer(ledger, cache_size=2).record([first.message(early)]).events == []


def test_a_timeout_after_a_refused_output_says_it_was_refused(ledger: Ledger) -> None:
    """An owner whose handoff was refused (its peer suspended) has no way out of the task
    and runs out of time: the timeout names the refusal, not only the missed deadline."""
    now = [NOW]
    w = LedgerWriter(ledger, POLICY, SUBJECTS, lambda: now[0])
    client, operator, triage = Sender("client"), Sender("operator"), Sender("triage")
    w.record([client.message(client.envelope("s", SubmitTask(to="triage", title="q")))])
    w.record([operator.message(operator.envelope(
        "x", SuspendAgent(agent="researcher", reason="looping"), task_id="-"))])
    handoff = Envelope(id="h", sender="triage", task_id="t", sent_at=NOW, attempt=1,
                       body=HandoffRequest(to="researcher", reason="look"))
    refused = w.record([triage.message(handoff)]).events
    assert [(e.kind, e.data["code"]) for e in refused] == [(Kind.REJECTED, "agent_suspended")]
    now[0] = NOW + timedelta(hours=1)
    [timed_out, *_] = w.tick().events
    assert timed_out.kind == Kind.TIMED_OUT
    assert timed_out.data["reason"].endswith(
        "; its last output was refused (agent_suspended: researcher is suspended)")

"""Signed checkpoints: recorded, relayed, verified — and what they catch that chains cannot.

The attacker here has write access to the SQLite file but not the signing key. After each
edit they recompute every per-aggregate hash chain (``forge``), so per-task verification
alone passes; the global chain and the signed checkpoints (in the ledger, and the copy on
the LEDGER stream) are what give them away.
"""

from __future__ import annotations

import base64
import gc
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid5

import anyio
import msgspec
import pytest
from eventsourcing.persistence import StoredEvent

from bus.client import Bus, BusSettings, open_bus
from bus.embedded import EmbeddedNats
from coordinator.ledger.checkpoints import (
    Checkpoint,
    Checkpointer,
    Signer,
    checkpoint_from_record,
    checkpoint_subject,
    global_link,
    latest_checkpoint,
    read_checkpoint,
    read_signer,
    signing_key_path,
    write_checkpoint,
)
from coordinator.ledger.events import GENESIS, Kind, LedgerEvent, chain_hash
from coordinator.ledger.replay import Break, replay, verify_against
from coordinator.ledger.store import open_ledger
from coordinator.ledger.writer import IntakeMessage, LedgerWriter
from coordinator.policy import load_policy
from coordinator.service import CoordinatorSettings, run_coordinator
from schemas import Codec, Envelope, Say, Subjects, SubmitTask, canonical
from tests.live import until

TIMEOUT = 15.0
POLICY = load_policy(
    Path(__file__).resolve().parents[2] / "agents" / "examples" / "ledgermesh.toml")
SENT_AT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
_NS = UUID("7e3f4a5b-6c7d-5e8f-9a0b-1c2d3e4f5a6b")
_codec = Codec()


# -- the attacker ---------------------------------------------------------------------------
def forge(db: str, *, keep_through: int | None = None,
          edit: Callable[[int, dict[str, Any]], None] | None = None,
          resign: Signer | None = None) -> None:
    """Delete every event after ``keep_through``, ``edit`` events in place, then recompute
    every per-aggregate chain so each one verifies again — and, with ``resign``, re-sign
    every checkpoint with the attacker's own key over the recomputed global heads."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            if keep_through is not None:
                conn.execute("DELETE FROM stored_events WHERE rowid > ?", (keep_through,))
            rows = conn.execute("SELECT rowid, originator_id, originator_version, topic, state "
                                "FROM stored_events ORDER BY rowid").fetchall()
            heads: dict[str, str] = {}
            global_at: dict[int, str] = {}
            global_head = GENESIS
            for rowid, originator_id, version, topic, blob in rows:
                state = msgspec.json.decode(blob)
                if edit is not None:
                    edit(rowid, state)
                if resign is not None and state["kind"] == Kind.CHECKPOINTED:
                    data = state["data"]
                    state["data"] = resign.sign(data["ledger"], data["position"],
                                                global_at[data["position"]]).data()
                state.pop("hash")
                state["prev_hash"] = heads.get(originator_id, GENESIS)
                state["hash"] = chain_hash(state["prev_hash"], UUID(originator_id), version,
                                           topic, state)
                heads[originator_id] = state["hash"]
                global_head = global_at[rowid] = global_link(global_head, state["hash"])
                conn.execute("UPDATE stored_events SET state = ? WHERE rowid = ?",
                             (canonical(state), rowid))
    finally:
        conn.close()


def chain_breaks(breaks: list[Break]) -> list[Break]:
    """Breaks of per-aggregate chains (not of the global chain or checkpoints)."""
    return [b for b in breaks if "version" in b.problem or "hash" in b.problem]


def states(db: str) -> list[tuple[int, dict[str, Any]]]:
    ledger = open_ledger(db, create=False)
    try:
        return [(n.id, msgspec.json.decode(n.state)) for n in ledger.read(0, 100_000)]
    finally:
        ledger.close()


# -- recording without NATS: the writer and the checkpointer ---------------------------------
def fixed_clock() -> datetime:
    return datetime(2025, 3, 4, 5, 6, 8, tzinfo=UTC)


def envelope(n: int, sender: str, task: str, body: Any, attempt: int = 0) -> Envelope:
    return Envelope(id=str(uuid5(_NS, str(n))), sender=sender, task_id=task, sent_at=SENT_AT,
                    body=body, attempt=attempt)


def intake(tasks: range, subjects: Subjects, start_seq: int) -> list[IntakeMessage]:
    """Each task: submitted to triage (submitted + assigned), then two notes from triage."""
    out = []
    seq = start_seq
    for i in tasks:
        task = f"task-{i}"
        said = [("client", envelope(i * 10, "client", task,
                                    SubmitTask(to="triage", title=f"q{i}", payload={"i": i}))),
                ("triage", envelope(i * 10 + 1, "triage", task, Say(text=f"note {i}a"), 1)),
                ("triage", envelope(i * 10 + 2, "triage", task, Say(text=f"note {i}b"), 1))]
        for principal, message in said:
            out.append(IntakeMessage(seq, subjects.intake(principal), _codec.encode(message),
                                     message.id))
            seq += 1
    return out


def build(db: str, signer: Signer, rounds: int = 3, per_round: int = 3) -> list[Checkpoint]:
    """A ledger with a checkpoint after every round; the checkpoints, as the stream has them."""
    subjects = Subjects("lm")
    ledger = open_ledger(db, create=True)
    try:
        writer = LedgerWriter(ledger, POLICY, subjects, fixed_clock)
        checkpointer = Checkpointer(signer, subjects.prefix)
        seq = 1
        out = []
        for r in range(rounds):
            batch = intake(range(r * per_round, (r + 1) * per_round), subjects, seq)
            seq += len(batch)
            writer.record(batch)
            recorded = writer.record_checkpoint(checkpointer)
            assert len(recorded.events) == 1
            out.append(Checkpoint(**recorded.events[0].data, at=recorded.positions[0]))
        assert writer.record_checkpoint(checkpointer).events == []  # nothing new
        return out
    finally:
        ledger.close()


def verify(db: str, **kwargs: Any) -> list[Break]:
    """The breaks replay finds, checking in this process and in a helper process alike."""
    ledger = open_ledger(db, create=False)
    try:
        inline = replay(ledger, helper=False, **kwargs)
        helped = replay(ledger, helper=True, **kwargs)
    finally:
        ledger.close()
    assert helped.breaks == inline.breaks
    assert (helped.digest, helped.chain.summary()) == (inline.digest, inline.chain.summary())
    return inline.breaks


def test_checkpoints_cover_the_log_chain_up_and_leave_the_digest_alone(tmp_path: Path) -> None:
    signer = Signer.generate()
    db = str(tmp_path / "ledger.db")
    checkpoints = build(db, signer)
    events = states(db)
    last_position = events[-1][0]
    # Each checkpoint covers the position just before it, and they form their own chain.
    assert [c.at for c in checkpoints] == [p for p, s in events if s["kind"] == Kind.CHECKPOINTED]
    assert all(c.position == c.at - 1 for c in checkpoints)
    assert checkpoints[-1].at == last_position
    ledger = open_ledger(db, create=False)
    try:
        result = replay(ledger, trusted_keys=[signer.public_key])
        assert result.breaks == []
        assert result.chain.checkpoints == 3
        assert result.chain.last == checkpoints[-1]
        assert result.chain.keys == {signer.public_key}
        assert result.chain.unsigned == 0
        assert verify_against(ledger, checkpoints[-1], [signer.public_key]) == []
        # A new checkpointer (a restarted coordinator) continues the same chains.
        checkpointer = Checkpointer(signer, "lm")
        while checkpointer.catch_up(ledger, page=4):
            pass
        assert (checkpointer.position, checkpointer.head) == (last_position,
                                                              result.chain.head)
        assert checkpointer.pending(last_position) == 0
        assert checkpointer.seal(ledger, fixed_clock()) == []
    finally:
        ledger.close()
    # Checkpoints are not task or principal state: the digest is that of the same intake
    # recorded without them.
    plain = str(tmp_path / "plain.db")
    ledger = open_ledger(plain, create=True)
    try:
        LedgerWriter(ledger, POLICY, Subjects("lm"), fixed_clock).record(
            intake(range(9), Subjects("lm"), 1))
        assert replay(ledger).digest == digest_of(db)
    finally:
        ledger.close()


def digest_of(db: str) -> str:
    ledger = open_ledger(db, create=False)
    try:
        return replay(ledger).digest
    finally:
        ledger.close()


def test_a_rewritten_event_no_longer_reaches_the_signed_head(tmp_path: Path) -> None:
    signer = Signer.generate()
    db = str(tmp_path / "ledger.db")
    checkpoints = build(db, signer)
    target = next(p for p, s in states(db) if s["kind"] == Kind.SAID)

    def rewrite(rowid: int, state: dict[str, Any]) -> None:
        if rowid == target:
            state["data"]["text"] = "something else entirely"

    forge(db, edit=rewrite)
    breaks = verify(db)
    assert chain_breaks(breaks) == []  # every per-task chain verifies again
    assert breaks, "the rewrite went unnoticed"
    first = breaks[0]
    assert first.position == checkpoints[0].at  # the first checkpoint after the edit
    assert first.problem.startswith(f"rewritten: global head at position "
                                    f"{checkpoints[0].position}")
    assert "after position 0 and at or before" in first.problem

    # Re-signing every checkpoint with a key of one's own makes the ledger consistent...
    attacker = Signer.generate()
    forge(db, resign=attacker)
    assert verify(db) == []
    # ...but not signed by the coordinator's key,
    untrusted = verify(db, trusted_keys=[signer.public_key])
    assert len(untrusted) == 3
    assert all("not a trusted key" in b.problem for b in untrusted)
    # and not what the stream's copy of the newest checkpoint says.
    against = verify(db, against=[checkpoints[-1]])
    assert [b.problem.split(":")[0] for b in against] == ["rewritten"]
    assert against[0].position == checkpoints[-1].position


def test_a_checkpoint_with_a_bad_signature_is_detected(tmp_path: Path) -> None:
    signer = Signer.generate()
    db = str(tmp_path / "ledger.db")
    checkpoints = build(db, signer)
    second = checkpoints[1].at

    def corrupt(rowid: int, state: dict[str, Any]) -> None:
        if rowid == second:  # claim another head, keep the signature
            state["data"]["global_head"] = "ab" * 32

    forge(db, edit=corrupt)
    breaks = verify(db)
    assert chain_breaks(breaks) == []
    assert breaks[0].position == second
    assert breaks[0].problem.startswith("checkpoint bad signature")
    # The forged checkpoint is itself a changed event: the next checkpoint says so too.
    assert [(b.position, b.problem.split(":")[0]) for b in breaks[1:]] == [
        (checkpoints[2].at, "rewritten")]

    def flip(rowid: int, state: dict[str, Any]) -> None:
        if rowid == second:
            state["data"] = checkpoints[1].data()
            sig = bytearray(base64.b64decode(state["data"]["signature"]))
            sig[0] ^= 1
            state["data"]["signature"] = base64.b64encode(bytes(sig)).decode()

    forge(db, edit=flip)
    breaks = verify(db)
    assert [(b.position, b.problem.split(" (")[0]) for b in breaks[:1]] == [
        (second, "checkpoint bad signature")]
    assert [b.position for b in breaks[1:]] == [checkpoints[2].at]


def test_a_truncated_tail_is_detected_against_a_saved_checkpoint(tmp_path: Path) -> None:
    signer = Signer.generate()
    db = str(tmp_path / "ledger.db")
    checkpoints = build(db, signer)
    saved = tmp_path / "checkpoint.json"
    write_checkpoint(saved, checkpoints[-1])
    assert read_checkpoint(saved) == checkpoints[-1]
    keep = checkpoints[-1].at - 4  # the newest checkpoint and three events before it
    forge(db, keep_through=keep)
    assert verify(db, trusted_keys=[signer.public_key]) == []  # the ledger alone looks fine
    breaks = verify(db, against=[read_checkpoint(saved)])
    assert [(b.position, b.problem) for b in breaks] == [
        (keep + 1, f"truncated: ledger ends at {keep}, signed checkpoint covers "
                   f"{checkpoints[-1].position}")]


# -- the coordinator: recorded, relayed, fetched back from the stream ------------------------
@asynccontextmanager
async def coordinator(settings: CoordinatorSettings) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        await tg.start(run_coordinator, settings)
        yield
        tg.cancel_scope.cancel()
    gc.collect()


async def submit(bus: Bus, subjects: Subjects, tasks: range) -> None:
    for i in tasks:
        message = envelope(1000 + i, "client", f"t-{i}",
                           SubmitTask(to="triage", title=f"q{i}", payload={"i": i}))
        await bus.publish(subjects.intake("client"), _codec.encode(message), msg_id=message.id)


async def checkpointed(db: str, bus: Bus, subjects: Subjects, tasks: int) -> int:
    """Wait until every task is recorded, the last event is a checkpoint, and all of it is
    relayed; the last position."""
    with anyio.fail_after(TIMEOUT):
        while True:
            events = await anyio.to_thread.run_sync(states, db)
            submitted = sum(1 for _, s in events if s["kind"] == Kind.SUBMITTED)
            if submitted == tasks and events[-1][1]["kind"] == Kind.CHECKPOINTED:
                last = events[-1][0]
                relayed = await bus.last_msg_id(subjects.ledger_stream)
                if relayed == subjects.ledger_msg_id(last):
                    return last
            await anyio.sleep(0.05)


async def test_the_coordinator_signs_relays_and_a_truncation_is_caught_by_the_stream_copy(
    nats_server: EmbeddedNats, prefix: str, tmp_path: Path
) -> None:
    db = str(tmp_path / "ledger.db")
    subjects = Subjects(prefix)
    settings = CoordinatorSettings(nats_server.url, db, POLICY, subjects,
                                   checkpoint_every=4, checkpoint_interval_s=0.2)
    async with open_bus(BusSettings(nats_server.url, f"{prefix}-auditor")) as bus:
        async with coordinator(settings):
            assert await latest_checkpoint(bus, subjects, wait=0.2) is None
            await submit(bus, subjects, range(3))
            first = await checkpointed(db, bus, subjects, 3)
            await anyio.sleep(0.8)  # idle: no more checkpoints
            assert (await anyio.to_thread.run_sync(states, db))[-1][0] == first
        # The key was generated next to the ledger, private, and is the one that signed.
        key_file = signing_key_path(db)
        assert key_file is not None
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        public_key = read_signer(key_file).public_key
        # A restarted coordinator keeps the key and continues the chains.
        async with coordinator(settings):
            await submit(bus, subjects, range(3, 6))
            last = await checkpointed(db, bus, subjects, 6)
        assert read_signer(key_file).public_key == public_key

        newest = await latest_checkpoint(bus, subjects)
        assert newest is not None
        assert (newest.at, newest.position, newest.key) == (last, last - 1, public_key)
        data = await bus.last_message(subjects.ledger_stream, checkpoint_subject(subjects))
        assert data is not None
        assert checkpoint_from_record(data) == newest
        assert checkpoint_subject(subjects) == (
            f"{prefix}.ledger.checkpoint.checkpoints.ledger.checkpointed")

    ledger = open_ledger(db, create=False)
    try:
        result = replay(ledger, trusted_keys=[public_key], against=[newest])
        assert result.breaks == []
        assert result.chain.checkpoints >= 2
        assert result.chain.anchored == 1
        assert result.chain.last == newest
    finally:
        ledger.close()

    # Delete the tail (the newest checkpoint with it); the ledger alone still verifies.
    keep = first + 2
    assert keep < newest.position
    forge(db, keep_through=keep)
    assert verify(db, trusted_keys=[public_key]) == []
    ledger = open_ledger(db, create=False)
    try:
        breaks = verify_against(ledger, newest, trusted_keys=[public_key])
    finally:
        ledger.close()
    assert [b.problem for b in breaks] == [
        f"truncated: ledger ends at {keep}, signed checkpoint covers {newest.position}"]


async def test_a_stop_signs_and_relays_everything_up_to_the_last_event(
    nats_server: EmbeddedNats, prefix: str, tmp_path: Path
) -> None:
    """Checkpoints far apart (1000 events, an hour): the stop itself signs what none covers,
    so a stopped ledger verifies with no unsigned tail, and the stream has the signature."""
    db = str(tmp_path / "ledger.db")
    subjects = Subjects(prefix)
    settings = CoordinatorSettings(nats_server.url, db, POLICY, subjects,
                                   checkpoint_every=1000, checkpoint_interval_s=3600)
    async with open_bus(BusSettings(nats_server.url, f"{prefix}-auditor")) as bus:
        async with coordinator(settings):
            await submit(bus, subjects, range(3))
            await until(db, lambda events: len(events) == 6, timeout=TIMEOUT)
            running = await anyio.to_thread.run_sync(states, db)
            assert Kind.CHECKPOINTED not in [s["kind"] for _, s in running]
        stopped = await anyio.to_thread.run_sync(states, db)
        assert stopped[:-1] == running
        last, event = stopped[-1]
        assert event["kind"] == Kind.CHECKPOINTED
        newest = await latest_checkpoint(bus, subjects, wait=1.0)  # relayed as it stopped
        assert newest is not None
        assert (newest.at, newest.position) == (last, last - 1)

        # A stop with nothing new to sign adds nothing.
        async with coordinator(settings):
            pass
        assert await anyio.to_thread.run_sync(states, db) == stopped

    ledger = open_ledger(db, create=False)
    try:
        result = replay(ledger, against=[newest])
    finally:
        ledger.close()
    assert result.breaks == []
    assert result.chain.last == newest
    assert result.chain.unsigned == 0


def test_verification_refuses_a_checkpoint_nobody_trusts(tmp_path: Path) -> None:
    signer = Signer.generate()
    db = str(tmp_path / "ledger.db")
    checkpoints = build(db, signer, rounds=1)
    forged = Signer.generate().sign("lm", checkpoints[0].position, checkpoints[0].global_head)
    breaks = verify(db, trusted_keys=[signer.public_key], against=[forged])
    assert len(breaks) == 1
    assert breaks[0].problem.startswith("external checkpoint rejected: signed by")


@pytest.mark.parametrize("page", [1, 3, 2000])
def test_catching_up_in_any_page_size_gives_the_same_head(tmp_path: Path, page: int) -> None:
    signer = Signer.generate()
    db = str(tmp_path / "ledger.db")
    checkpoints = build(db, signer, rounds=2)
    ledger = open_ledger(db, create=False)
    try:
        checkpointer = Checkpointer(signer, "lm")
        while checkpointer.catch_up(ledger, page=page):
            pass
        assert checkpointer.covered == checkpoints[-1].at
        assert replay(ledger).chain.head == checkpointer.head
    finally:
        ledger.close()


def test_following_commits_keeps_the_head_reading_the_log_gives(tmp_path: Path) -> None:
    signer = Signer.generate()
    db = str(tmp_path / "ledger.db")
    subjects = Subjects("lm")
    ledger = open_ledger(db, create=True)
    try:
        checkpointer = Checkpointer(signer, subjects.prefix)
        writer = LedgerWriter(ledger, POLICY, subjects, fixed_clock,
                              on_commit=checkpointer.follow)
        seq = 1
        for r in range(3):
            batch = intake(range(r * 3, (r + 1) * 3), subjects, seq)
            seq += len(batch)
            recorded = writer.record(batch)
            # Kept up with the commit without reading it back.
            assert checkpointer.position == ledger.last_position() == recorded.positions[-1]
            (sealed,) = writer.record_checkpoint(checkpointer).positions
            assert checkpointer.covered == checkpointer.position == sealed
        reader = Checkpointer(signer, subjects.prefix)
        while reader.catch_up(ledger):
            pass
        assert (reader.head, reader.position, reader.covered) == (
            checkpointer.head, checkpointer.position, checkpointer.covered)
        assert replay(ledger).chain.checkpoints == 3
        # A commit that does not continue what was folded is left for catch_up to read.
        lagging = Checkpointer(signer, subjects.prefix)
        tail = ledger.read(ledger.last_position() - 2, 10)
        lagging.follow(tail, [cast(LedgerEvent, ledger.mapper.to_domain_event(
            StoredEvent(originator_id=n.originator_id, originator_version=n.originator_version,
                        topic=n.topic, state=n.state))) for n in tail])
        assert (lagging.position, lagging.head) == (0, GENESIS)
    finally:
        ledger.close()
    assert verify(db) == []

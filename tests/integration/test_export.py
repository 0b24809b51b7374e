"""``ledgermesh export`` writes what the relay published: the same records, byte for byte,
whether read from the ledger stream or from the ledger itself; and an export can be
checked on its own (every event's hash from its line)."""

from __future__ import annotations

import io
from pathlib import Path
from uuid import UUID

import anyio
import msgspec
import pytest

from bus.embedded import EmbeddedNats
from coordinator.ledger.events import Kind
from coordinator.ledger.hashcheck import HashCheck
from coordinator.ledger.store import open_ledger
from ledgermesh.export import export_ledger
from schemas import HandoffRequest, LedgerRecord, Subjects, SubmitTask
from tests import live
from tests.live import envelope, of, say, until


def exported(ledger: str, **options: object) -> list[bytes]:
    opened = open_ledger(ledger, create=False)
    try:
        out = io.BytesIO()
        export_ledger(opened, out, **options)  # type: ignore[arg-type]
    finally:
        opened.close()
    return out.getvalue().splitlines()


def rows(lines: list[bytes]) -> list[tuple[int, UUID, int, str, bytes]]:
    """An export read back as the ledger's rows are: what the hash check takes."""
    records = [msgspec.json.decode(line, type=LedgerRecord) for line in lines]
    return [(r.position, UUID(r.aggregate_id), r.version, r.topic, bytes(r.event))
            for r in records]


async def test_an_export_is_the_relayed_stream_and_verifies_on_its_own(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.db")
    subjects = Subjects(prefix)
    async with live.system(nats_server, prefix, ledger, live.team_policy()) as bus:
        for task in ("t-a", "t-b"):
            await say(bus, prefix, envelope("client", task, SubmitTask(to="triage",
                                                                       title=task)))
        await until(ledger, lambda e: len([x for x in e if x["kind"] == Kind.ASSIGNED]) == 2)
        await say(bus, prefix, envelope("triage", "t-a", HandoffRequest(
            to="researcher", reason="needs research"), 1))
        events = await until(ledger, lambda e: any(
            x["kind"] == Kind.ASSIGNED and x["data"]["agent"] == "researcher"
            for x in of(e, "t-a")))
        copies: list[bytes] = []
        with anyio.fail_after(10):  # the relay publishes right after each commit
            while len(copies) < len(events):
                stored = await bus.stored(subjects.ledger_stream, len(copies) + 1)
                if stored is None:
                    await anyio.sleep(0.05)
                    continue
                copies.append(stored[1])
    lines = exported(ledger)
    assert len(copies) == len(events) >= 6
    assert lines[:-1] == copies  # byte for byte what the ledger stream holds
    # ...then the checkpoint the coordinator signed as it stopped.
    last = msgspec.json.decode(lines[-1], type=LedgerRecord)
    assert msgspec.json.decode(last.event)["kind"] == Kind.CHECKPOINTED

    check = HashCheck()
    check.add(rows(lines))
    assert check.events == len(lines)
    assert check.wrong == {}
    # One edited byte in an exported event is found, at its position.
    tampered = [line.replace(b'"title":"t-b"', b'"title":"t-c"') for line in lines]
    assert tampered != lines
    check = HashCheck()
    check.add(rows(tampered))
    changed = [r.position for r, line, t in zip(
        (msgspec.json.decode(x, type=LedgerRecord) for x in lines), lines, tampered,
        strict=True) if line != t]
    assert list(check.wrong) == changed

    only_a = [msgspec.json.decode(line, type=LedgerRecord) for line in
              exported(ledger, task_id="t-a")]
    assert [msgspec.json.decode(r.event)["key"] for r in only_a] == ["t-a"] * len(only_a)
    assert len(only_a) == len(of(events, "t-a"))
    middle = [msgspec.json.decode(line, type=LedgerRecord).position
              for line in exported(ledger, after=2, to=5)]
    assert middle == [3, 4, 5]


@pytest.mark.parametrize("after", [0, 3])
def test_an_empty_span_exports_nothing(tmp_path: Path, after: int) -> None:
    ledger = str(tmp_path / "ledger.db")
    open_ledger(ledger, create=True).close()
    assert exported(ledger, after=after) == []

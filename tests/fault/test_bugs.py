"""Bugs the fault harness found, each kept as the smallest scenario that exposed it, so
the fix stays guarded. (The third, in-flight intake skipped after a coordinator restart,
is guarded by ``test_scenarios.py::test_coordinator_killed[after_receive]`` and
``test_coordinator_stopped_during_a_burst``.)
"""

from __future__ import annotations

from pathlib import Path

import anyio

from bus.embedded import EmbeddedNats
from coordinator.ledger.events import Kind

from .harness import (
    DEDUP_WINDOW,
    TaskSpec,
    decode_raw,
    degraded,
    ledger_events,
    ledger_state,
    open_world,
    short_ack_wait,
    short_dedup_window,
    until,
)


async def test_a_deadline_passing_during_a_ledger_outage_still_times_out(
        nats_server: EmbeddedNats, prefix: str, scenario: str, tmp_path: Path) -> None:
    """A task's deadline passes while the ledger cannot be written. Once it can, the
    attempt must still time out and (nobody answers) the task be dead-lettered.

    Today the failed timer commit removes the task from ``LedgerWriter.timers`` and
    nothing puts it back until the coordinator restarts: the task stays assigned.
    """
    async with open_world(scenario, nats_server.url, prefix, tmp_path / "world") as w:
        coordinator = w.dep.coordinator()
        await w.dep.ready(w.bus, coordinator)  # no agent: "ghost" never answers (1 s deadline)
        ghost = TaskSpec("ghost-000", "ghost", {})
        await w.client.submit(ghost)
        await until(lambda: ledger_state(w.dep.ledger)[0].get(ghost.task_id) == "assigned")
        w.dep.limit_writes(coordinator, 512)
        w.dep.history.write("coordinator_status", process="checker",
                            status=await degraded(w))
        await anyio.sleep(1.5)  # the deadline passes; every timer commit fails
        w.dep.unlimit_writes(coordinator)
        summary = await w.verify(drain_within=6)  # 2 × 1 s deadline + backoff, with margin
    assert summary.violations == []
    assert summary.counts["dead_lettered"] == 1


async def test_a_rejected_message_sent_again_after_the_dedup_window_is_recorded_once(
        nats_server: EmbeddedNats, prefix: str, scenario: str, tmp_path: Path) -> None:
    """A client resends a submission (same id, same bytes) after the dedup window, e.g.
    while retrying through an outage. Accepted messages are recorded once (the task's
    ``seen`` ids); a rejected one goes on the principal's record, which has no memory of
    message ids, so every late copy is recorded as one more rejection."""
    async with open_world(scenario, nats_server.url, prefix, tmp_path / "world") as w:
        await short_dedup_window(w.inspector)
        await w.dep.ready(w.bus, w.dep.coordinator())
        await short_ack_wait(w.inspector)
        refused = TaskSpec("refused-000", "nobody", {})  # no such agent: rejected
        accepted = TaskSpec("accepted-000", "ghost", {})
        for spec in (refused, accepted):
            await w.client.submit(spec)
        await until(lambda: len(ledger_events(w.dep.ledger)) >= 3)
        await anyio.sleep(DEDUP_WINDOW * 3)
        for spec in (refused, accepted):
            msg_id, data = w.client.envelope(spec)
            assert not await w.client.resend("client", data, msg_id)  # stored again
        summary = await w.verify(redelivered=True)
        events = ledger_events(w.dep.ledger)
    rejections = [e for e in events if e["kind"] == Kind.REJECTED]
    assert [e["data"]["code"] for e in rejections] == ["unknown_agent"]
    assert decode_raw(rejections[0]) == w.client.envelopes[w.client.msg_ids[refused.task_id]]
    assert summary.violations == []

"""The coordinator's clock: deadlines and retries become recorded decisions."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from coordinator.health import Health
from coordinator.ledger.writer import LedgerWriter
from coordinator.ledger_writes import LedgerWrites
from coordinator.signals import Doorbell

log = logging.getLogger("ledgermesh.coordinator.timer")


async def serve_timer(writer: LedgerWriter, writes: LedgerWrites, relay: Doorbell,
                      health: Health, interval: float = 0.2, *,
                      task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    while True:
        await anyio.sleep(interval)
        try:
            recorded = await writes.run(writer.tick)
        except Exception as exc:  # the ledger's driver errors vary by backend
            health.ledger_error(f"{type(exc).__name__}: {exc}")
            log.error("cannot record timer decisions (will retry): %s", exc)
            continue
        if recorded.events:
            health.recorded(len(recorded.events), writer.position)
            relay.ring()

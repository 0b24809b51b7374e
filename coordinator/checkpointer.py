"""Signed checkpoints, recorded periodically (see ``coordinator/ledger/checkpoints.py``).

A checkpoint is recorded when ``every_events`` positions are not yet covered by one, or
when ``every_s`` seconds passed since the last one and anything new was stored; an idle
ledger gets no more checkpoints. Like any event it is relayed to the LEDGER stream, so the
newest signed head also lives outside the database.
"""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskStatus

from coordinator.health import Health
from coordinator.ledger.checkpoints import Checkpointer
from coordinator.ledger.store import Ledger
from coordinator.ledger.writer import LedgerWriter
from coordinator.ledger_writes import LedgerWrites
from coordinator.signals import Doorbell

log = logging.getLogger("ledgermesh.coordinator.checkpointer")


async def serve_checkpoints(writer: LedgerWriter, ledger: Ledger,
                            writes: LedgerWrites, relay: Doorbell, health: Health,
                            checkpointer: Checkpointer, *, every_events: int = 1000,
                            every_s: float = 30.0, poll: float = 0.5,
                            task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    log.info("checkpoints of ledger %r signed by %s (every %d events or %g s)",
             checkpointer.ledger_name, checkpointer.signer.public_key, every_events, every_s)
    # The running global head: one pass over the log, a page per turn of the writer thread
    # so that intake is not held up on a long ledger.
    try:
        while await writes.run(checkpointer.catch_up, ledger):
            pass
    except Exception as exc:  # recording catches up anyway; this only spreads the work
        log.warning("cannot read the ledger for checkpoints yet: %s", exc)
    last_at = anyio.current_time()
    await _serve(writer, ledger, writes, relay, health, checkpointer, every_events, every_s,
                 poll, last_at)


async def _serve(writer: LedgerWriter, ledger: Ledger, writes: LedgerWrites,
                 relay: Doorbell, health: Health, checkpointer: Checkpointer,
                 every_events: int, every_s: float, poll: float, last_at: float) -> None:
    while True:
        await anyio.sleep(min(poll, every_s))
        try:
            last = await writes.run(ledger.last_position)
            pending = checkpointer.pending(last)
            due = pending >= every_events or (
                pending > 0 and anyio.current_time() - last_at >= every_s)
            if not due:
                continue
            recorded = await writes.run(writer.record_checkpoint, checkpointer)
        except Exception as exc:  # the ledger's driver errors vary by backend
            health.ledger_error(f"{type(exc).__name__}: {exc}")
            log.error("cannot record a checkpoint (will retry): %s", exc)
            await anyio.sleep(min(every_s, 5.0))
            continue
        last_at = anyio.current_time()
        if recorded.events:
            health.recorded(len(recorded.events), writer.position)
            relay.ring()

"""The coordinator process: intake, ledger and relay wired together."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import anyio
import msgspec
from anyio.abc import TaskStatus
from eventsourcing.persistence import Notification

from bus.client import Bus, BusSettings, Credentials, open_bus
from bus.faults import CrashPoints
from bus.topology import agent_consumer, coordinator_consumer, streams
from bus.urls import redact_url
from coordinator.checkpointer import serve_checkpoints
from coordinator.gateway import serve_gateway
from coordinator.health import Health
from coordinator.intake import serve_intake
from coordinator.ledger.checkpoints import Checkpointer, load_signer
from coordinator.ledger.events import LedgerEvent
from coordinator.ledger.feed import CommitFeed
from coordinator.ledger.owner import LedgerInUseError, WriterLock, holder_name, sole_writer
from coordinator.ledger.store import Ledger, LedgerError, is_postgres, open_ledger, redacted
from coordinator.ledger.writer import LedgerWriter
from coordinator.ledger_writes import LedgerWrites
from coordinator.metrics import serve_metrics
from coordinator.policy import Policy
from coordinator.receipts import ReceiptBook
from coordinator.relay import relay_rest, serve_relay
from coordinator.signals import Doorbell
from coordinator.timer import serve_timer
from schemas import Subjects

log = logging.getLogger("ledgermesh.coordinator")
STOP_GRACE_S = 5.0  # at a stop, for the last checkpoint and relay pass
LOCK_CHECK_S = 5.0  # how often the ledger's writer lock is checked (owner.py)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CoordinatorSettings:
    nats_url: str
    ledger: str  # SQLite path or postgresql:// URL
    policy: Policy
    subjects: Subjects = Subjects()
    batch_max: int = 256
    clock: Callable[[], datetime] = utc_now
    crash: CrashPoints = CrashPoints()
    credentials: Credentials | None = None  # None: an open (dev) server
    # Checkpoints: an Ed25519 nkey seed; None: <ledger>.signing.nk (made if missing).
    signing_seed: str | None = None
    checkpoint_every: int = 1000  # events
    checkpoint_interval_s: float = 30.0
    metrics: tuple[str, int] | None = None  # serve Prometheus metrics on (host, port)


async def run_coordinator(settings: CoordinatorSettings, *,
                          task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    with sole_writer(settings.ledger) as lock:
        await _run(settings, lock, task_status)


async def _refuse_a_second_coordinator(bus: Bus, subjects: Subjects) -> None:
    """The ledger's lock keeps two coordinators off one ledger; this keeps a second one,
    on another ledger (a wrong path, another working directory), off the same NATS and
    prefix, where it would read the whole intake into a ledger of its own. A coordinator
    that died answers nothing; two starting in the same instant are not told apart."""
    others = await bus.service_infos(subjects.service("coordinator"))
    if others:
        meta = others[0].get("metadata") or {}
        raise LedgerInUseError(
            f"another coordinator already serves prefix {subjects.prefix!r} on this NATS "
            f"({meta.get('holder', 'unknown process')}, ledger {meta.get('ledger', '?')}): a "
            "deployment has exactly one coordinator; stop that one first, or use another "
            "--prefix")


class LedgerBehindItsStreamError(LedgerError):
    """The NATS streams hold more of the log than this ledger does."""


async def _refuse_a_ledger_behind_its_stream(bus: Bus, subjects: Subjects, position: int,
                                             location: str) -> None:
    """Positions the ledger stream already holds are never relayed again, so a ledger that
    ends before them (restored from an older backup, or a new one on old streams) would
    record new tasks and deliver none of them, saying nothing."""
    relayed = subjects.ledger_position(await bus.last_msg_id(subjects.ledger_stream))
    if relayed > position:
        raise LedgerBehindItsStreamError(
            f"ledger {redacted(location)} ends at position {position}, but the NATS stream "
            f"{subjects.ledger_stream} already holds its copies up to {relayed}: this is not "
            f"the ledger those streams were made from, or it lost its newest events (restored "
            f"from an older backup?). Start it with a new --prefix (fresh streams), or with "
            f"the ledger that reaches {relayed}")


async def _keep_the_lock(lock: WriterLock, health: Health,
                         every_s: float = LOCK_CHECK_S) -> None:
    """The ledger's lock can be lost under a running coordinator (PostgreSQL restarted, the
    lock file removed): take it again, or stop (LedgerInUseError) if another coordinator
    has it now. While it cannot be checked, status says degraded, and why."""
    while True:
        await anyio.sleep(every_s)
        health.problem("lock", await anyio.to_thread.run_sync(lock.check))


async def _run(settings: CoordinatorSettings, lock: WriterLock,
               task_status: TaskStatus[None]) -> None:
    subjects = settings.subjects
    ledger = await anyio.to_thread.run_sync(
        lambda: open_ledger(settings.ledger, create=True))
    health = Health(ledger_position=await anyio.to_thread.run_sync(ledger.last_position))
    # Every write to the ledger, one at a time: inline for SQLite, on a thread for
    # PostgreSQL (whose commits wait on the network).
    writes = LedgerWrites(threaded=is_postgres(settings.ledger))
    try:
        signer = await anyio.to_thread.run_sync(
            lambda: load_signer(settings.signing_seed, settings.ledger))
        checkpointer = Checkpointer(signer, subjects.prefix)
        feed = CommitFeed()

        def on_commit(stored: list[Notification], events: list[LedgerEvent]) -> None:
            # What was just stored goes to the relay and the global chain in memory,
            # instead of both reading it back from the database.
            feed.add(stored)
            checkpointer.follow(stored, events)
            if stored:
                health.ledger_position = stored[-1].id
            health.count(events)

        writer = await writes.run(lambda: LedgerWriter(ledger, settings.policy, subjects,
                                                       settings.clock, on_commit=on_commit))
        doorbell = Doorbell()

        def on_bus_event(text: str) -> None:
            if text == "disconnected":
                health.connected = False
            elif text == "reconnected":
                health.connected = True
            elif text.startswith("error"):
                health.last_error = text

        bus_settings = BusSettings.of(settings.nats_url, subjects.service("coordinator"),
                                      settings.credentials)
        async with open_bus(bus_settings, on_bus_event) as bus:
            await _refuse_a_second_coordinator(bus, subjects)
            await bus.ensure_streams(streams(subjects, settings.policy.max_payload_bytes))
            await _refuse_a_ledger_behind_its_stream(bus, subjects, health.ledger_position,
                                                     settings.ledger)
            # A consumer made anew starts after what the ledger holds, unless the stream
            # holds less (it lost its tail in a crash before its sync): then after its end,
            # since the sequences past it will be handed to new messages.
            start_after = min(writer.position, await bus.last_seq(subjects.intake_stream))
            await bus.ensure_consumer(coordinator_consumer(subjects, start_after))
            for name, agent in settings.policy.agents.items():
                # Redeliver an unacked delivery only well after the agent's deadline: a
                # retry is the timer's decision, recorded, not the broker's; a late copy of
                # the old attempt is then fenced off as stale.
                await bus.ensure_consumer(agent_consumer(subjects, name,
                                                         2 * agent.deadline_s))
            try:
                async with anyio.create_task_group() as tg:
                    # The relay takes what was just committed from the feed; when it reads the
                    # log, it does on its own thread (WAL lets it read while the writer commits).
                    await tg.start(partial(serve_relay, bus, ledger, anyio.CapacityLimiter(1),
                                           subjects, doorbell, health, settings.crash, feed=feed))
                    receipts = ReceiptBook(subjects, frozenset(settings.policy.agents))
                    await tg.start(partial(receipts.serve, bus))
                    await tg.start(partial(serve_intake, bus, writer, writes, subjects, doorbell,
                                           health, settings.batch_max, settings.crash,
                                           receipts=receipts))
                    await tg.start(serve_timer, writer, writes, doorbell, health)
                    tg.start_soon(_keep_the_lock, lock, health)
                    await tg.start(partial(serve_checkpoints, writer, ledger, writes, doorbell,
                                           health, checkpointer,
                                           every_events=settings.checkpoint_every,
                                           every_s=settings.checkpoint_interval_s))
                    await tg.start(serve_gateway, bus, writer, writes, subjects, settings.policy,
                                   doorbell)
                    if settings.metrics is not None:
                        await tg.start(serve_metrics, health, subjects.prefix, *settings.metrics)
                    await bus.add_service(subjects.service("coordinator"), "0.1.0",
                                          "ledgermesh coordinator",
                                          {"prefix": subjects.prefix, "holder": holder_name(),
                                           "ledger": redacted(settings.ledger)},
                                          lambda: msgspec.json.encode(health.report()))
                    log.info("coordinator ready: ledger %s, intake position %d; NATS %s, "
                             "prefix %s; %d agents in the policy (%s); checkpoints signed by "
                             "%s", redacted(settings.ledger), writer.position,
                             redact_url(settings.nats_url), subjects.prefix,
                             len(settings.policy.agents),
                             ", ".join(settings.policy.agents), signer.public_key)
                    task_status.started()
            except anyio.get_cancelled_exc_class():
                # A stop (not a crash): sign what no checkpoint covers yet and relay it, so
                # that a stopped ledger is signed up to its last event.
                with anyio.move_on_after(STOP_GRACE_S, shield=True):
                    await _close_the_record(bus, ledger, writer, writes, checkpointer,
                                            subjects)
                raise
    finally:
        writes.close()
        ledger.close()


async def _close_the_record(bus: Bus, ledger: Ledger, writer: LedgerWriter,
                            writes: LedgerWrites, checkpointer: Checkpointer,
                            subjects: Subjects) -> None:
    """A last checkpoint and a last relay pass; given up with a warning if either fails
    (the next start relays what this one could not)."""
    try:
        recorded = await writes.run(writer.record_checkpoint, checkpointer)
        if recorded.positions:
            log.info("stopping: signed a checkpoint at position %d", recorded.positions[-1])
        await relay_rest(bus, ledger, subjects)
    except Exception as exc:  # the ledger's and the bus's errors vary
        log.warning("stopping: could not sign and relay the last events: %s", exc)

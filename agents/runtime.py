"""Run an Agent as a service: pull deliveries, run handlers, publish outputs, then ack.

A delivery is acked only after the coordinator's receipt says the ledger recorded every
output its handler produced (agents/receipts.py), so a crash before the ack, the agent's
or the NATS machine's, redelivers it and the same output ids are published again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from agents.receipts import FIRST_WAIT_S, Receipts, Sent
from agents.sdk import Agent, Context
from bus.client import (
    Bus,
    BusError,
    BusSettings,
    Credentials,
    Inbound,
    PendingAck,
    open_bus,
)
from bus.faults import CrashPoints
from bus.topology import agent_consumer
from bus.urls import redact_url
from schemas import (
    Codec,
    Envelope,
    LedgermeshError,
    MalformedMessageError,
    Subjects,
    ToolOutcome,
    pack,
)

log = logging.getLogger("ledgermesh.agent")
_outcome = msgspec.json.Decoder(ToolOutcome)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class AgentSettings:
    nats_url: str
    subjects: Subjects = Subjects()
    concurrency: int | None = None  # default: the Agent's own
    clock: Callable[[], datetime] = utc_now
    crash: CrashPoints = CrashPoints()
    credentials: Credentials | None = None  # None: an open (dev) server
    receipt_wait_s: float = FIRST_WAIT_S  # before an unconfirmed output is sent again


class _Intake:
    """Publishes an agent's outputs to its own intake subject; asks its tool gateway.
    ``tasks``: the agent's task group, where turns published in the background run (so a
    shutdown cancels a publish in progress)."""

    def __init__(self, bus: Bus, subjects: Subjects, agent: str, codec: Codec,
                 tasks: TaskGroup, receipts: Receipts) -> None:
        self.tasks = tasks
        self.receipts = receipts
        # Keys the intake messages' ids (schemas/batch.py): another principal who can
        # predict an id can take it first and get this agent's message dropped as a
        # duplicate. A new key per process costs nothing: after a restart a republished
        # turn is stored again and the ledger deduplicates its envelopes by their ids.
        self._key = secrets.token_bytes(32)
        self._bus = bus
        self._subject = subjects.intake(agent)
        self._gateway = subjects.tool_gateway(agent)
        self._codec = codec

    async def publish(self, envelopes: list[Envelope], sent: list[Sent]) -> list[PendingAck]:
        """Put ``envelopes`` on the wire in order, batched (schemas/batch.py), without
        waiting for the stream's acks; each intake message is added to ``sent``, to wait
        for its receipt."""
        encoded = [(e.id, self._codec.encode(e)) for e in envelopes]
        pending = []
        for msg_id, data in pack(encoded, key=self._key):
            sent.append(self.receipts.expect(msg_id, data))
            pending.append(await self._bus.start_publish(self._subject, data, msg_id=msg_id))
        return pending

    async def call_tool(self, envelope: Envelope, timeout: float) -> ToolOutcome:
        # The same envelope (same id) on every try: the gateway answers a repeat from the
        # ledger, so retrying after a lost reply never runs the tool twice.
        data = self._codec.encode(envelope)
        for attempt in range(3):
            try:
                return _outcome.decode(await self._bus.request(self._gateway, data, timeout))
            except BusError:
                if attempt == 2:
                    raise
                await anyio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


class _Turn:
    """The outputs a handler says in one turn (until it next waits on something, or
    returns): they go out together, as one intake message. Each ``send`` of the turn
    returns the turn itself; ``wait`` until the stream has stored all of them."""

    __slots__ = ("_before", "_intake", "_published", "_sent", "envelopes")

    def __init__(self, intake: _Intake, before: _Turn | None, sent: list[Sent]) -> None:
        self.envelopes: list[Envelope] = []
        self._intake = intake
        self._sent = sent  # the delivery's intake messages
        self._before = before  # published first, so turns reach the stream in order
        self._published: asyncio.Future[list[PendingAck]] | None = None

    @property
    def started(self) -> bool:
        return self._published is not None

    def start(self) -> None:
        """Publish in the background (called once the handler waits on something)."""
        if self._published is None:
            self._intake.tasks.start_soon(self._publish_into, self._future())

    async def wait(self, timeout: float = 10.0) -> object:
        for pending in await self._acks():
            await pending.wait(timeout)
        return None

    async def _acks(self) -> list[PendingAck]:
        if self._published is None:
            # Nothing started it: the handler returned before it next waited (the usual
            # case). Publish right here: no task, no extra turn of the event loop.
            await self._publish_into(self._future())
        assert self._published is not None
        return await self._published

    def _future(self) -> asyncio.Future[list[PendingAck]]:
        future = self._published = asyncio.get_running_loop().create_future()
        future.add_done_callback(_observed)
        return future

    async def _publish_into(self, future: asyncio.Future[list[PendingAck]]) -> None:
        try:
            future.set_result(await self._publish())
        except Exception as exc:  # the waiter's to raise, not the task group's
            future.set_exception(exc)
        except BaseException:
            future.cancel()
            raise

    async def _publish(self) -> list[PendingAck]:
        before, self._before = self._before, None
        if before is not None:
            try:
                await before._acks()
            except Exception as exc:
                # Storing this turn without the one before would record the outputs out
                # of order once the delivery comes again and says that one anew.
                raise BusError("not published: an earlier output of this delivery was "
                               f"not ({exc})") from exc
        return await self._intake.publish(self.envelopes, self._sent)


def _observed(future: asyncio.Future[list[PendingAck]]) -> None:
    """A turn nobody waited for (its handler's delivery was given up on a tool call's
    error) fails quietly: the delivery comes again and says it again."""
    if not future.cancelled():
        future.exception()


class _DeliveryOutbox:
    """One delivery's outbox: batches what its handler says turn by turn, in order."""

    def __init__(self, intake: _Intake) -> None:
        self._intake = intake
        self._turn: _Turn | None = None
        self.sent: list[Sent] = []  # every intake message published, for the receipts

    async def send(self, envelope: Envelope) -> _Turn:
        turn = self._turn
        if turn is None or turn.started:
            turn = self._turn = _Turn(self._intake, before=turn, sent=self.sent)
            # Runs once the handler waits on something (if it returns first, the runtime
            # publishes the turn as it settles): by then the turn holds all it said.
            asyncio.get_running_loop().call_soon(turn.start)
        turn.envelopes.append(envelope)
        return turn

    async def call_tool(self, envelope: Envelope, timeout: float) -> ToolOutcome:
        return await self._intake.call_tool(envelope, timeout)


@dataclass
class _Counters:
    handled: int = 0
    failed: int = 0
    last_error: str | None = None


async def run_agent(agent: Agent, settings: AgentSettings, *,
                    stopping: anyio.Event | None = None,
                    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the agent until cancelled; or, once ``stopping`` is set, take no new delivery,
    finish those in hand (their outputs recorded and the deliveries acked), and return:
    a stop then costs no task a timeout and a retry."""
    subjects = settings.subjects
    codec = Codec()
    counters = _Counters()
    concurrency = settings.concurrency or agent.concurrency
    consumer = agent_consumer(subjects, agent.name)
    bus_settings = BusSettings.of(settings.nats_url, subjects.service(agent.name),
                                  settings.credentials)
    refused = _Refusals(agent.name)
    if not agent.handlers:
        log.warning("%s has no handlers (register one: @agent.on(SubmitTask) on an async "
                    "def): every task it gets fails", agent.name)
    async with open_bus(bus_settings, refused.note) as bus:
        # Streams and this agent's consumer are the coordinator's to create (from the
        # policy); until they exist the pull loop waits and says so.
        send, receive = anyio.create_memory_object_stream[Inbound](max_buffer_size=concurrency)
        async with anyio.create_task_group() as tg:
            tg.start_soon(refused.stop_on_denial)
            receipts = Receipts(bus, subjects.receipt(agent.name), subjects.intake(agent.name),
                                settings.clock, settings.receipt_wait_s)
            await tg.start(receipts.serve)  # listening before anything is published
            intake = _Intake(bus, subjects, agent.name, codec, tg, receipts)
            pulling = anyio.CancelScope()

            async def pull(*, task_status: TaskStatus[None]) -> None:
                with pulling:  # (serve_pull closes ``send`` as it ends: the workers see it)
                    await bus.serve_pull(consumer, send, task_status=task_status)

            await tg.start(pull)
            async with anyio.create_task_group() as workers:
                for _ in range(concurrency):
                    workers.start_soon(_work, agent, receive.clone(), intake, codec, settings,
                                       counters)
                receive.close()

                def status() -> bytes:
                    return msgspec.json.encode({"agent": agent.name,
                                                "connected": bus.connected,
                                                "handled": counters.handled,
                                                "failed": counters.failed,
                                                "last_error": counters.last_error})

                await bus.add_service(subjects.service(agent.name), agent.version,
                                      agent.description or agent.name,
                                      {"agent": agent.name, "prefix": subjects.prefix,
                                       "handles": ",".join(t.__name__ for t in agent.handlers)},
                                      status)
                log.info("%s ready (%d workers) on NATS %s, prefix %s%s", agent.name,
                         concurrency, redact_url(settings.nats_url), subjects.prefix,
                         "" if settings.credentials is None else ", with its nkey")
                task_status.started()
                if stopping is None:
                    return  # (until cancelled: the workers never run out of deliveries)
                await stopping.wait()
                pulling.cancel()
            await receipts.settled()  # the deliveries whose outputs are recorded: acked
            log.info("%s: finished the work in hand (%d handled in all); stopping",
                     agent.name, counters.handled)
            tg.cancel_scope.cancel()


class AgentDeniedError(LedgermeshError):
    """NATS refuses this agent what it cannot work without."""


class _Refusals:
    """Watches the connection's errors for a refusal no retry will cure: pulling its own
    deliveries, or publishing on its own intake (a seed that is another principal's, or a
    NATS config without this agent). It would otherwise say "ready" and never work."""

    def __init__(self, agent: str) -> None:
        self._agent = agent
        self._denied: str | None = None
        self._event = anyio.Event()

    def note(self, text: str) -> None:
        lowered = text.lower()
        if "permissions violation for publish" in lowered and (
                ".msg.next." in lowered or ".intake." in lowered):
            self._denied = text.removeprefix("error: ").strip()
            self._event.set()

    async def stop_on_denial(self) -> None:
        await self._event.wait()
        raise AgentDeniedError(
            f"NATS refuses what agent {self._agent} needs ({self._denied}): its --nkey is "
            f"not {self._agent}'s, or the server's auth config was generated from a policy "
            f"without {self._agent} (ledgermesh auth generate)")


async def _work(agent: Agent, receive: anyio.abc.ObjectReceiveStream[Inbound],
                intake: _Intake, codec: Codec, settings: AgentSettings,
                counters: _Counters) -> None:
    async with receive:
        async for message in receive:
            try:
                delivery = codec.decode_delivery(message.data, message.subject)
            except MalformedMessageError as exc:
                log.error("%s: dropping an unreadable delivery: %s", agent.name, exc)
                await message.ack()
                continue
            if (message.delivered > 1 and delivery.deadline is not None
                    and settings.clock() > delivery.deadline):
                # A redelivered copy of an attempt that already timed out: the coordinator
                # has retried it (or will), and would refuse this attempt's output anyway.
                log.info("%s: dropping stale attempt %d of task %s (deadline %s passed)",
                         agent.name, delivery.attempt, delivery.task_id, delivery.deadline)
                await message.ack()
                continue
            outbox = _DeliveryOutbox(intake)
            ctx = Context(agent.name, delivery, outbox, settings.clock)
            settings.crash.reached("agent.handler", message.data)
            try:
                with anyio.move_on_after(_time_allowed(delivery.deadline, settings)) as late:
                    await handle(agent, ctx, counters)
                if late.cancelled_caught:
                    # Past its deadline the coordinator has timed the attempt out and will
                    # refuse what it says: stop it, or a handler that never returns (a model
                    # call without a timeout) holds this worker for good.
                    counters.failed += 1
                    counters.last_error = (f"task {delivery.task_id}: handler still running "
                                           "past the deadline: cancelled")
                    log.warning("%s: task %s: the handler was still running well past the "
                                "attempt's deadline (%s): cancelled; the coordinator retries "
                                "the attempt", agent.name, delivery.task_id, delivery.deadline)
                    intake.receipts.forget(outbox.sent)
                    await message.ack()
                    continue
                await ctx.settle()  # every output stored by intake
            except BusError as exc:
                # Outputs not stored: leave the delivery unacked so it comes again (same
                # output ids, so whatever did get stored is deduplicated).
                intake.receipts.forget(outbox.sent)
                counters.last_error = str(exc)
                log.warning("%s: task %s not acked: %s", agent.name, delivery.task_id, exc)
                continue
            settings.crash.reached("agent.before_ack", message.data)
            # Acked once recorded; the worker goes on meanwhile.
            await intake.receipts.ack_when_recorded(message.ack, outbox.sent,
                                                    delivery.deadline, delivery.task_id)


def _time_allowed(deadline: datetime | None, settings: AgentSettings) -> float:
    """Seconds a handler may run before it is cancelled: half as long again as its attempt
    had left when it started, and a second. Well past the coordinator's timeout, yet this
    machine's clock may run ahead of the coordinator's by a third of that time without
    cutting a handler short. A delivery that arrives past its deadline by this clock (late,
    or the clocks disagree) runs without a limit, as before."""
    if deadline is None:
        return math.inf
    left = (deadline - settings.clock()).total_seconds()
    return left * 1.5 + 1.0 if left > 0 else math.inf


async def handle(agent: Agent, ctx: Context, counters: _Counters | None = None) -> None:
    """Run the agent's handler for ``ctx``'s delivery; an exception escaping it becomes a
    recorded, retryable failure. (``ledgermesh replay-agent`` runs handlers through this
    too, so a replay sees what the runtime would have sent.)"""
    counters = counters or _Counters()
    body = ctx.delivery.envelope.body
    handler = agent.handler_for(body)
    try:
        if handler is None:
            await ctx.fail(f"{agent.name} has no handler for {type(body).__name__}")
        else:
            await handler(ctx, body)
            if not ctx.finished:
                # Returning is not finishing: the attempt would wait out its deadline, and
                # each retry its own, with no word of why.
                reason = (f"{agent.name}'s handler for {type(body).__name__} returned "
                          "without finishing the task (ctx.complete, handoff, decline or fail)")
                counters.failed += 1
                counters.last_error = reason
                log.warning("%s: task %s: %s", agent.name, ctx.task_id, reason)
                await ctx.fail(reason, retryable=True)
                return
        counters.handled += 1
    except BusError:
        raise
    except Exception as exc:  # a handler bug must become a recorded failure
        counters.failed += 1
        counters.last_error = f"{type(exc).__name__}: {exc}"
        log.exception("%s: handler failed on task %s", agent.name, ctx.task_id)
        if not ctx.finished:
            await ctx.fail(f"{type(exc).__name__}: {exc}", retryable=True)

"""The one module that speaks nats-py: connection, JetStream publish, pull, observe.

Everything above this module sees ``Bus`` and ``Inbound``; nothing else imports nats.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
import nkeys
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from bus.topology import DEDUP_WINDOW_S, ConsumerSpec, StreamSpec
from schemas import LedgermeshError

log = logging.getLogger("ledgermesh.bus")

_BLANK = re.compile(r"\s")  # no subject may hold one: the protocol splits on them

MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"


class BusError(LedgermeshError):
    """NATS cannot be reached, or refused a request."""


@dataclass(frozen=True)
class BusSettings:
    url: str
    name: str
    request_timeout: float = 5.0
    nkey_seed: str | None = field(default=None, repr=False)
    inbox_prefix: str | None = None  # e.g. "_INBOX.<principal>"; the server allows only that
    js_api_prefix: str | None = None  # JetStream API imported from another account
    # A connection that goes silent (no FIN, no RST: a dropped NAT entry, a failed link)
    # is given up once a ping finds this many unanswered, one every ``ping_interval``
    # seconds: 8-12 s after it went silent. nats-py's default (2 minutes, 2 pings) left a
    # process deaf for 4 to 6 minutes.
    ping_interval: float = 4.0
    max_outstanding_pings: int = 2

    @classmethod
    def of(cls, url: str, name: str, credentials: Credentials | None) -> BusSettings:
        """Settings for a principal; ``credentials`` None means an open server."""
        if credentials is None:
            return cls(url=url, name=name)
        return cls(url=url, name=name, nkey_seed=credentials.nkey_seed,
                   inbox_prefix=credentials.inbox_prefix,
                   js_api_prefix=credentials.js_api_prefix)


@dataclass(frozen=True)
class Credentials:
    """Who a process is to NATS: an nkey user seed and the inbox prefix it may subscribe to."""

    nkey_seed: str = field(repr=False)
    inbox_prefix: str
    js_api_prefix: str | None = None  # e.g. "$JS.LM_CORE.API" in an account without JetStream

    @classmethod
    def for_principal(cls, nkey_seed: str, principal: str,
                      js_api_prefix: str | None = None) -> Credentials:
        return cls(nkey_seed=nkey_seed, inbox_prefix=f"_INBOX.{principal}",
                   js_api_prefix=js_api_prefix)


def check_nkey_seed(seed: str) -> str:
    """The public key of a user seed; BusError if ``seed`` is not one."""
    text = seed.strip()
    try:
        # nkeys does not check the seed's CRC: a mistyped seed would silently be another key.
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
        if len(raw) < 4 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
            raise ValueError("checksum mismatch")
        public = nkeys.from_seed(bytearray(text.encode())).public_key
    except (nkeys.NkeysError, ValueError, TypeError, binascii.Error) as exc:
        raise BusError(f"not a valid nkey seed ({type(exc).__name__}: {exc})") from None
    text = public.decode() if isinstance(public, bytes) else str(public)
    if not text.startswith("U"):
        raise BusError("not a user nkey seed (user seeds start with 'SU')")
    return text


class PubAck(msgspec.Struct, frozen=True):
    """A stream's ack of one publish (a Struct: one per message, made ~10x faster than
    a frozen dataclass)."""

    stream: str
    seq: int
    duplicate: bool


class _StreamAck(msgspec.Struct):
    """A JetStream publish ack (or its error), as the server sends it."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_stream_ack = msgspec.json.Decoder(_StreamAck)


class _AckInbox:
    """Pipelined JetStream publishes: one reply subscription, acks matched by a counter.

    What nats-py's ``publish_async`` does, minus what costs a profile's worth per message
    (a task per semaphore wait, random tokens, ``json.loads``): half the client CPU of a
    relayed event. Futures carry a BusError when the stream refuses a message.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[str, asyncio.Future[PubAck]]] = {}

    async def expect(self, subject: str) -> tuple[str, str, asyncio.Future[PubAck]]:
        """A reply subject for a publish to ``subject``, its token, and the future its ack
        will resolve (``forget`` the token if the publish is not sent)."""
        if not self._prefix:
            prefix = f"{self._nc.new_inbox()}."
            await self._nc.subscribe(f"{prefix}*", cb=self._on_ack)
            self._prefix = prefix
        token = str(next(self._tokens))
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (subject, future)
        return self._prefix + token, token, future

    def forget(self, token: str) -> None:
        """Stop waiting for an ack that will not come (timed out)."""
        self._waiting.pop(token, None)

    async def _on_ack(self, msg: Msg) -> None:
        subject, future = self._waiting.pop(msg.subject[len(self._prefix):], ("", None))
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(BusError(f"publish to {subject}: no stream answered"))
            return
        try:
            ack = _stream_ack.decode(msg.data)
        except msgspec.DecodeError as exc:
            future.set_exception(BusError(f"publish to {subject}: unreadable ack: {exc}"))
            return
        if ack.error is not None:
            future.set_exception(BusError(f"publish to {subject} refused: "
                                          f"{ack.error.get('description', ack.error)}"))
        else:
            future.set_result(PubAck(ack.stream, ack.seq, ack.duplicate))


class PendingAck:
    """A publish whose stream ack has not been awaited yet (a plain class: an agent makes
    one per output, and a frozen dataclass's construction costs ~10x as much)."""

    __slots__ = ("_future", "_inbox", "_token", "subject")

    def __init__(self, subject: str, token: str, future: asyncio.Future[PubAck],
                 inbox: _AckInbox) -> None:
        self.subject = subject
        self._token = token
        self._future = future
        self._inbox = inbox

    def __repr__(self) -> str:
        return f"PendingAck(subject={self.subject!r})"

    async def wait(self, timeout: float = 10.0) -> PubAck:
        future = self._future
        try:
            if future.done():  # often, by the time it is asked
                return future.result()
            # Acks have no timeout of their own. A timer on the future itself, not a cancel
            # scope: an agent waits for every output it sends, and a scope was a tenth of
            # its CPU. (Cancelling the waiting task cancels the future, as any await does.)
            timer = asyncio.get_running_loop().call_later(timeout, _expire, future)
            try:
                return await future
            finally:
                timer.cancel()
        except TimeoutError as exc:
            self._inbox.forget(self._token)
            raise BusError(f"publish to {self.subject}: no ack within {timeout:g} s") from exc


def _expire(future: asyncio.Future[PubAck]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _expire_all(futures: list[asyncio.Future[PubAck]]) -> None:
    for future in futures:
        _expire(future)


@dataclass
class Inbound:
    """A message pulled from a durable consumer; ack it once it is safely handled."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    delivered: int  # how many times the server has delivered it (1 = first time)
    _msg: Msg = field(repr=False)

    @property
    def msg_id(self) -> str | None:
        return self.headers.get(MSG_ID)

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        await self._msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self._msg.in_progress()


HAND_BACK_S = 2.0  # a stopping pull hands back what it was sent ahead, for up to this long
OBSERVE_HEARTBEAT_S = 1.0  # a follower resumes within ~2-3 s of a server restart


@dataclass(frozen=True)
class Observed:
    """A message seen by an observer of a stream (no ack needed)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int


def _sequence_and_delivered(msg: Msg) -> tuple[int, int]:
    """A pulled message's stream sequence and delivery count, from its reply subject.

    ``msg.metadata`` reads the same tokens but also builds a datetime and three frozen
    dataclasses: 8x the time, on every message the coordinator and the agents pull."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
        return int(tokens[5]), int(tokens[4])
    meta = msg.metadata  # the longer form (with domain and account), or not JetStream's
    return meta.sequence.stream, meta.num_delivered


class Bus:
    """A NATS connection with the JetStream operations ledgermesh needs."""

    def __init__(self, nc: Client, settings: BusSettings) -> None:
        self._nc = nc
        if settings.js_api_prefix is None:
            self._js = nc.jetstream(timeout=settings.request_timeout)
        else:
            self._js = nc.jetstream(timeout=settings.request_timeout,
                                    prefix=settings.js_api_prefix)
        self.settings = settings
        self._acks = _AckInbox(nc)

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    @property
    def reconnects(self) -> int:
        """How many times this connection was re-established (to any server)."""
        return int(self._nc.stats["reconnects"])

    @property
    def server_version(self) -> str:
        return str(self._nc.connected_server_version)

    # -- topology ---------------------------------------------------------------
    async def ensure_streams(self, specs: Sequence[StreamSpec]) -> None:
        """Create the streams that do not exist; existing ones are left as they are."""
        for spec in specs:
            try:
                await self._js.stream_info(spec.name)
                continue
            except nats.js.errors.NotFoundError:
                pass
            except (nats.errors.TimeoutError, TimeoutError) as exc:
                raise BusError(f"cannot read stream {spec.name}: no answer from NATS "
                               "(is JetStream enabled, and are you allowed to?)") from exc
            config = api.StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                retention=api.RetentionPolicy(spec.retention),
                storage=api.StorageType.FILE,
                duplicate_window=DEDUP_WINDOW_S,
                deny_delete=spec.deny_delete,
                deny_purge=spec.deny_delete,
                max_msg_size=spec.max_msg_size,
            )
            await self._call(self._js.add_stream(config), f"create stream {spec.name}")

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        """Create the durable consumer, or update the settings of the one there.

        Where it starts delivering is fixed when it is made (``spec.start_after``). An
        ack policy cannot be changed in place: a consumer with another one (made by an
        older ledgermesh) is replaced by one that starts after ``spec.start_after``."""
        ack_policy = api.AckPolicy.ALL if spec.ack_all else api.AckPolicy.EXPLICIT
        what = f"create consumer {spec.durable} on {spec.stream}"

        async def current() -> api.ConsumerConfig | None:
            try:
                info = await self._js.consumer_info(spec.stream, spec.durable)
            except nats.js.errors.NotFoundError:
                return None
            config: api.ConsumerConfig = info.config
            return config

        existing: api.ConsumerConfig | None = await self._call(current(), what)
        if existing is not None and existing.ack_policy != ack_policy:
            log.warning("replacing consumer %s on %s (ack policy %s, now %s); it delivers "
                        "from stream sequence %d on", spec.durable, spec.stream,
                        existing.ack_policy, ack_policy, spec.start_after + 1)
            await self._call(self._js.delete_consumer(spec.stream, spec.durable),
                             f"replace consumer {spec.durable} on {spec.stream}")
            existing = None
        if existing is not None:  # keep where it delivers from: that is not editable
            deliver_policy, start = existing.deliver_policy, existing.opt_start_seq
        elif spec.start_after > 0:
            deliver_policy, start = api.DeliverPolicy.BY_START_SEQUENCE, spec.start_after + 1
        else:
            deliver_policy, start = api.DeliverPolicy.ALL, None
        config = api.ConsumerConfig(
            durable_name=spec.durable,
            ack_policy=ack_policy,
            deliver_policy=deliver_policy,
            opt_start_seq=start,
            filter_subject=spec.filter_subject,
            ack_wait=spec.ack_wait_s,
            max_ack_pending=spec.max_ack_pending,
            max_deliver=-1,
        )
        await self._call(self._js.add_consumer(spec.stream, config), what)

    async def _call(self, coro: Awaitable[Any], what: str) -> Any:
        try:
            return await coro
        except nats.js.errors.APIError as exc:
            raise BusError(f"cannot {what}: {exc.description}") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise BusError(f"cannot {what}: no answer from NATS (is JetStream enabled, "
                           "and are you allowed to?)") from exc

    # -- publishing -------------------------------------------------------------
    async def publish(self, subject: str, data: bytes, *, msg_id: str,
                      expected_last_msg_id: str | None = None) -> PubAck:
        """Publish to a stream and wait for its ack; safe to retry with the same id."""
        headers = {MSG_ID: msg_id}
        if expected_last_msg_id is not None:
            headers[EXPECTED_LAST_MSG_ID] = expected_last_msg_id
        try:
            ack = await self._js.publish(subject, data, headers=headers)
        except nats.js.errors.APIError as exc:
            raise BusError(f"publish to {subject} refused: {exc.description}") from exc
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError) as exc:
            raise BusError(f"publish to {subject}: no stream answered") from exc
        return PubAck(ack.stream, ack.seq, bool(ack.duplicate))

    async def start_publish(self, subject: str, data: bytes, *, msg_id: str) -> PendingAck:
        """Publish without waiting for the stream's ack; ``wait()`` on the result later.

        Lets a sender put several messages on the wire in one round trip."""
        reply, token, future = await self._acks.expect(subject)
        try:
            await self._write([self._hpub(subject, reply, {MSG_ID: msg_id}, data)])
        except BaseException:
            self._acks.forget(token)
            raise
        return PendingAck(subject, token, future, self._acks)

    async def publish_all(self, items: Sequence[tuple[str, bytes, dict[str, str]]],
                          timeout: float = 10.0, *,
                          chain: Sequence[tuple[str, bytes, dict[str, str]]] = (),
                          ) -> list[PubAck]:
        """Publish many messages pipelined; return their acks in order (BusError if the
        stream refuses one, or an ack does not come within ``timeout``).

        Then ``chain``: messages to one stream, each expecting the one before it as the
        stream's last (``Nats-Expected-Last-Msg-Id``). Only the last of them asks for an
        ack, appended to the result: the stream takes a connection's messages in order and
        refuses each one whose predecessor is not what it stored last, so one refused or
        lost link fails every later one, the last included. Half the messages on the wire.
        """
        sent: list[tuple[str, asyncio.Future[PubAck]]] = []
        frames: list[bytes] = []
        try:
            for subject, data, headers in items:
                reply, token, future = await self._acks.expect(subject)
                sent.append((token, future))
                frames.append(self._hpub(subject, reply, headers, data))
            for i, (subject, data, headers) in enumerate(chain):
                reply = ""  # no reply: no ack, but for the last link's
                if i == len(chain) - 1:
                    reply, token, future = await self._acks.expect(subject)
                    sent.append((token, future))
                frames.append(self._hpub(subject, reply, headers, data))
            await self._write(frames)
            # One timer for all the acks, not a cancel scope (its cost is per call, and
            # the relay calls this for every commit).
            timer = asyncio.get_running_loop().call_later(
                timeout, _expire_all, [future for _, future in sent])
            try:
                return [await future for _, future in sent]
            finally:
                timer.cancel()
        except TimeoutError as exc:
            raise BusError(f"publish of {len(items)} messages: no ack within "
                           f"{timeout:g} s") from exc
        finally:
            for token, _ in sent:
                self._acks.forget(token)

    def _hpub(self, subject: str, reply: str, headers: dict[str, str], data: bytes) -> bytes:
        """One message as the NATS protocol's HPUB frame: what ``Client.publish`` writes,
        minus its per-message costs (a third of the relay's CPU went to them)."""
        lines = "".join([f"{key}: {value}\r\n" for key, value in headers.items()])
        if (lines.count("\n") != len(headers) or lines.count("\r") != len(headers)
                or not subject or _BLANK.search(subject) or (reply and _BLANK.search(reply))):
            raise BusError(f"cannot publish to {subject!r}: a line break or blank in its "
                           "subject or headers")
        if len(data) > self._nc.max_payload:
            raise BusError(f"cannot publish to {subject}: {len(data)} bytes is more than "
                           f"the server's limit of {self._nc.max_payload}")
        head = b"NATS/1.0\r\n%s\r\n" % lines.encode()
        if reply:
            return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                subject.encode(), reply.encode(), len(head), len(head) + len(data), head, data)
        return b"HPUB %s %d %d\r\n%s%s\r\n" % (
            subject.encode(), len(head), len(head) + len(data), head, data)

    async def _write(self, frames: list[bytes]) -> None:
        """Queue protocol frames as one write, as ``Client.publish`` queues each message
        (nats-py has no public call for several: this is the one use of its internals)."""
        nc = self._nc
        if nc.is_closed or nc.is_draining_pubs:
            raise BusError("cannot publish: the connection is closed or closing")
        data = b"".join(frames)
        await nc._send_command(data)  # while reconnecting: buffered, as publish does
        nc.stats["out_msgs"] += len(frames)
        nc.stats["out_bytes"] += len(data)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    # -- notices: plain NATS messages, fire and forget ------------------------------
    async def notify(self, notices: Sequence[tuple[str, bytes]]) -> None:
        """Publish plain NATS messages, in one write and unacknowledged: a notice lost on
        the way (a reconnect, a slow receiver) is its receiver's to recover."""
        if notices:
            await self._write([b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(data), data)
                               for subject, data in notices])

    async def serve_notices(self, subject: str, handle: Callable[[bytes], Awaitable[None]], *,
                            task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hand each notice on ``subject`` to ``handle``, in order, until cancelled."""
        sub = await self._nc.subscribe(subject)
        task_status.started()
        try:
            async for msg in sub.messages:
                await handle(msg.data)
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def flush(self, timeout: int = 5) -> None:
        """Until the server has everything published so far (acks included)."""
        try:
            await self._nc.flush(timeout=timeout)
        except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError) as exc:
            raise BusError(f"flush: {exc}") from exc

    async def stored(self, stream: str, seq: int) -> tuple[str, bytes, dict[str, str]] | None:
        """The message stored at ``seq`` in ``stream`` (subject, data, headers); None if the
        stream no longer holds it."""
        try:
            msg = await self._js.get_msg(stream, seq=seq)
        except nats.js.errors.NotFoundError:
            return None
        except nats.js.errors.APIError as exc:
            raise BusError(f"cannot read {stream} #{seq}: {exc.description}") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise BusError(f"cannot read {stream} #{seq}: no answer from NATS") from exc
        return msg.subject or "", msg.data or b"", dict(msg.headers or {})

    async def last_seq(self, stream: str) -> int:
        """The sequence of the newest message ``stream`` holds (0: none yet)."""
        info = await self._call(self._js.stream_info(stream), f"read stream {stream}")
        return int(info.state.last_seq)

    async def last_msg_id(self, stream: str) -> str | None:
        """The Nats-Msg-Id of the newest message in ``stream``, or None if it is empty."""
        info = await self._call(self._js.stream_info(stream), f"read stream {stream}")
        if not info.state.messages:
            return None
        msg = await self._call(self._js.get_msg(stream, seq=info.state.last_seq),
                               f"read stream {stream}")
        headers = msg.headers or {}
        return headers.get(MSG_ID)

    async def last_message(self, stream: str, subject: str, wait: float = 2.0) -> bytes | None:
        """The data of the newest message on ``subject`` in ``stream``; None if none arrives
        within ``wait`` seconds. An ephemeral ordered consumer, not a direct get, so a reader
        that may only create consumers on the stream (the observer) can ask too."""
        sub = await self._call(
            self._js.subscribe(subject, stream=stream, ordered_consumer=True,
                               deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT),
            f"read {subject} in stream {stream}")
        try:
            msg = await sub.next_msg(timeout=wait)
        except nats.errors.TimeoutError:
            return None
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
        return bytes(msg.data or b"")

    # -- consuming --------------------------------------------------------------
    async def serve_pull(self, spec: ConsumerSpec, out: MemoryObjectSendStream[Inbound], *,
                         batch: int = 256, expires: float = 5.0,
                         task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep pull requests outstanding on a durable consumer, forwarding into ``out``.

        At most ``2 * batch`` messages are requested at once, and ``out`` is bounded, so a
        slow reader slows the pulling instead of losing messages. Requests carry their own
        inbox token so each is accounted for exactly. After a reconnect new requests go out
        at once (the server forgot the old ones); a request lost otherwise expires on our
        side too, and a new one is issued.
        """
        async with out:  # ours to close: the reader sees the end when pulling stops
            await self._pull_into(spec, out, batch, expires, task_status)

    async def _pull_into(self, spec: ConsumerSpec, out: MemoryObjectSendStream[Inbound],
                         batch: int, expires: float, task_status: TaskStatus[None]) -> None:
        inbox = self._nc.new_inbox()
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        # token -> [messages still owed, deadline]. The server fills requests in the order
        # they arrived and delivered messages keep their own subject, so a message is
        # credited to the oldest request; status messages (on the request's own reply
        # subject) end exactly the request they name.
        pending: OrderedDict[str, list[float]] = OrderedDict()
        ended = [anyio.Event()]  # set when a request ends: time to ask for more
        missing = [False]  # the server said the consumer does not exist (yet)
        handing_back = [False]  # pulling stopped: what still arrives goes back (a nak)
        waiting: set[anyio.CancelScope] = set()  # arrivals waiting for room in ``out``
        arriving = [0]

        async def arrive(msg: Msg) -> None:
            arriving[0] += 1
            try:
                await take(msg)
            finally:
                arriving[0] -= 1

        async def take(msg: Msg) -> None:
            # Each message goes from nats-py's delivery task straight into ``out``, not
            # through a stream of our own and a second task: one hand-off per message
            # instead of two (not ``next_msg`` either: a task and a uuid4 per message).
            headers = msg.headers
            status = headers.get("Status") if headers else None
            if status is not None:
                if status != "100":  # 100 is a heartbeat; anything else ends the request
                    pending.pop(msg.subject.rsplit(".", 1)[-1], None)
                    missing[0] = status == "503"
                    ended[0].set()
                return
            if pending:
                oldest = next(iter(pending.values()))
                oldest[0] -= 1
                if oldest[0] <= 0:
                    pending.popitem(last=False)
                    ended[0].set()
            if not handing_back[0]:
                stream_seq, delivered = _sequence_and_delivered(msg)
                inbound = Inbound(subject=msg.subject, data=msg.data, headers=headers or {},
                                  stream_seq=stream_seq, delivered=delivered, _msg=msg)
                # A reader gone (shutting down) leaves the message unacked: redelivered.
                with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    try:
                        out.send_nowait(inbound)
                        return
                    except anyio.WouldBlock:
                        # The reader is behind: wait for room (what arrives meanwhile is
                        # bounded by the credit the pull requests extend), unless pulling
                        # stops first.
                        with anyio.CancelScope() as scope:
                            waiting.add(scope)
                            try:
                                await out.send(inbound)
                                return
                            finally:
                                waiting.discard(scope)
            # Not taken: back to the server, for another instance, rather than after the
            # ack wait. Not at once: our pull requests may be served until they expire (a
            # nak storm, and the last redelivery lost in flight as we unsubscribe).
            with suppress(nats.errors.Error):
                await msg.nak(delay=expires + 1.0)

        sub = await self._nc.subscribe(f"{inbox}.*", cb=arrive)
        counter = 0
        missing_since: float | None = None
        reconnects = self.reconnects
        task_status.started()
        try:
            while True:
                if self.reconnects != reconnects:
                    # A new connection: the requests made on the old one died with it (a
                    # restarted server forgot them, and a server that lived on saw their
                    # reply subject go away). Ask again now, not when they would expire.
                    reconnects = self.reconnects
                    pending.clear()
                if missing[0]:  # no such consumer (yet): wait for its creator
                    missing[0] = False
                    now = time.monotonic()
                    if missing_since is None or now - missing_since > 10:
                        log.warning("consumer %s on %s does not exist yet; waiting (is the "
                                    "coordinator running with this --prefix, and this agent "
                                    "in its policy?)", spec.durable, spec.stream)
                        missing_since = now
                    await anyio.sleep(0.5)
                owed = sum(int(p[0]) for p in pending.values())
                if owed <= batch and len(pending) < 4 and self._nc.is_connected:
                    counter += 1
                    token = str(counter)
                    request = {"batch": batch, "expires": int(expires * 1e9)}
                    pending[token] = [batch, time.monotonic() + expires + 1.0]
                    await self._nc.publish(next_subject, json.dumps(request).encode(),
                                           reply=f"{inbox}.{token}")
                    continue
                now = time.monotonic()
                # Until the next request's deadline, at most half a second: a reconnect
                # must be noticed soon (above).
                wait = min([0.5, *(p[1] - now for p in pending.values())])
                with anyio.move_on_after(max(wait, 0.01)):
                    await ended[0].wait()
                ended[0] = anyio.Event()
                # A request the server forgot (it restarted) expires on our side too.
                now = time.monotonic()
                for token in [t for t, p in pending.items() if p[1] <= now]:
                    del pending[token]
        finally:
            with anyio.CancelScope(shield=True):
                # The server sent ahead of the reader (up to two batches): hand back what
                # waits in the subscription, and what arrives while it does, before
                # unsubscribing drops it. Each would otherwise wait out the ack wait.
                handing_back[0] = True
                for scope in waiting:
                    scope.cancel()
                with anyio.move_on_after(HAND_BACK_S):
                    # (nats-py's queue signals nothing as it empties: polled)
                    while (sub.pending_msgs or arriving[0]) and not self._nc.is_closed:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                await sub.unsubscribe()

    async def serve_observe(self, stream: str, subject: str, out: MemoryObjectSendStream[Observed],
                            from_start: bool, *,
                            task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow ``subject`` in ``stream`` with an ordered (flow-controlled) consumer.

        The consumer lives in the server's memory: a restarted server has forgotten it.
        nats-py makes it anew, after the last stream sequence seen, once two heartbeats
        are missed; at its default (5 s) a restart left a follower silent for ~18 s."""
        policy = api.DeliverPolicy.ALL if from_start else api.DeliverPolicy.NEW
        async with out:
            sub = await self._call(
                self._js.subscribe(subject, stream=stream, ordered_consumer=True,
                                   deliver_policy=policy, idle_heartbeat=OBSERVE_HEARTBEAT_S),
                f"follow {subject} in stream {stream} (is the coordinator running "
                "with this --prefix?)")
            task_status.started()
            try:
                async for msg in sub.messages:
                    meta = msg.metadata
                    await out.send(Observed(msg.subject, msg.data, dict(msg.headers or {}),
                                            meta.sequence.stream))
            finally:
                with anyio.CancelScope(shield=True):
                    await sub.unsubscribe()

    async def consumer_pending(self, spec: ConsumerSpec) -> int:
        info = await self._call(self._js.consumer_info(spec.stream, spec.durable),
                                f"read consumer {spec.durable}")
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    # -- request/reply (the tool gateway) -------------------------------------------
    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        """Send a request and wait for one reply (raises BusError on no answer)."""
        try:
            reply = await self._nc.request(subject, data, timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise BusError(f"nobody serves {subject}") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise BusError(f"no answer on {subject} within {timeout:g} s") from exc
        return bytes(reply.data)

    async def serve_requests(self, subject: str, queue: str,
                             handle: Callable[[str, bytes], Awaitable[bytes]], *,
                             concurrency: int = 16,
                             task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Answer requests on ``subject`` (a queue group shares them) with ``handle``.

        Bounded: at most ``concurrency`` requests are handled at once; the rest wait in the
        subscription. A request that is never answered times out at its sender, which
        retries it (requests here are idempotent by their id), so none is lost silently.
        """
        sub = await self._nc.subscribe(subject, queue=queue)
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                slots = anyio.Semaphore(concurrency)
                async for msg in sub.messages:
                    await slots.acquire()

                    async def answer(msg: Msg = msg) -> None:
                        try:
                            reply = await handle(msg.subject, msg.data)
                            if msg.reply:
                                await self._nc.publish(msg.reply, reply)
                        finally:
                            slots.release()

                    tg.start_soon(answer)
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    # -- discovery ----------------------------------------------------------------
    async def ping(self, service: str, timeout: float = 0.5) -> bool:
        """Whether a NATS micro service of that name answers ``$SRV.PING.<service>``."""
        try:
            await self._nc.request(f"$SRV.PING.{service}", b"", timeout=timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError):
            return False
        return True

    async def count_instances(self, service: str, wait: float = 0.3) -> int:
        """How many instances of a NATS micro service answer ``$SRV.PING.<service>`` within
        ``wait`` seconds (each instance answers a ping)."""
        return len(await self._gather(f"$SRV.PING.{service}", wait))

    async def service_infos(self, service: str, wait: float = 0.3) -> list[dict[str, Any]]:
        """The ``$SRV.INFO`` replies (name, id, metadata, …) of every live instance of a
        NATS micro service within ``wait`` seconds."""
        infos = []
        for data in await self._gather(f"$SRV.INFO.{service}", wait):
            with suppress(msgspec.DecodeError):
                info = msgspec.json.decode(data)
                if isinstance(info, dict):
                    infos.append(info)
        return infos

    async def service_statuses(self, service: str, wait: float = 0.3) -> list[bytes]:
        """The replies of every instance's ``status`` endpoint within ``wait`` seconds."""
        return await self._gather(f"{service}.status", wait)

    async def _gather(self, subject: str, wait: float) -> list[bytes]:
        """Every answer to one request on ``subject`` within ``wait`` seconds."""
        inbox = self._nc.new_inbox()
        answers: list[bytes] = []

        async def collect(msg: Msg) -> None:
            if not (msg.headers and msg.headers.get("Status") == "503"):  # "no responders"
                answers.append(bytes(msg.data))

        sub = await self._nc.subscribe(inbox, cb=collect)
        try:
            await self._nc.flush(timeout=int(max(1, wait * 10)))
            # nats-server 2.15.1 can drop what another connection sends to a subscription
            # a few ms old, even after its PONG (bench/RESULTS.md, caveats): let it settle.
            await anyio.sleep(0.05)
            await self._nc.publish(subject, b"", reply=inbox)
            await anyio.sleep(wait)
        except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError) as exc:
            raise BusError(f"cannot ask {subject}: {exc}") from exc
        finally:
            await sub.unsubscribe()
        return answers

    async def service_status(self, service: str, timeout: float = 1.0) -> bytes | None:
        """The reply of a service's ``status`` endpoint, or None if nobody answered."""
        try:
            reply = await self._nc.request(f"{service}.status", b"", timeout=timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError):
            return None
        return bytes(reply.data)

    async def add_service(self, name: str, version: str, description: str,
                          metadata: dict[str, str],
                          status: Callable[[], bytes]) -> None:
        """Register with the NATS micro API (``nats micro ls``), with a status endpoint."""
        from nats.micro import add_service  # local: only services need it
        from nats.micro.request import Request
        from nats.micro.service import EndpointConfig

        service = await add_service(self._nc, name=name, version=version,
                                    description=description, metadata=metadata)

        async def handle(request: Request) -> None:
            await request.respond(status())

        # A queue group of its own: every instance answers (``service_statuses``); a
        # plain request takes the first answer.
        await service.add_endpoint(EndpointConfig(name="status", subject=f"{name}.status",
                                                  handler=handle,
                                                  queue_group=f"i{service.id}"))


async def _abandon(nc: Client) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await nc.close()
        except Exception:  # a half-open client; nothing more to release
            log.debug("closing an unconnected client failed", exc_info=True)


# asyncio reads a socket into a fresh buffer of 256 KiB, above glibc's mmap threshold
# (128 KiB): every read then maps, shrinks and unmaps memory and faults its pages in,
# ~12 µs against ~2.5 µs for a read into 64 KiB (a send and a recv of 1.2 KB, measured).
READ_SIZE = 64 * 1024


def _read_in_small_chunks(nc: Client) -> None:
    """Cap each socket read of the connection at ``READ_SIZE`` (a connection made anew, as
    after a reconnect, must be capped again). Only a plain TCP connection reads this way:
    TLS reads into a buffer allocated once, and websockets have no such transport."""
    writer = getattr(nc._transport, "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is not None and getattr(transport, "max_size", 0) > READ_SIZE:
        transport.max_size = READ_SIZE


class _Repeats:
    """A connection's notes, each said once, then again with how often it came meanwhile
    at most every ``every_s`` seconds."""

    def __init__(self, every_s: float = 30.0, kinds: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._kinds = kinds
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # text -> (said at, times since)

    def first_or_count(self, text: str) -> str | None:
        """The line to log for ``text`` now, or None to stay quiet."""
        now = self._clock()
        said_at, since = self._seen.get(text, (None, 0))
        if said_at is not None and now - said_at < self._every_s:
            self._seen[text] = (said_at, since + 1)
            return None
        if len(self._seen) >= self._kinds:
            self._seen.clear()  # (texts that vary without end: forget, and say them again)
        self._seen[text] = (now, 0)
        if said_at is None or not since:
            return text
        return f"{text} (and {since} more time(s) in the last {now - said_at:.0f} s)"


# What a connection to NATS that failed or was refused raises, for callers that tell the
# user so in one line (a bug raises something else).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, nats.errors.Error,
                                                      BusError)


@asynccontextmanager
async def open_bus(settings: BusSettings,
                   on_event: Callable[[str], None] | None = None) -> AsyncIterator[Bus]:
    """Connect (reconnecting forever), yield a Bus, drain on exit."""

    repeats = _Repeats()

    def note(text: str) -> None:
        said = repeats.first_or_count(text)
        if said is not None:  # (a server down: the same error every half second, for hours)
            log.info("%s: %s", settings.name, said)
        if on_event is not None:
            on_event(text)

    async def error_cb(exc: Exception) -> None:
        note(f"error: {exc}")

    async def disconnected_cb() -> None:
        if connected:  # (nats-py says so at its give-up on a first connect, too)
            note("disconnected")

    async def reconnected_cb() -> None:
        _read_in_small_chunks(nc)
        note("reconnected")

    options: dict[str, Any] = {}
    seed = settings.nkey_seed
    inbox_prefix = settings.inbox_prefix
    if seed is not None:
        try:
            check_nkey_seed(seed)
        except BusError as exc:
            raise BusError(f"cannot connect to NATS at {settings.url}: {exc}") from None
        options["nkeys_seed_str"] = seed.strip()
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    # The server refusing who we are is final: don't retry it until the deadline.
    refused: list[str] = []
    first_errors: set[str] = set()
    connected = False
    nc = Client()

    async def connect_error_cb(exc: Exception) -> None:
        text = str(exc)
        if not connected and "authorization violation" in text.lower():
            refused.append(text.strip().removeprefix("nats: ").strip("'"))
            # Close first (the socket too), then stop the connect loop from retrying.
            await _abandon(nc)
            connecting.cancel()
            return
        if not connected:
            # Until the first connect, one note per distinct error: the deadline's own
            # error says the rest, and ten "Connect call failed" lines would bury it.
            if text in first_errors:
                log.debug("%s: %s", settings.name, text)
                return
            first_errors.add(text)
        await error_cb(exc)

    try:
        # Reconnect forever once connected, but fail the first connect within a deadline:
        # a wrong URL must be an error, not a silent hang.
        with anyio.fail_after(settings.request_timeout), anyio.CancelScope() as connecting:
            # (nats-py annotates the waits as int; fractions of a second work.)
            options.update(reconnect_time_wait=0.5, connect_timeout=settings.request_timeout,
                           ping_interval=settings.ping_interval,
                           max_outstanding_pings=settings.max_outstanding_pings)
            await nc.connect(
                settings.url, name=settings.name, max_reconnect_attempts=-1,
                allow_reconnect=True, error_cb=connect_error_cb,
                disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb, **options,
            )
    except TimeoutError:
        await _abandon(nc)
        raise BusError(f"cannot connect to NATS at {settings.url}: no server answered within "
                       f"{settings.request_timeout:.0f} s") from None
    except (OSError, nats.errors.Error) as exc:
        await _abandon(nc)
        raise BusError(f"cannot connect to NATS at {settings.url}: "
                       f"{exc or type(exc).__name__}") from exc
    if refused or not nc.is_connected:
        await _abandon(nc)
        how = "with nkey credentials" if seed is not None else "without credentials"
        raise BusError(f"NATS at {settings.url} refused the connection {how}: "
                       f"{refused[0] if refused else 'not connected'} (check --nkey or "
                       "LEDGERMESH_NKEY)")
    connected = True  # from now on errors are notes, never fatal
    _read_in_small_chunks(nc)
    try:
        yield Bus(nc, settings)
    finally:
        connected = False  # (closing: the disconnection that follows is ours, no news)
        with anyio.CancelScope(shield=True):
            try:
                await nc.drain()
            except Exception:  # closing anyway: a failed drain must not mask the real error
                await nc.close()

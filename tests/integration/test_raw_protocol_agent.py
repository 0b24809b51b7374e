"""An agent written from docs/protocol.md with raw nats-py, against the real coordinator.

The module has two halves:

* the **raw-protocol agent** (between the ``RAW AGENT`` markers): the standard library and
  ``nats`` only. It builds every JSON message by hand, pulls deliveries with
  ``$JS.API.CONSUMER.MSG.NEXT``, acks with ``+ACK``, and verifies the ledger's hash chain
  from the relayed bytes, exactly as a non-Python implementer would from the document;
* the **harness**: starts the coordinator in-process and reads the ledger back with the
  project's own replay, to check that what the document promises is what happened.

``test_agent_half_uses_only_the_documented_protocol`` keeps the halves apart.
"""

from __future__ import annotations

# ---- RAW AGENT: begin (stdlib + nats-py only; no imports from agents, bus, schemas) ----
import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

# docs/protocol.md, "Output ids": the namespace the Python SDK uses for uuid5 output ids.
NS_OUTPUT = uuid.UUID("3c9f1a7e-5b2d-5f4e-8a6c-7d8e9f0a1b2c")
GENESIS = "0" * 64
PULL_BATCH = 8
PULL_EXPIRES_S = 2.0
REQUEST_TIMEOUT_S = 5.0

Json = dict[str, Any]
# A handler turns one delivery into the bodies to say, in order.
Handler = Callable[[Json], list[Json]]


class ProtocolError(Exception):
    """The other side answered something docs/protocol.md does not allow."""


def utc_now() -> str:
    """``sent_at``: RFC 3339, UTC, with a ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def output_id(delivery_id: str, n: int) -> str:
    """The n-th output (1-based) of a delivery: the same id every time it is handled."""
    return str(uuid.uuid5(NS_OUTPUT, f"{delivery_id}:{n}"))


def encode(obj: Json) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


async def publish_envelope(nc: Client, prefix: str, envelope: Json) -> tuple[bytes, Json]:
    """JetStream publish to ``<prefix>.intake.<sender>``: the bytes sent and the PubAck."""
    data = encode(envelope)
    reply = await nc.request(f"{prefix}.intake.{envelope['sender']}", data,
                             timeout=REQUEST_TIMEOUT_S,
                             headers={"Nats-Msg-Id": envelope["id"]})
    ack: Json = json.loads(reply.data)
    if "error" in ack:
        raise ProtocolError(f"intake refused {envelope['id']}: {ack['error']}")
    if ack.get("stream") != f"{prefix.upper()}_INTAKE" or not ack.get("seq"):
        raise ProtocolError(f"not a PubAck of the intake stream: {ack}")
    return data, ack


def submit_envelope(principal: str, task_id: str, to: str, title: str, payload: Json) -> Json:
    return {
        "id": str(uuid.uuid4()),  # a client picks any unique id; keep it to retry with
        "sender": principal,
        "task_id": task_id,
        "sent_at": utc_now(),
        "body": {"type": "task.submit", "to": to, "title": title, "payload": payload},
        "causation_id": None,
        "trace": None,
        "labels": [],
        "attempt": 0,
    }


def ack_metadata(reply: str) -> tuple[int, int]:
    """(times delivered, stream sequence) from a ``$JS.ACK.…`` reply subject."""
    tokens = reply.split(".")
    if tokens[:2] != ["$JS", "ACK"]:
        raise ProtocolError(f"not a JetStream ack subject: {reply!r}")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[4]), int(tokens[5])
    if len(tokens) >= 11:  # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>…
        return int(tokens[6]), int(tokens[7])
    raise ProtocolError(f"unexpected ack subject: {reply!r}")


@dataclass
class Handled:
    delivery: Json
    delivered: int  # 1 = first time; more = a redelivery
    outputs: list[tuple[Json, bytes, Json]]  # (envelope, bytes published, PubAck)
    acked: bool


@dataclass
class RawAgent:
    """One agent instance: pulls its deliveries, says what its handler returns, then acks."""

    url: str
    prefix: str
    name: str
    handler: Handler
    # Test hook: answer the first delivery with -NAK *after* its outputs were stored, as
    # if the process had crashed just before acking. The redelivery must be harmless.
    nak_first_delivery: bool = False
    handled: list[Handled] = field(default_factory=list)
    nc: Client | None = None

    async def connect(self) -> Client:
        self.nc = await nats.connect(self.url, name=f"{self.prefix}_{self.name}",
                                     max_reconnect_attempts=-1)
        return self.nc

    async def serve(self) -> None:
        """Keep one pull request outstanding at a time, forever."""
        nc = self._client()
        stream, consumer = f"{self.prefix.upper()}_DELIVER", f"agent-{self.name}"
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        inbox = nc.new_inbox()
        sub = await nc.subscribe(f"{inbox}.*")
        loop = asyncio.get_running_loop()
        token = 0
        while True:
            token += 1
            reply = f"{inbox}.{token}"
            request = {"batch": PULL_BATCH, "expires": int(PULL_EXPIRES_S * 1e9)}
            await nc.publish(next_subject, encode(request), reply=reply)
            received = 0
            deadline = loop.time() + PULL_EXPIRES_S + 1.0
            while received < PULL_BATCH:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except nats.errors.TimeoutError:
                    break
                status = (msg.headers or {}).get("Status")
                if status is not None:
                    # Status messages come on the reply subject; deliveries do not (they keep
                    # their own subject, <prefix>.deliver.<agent>).
                    if msg.subject != reply or status == "100":
                        continue  # a late status of an older request, or a heartbeat
                    if status == "503":  # no such consumer (yet): the coordinator makes it
                        await asyncio.sleep(0.5)
                    break  # 404 / 408 / 409 / 503: this request is over
                received += 1
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        nc = self._client()
        if msg.subject != f"{self.prefix}.deliver.{self.name}":
            raise ProtocolError(f"{self.name}: delivery on {msg.subject!r}")
        delivered, _ = ack_metadata(msg.reply)
        delivery: Json = json.loads(msg.data)
        if (msg.headers or {}).get("Nats-Msg-Id") != delivery["id"]:
            raise ProtocolError(f"{self.name}: Nats-Msg-Id is not the delivery id")
        if delivery["agent"] != self.name:
            raise ProtocolError(f"{self.name}: delivery for {delivery['agent']!r}")
        cause = delivery["envelope"]
        outputs: list[tuple[Json, bytes, Json]] = []
        for n, body in enumerate(self.handler(delivery), start=1):
            envelope = {
                "id": output_id(delivery["id"], n),
                "sender": self.name,
                "task_id": delivery["task_id"],
                "sent_at": utc_now(),
                "body": body,
                "causation_id": cause["id"],
                "trace": cause["trace"],
                "labels": delivery["labels"],
                "attempt": delivery["attempt"],
            }
            # One at a time, in order, each stored (PubAck) before the next is sent.
            data, puback = await publish_envelope(nc, self.prefix, envelope)
            outputs.append((envelope, data, puback))
        crash = self.nak_first_delivery and not self.handled
        # Only now, with every output acked by the intake stream, settle the delivery.
        await nc.publish(msg.reply, b"-NAK" if crash else b"+ACK")
        await nc.flush()
        self.handled.append(Handled(delivery, delivered, outputs, acked=not crash))

    def _client(self) -> Client:
        if self.nc is None:
            raise RuntimeError(f"{self.name}: connect() first")
        return self.nc


# -- the two agents of the scenario ---------------------------------------------------


def echo(delivery: Json) -> list[Json]:
    if delivery["envelope"]["body"]["type"] != "task.submit":
        return [{"type": "task.fail", "reason": "echo only starts tasks", "retryable": False}]
    return [
        {"type": "task.say", "text": f"echo: {delivery['title']}"},
        {"type": "handoff.request", "to": "closer", "reason": "echoed",
         "payload": {"echoed": delivery["input"]}},
    ]


def closer(delivery: Json) -> list[Json]:
    body = delivery["envelope"]["body"]
    if body["type"] != "handoff.request":
        return [{"type": "task.fail", "reason": "closer only takes handoffs", "retryable": False}]
    return [{"type": "task.complete", "result": f"closed after {body['reason']}",
             "payload": body["payload"]}]


# -- observing the ledger ----------------------------------------------------------------


@dataclass(frozen=True)
class LedgerCopy:
    """One relayed ledger event, with the exact bytes of its ``event`` member."""

    subject: str
    msg_id: str | None
    expected_last: str | None
    record: Json
    event_bytes: bytes

    @classmethod
    def parse(cls, msg: Msg) -> LedgerCopy:
        data = bytes(msg.data)
        record: Json = json.loads(data)
        # "event" is the record's last member and its value is raw canonical JSON: slice it
        # out instead of re-encoding it (docs/protocol.md, "Verifying the hash chain").
        marker = b',"event":'
        if not data.endswith(b"}") or marker not in data:
            raise ProtocolError(f"not a ledger record: {data[:80]!r}")
        event_bytes = data[data.index(marker) + len(marker):-1]
        if json.loads(event_bytes) != record["event"]:
            raise ProtocolError("the event slice is not the record's event")
        headers = msg.headers or {}
        return cls(msg.subject, headers.get("Nats-Msg-Id"),
                   headers.get("Nats-Expected-Last-Msg-Id"), record, event_bytes)

    @property
    def event(self) -> Json:
        event: Json = self.record["event"]
        return event

    @property
    def kind(self) -> str:
        return str(self.event["kind"])

    def recomputed_hash(self) -> str:
        """sha256(prev_hash || canonical({aggregate_id, state, topic, version}))."""
        member = b',"hash":"' + self.event["hash"].encode() + b'"'
        at = self.event_bytes.rindex(member)  # the top-level member is the last one
        state = self.event_bytes[:at] + self.event_bytes[at + len(member):]
        body = (b'{"aggregate_id":' + encode(self.record["aggregate_id"])
                + b',"state":' + state
                + b',"topic":' + encode(self.record["topic"])
                + b',"version":' + str(self.record["version"]).encode() + b"}")
        return hashlib.sha256(bytes.fromhex(self.event["prev_hash"]) + body).hexdigest()


def verify_chain(copies: list[LedgerCopy]) -> str:
    """Check one aggregate's events from version 1; return the chain head."""
    version, head = 0, GENESIS
    for copy in copies:
        if copy.record["version"] != version + 1:
            raise ProtocolError(f"version {copy.record['version']} follows {version}")
        if copy.event["prev_hash"] != head:
            raise ProtocolError(f"version {version + 1}: prev_hash is not the previous hash")
        if copy.recomputed_hash() != copy.event["hash"]:
            raise ProtocolError(f"version {version + 1}: hash does not match its bytes")
        version, head = copy.record["version"], copy.event["hash"]
    return head


class LiveTail:
    """A core-NATS subscription: live ledger events from now on (none from before)."""

    def __init__(self, nc: Client, subject: str) -> None:
        self._nc = nc
        self._subject = subject
        self.copies: list[LedgerCopy] = []
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._subject)
        await self._nc.flush()  # the server has the interest before anything is published

    async def until(self, kind: str, patience: float) -> list[LedgerCopy]:
        """Everything received until (and including) an event of ``kind``."""
        while not self.copies or self.copies[-1].kind != kind:
            self.copies.append(LedgerCopy.parse(await self._sub.next_msg(timeout=patience)))
        return self.copies

    async def take(self, count: int, patience: float) -> list[LedgerCopy]:
        """The first ``count`` events received."""
        while len(self.copies) < count:
            self.copies.append(LedgerCopy.parse(await self._sub.next_msg(timeout=patience)))
        return self.copies[:count]


async def read_history(nc: Client, prefix: str, filter_subject: str, *, until_kind: str,
                       patience: float) -> list[LedgerCopy]:
    """Everything recorded under ``filter_subject``, from the stream's start.

    An ephemeral push consumer on ``<PREFIX>_LEDGER`` made with the 5-token
    ``$JS.API.CONSUMER.CREATE.<stream>`` request; no acks (``ack_policy: none``).
    """
    stream = f"{prefix.upper()}_LEDGER"
    deliver = nc.new_inbox()
    sub = await nc.subscribe(deliver)
    try:
        request = {"stream_name": stream,
                   "config": {"deliver_subject": deliver, "deliver_policy": "all",
                              "ack_policy": "none", "filter_subject": filter_subject,
                              "inactive_threshold": 5_000_000_000}}
        reply = await nc.request(f"$JS.API.CONSUMER.CREATE.{stream}", encode(request),
                                 timeout=REQUEST_TIMEOUT_S)
        answer: Json = json.loads(reply.data)
        if "error" in answer:
            raise ProtocolError(f"cannot follow {stream}: {answer['error']}")
        copies: list[LedgerCopy] = []
        while not copies or copies[-1].kind != until_kind:
            copies.append(LedgerCopy.parse(await sub.next_msg(timeout=patience)))
        return copies
    finally:
        await sub.unsubscribe()


def decoded_raw(copy: LedgerCopy) -> bytes:
    """The envelope bytes exactly as the coordinator received them ("" on decisions)."""
    return base64.b64decode(copy.event["raw"])


# ---- RAW AGENT: end ----------------------------------------------------------------------

import ast  # noqa: E402  (the harness below may use the project's code)
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import anyio  # noqa: E402
import pytest  # noqa: E402

from bus.embedded import EmbeddedNats  # noqa: E402
from coordinator.ledger.events import task_aggregate_id  # noqa: E402
from coordinator.ledger.replay import replay  # noqa: E402
from coordinator.ledger.store import Ledger, open_ledger  # noqa: E402
from coordinator.policy import parse_policy  # noqa: E402
from coordinator.service import CoordinatorSettings, run_coordinator  # noqa: E402
from schemas import Subjects  # noqa: E402

TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[2]
PROTOCOL_DOC = REPO / "docs" / "protocol.md"
POLICY = """
submitters = ["client"]

[agents.echo]
description = "Says what it was asked, then hands the task to closer"
handoff_to = ["closer"]

[agents.closer]
description = "Completes whatever it is handed"
"""


def documented_kinds(name: str) -> list[str]:
    """The event kinds listed in docs/protocol.md under ``<!-- kinds: name -->``."""
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    found = re.search(rf"<!-- kinds: {re.escape(name)} -->\s*```text\n(.*?)```", text, re.S)
    assert found, f"docs/protocol.md has no '<!-- kinds: {name} -->' block"
    return [line.split()[0] for line in found.group(1).splitlines() if line.strip()]


def read_ledger(path: str) -> Ledger:
    return open_ledger(path, create=False)




@pytest.fixture
def ledger_path(tmp_path: Path) -> str:
    return str(tmp_path / "ledger.db")


async def _connect_all(agents: tuple[RawAgent, ...]) -> None:
    for agent in agents:
        await agent.connect()


async def _close_all(clients: list[Client | None]) -> None:
    with anyio.CancelScope(shield=True):
        for nc in clients:
            if nc is not None and not nc.is_closed:
                await nc.close()


async def test_raw_agents_complete_a_handoff(nats_server: EmbeddedNats, prefix: str,
                                             ledger_path: str) -> None:
    settings = CoordinatorSettings(nats_server.url, ledger_path, parse_policy(POLICY),
                                   Subjects(prefix))
    task_id = f"raw-{uuid.uuid4().hex[:8]}"
    echo_agent = RawAgent(nats_server.url, prefix, "echo", echo, nak_first_delivery=True)
    closer_agent = RawAgent(nats_server.url, prefix, "closer", closer)
    client: Client | None = None
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(run_coordinator, settings)
            try:
                await _connect_all((echo_agent, closer_agent))
                async with anyio.create_task_group() as agents:
                    agents.start_soon(echo_agent.serve)
                    agents.start_soon(closer_agent.serve)
                    client = await nats.connect(nats_server.url, name="client")
                    live = LiveTail(client, f"{prefix}.ledger.task.{task_id}.>")
                    await live.start()
                    submitted = submit_envelope("client", task_id, "echo", "say hello",
                                                {"greeting": "hello"})
                    _, puback = await publish_envelope(client, prefix, submitted)
                    assert puback == {"stream": f"{prefix.upper()}_INTAKE", "seq": 1}
                    # The same envelope again (same Nats-Msg-Id): answered as a duplicate.
                    _, again = await publish_envelope(client, prefix, submitted)
                    assert again == {**puback, "duplicate": True}

                    live_copies = await live.until("task.completed", patience=TIMEOUT)
                    assert closer_agent.nc is not None
                    history = await read_history(closer_agent.nc, prefix,
                                                 f"{prefix}.ledger.task.{task_id}.>",
                                                 until_kind="task.completed", patience=TIMEOUT)
                    # Every delivery was acked: nothing pending or awaiting an ack.
                    js = client.jetstream()
                    for name in ("echo", "closer"):
                        while True:
                            info = await js.consumer_info(f"{prefix.upper()}_DELIVER",
                                                          f"agent-{name}")
                            if (info.num_pending, info.num_ack_pending) == (0, 0):
                                break
                            await anyio.sleep(0.05)
                    agents.cancel_scope.cancel()
            finally:
                await _close_all([client, echo_agent.nc, closer_agent.nc])
            tg.cancel_scope.cancel()

    expected = documented_kinds("say-then-handoff")

    # -- what the raw agent observed on the ledger subjects ---------------------------------
    for copies in (live_copies, history):
        assert [c.kind for c in copies] == expected
        assert [c.subject for c in copies] == [f"{prefix}.ledger.task.{task_id}.{k}"
                                               for k in expected]
        assert [c.msg_id for c in copies] == [f"{prefix}:{c.record['position']}"
                                              for c in copies]
        # Nothing but this task was recorded under this prefix: positions run 1, 2, 3…
        assert [c.expected_last for c in copies] == [None] + [f"{prefix}:{c.record['position']}"
                                                            for c in copies[:-1]]
        assert {c.record["aggregate_id"] for c in copies} == {str(task_aggregate_id(task_id))}
        assert [c.record["version"] for c in copies] == list(range(1, len(expected) + 1))
    head = verify_chain(history)
    assert verify_chain(live_copies) == head
    assert [c.event_bytes for c in live_copies] == [c.event_bytes for c in history]

    # -- what each raw agent was delivered and said ----------------------------------------
    first, again_ = echo_agent.handled  # NAKed once ("crashed"), so delivered twice
    assert (first.delivered, first.acked, again_.delivered, again_.acked) == (1, False, 2, True)
    assert first.delivery == again_.delivery
    delivery = first.delivery
    assert (delivery["agent"], delivery["task_id"], delivery["attempt"]) == ("echo", task_id, 1)
    assert delivery["input"] == {"greeting": "hello"}
    assert delivery["envelope"]["id"] == submitted["id"]
    assert delivery["envelope"]["body"]["type"] == "task.submit"
    # The redelivery republished the same ids; JetStream answered "duplicate".
    assert [e["id"] for e, _, _ in again_.outputs] == [e["id"] for e, _, _ in first.outputs]
    assert [a.get("duplicate") for _, _, a in first.outputs] == [None, None]
    assert [a["duplicate"] for _, _, a in again_.outputs] == [True, True]
    assert [a["seq"] for _, _, a in again_.outputs] == [a["seq"] for _, _, a in first.outputs]

    (closed,) = closer_agent.handled
    handoff = closed.delivery
    assert (handoff["agent"], handoff["attempt"], closed.delivered) == ("closer", 2, 1)
    assert handoff["input"] == {"greeting": "hello"}  # the task's input, not the payload
    assert handoff["envelope"]["sender"] == "echo"
    assert handoff["envelope"]["body"] == {"type": "handoff.request", "to": "closer",
                                           "reason": "echoed",
                                           "payload": {"echoed": {"greeting": "hello"}}}
    assert handoff["envelope"]["id"] == output_id(delivery["id"], 2)

    # The ledger keeps each envelope's bytes exactly as they were published.
    by_kind = {c.kind: c for c in history}
    said_envelope, said_bytes, _ = first.outputs[0]
    assert by_kind["message.said"].event["msg_id"] == said_envelope["id"]
    assert decoded_raw(by_kind["message.said"]) == said_bytes
    assert decoded_raw(by_kind["task.submitted"]) == encode(submitted)
    assert by_kind["handoff.accepted"].event["data"] == {
        "request_id": handoff["envelope"]["id"], "by": "closer", "implicit": True}
    assert by_kind["handoff.accepted"].event["sender"] == "coordinator"

    # -- what the ledger itself says (the project's replay) ---------------------------------
    ledger = read_ledger(ledger_path)
    try:
        result = replay(ledger)
        events = ledger.history(task_aggregate_id(task_id))
    finally:
        ledger.close()
    assert result.verified, result.breaks
    task = result.tasks[task_id]
    assert (task.status, task.result, task.owner) == ("completed", "closed after echoed", None)
    assert (task.attempt, task.hops, task.rejections) == (2, 1, 0)
    assert result.principals == {}  # nothing was rejected anywhere
    assert [e.kind for e in events] == expected
    assert [e.hash for e in events] == [c.event["hash"] for c in history]
    assert task.head == head
    assigned = [e.data for e in events if e.kind == "task.assigned"]
    assert [(a["agent"], a["attempt"]) for a in assigned] == [("echo", 1), ("closer", 2)]
    assert [a["delivery"] for a in assigned] == [delivery, handoff]


async def test_rejections_are_recorded_and_relayed(nats_server: EmbeddedNats, prefix: str,
                                                   ledger_path: str) -> None:
    """Nothing answers a rejected message: the sender finds it on the ledger subjects."""
    settings = CoordinatorSettings(nats_server.url, ledger_path, parse_policy(POLICY),
                                   Subjects(prefix))
    client: Client | None = None
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            await tg.start(run_coordinator, settings)
            try:
                client = await nats.connect(nats_server.url, name="client")
                live = LiveTail(client, f"{prefix}.ledger.principal.client.>")
                await live.start()
                junk_id = str(uuid.uuid4())
                await client.request(f"{prefix}.intake.client", b"not json",
                                     headers={"Nats-Msg-Id": junk_id}, timeout=REQUEST_TIMEOUT_S)
                spoofed = submit_envelope("echo", "t-spoof", "echo", "spoofed", {})
                await client.request(f"{prefix}.intake.client", encode(spoofed),
                                     headers={"Nats-Msg-Id": spoofed["id"]},
                                     timeout=REQUEST_TIMEOUT_S)
                orphan = {**submit_envelope("client", "t-none", "echo", "", {}),
                          "body": {"type": "task.say", "text": "anyone?"}, "attempt": 1}
                await publish_envelope(client, prefix, orphan)
                nobody = submit_envelope("client", "t-nobody", "nobody", "lost", {})
                await publish_envelope(client, prefix, nobody)
                copies = await live.take(4, patience=TIMEOUT)
            finally:
                await _close_all([client])
            tg.cancel_scope.cancel()

    assert [c.subject for c in copies] == [f"{prefix}.ledger.principal.client.message.rejected"] * 4
    assert [(c.event["msg_id"], c.event["data"]["code"]) for c in copies] == [
        (junk_id, "malformed"), (spoofed["id"], "spoofed_sender"),
        (orphan["id"], "unknown_task"), (nobody["id"], "unknown_agent")]
    assert all(c.event["data"]["subject_principal"] == "client" for c in copies)
    # The rejection's sender is the authenticated subject; the claim is kept as data.
    assert [c.event["sender"] for c in copies] == ["client"] * 4
    assert copies[1].event["data"]["claimed_sender"] == "echo"
    assert decoded_raw(copies[0]) == b"not json"
    verify_chain(copies)


def test_agent_half_uses_only_the_documented_protocol() -> None:
    """The raw agent must not lean on the project's Python: stdlib and nats only."""
    source = Path(__file__).read_text(encoding="utf-8")
    begin = source.index("\n", source.index("# ---- RAW AGENT: begin"))
    end = source.index("# ---- RAW AGENT: end")
    agent_half, harness_half = ast.parse(source[begin:end]), ast.parse(source[end:])
    allowed = {"__future__", "asyncio", "base64", "hashlib", "json", "uuid", "collections",
               "dataclasses", "datetime", "typing", "nats"}
    for node in ast.walk(agent_half):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
        else:
            continue
        assert roots <= allowed, f"the raw agent imports {roots - allowed}"
    # Nor may it use, at run time, what the harness imports from the project.
    project = {"agents", "bus", "coordinator", "schemas", "ledgermesh"}
    borrowed = {alias.asname or alias.name for node in ast.walk(harness_half)
                if isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] in project
                for alias in node.names}
    used = {node.id for node in ast.walk(agent_half) if isinstance(node, ast.Name)}
    assert borrowed, "the harness imports nothing from the project? check the markers"
    assert not used & borrowed, f"the raw agent uses {used & borrowed} from the project"

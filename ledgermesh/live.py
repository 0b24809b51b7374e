"""Commands against a running system: ``submit`` and ``tail``."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bus.client import (
    CONNECTION_ERRORS,
    Bus,
    BusError,
    BusSettings,
    Credentials,
    Observed,
    open_bus,
)
from coordinator.service import utc_now
from ledgermesh.auth import load_credentials
from ledgermesh.style import Style, short, stdout_style
from schemas import (
    ApproveTool,
    Codec,
    Envelope,
    LedgermeshError,
    LedgerRecord,
    ResumeAgent,
    Subjects,
    SubmitTask,
    SuspendAgent,
    is_token,
)

log = logging.getLogger("ledgermesh.cli")
AGAIN_S = 3.0  # without a verdict, a submission or command is published again this often


class UsageError(LedgermeshError):
    """A command-line argument is wrong; the message says how to fix it."""


def parse_payload(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--payload is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno} "
                         "(example: --payload '{\"question\": \"…\"}')") from None
    if not isinstance(value, dict):
        raise UsageError("--payload must be a JSON object, e.g. '{\"question\": \"…\"}'")
    return value


class SubmitRejectedError(LedgermeshError):
    """The coordinator recorded the submission as rejected."""


class NoVerdictError(LedgermeshError):
    """The connection to NATS failed before the coordinator's verdict."""


def bus_settings(nats_url: str, name: str, credentials: Credentials | None) -> BusSettings:
    return BusSettings.of(nats_url, name, credentials)


def submit_command(nats_url: str, prefix: str, *, to: str, title: str, payload_text: str,
                   task_id: str | None, principal: str | None, wait: float = 10.0,
                   nkey: Path | None = None) -> int:
    """``principal`` None: the seed file's principal with credentials, else "client"."""
    payload = parse_payload(payload_text)
    task = task_id or f"t-{uuid.uuid4().hex[:12]}"
    for name, value in (("--to", to), ("--task-id", task), ("--as", principal or "client")):
        if not is_token(value):
            raise UsageError(f"{name} {value!r}: use 1-128 letters, digits, '-' or '_'")
    subjects = Subjects(prefix)
    credentials = load_credentials(nkey, subjects, principal)
    who: str = principal or (credentials.inbox_prefix.removeprefix("_INBOX.")
                             if credentials is not None else "client")
    settings = bus_settings(nats_url, f"{prefix}_submit", credentials)

    envelope = Envelope(id=str(uuid.uuid4()), sender=who, task_id=task, sent_at=utc_now(),
                        body=SubmitTask(to=to, title=title, payload=payload))
    # The tail command to paste: the same server, prefix and key (a client may read).
    with_key = ((f" --prefix {prefix}" if prefix != Subjects().prefix else "")
                + (f" --nkey {nkey}" if nkey is not None else ""))
    event = await_verdict(settings, subjects, envelope, wait,
                          watch=(subjects.ledger_of_task(task),),
                          verdicts=(subjects.ledger("task", task, "task.submitted"),))
    if event is None:
        print(f"sent {task} to {to}, not recorded yet: no verdict from the coordinator "
              f"within {wait:.0f} s (is it running?)\n"
              "  it waits in the intake stream and is recorded once a coordinator reads it: "
              "no need to send it again\n"
              f"  watch for it:  ledgermesh tail --nats {nats_url}{with_key} --task {task} "
              f"--until-closed")
        return 1
    if event["kind"] == "message.rejected":
        data = event["data"]
        raise SubmitRejectedError(f"task {task} rejected ({data['code']}): {data['reason']}")
    print(f"submitted {task} to {to} (recorded)")
    print(f"  watch it:  ledgermesh tail --nats {nats_url}{with_key} --task {task} "
          "--until-closed")
    return 0


def await_verdict(settings: BusSettings, subjects: Subjects, envelope: Envelope, wait: float,
                  watch: tuple[str, ...], verdicts: tuple[str, ...],
                  again_s: float = AGAIN_S) -> dict[str, Any] | None:
    """Publish ``envelope`` on its sender's intake; the first ledger event it caused (or its
    rejection), or None if nothing was recorded within ``wait`` seconds.

    The verdict is watched for live on ``watch``. Every ``again_s`` without one, the last
    event on each of ``verdicts`` (ledger subjects without wildcards) is read, since a
    restarted nats-server loses the live watch; if none is it, the envelope is published
    again, same bytes and id: JetStream acks before it syncs, so a crash of the NATS
    machine can lose an acked message (a stream that still holds it stores nothing)."""
    found: list[dict[str, Any]] = []
    sent = False  # the intake stream acknowledged it: it is recorded once a coordinator reads it
    rejections = subjects.ledger("principal", envelope.sender, "message.rejected")
    intake, data = subjects.intake(envelope.sender), Codec().encode(envelope)

    def caused(record_data: bytes) -> dict[str, Any] | None:
        record = msgspec.json.decode(record_data, type=LedgerRecord)
        event: dict[str, Any] = msgspec.json.decode(record.event)
        return event if event["msg_id"] == envelope.id else None

    async def publish_again(bus: Bus, done: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(again_s)
            try:
                for subject in (*verdicts, rejections):
                    stored = await bus.last_message(subjects.ledger_stream, subject, wait=0.5)
                    event = caused(stored) if stored is not None else None
                    if event is not None:
                        found.append(event)
                        done.cancel()
                        return
                await bus.publish(intake, data, msg_id=envelope.id)
            except BusError as exc:  # no stream yet, a reconnect: next time
                log.info("no verdict for %s yet, and cannot ask again: %s", envelope.id, exc)

    async def main() -> None:
        nonlocal sent
        async with open_bus(settings) as bus:
            # Watch for the ledger's verdict before publishing, so it cannot be missed.
            send, receive = anyio.create_memory_object_stream[Observed](max_buffer_size=64)
            async with anyio.create_task_group() as tg, receive:
                for subject in (*watch, rejections):
                    await tg.start(bus.serve_observe, subjects.ledger_stream, subject,
                                   send.clone(), False)
                send.close()
                await bus.publish(intake, data, msg_id=envelope.id)
                sent = True
                tg.start_soon(publish_again, bus, tg.cancel_scope)
                with anyio.move_on_after(wait):
                    async for message in receive:
                        event = caused(message.data)
                        if event is not None:
                            found.append(event)
                            break
                tg.cancel_scope.cancel()

    what = (f"task {envelope.task_id}" if isinstance(envelope.body, SubmitTask)
            else "the command")
    try:
        anyio.run(main)
    except KeyboardInterrupt:
        print(f"interrupted: {what} was sent (the intake stream has it) and is recorded once "
              "a coordinator reads it: no need to send it again" if sent
              else f"interrupted before {what} was sent: nothing to undo", file=sys.stderr)
        raise
    except BaseException as exc:
        if not _lost_connection(exc):
            raise
        cause = _first_line(exc)
        if sent:
            raise NoVerdictError(f"{what} was sent (the intake stream has it), then the "
                                 f"connection to NATS failed before a verdict ({cause}): it "
                                 "is recorded once a coordinator reads it; no need to send "
                                 "it again") from None
        if isinstance(exc, LedgermeshError):
            raise  # (cannot connect, refused credentials: already one clear line)
        ours = _ours(exc)
        if ours is not None:  # e.g. no ledger stream to watch: no coordinator on --prefix
            raise NoVerdictError(f"{what} was not sent: {ours}") from None
        raise NoVerdictError(f"{what} was not sent: the connection to NATS failed first "
                             f"({cause}); send it again") from None
    return found[0] if found else None


def _lost_connection(exc: BaseException) -> bool:
    """Whether this error (every one of a group) is NATS gone or refusing, not a bug."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_lost_connection(inner) for inner in exc.exceptions)
    return isinstance(exc, (*CONNECTION_ERRORS, LedgermeshError))


def _ours(exc: BaseException) -> LedgermeshError | None:
    """The first of ledgermesh's own errors in a group (already one clear line)."""
    if isinstance(exc, BaseExceptionGroup):
        return next((e for e in map(_ours, exc.exceptions) if e is not None), None)
    return exc if isinstance(exc, LedgermeshError) else None


def _first_line(exc: BaseException) -> str:
    """The innermost first cause of an error (or group of them), in one line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class OperatorRejectedError(LedgermeshError):
    """The coordinator refused an operator command (and recorded why)."""


def operator_command(nats_url: str, prefix: str, body: ApproveTool | SuspendAgent | ResumeAgent,
                     *, task_id: str, principal: str | None, nkey: Path | None,
                     wait: float = 10.0) -> int:
    """``approve``, ``agent suspend``, ``agent resume``: recorded commands of an operator."""
    subjects = Subjects(prefix)
    credentials = load_credentials(nkey, subjects, principal)
    who = principal or (credentials.inbox_prefix.removeprefix("_INBOX.")
                        if credentials is not None else "operator")
    if not is_token(task_id):
        raise UsageError(f"task id {task_id!r}: use 1-128 letters, digits, '-' or '_'")
    envelope = Envelope(id=str(uuid.uuid4()), sender=who, task_id=task_id,
                        sent_at=utc_now(), body=body)
    if isinstance(body, ApproveTool):
        target, verdict = (subjects.ledger_of_task(task_id),
                           subjects.ledger("task", task_id, "tool.approved"))
    else:
        kind = "agent.suspended" if isinstance(body, SuspendAgent) else "agent.resumed"
        target, verdict = (subjects.ledger("principal", body.agent, ">"),
                           subjects.ledger("principal", body.agent, kind))
    event = await_verdict(BusSettings.of(nats_url, f"{prefix}_operator", credentials),
                          subjects, envelope, wait, watch=(target,), verdicts=(verdict,))
    if event is None:
        print(f"sent, not recorded yet: no verdict from the coordinator within {wait:.0f} s "
              "(is it running?)\n"
              "  the command waits in the intake stream and takes effect once a coordinator "
              "reads it: do not send it again unless you mean it twice")
        return 1
    if event["kind"] == "message.rejected":
        data = event["data"]
        raise OperatorRejectedError(f"refused ({data['code']}): {data['reason']}")
    print(f"recorded: {event['kind']} (by {who})")
    return 0


def describe(record: LedgerRecord, event: dict[str, Any]) -> str:
    """One human line for a relayed ledger event."""
    data = event.get("data", {})
    kind = event["kind"]
    who = event["sender"]
    detail = {
        "task.submitted": lambda: f"→ {data.get('to')}  \"{data.get('title')}\"",
        "task.assigned": lambda: f"assigned to {data.get('agent')} (attempt {data.get('attempt')})",
        "message.said": lambda: f"\"{data.get('text')}\"",
        "handoff.requested": lambda: f"→ {data.get('to')}  reason: {data.get('reason')}",
        "handoff.accepted": lambda: f"accepted by {data.get('by')}",
        "handoff.declined": lambda: f"→ {data.get('to')}  declined: {data.get('reason')}",
        "task.completed": lambda: f"completed \"{data.get('result')}\"",
        "task.failed": lambda: f"failed: {data.get('reason')}",
        "attempt.timed_out": lambda: (f"{data.get('agent')} timed out "
                                      f"(attempt {data.get('attempt')})"),
        "attempt.failed": lambda: f"attempt {data.get('attempt')} failed: {data.get('reason')}",
        "task.dead_lettered": lambda: f"dead-lettered: {data.get('reason')}",
        "tool.requested": lambda: f"{data.get('tool')} {json.dumps(data.get('args'))}",
        "tool.authorized": lambda: (f"{data.get('tool')} allowed: "
                                    f"{data.get('grounds', 'by the policy')}"),
        "tool.denied": lambda: (f"{data.get('tool')} DENIED {data.get('rule')}: "
                                f"{data.get('reason')}"),
        "tool.completed": lambda: ("ok" if data.get("outcome", {}).get("ok") else "error")
                                  + (f" labels {data.get('labels')}" if data.get("labels") else ""),
        "tool.approved": lambda: f"{data.get('tool')} approved: {data.get('reason')}",
        "agent.suspended": lambda: "SUSPENDED" + _because(data),
        "agent.resumed": lambda: "resumed" + _because(data),
        "principal.throttled": lambda: (f"{data.get('count')} envelopes dropped by the rate "
                                        "limit"),
        "message.rejected": lambda: f"REJECTED {data.get('code')}: {data.get('reason')}",
        "ledger.checkpointed": lambda: (f"signed up to #{data.get('position')} by "
                                        f"{short(str(data.get('key')), 12)}"),
    }.get(kind, lambda: "")()
    return f"#{record.position:<6} {short(event['key'], 14):<15} {who:<12} {kind:<18} {detail}"


def _because(data: dict[str, Any]) -> str:
    reason = data.get("reason")
    return f": {reason}" if reason else " (no reason given)"


_RED = frozenset({"message.rejected", "tool.denied", "task.dead_lettered", "task.failed",
                  "agent.suspended"})
_YELLOW = frozenset({"attempt.timed_out", "attempt.failed", "handoff.declined",
                     "principal.throttled"})


def _coloured(style: Style, kind: str, line: str) -> str:
    """Refusals and failures in red, retries and declines in yellow (on a terminal)."""
    if kind in _RED:
        return style.red(line)
    return style.yellow(line) if kind in _YELLOW else line


_CLOSED = {"task.completed": 0, "task.failed": 1}  # a task's last word: the exit code
SILENT_TASK_NOTE_S = 3.0  # tail --task: say so when the task has no event after this long


def tail_command(nats_url: str, prefix: str, *, task_id: str | None, from_start: bool,
                 as_json: bool, limit: int | None = None, nkey: Path | None = None,
                 until_closed: bool = False) -> int:
    subjects = Subjects(prefix)
    settings = bus_settings(nats_url, f"{prefix}_tail", load_credentials(nkey, subjects))
    if task_id is not None and not is_token(task_id):
        raise UsageError(f"--task {task_id!r}: task ids are letters, digits, '-' or '_'")
    if until_closed and task_id is None:
        raise UsageError("--until-closed follows one task: give it with --task TASK_ID")
    from_start = from_start or until_closed  # a task closed already says so at once
    outcome: int | None = None  # the exit code once the task closed (--until-closed)
    subject = subjects.ledger_of_task(task_id) if task_id else subjects.ledger_all
    style = stdout_style()
    decode_record = msgspec.json.Decoder(LedgerRecord).decode
    decode_event: Callable[[bytes], Any] = msgspec.json.Decoder().decode

    following = False  # the connection's news matter only while following

    def connection(event: str) -> None:  # a restart of nats-server: say why it went quiet
        if following and event in ("disconnected", "reconnected"):
            print(style.dim(f"{event} ({nats_url})"), file=sys.stderr, flush=True)

    async def main() -> None:
        nonlocal following
        async with open_bus(settings, on_event=connection) as bus:
            following = True
            try:
                await follow(bus)
            finally:
                following = False

    async def follow(bus: Bus) -> None:
        nonlocal outcome
        send, receive = anyio.create_memory_object_stream[Observed](max_buffer_size=256)
        async with anyio.create_task_group() as tg, receive:
            await tg.start(bus.serve_observe, subjects.ledger_stream, subject, send, from_start)
            if not as_json:
                print(style.dim(f"following {subject} (Ctrl-C to stop)"), file=sys.stderr)
            seen = 0

            async def note_silence() -> None:  # a mistyped id would wait without a word
                await anyio.sleep(SILENT_TASK_NOTE_S)
                if seen == 0:
                    print(style.dim(f"no event of task {task_id} yet: waiting for it (is the "
                                    "id right? submitted yet?)"), file=sys.stderr, flush=True)

            if task_id is not None:
                tg.start_soon(note_silence)
            async for message in receive:
                record = decode_record(message.data)
                event = decode_event(record.event)
                if as_json:
                    print(json.dumps({"position": record.position, **event}), flush=True)
                else:
                    style.out(_coloured(style, event["kind"], describe(record, event)))
                seen += 1
                if until_closed and event["kind"] in _CLOSED and event["key"] == task_id:
                    outcome = _CLOSED[event["kind"]]
                if outcome is not None or (limit is not None and seen >= limit):
                    tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    except KeyboardInterrupt:
        return 130
    return outcome or 0


__all__ = ["Style", "UsageError", "parse_payload", "submit_command", "tail_command"]

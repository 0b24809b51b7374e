"""The audit view of one task: its timeline, who handed it to whom, and why."""

from __future__ import annotations

from typing import Any

import msgspec

from coordinator.ledger.events import (
    Kind,
    LedgerEvent,
    principal_aggregate_id,
    task_aggregate_id,
)
from coordinator.ledger.hashcheck import log_pages
from coordinator.ledger.replay import first_broken, replay
from coordinator.ledger.store import Ledger, LedgerError
from ledgermesh.style import Style

SUMMARY_CHARS = 90  # of a timeline line's summary on a terminal (--json keeps them whole)


class TimelineEntry(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    kind: str
    actor: str
    to: str | None
    summary: str
    msg_id: str
    recorded_at: str


class Hop(msgspec.Struct, frozen=True, kw_only=True):
    """One assignment of the task: who got it, and how."""

    agent: str
    via: str  # "submit", "handoff", "declined" (handed back) or "retry"
    note: str  # why: the decline and its reason, or what ended the attempt retried
    version: int  # the assignment's place in the task's history


class Denial(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    agent: str
    tool: str
    rule: str
    because: str  # what put the labels on the task the rule looked at, if anything did


class Audit(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    status: str
    events: int
    attempts: int
    agents: list[str]
    chain_ok: bool
    chain_problem: str | None
    broken_from: int | None = None  # the first version the chain does not vouch for
    submitter: str
    path: list[Hop]
    denials: list[Denial]
    timeline: list[TimelineEntry]


def audit_task(ledger: Ledger, task_id: str) -> Audit:
    history = ledger.history(task_aggregate_id(task_id))
    if not history:
        raise LedgerError(f"no task {task_id!r} in this ledger{_refused_naming(ledger, task_id)}"
                          " (list the ledger's tasks: ledgermesh audit --ledger …)")
    broken = first_broken(history)
    problem = None if broken is None else (
        f"version {broken[0].originator_version} ({broken[0].kind}): {broken[1]}")
    timeline = [entry for event in history if (entry := _readable_entry(event)) is not None]
    status = "open"
    agents: list[str] = []
    attempts = 0
    try:
        for event in history:
            if event.kind == Kind.ASSIGNED:
                attempts = event.data["attempt"]
                if event.data["agent"] not in agents:
                    agents.append(event.data["agent"])
            elif event.kind == Kind.COMPLETED:
                status = "completed"
            elif event.kind == Kind.FAILED:
                status = "failed"
        path, denials = _path(history), _denials(history)
    except _UNFOLDABLE:
        if broken is None:
            raise  # data the coordinator wrote and cannot read back: a bug, not an edit
        path, denials = [], []  # an edited record: its timeline says where
    return Audit(task_id=task_id, status=status, events=len(history), attempts=attempts,
                 agents=agents, chain_ok=problem is None, chain_problem=problem,
                 broken_from=None if broken is None else broken[0].originator_version,
                 submitter=history[0].sender, path=path, denials=denials,
                 timeline=timeline)


# What reading an event's data as its kind says raises when the data is not that kind's.
_UNFOLDABLE = (KeyError, TypeError, ValueError, AttributeError)


def _readable_entry(event: LedgerEvent) -> TimelineEntry | None:
    try:
        return _entry(event)
    except _UNFOLDABLE as exc:
        return TimelineEntry(version=event.originator_version, kind=event.kind,
                             actor=event.sender, to=None,
                             summary=f"(its data does not fit its kind: {type(exc).__name__} "
                                     f"{exc})", msg_id=event.msg_id,
                             recorded_at=event.recorded_at)


def _refused_naming(ledger: Ledger, task_id: str) -> str:
    """What the ledger refused that named this task (a submission rejected, an operator's
    command on a task that did not exist): recorded on the sender's record, not a task's."""
    found: list[str] = []
    for rows in log_pages(ledger, ledger.last_position(), 2000):
        for position, _, _, _, state in rows:
            if b'"message.rejected"' not in state:
                continue  # (a byte search: most events are not rejections)
            try:
                event = msgspec.json.decode(state)
            except msgspec.DecodeError:
                continue  # a damaged row: replay --verify is the place to say so
            data = event.get("data") if isinstance(event, dict) else None
            if (isinstance(data, dict) and event.get("kind") == Kind.REJECTED
                    and data.get("task_id") == task_id):
                found.append(f"position {position}, from {event.get('sender')}: "
                             f"{data.get('code')}: {data.get('reason')}")
    if not found:
        return ""
    shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
    return f"; the ledger refused {len(found)} message(s) naming it ({shown})"


class TaskLine(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    status: str
    assignments: int
    agents: list[str]  # every agent assigned, in order
    submitter: str
    title: str


class RecordLine(msgspec.Struct, frozen=True, kw_only=True):
    """One event of a principal's own record: what it said that was refused, its
    suspensions and resumptions, the messages its rate limit dropped."""

    version: int
    kind: str
    summary: str
    recorded_at: str


class TaskList(msgspec.Struct, frozen=True, kw_only=True):
    tasks: list[TaskLine]  # in the order they were submitted
    total: int  # tasks in the ledger (``tasks`` may be one agent's)
    chains_ok: bool
    first_break: str | None
    record: list[RecordLine] = []  # with --agent: the agent's own record


def list_tasks(ledger: Ledger, agent: str | None = None) -> TaskList:
    """Every task (or every task ``agent`` was assigned), from a replay of the ledger,
    which also verifies it."""
    result = replay(ledger)
    lines = [TaskLine(task_id=t.task_id, status=t.status, assignments=t.attempt,
                      agents=list(t.participants), submitter=t.submitter, title=t.title)
             for t in result.tasks.values()
             if agent is None or agent in t.participants]
    first = result.breaks[0] if result.breaks else None
    record = [] if agent is None else [
        line for event in ledger.history(principal_aggregate_id(agent))
        if (line := _record_line(event)) is not None]
    return TaskList(tasks=lines, total=len(result.tasks), chains_ok=first is None,
                    first_break=None if first is None else (
                        f"position {first.position} ({first.aggregate} {first.key}, event "
                        f"{first.kind}): {first.problem}"),
                    record=record)


def _record_line(event: LedgerEvent) -> RecordLine | None:
    data: dict[str, Any] = event.data
    if event.kind == Kind.REJECTED:
        # (an agent command names no task: "-")
        on = f" on task {data['task_id']}" if data.get("task_id") not in (None, "-") else ""
        summary = f"refused{on}: {data['code']}: {data['reason']}"
    elif event.kind == Kind.SUSPENDED:
        summary = f"suspended by {data['by']}: {data['reason'] or '(no reason given)'}"
    elif event.kind == Kind.RESUMED:
        summary = f"resumed by {data['by']}"
    elif event.kind == Kind.THROTTLED:
        summary = (f"rate limit dropped {data['count']} message(s) from {data['since']} "
                   f"to {data['until']}")
    else:
        return None
    return RecordLine(version=event.originator_version, kind=event.kind, summary=summary,
                      recorded_at=event.recorded_at)


def render_tasks(listed: TaskList, style: Style, agent: str | None) -> list[str]:
    whose = f" assigned to {agent}" if agent is not None else ""
    chains = (style.green("chains verified ✓") if listed.chains_ok
              else style.red(f"chains NOT verified ✗: {listed.first_break}"))
    lines = [f"{len(listed.tasks)} of {listed.total} tasks{whose}; {chains}"]
    if not listed.tasks:
        return lines + _render_record(listed.record, style, agent)
    width = max(len(t.task_id) for t in listed.tasks)
    lines.append(style.bold(f"{'TASK':<{width}}  {'STATUS':<9}  {'ASSIGNED':>8}  "
                            f"{'AGENTS':<40}  TITLE"))
    for t in listed.tasks:
        lines.append(f"{t.task_id:<{width}}  {t.status:<9}  {t.assignments:>8}  "
                     f"{_clip(' → '.join(t.agents), 40):<40}  {_quote(t.title, 60)}")
    lines.append("see one: ledgermesh audit TASK_ID --ledger …")
    return lines + _render_record(listed.record, style, agent)


def _render_record(record: list[RecordLine], style: Style, agent: str | None) -> list[str]:
    if agent is None:
        return []
    if not record:
        return [f"{agent}'s own record: nothing refused, never suspended"]
    lines = [f"{agent}'s own record ({len(record)} events):"]
    for r in record:
        text = f"  {r.recorded_at[:19]}  {_clip(r.summary, SUMMARY_CHARS)}"
        lines.append(style.yellow(text) if r.kind != Kind.RESUMED else text)
    return lines


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _path(history: list[LedgerEvent]) -> list[Hop]:
    """Every assignment, with what led to it (the events just before it say)."""
    hops: list[Hop] = []
    via, note = "submit", ""
    for event in history:
        data = event.data
        if event.kind == Kind.HANDOFF_REQUESTED:
            via, note = "handoff", ""
        elif event.kind == Kind.HANDOFF_DECLINED:
            via, note = "declined", f"declined: {data['reason']}"
        elif event.kind == Kind.TIMED_OUT:  # (the note says why the hop after it was made)
            via, note = "retry", "after a timeout"
        elif event.kind == Kind.ATTEMPT_FAILED:
            via, note = "retry", f"after a failure: {data.get('reason', '')}".rstrip(": ")
        elif event.kind == Kind.ASSIGNED:
            hops.append(Hop(agent=data["agent"], via=via, note=note,
                            version=event.originator_version))
    return hops


def _denials(history: list[LedgerEvent]) -> list[Denial]:
    """Refused tool calls, each with the tool result that labelled the task, if any."""
    callers: dict[str, str] = {}
    labelled: dict[str, str] = {}  # label -> "tool #version" that first put it on the task
    out: list[Denial] = []
    for event in history:
        data = event.data
        if event.kind == Kind.TOOL_REQUESTED:
            callers[data["call_id"]] = event.sender
        elif event.kind == Kind.TOOL_COMPLETED:
            tool = data.get("tool") or _tool_of(history, data["call_id"])
            for label in data.get("labels", []):
                labelled.setdefault(label, f"{tool} #{event.originator_version}")
        elif event.kind == Kind.TOOL_DENIED:
            sources = [f"{label} by {labelled[label]}" for label in data["task_labels"]
                       if label in labelled]
            out.append(Denial(version=event.originator_version,
                              agent=callers.get(data["call_id"], "?"), tool=data["tool"],
                              rule=data["rule"], because=", ".join(sources)))
    return out


def _tool_of(history: list[LedgerEvent], call_id: str) -> str:
    return next((e.data["tool"] for e in history
                 if e.kind == Kind.TOOL_REQUESTED and e.data["call_id"] == call_id), "?")


def _entry(event: LedgerEvent) -> TimelineEntry | None:
    data: dict[str, Any] = event.data
    kind = event.kind
    to: str | None = None
    if kind == Kind.SUBMITTED:
        label, to, summary = "submit", data["to"], _quote(data["title"])
    elif kind == Kind.SAID:
        label, summary = "say", _quote(data["text"])
    elif kind == Kind.HANDOFF_REQUESTED:
        label, to, summary = "handoff", data["to"], f"reason: {data['reason']}"
    elif kind == Kind.HANDOFF_ACCEPTED:
        how = "implicitly (started work)" if data.get("implicit") else "explicitly"
        label, summary = "accepted", how
    elif kind == Kind.HANDOFF_DECLINED:
        label, to, summary = "declined", data["to"], f"reason: {data['reason']}"
    elif kind == Kind.COMPLETED:
        label, summary = "complete", _quote(data["result"])
    elif kind == Kind.FAILED:
        label, summary = "fail", f"reason: {data['reason']}"
    elif kind == Kind.REJECTED:
        label, summary = "REJECTED", f"{data['code']}: {data['reason']}"
    elif kind == Kind.TIMED_OUT:
        label, summary = "timeout", (f"{data['agent']} missed its deadline (try "
                                     f"{data['tries']} of this step)" + _retry(data))
    elif kind == Kind.ATTEMPT_FAILED:
        label, summary = "failed", (f"try {data['tries']} of this step: {data['reason']}"
                                    + _retry(data))
    elif kind == Kind.DEAD_LETTERED:
        label, summary = "DEADLETTER", data["reason"]
    elif kind == Kind.TOOL_REQUESTED:
        label, summary = "tool", f"{data['tool']} {_args(data['args'])}"
    elif kind == Kind.TOOL_AUTHORIZED:  # (recorded without its grounds before they were)
        label, summary = "allowed", f"{data['tool']} — {data.get('grounds', 'by the policy')}"
    elif kind == Kind.TOOL_DENIED:
        label, summary = "DENIED", f"{data['tool']} — {data['rule']}: {data['reason']}"
    elif kind == Kind.TOOL_COMPLETED:
        outcome = data["outcome"]
        label = "result"
        summary = ("ok" if outcome["ok"] else f"error {outcome['error']['type']}: "
                   f"{outcome['error']['message']}")
        if data.get("labels"):
            summary += f"  (labels the task {', '.join(data['labels'])})"
    elif kind == Kind.TOOL_APPROVED:
        label, summary = "approved", f"{data['tool']}: {data['reason'] or '(no reason)'}"
    else:
        return None  # assignments are shown through the handoffs that caused them
    actor = data.get("by", event.sender) if kind == Kind.HANDOFF_ACCEPTED else event.sender
    return TimelineEntry(version=event.originator_version, kind=label, actor=actor, to=to,
                         summary=summary, msg_id=event.msg_id, recorded_at=event.recorded_at)


def _retry(data: dict[str, Any]) -> str:
    return " — retry scheduled" if data.get("retry_at") else " — no retries left"


def _args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def _quote(text: str, limit: int | None = None) -> str:
    """Quoted; cut to ``limit`` characters if given (summaries are whole: --json keeps
    them so, the terminal view cuts each line)."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return f'"{text}"'


def render_audit(audit: Audit, style: Style, indent: str = "") -> list[str]:
    chain = (style.green("chain ✓") if audit.chain_ok
             else style.red(f"chain BROKEN: {audit.chain_problem}"))
    lines = [f"{indent}{style.bold(audit.task_id)}  {audit.status} after {audit.attempts} "
             f"assignments across {len(audit.agents)} agents, {audit.events} events, {chain}",
             f"{indent}path: {_render_path(audit, style)}"]
    for d in audit.denials:
        because = f"; task labelled {d.because}" if d.because else ""
        lines.append(f"{indent}{style.red('denied')}: {d.agent} → tool {d.tool} "
                     f"(#{d.version}, {d.rule}{because})")
    for e in audit.timeline:
        arrow = f"→ {e.to:<11}" if e.to else " " * 13
        kind = f"{e.kind:<10}"
        if e.kind in ("REJECTED", "DENIED", "DEADLETTER"):
            kind = style.red(kind)
        elif e.kind in ("declined", "timeout", "failed"):
            kind = style.yellow(kind)
        # From the first broken link on, nothing the chain vouches for: marked, not hidden.
        unsure = audit.broken_from is not None and e.version >= audit.broken_from
        mark = style.red("✗") if unsure else " "
        summary = _clip(e.summary, SUMMARY_CHARS)
        lines.append(f"{indent}#{e.version:<3}{mark} {e.actor:<11}{arrow}{kind} {summary}")
    if audit.broken_from is not None:
        lines.append(style.red(f"{indent}✗ not vouched for by the chain: version "
                               f"{audit.broken_from} on (`ledgermesh replay --verify` "
                               "tells more)"))
    return lines


_VIA = {"submit": "→", "handoff": "→", "declined": "↩", "retry": "⟳"}


def _render_path(audit: Audit, style: Style) -> str:
    """``client → triage → researcher ⟳ researcher (after a timeout) → … ✓ completed``."""
    parts = [audit.submitter]
    for hop in audit.path:
        note = f" ({hop.note})" if hop.note else ""
        text = f"{_VIA.get(hop.via, '→')} {hop.agent}{note}"
        parts.append(style.yellow(text) if hop.via in ("declined", "retry") else text)
    end = {"completed": style.green("✓ completed"), "failed": style.red("✗ failed")}
    parts.append(end.get(audit.status, f"… {audit.status}"))
    return " ".join(parts)

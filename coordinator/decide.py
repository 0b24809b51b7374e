"""Pure decisions: given a task's state and one intake message (or the clock reaching a
deadline), which events to record.

No I/O, no clock of its own: ``now`` is an argument, and every decision — a deadline, a
retry, a dead letter — is recorded as an event, so replay folds decisions, never re-makes
them.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from typing import Any

import msgspec

from coordinator.ledger.events import Aggregate, Draft, Kind, Provenance, delivery_id
from coordinator.ledger.state import TaskState
from coordinator.policy import Policy
from schemas import (
    ApproveTool,
    Complete,
    Delivery,
    Envelope,
    Fail,
    Failure,
    HandoffDecision,
    HandoffRequest,
    ResumeAgent,
    Say,
    SubmitTask,
    SuspendAgent,
    ToolCall,
    ToolInvocation,
    ToolOutcome,
)

COORDINATOR = "coordinator"


class Rejection(msgspec.Struct, frozen=True):
    code: str
    reason: str


def reject_unreadable(principal: str, msg_id: str, raw: bytes, reason: str,
                      code: str = "malformed") -> list[Draft]:
    """Bytes that are not an envelope: recorded against the subject they arrived on."""
    provenance = Provenance(msg_id=msg_id, sender=principal, raw=_b64(raw))
    data = {"code": code, "reason": reason, "subject_principal": principal}
    return [Draft(aggregate=Aggregate.PRINCIPAL, key=principal, kind=Kind.REJECTED,
                  data=data, provenance=provenance)]


def decide(principal: str, raw: bytes, env: Envelope, task: TaskState | None,
           policy: Policy, now: datetime, msg_id: str | None = None,
           suspended: frozenset[str] = frozenset()) -> list[Draft]:
    """Events for one decoded envelope that arrived on ``principal``'s intake subject.

    ``msg_id`` is the Nats-Msg-Id it arrived with: it must be the envelope id, since
    JetStream deduplicates on one and the ledger on the other.
    """
    if (task is not None and env.id in task.seen and env.sender == principal
            and (principal in task.participants or principal == task.submitter
                 or principal in policy.operators)):
        return []  # already recorded: a redelivery or a resend by its own sender
    # (anyone else reusing a recorded id falls through and is rejected, with a trace)
    said = Provenance(msg_id=env.id, sender=env.sender, sent_at=env.sent_at.isoformat(),
                      causation_id=env.causation_id, trace=env.trace, raw=_b64(raw))
    if isinstance(env.body, SuspendAgent | ResumeAgent | ApproveTool):
        return _operator(principal, env, task, policy, msg_id, said, suspended)
    problem = _check(principal, env, task, policy, msg_id, suspended)
    if problem is None and isinstance(env.body, ToolCall):
        problem = Rejection("wrong_channel", "tool calls go to the tool gateway "
                                             f"(<prefix>.toolcall.{principal}), not to intake")
    if problem is not None:
        return [_rejected(principal, env, task, problem, said)]
    labels = {"labels": list(env.labels)} if env.labels else {}
    decided = Provenance(msg_id=env.id, sender=COORDINATOR, causation_id=env.id,
                         trace=env.trace)

    def event(kind: str, data: dict[str, Any], provenance: Provenance = said) -> Draft:
        return Draft(aggregate=Aggregate.TASK, key=env.task_id, kind=kind, data=data,
                     provenance=provenance)

    body = env.body
    if isinstance(body, SubmitTask):
        first = event(Kind.SUBMITTED, {"to": body.to, "title": body.title,
                                       "input": body.payload, **labels})
        assign = _assign(env, body.to, attempt=1, tries=1, title=body.title,
                         input=body.payload, labels=list(env.labels), policy=policy, now=now)
        return [first, event(Kind.ASSIGNED, assign, decided)]

    assert task is not None  # _check rejects every other body on an unknown task
    out: list[Draft] = []
    offer = task.offer
    if offer is not None and not isinstance(body, HandoffDecision):
        # Any output from the receiver of a handoff is its acceptance.
        out.append(event(Kind.HANDOFF_ACCEPTED, {"request_id": offer.request_id,
                                                 "by": env.sender, "implicit": True}, decided))
    def onward(agent: str) -> dict[str, Any]:
        """The next step's assignment: a new attempt, first try."""
        return _assign(env, agent, attempt=task.attempt + 1, tries=1, title=task.title,
                       input=task.input, labels=_merge(task.labels, env.labels),
                       policy=policy, now=now)

    if isinstance(body, HandoffDecision):
        assert offer is not None
        if body.accept:
            out.append(event(Kind.HANDOFF_ACCEPTED, {"request_id": offer.request_id,
                                                     "by": env.sender, "implicit": False,
                                                     **labels}))
        else:
            out.append(event(Kind.HANDOFF_DECLINED, {"request_id": offer.request_id,
                                                     "reason": body.reason, "to": offer.by,
                                                     **labels}))
            out.append(event(Kind.ASSIGNED, onward(offer.by), decided))
    elif isinstance(body, Say):
        out.append(event(Kind.SAID, {"text": body.text, **labels}))
    elif isinstance(body, HandoffRequest):
        out.append(event(Kind.HANDOFF_REQUESTED, {"to": body.to, "reason": body.reason,
                                                  "payload": body.payload, **labels}))
        out.append(event(Kind.ASSIGNED, onward(body.to), decided))
    elif isinstance(body, Complete):
        out.append(event(Kind.COMPLETED, {"result": body.result, "payload": body.payload,
                                          **labels}))
    elif isinstance(body, Fail):
        out += _failed_attempt(task, policy, now, body.reason, body.retryable,
                               first=event(Kind.ATTEMPT_FAILED, {}), decided=decided)
    return out


def _operator(principal: str, env: Envelope, task: TaskState | None, policy: Policy,
              msg_id: str | None, said: Provenance,
              suspended: frozenset[str] = frozenset()) -> list[Draft]:
    """Operator commands: approvals on a task, suspending and resuming agents."""
    body = env.body
    problem = None
    if env.sender != principal:
        problem = Rejection("spoofed_sender", f"envelope says sender {env.sender!r} but "
                                              f"arrived on {principal!r}'s subject")
    elif msg_id is not None and msg_id != env.id:
        problem = Rejection("msg_id_mismatch", f"Nats-Msg-Id {msg_id!r} is not the envelope "
                                               f"id {env.id!r}")
    elif principal not in policy.operators:
        problem = Rejection("not_operator", f"{principal!r} is not an operator "
                                            "(policy: operators)")
    elif isinstance(body, ApproveTool) and (task is None or not task.is_open):
        problem = Rejection("unknown_task", f"no open task {env.task_id} to approve a tool on")
    elif isinstance(body, ApproveTool) and body.tool not in policy.tools:
        problem = Rejection("unknown_tool", f"no tool named {body.tool!r} in the policy")
    elif isinstance(body, ApproveTool) and not policy.tools[body.tool].privileged:
        problem = Rejection("not_privileged", f"{body.tool} is not privileged: the policy "
                                              "needs no approval to call it")
    elif isinstance(body, SuspendAgent | ResumeAgent) and not policy.is_agent(body.agent):
        problem = Rejection("unknown_agent", f"no agent named {body.agent!r} in the policy")
    elif isinstance(body, SuspendAgent) and body.agent in suspended:
        problem = Rejection("already_suspended", f"{body.agent} is suspended already")
    elif isinstance(body, ResumeAgent) and body.agent not in suspended:
        problem = Rejection("not_suspended", f"{body.agent} is not suspended")
    if problem is not None:
        return [_rejected(principal, env, None, problem, said)]
    if isinstance(body, ApproveTool):
        return [Draft(aggregate=Aggregate.TASK, key=env.task_id, kind=Kind.TOOL_APPROVED,
                      data={"tool": body.tool, "reason": body.reason}, provenance=said)]
    assert isinstance(body, SuspendAgent | ResumeAgent)
    kind = Kind.SUSPENDED if isinstance(body, SuspendAgent) else Kind.RESUMED
    return [Draft(aggregate=Aggregate.PRINCIPAL, key=body.agent, kind=kind,
                  data={"reason": body.reason, "by": principal}, provenance=said)]


def decide_suspension(task: TaskState, agent: str, reason: str, cause: str) -> list[Draft]:
    """A suspended agent's open task fails: nobody else may silently take over its work."""
    if not task.is_open or task.owner != agent:
        return []
    provenance = Provenance(msg_id=f"{cause}:{task.task_id}", sender=COORDINATOR,
                            causation_id=cause)
    return [Draft(aggregate=Aggregate.TASK, key=task.task_id, kind=Kind.FAILED,
                  data={"reason": f"owner {agent} was suspended: {reason}",
                        "retryable": False}, provenance=provenance)]


def decide_throttled(principal: str, count: int, since: datetime,
                     now: datetime) -> list[Draft]:
    """One event for a flood: how many messages the rate limit dropped, and when."""
    provenance = Provenance(msg_id=f"throttled:{principal}:{since.isoformat()}",
                            sender=COORDINATOR)
    return [Draft(aggregate=Aggregate.PRINCIPAL, key=principal, kind=Kind.THROTTLED,
                  data={"count": count, "since": since.isoformat(),
                        "until": now.isoformat()}, provenance=provenance)]


class ToolVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway does with a tool call once its decision is recorded."""

    answer: ToolOutcome | None = None  # answer this now (denied, or answered before)
    run: ToolInvocation | None = None  # otherwise run this and record the outcome


def decide_tool_call(principal: str, raw: bytes, env: Envelope, task: TaskState | None,
                     policy: Policy, suspended: frozenset[str]
                     ) -> tuple[list[Draft], ToolVerdict]:
    """Authorize a tool call and say what to record; a repeated call id gets its answer."""
    assert isinstance(env.body, ToolCall)
    call = env.body
    if (task is not None and env.id in task.tool_calls and env.sender == principal
            and principal in task.participants):
        # Only the caller itself hears a recorded answer again (it may contain anything).
        answer = recorded_answer(task.tool_calls[env.id])
        if answer is not None:
            return [], ToolVerdict(answer=answer)
        # Authorized but never answered (a crash in between): run it again, same key.
        return [], ToolVerdict(run=_invocation(env, call, task))
    said = Provenance(msg_id=env.id, sender=env.sender, sent_at=env.sent_at.isoformat(),
                      causation_id=env.causation_id, trace=env.trace, raw=_b64(raw))
    problem = _check(principal, env, task, policy, None, suspended)
    if problem is not None:
        return ([_rejected(principal, env, task, problem, said)],
                ToolVerdict(answer=_denied(problem.code, problem.reason)))
    assert task is not None
    decided = Provenance(msg_id=env.id, sender=COORDINATOR, causation_id=env.id,
                         trace=env.trace)
    accepted = [] if task.offer is None else [Draft(
        aggregate=Aggregate.TASK, key=env.task_id, kind=Kind.HANDOFF_ACCEPTED,
        data={"request_id": task.offer.request_id, "by": env.sender, "implicit": True},
        provenance=decided)]
    requested = Draft(aggregate=Aggregate.TASK, key=env.task_id, kind=Kind.TOOL_REQUESTED,
                      data={"call_id": env.id, "tool": call.tool, "args": call.args},
                      provenance=said)
    denial = policy.tool_denial(env.sender, call.tool, call.args, task.labels, task.approvals,
                                env.task_id)
    if denial is not None:
        rule, reason = denial
        denied = Draft(aggregate=Aggregate.TASK, key=env.task_id, kind=Kind.TOOL_DENIED,
                       data={"call_id": env.id, "tool": call.tool, "rule": rule,
                             "reason": reason, "task_labels": list(task.labels)},
                       provenance=decided)
        return [*accepted, requested, denied], ToolVerdict(answer=_denied(rule, reason))
    authorized = Draft(aggregate=Aggregate.TASK, key=env.task_id, kind=Kind.TOOL_AUTHORIZED,
                       data={"call_id": env.id, "tool": call.tool, "args": call.args,
                             "grounds": policy.tool_grounds(env.sender, call.tool,
                                                            task.labels)},
                       provenance=decided)
    return [*accepted, requested, authorized], ToolVerdict(run=_invocation(env, call, task))


def recorded_answer(known: dict[str, Any]) -> ToolOutcome | None:
    """The answer a tool call's record gives (``TaskState.tool_calls[call_id]``); None
    while it has none (authorized and not answered, or answered by a retryable failure)."""
    if known["state"] == "done":
        return msgspec.convert(known["outcome"], ToolOutcome)
    if known["state"] == "denied":
        return _denied(known["rule"], known["reason"])
    return None


def decide_tool_result(task: TaskState, call_id: str, outcome: ToolOutcome,
                       untrusted: bool) -> list[Draft]:
    """Record a tool's answer; an untrusted tool's result labels the task."""
    labels = list(outcome.labels)
    if untrusted and "untrusted" not in labels:
        labels.append("untrusted")
    recorded = msgspec.to_builtins(ToolOutcome(ok=outcome.ok, result=outcome.result,
                                               error=outcome.error, labels=tuple(labels)))
    provenance = Provenance(msg_id=f"{call_id}:result", sender=COORDINATOR,
                            causation_id=call_id)
    return [Draft(aggregate=Aggregate.TASK, key=task.task_id, kind=Kind.TOOL_COMPLETED,
                  data={"call_id": call_id, "outcome": recorded, "labels": labels},
                  provenance=provenance)]


def _invocation(env: Envelope, call: ToolCall, task: TaskState) -> ToolInvocation:
    return ToolInvocation(call_id=env.id, tool=call.tool, task_id=env.task_id,
                          agent=env.sender, args=call.args, labels=tuple(task.labels))


def _denied(rule: str, reason: str) -> ToolOutcome:
    return ToolOutcome(ok=False, error=Failure(type="denied", message=f"{rule}: {reason}"))


def decide_timer(task: TaskState, policy: Policy, now: datetime) -> list[Draft]:
    """What the clock reaching a task's deadline or retry time decides, if anything."""
    decided = Provenance(msg_id=f"timer:{task.task_id}:{task.attempt}:{task.tries}",
                         sender=COORDINATOR,
                         causation_id=(task.cause or {}).get("envelope", {}).get("id"))
    if task.status == "assigned" and task.deadline is not None \
            and datetime.fromisoformat(task.deadline) <= now:
        assert task.owner is not None
        first = Draft(aggregate=Aggregate.TASK, key=task.task_id, kind=Kind.TIMED_OUT,
                      data={}, provenance=decided)
        # (No attempt number in the words: the data has it, and the task-wide count read
        # next to "after 3 of 3 attempts", which counts the step's tries, misled.)
        reason = f"{task.owner} did not finish by {task.deadline}"
        if task.refused is not None:  # the likely why: its way out of the task was refused
            reason += f"; its last output was refused ({task.refused})"
        return _failed_attempt(task, policy, now, reason, True, first=first, decided=decided)
    if task.status == "retrying" and task.retry_at is not None \
            and datetime.fromisoformat(task.retry_at) <= now and task.cause is not None:
        cause = msgspec.convert(task.cause["envelope"], Envelope, strict=False)
        retry = _assign(cause, task.cause["agent"], attempt=task.attempt + 1,
                        tries=task.tries + 1, title=task.title, input=task.input,
                        labels=list(task.labels), policy=policy, now=now)
        provenance = Provenance(msg_id=f"{decided.msg_id}:retry", sender=COORDINATOR,
                                causation_id=cause.id)
        return [Draft(aggregate=Aggregate.TASK, key=task.task_id, kind=Kind.ASSIGNED,
                      data=retry, provenance=provenance)]
    return []


def _failed_attempt(task: TaskState, policy: Policy, now: datetime, reason: str,
                    retryable: bool, *, first: Draft, decided: Provenance) -> list[Draft]:
    """An attempt ended without a result: retry after a backoff, or dead-letter the task."""
    agent = task.owner or ""
    limit = policy.agents[agent].max_attempts if agent in policy.agents else 1
    again = retryable and task.tries < limit
    retry_at = (now + timedelta(seconds=policy.retry_delay(task.tries))).isoformat() \
        if again else None
    data = {"agent": agent, "attempt": task.attempt, "tries": task.tries, "reason": reason,
            "retryable": retryable, "retry_at": retry_at}
    out = [Draft(aggregate=first.aggregate, key=first.key, kind=first.kind, data=data,
                 provenance=first.provenance)]
    if not again:
        why = (f"{reason} (not retryable)" if not retryable
               else f"{reason} (after {task.tries} of {limit} attempts)")
        for kind, extra in ((Kind.DEAD_LETTERED, {"agent": agent, "tries": task.tries}),
                            (Kind.FAILED, {"retryable": False})):
            out.append(Draft(aggregate=Aggregate.TASK, key=task.task_id, kind=kind,
                             data={"reason": why, **extra},
                             provenance=Provenance(msg_id=decided.msg_id, sender=COORDINATOR,
                                                   causation_id=decided.causation_id)))
    return out


def _check(principal: str, env: Envelope, task: TaskState | None, policy: Policy,
           msg_id: str | None, suspended: frozenset[str] = frozenset()) -> Rejection | None:
    """Why this envelope must not be recorded as said, or None if it may."""
    if env.sender != principal:
        return Rejection("spoofed_sender",
                         f"envelope says sender {env.sender!r} but arrived on {principal!r}'s "
                         "subject")
    if msg_id is not None and msg_id != env.id:
        return Rejection("msg_id_mismatch",
                         f"Nats-Msg-Id {msg_id!r} is not the envelope id {env.id!r}")
    if principal in suspended:
        return Rejection("suspended", f"{principal} is suspended: its output is refused")
    body = env.body
    if isinstance(body, SubmitTask):
        if task is not None:
            return Rejection("task_exists", f"task {env.task_id} was already submitted")
        if not policy.may_submit(principal):
            return Rejection("submit_denied", f"{principal!r} may not submit tasks")
        if not policy.is_agent(body.to):
            return Rejection("unknown_agent", f"no agent named {body.to!r} in the policy")
        if body.to in suspended:
            return Rejection("agent_suspended", f"{body.to} is suspended")
        return None
    if task is None:
        return Rejection("unknown_task", f"no task {env.task_id}")
    if not task.is_open:
        return Rejection("task_closed", f"task {env.task_id} is already {task.status}")
    if task.owner != env.sender:
        return Rejection("not_owner", f"{env.sender!r} does not own task {env.task_id} "
                                      f"(owner: {task.owner})")
    if env.attempt != task.attempt or task.status != "assigned":
        return Rejection("stale_attempt", f"output for attempt {env.attempt}; the current "
                                          f"attempt is {task.attempt} ({task.status})")
    if isinstance(body, HandoffDecision) and task.offer is None:
        return Rejection("no_pending_handoff", "there is no handoff to accept or decline")
    if isinstance(body, HandoffRequest):
        if not policy.is_agent(body.to):
            return Rejection("unknown_agent", f"no agent named {body.to!r} in the policy")
        if not policy.may_hand_off(env.sender, body.to):
            return Rejection("handoff_denied",
                             f"policy does not allow {env.sender} to hand off to {body.to}")
        if body.to in suspended:
            return Rejection("agent_suspended", f"{body.to} is suspended")
    return None


def _rejected(principal: str, env: Envelope, task: TaskState | None, problem: Rejection,
              said: Provenance) -> Draft:
    """Record a rejection on the task only if an authenticated participant caused it.

    Otherwise anybody could append to any task's chain; it goes on the principal's record.
    """
    data = {"code": problem.code, "reason": problem.reason, "subject_principal": principal,
            "claimed_sender": env.sender, "task_id": env.task_id}
    on_task = (task is not None and env.sender == principal
               and (principal in task.participants or principal == task.submitter))
    provenance = Provenance(msg_id=said.msg_id, sender=principal, sent_at=said.sent_at,
                            causation_id=said.causation_id, trace=said.trace, raw=said.raw)
    return Draft(aggregate=Aggregate.TASK if on_task else Aggregate.PRINCIPAL,
                 key=env.task_id if on_task else principal, kind=Kind.REJECTED, data=data,
                 provenance=provenance)


def _assign(cause: Envelope, agent: str, *, attempt: int, tries: int, title: str,
            input: dict[str, Any], labels: list[str], policy: Policy,
            now: datetime) -> dict[str, Any]:
    deadline_s = policy.agents[agent].deadline_s if agent in policy.agents else 30.0
    deadline = now + timedelta(seconds=deadline_s)
    delivery = Delivery(id=delivery_id(cause.id, agent, attempt), agent=agent,
                        task_id=cause.task_id, attempt=attempt, title=title, input=input,
                        envelope=cause, labels=tuple(labels), deadline=deadline)
    return {"agent": agent, "attempt": attempt, "tries": tries,
            "deadline": deadline.isoformat(), "delivery": msgspec.to_builtins(delivery)}


def _merge(labels: list[str], more: tuple[str, ...]) -> list[str]:
    return labels + [label for label in more if label not in labels]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")

"""Pure decisions: given a task's state and one intake message, which events to record.

No I/O, no clock: everything a decision depends on is an argument, so replay never has
to re-decide — it folds what was decided.
"""

from __future__ import annotations

import base64

import msgspec

from coordinator.ledger.events import Aggregate, Draft, Kind, Provenance, delivery_id
from coordinator.ledger.state import TaskState
from coordinator.policy import Policy
from schemas import (
    Complete,
    Delivery,
    Envelope,
    Fail,
    HandoffDecision,
    HandoffRequest,
    Say,
    SubmitTask,
    is_token,
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


def decide(
    principal: str, raw: bytes, env: Envelope, task: TaskState | None, policy: Policy
) -> list[Draft]:
    """Events for one decoded envelope that arrived on ``principal``'s intake subject."""
    if task is not None and env.id in task.seen:
        return []  # already recorded: a redelivery or a resend with the same id
    said = Provenance(
        msg_id=env.id,
        sender=env.sender,
        sent_at=env.sent_at.isoformat(),
        causation_id=env.causation_id,
        trace=env.trace,
        raw=_b64(raw),
    )
    problem = _check(principal, env, task, policy)
    if problem is not None:
        data = {"code": problem.code, "reason": problem.reason, "subject_principal": principal}
        on_task = task is not None
        return [Draft(aggregate=Aggregate.TASK if on_task else Aggregate.PRINCIPAL,
                      key=env.task_id if on_task else principal,
                      kind=Kind.REJECTED, data=data, provenance=said)]
    labels = {"labels": list(env.labels)} if env.labels else {}
    decided = Provenance(msg_id=env.id, sender=COORDINATOR, causation_id=env.id)

    def event(kind: Kind, data: dict[str, object], provenance: Provenance = said) -> Draft:
        return Draft(aggregate=Aggregate.TASK, key=env.task_id, kind=kind,
                     data=data, provenance=provenance)

    body = env.body
    if isinstance(body, SubmitTask):
        first = event(Kind.SUBMITTED, {"to": body.to, "title": body.title,
                                       "input": body.payload, **labels})
        assign = _assign(env, body.to, attempt=1, title=body.title, input=body.payload,
                         labels=list(env.labels))
        return [first, event(Kind.ASSIGNED, assign, decided)]

    assert task is not None  # _check rejects every other body on an unknown task
    out: list[Draft] = []
    offer = task.offer
    if offer is not None and not isinstance(body, HandoffDecision):
        # Any output from the receiver of a handoff is its acceptance.
        out.append(event(Kind.HANDOFF_ACCEPTED, {"request_id": offer.request_id,
                                                 "by": env.sender, "implicit": True}, decided))
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
            back = _assign(env, offer.by, attempt=task.attempt + 1, title=task.title,
                           input=task.input, labels=_merge(task.labels, env.labels))
            out.append(event(Kind.ASSIGNED, back, decided))
    elif isinstance(body, Say):
        out.append(event(Kind.SAID, {"text": body.text, **labels}))
    elif isinstance(body, HandoffRequest):
        out.append(event(Kind.HANDOFF_REQUESTED, {"to": body.to, "reason": body.reason,
                                                  "payload": body.payload, **labels}))
        onward = _assign(env, body.to, attempt=task.attempt + 1, title=task.title,
                         input=task.input, labels=_merge(task.labels, env.labels))
        out.append(event(Kind.ASSIGNED, onward, decided))
    elif isinstance(body, Complete):
        out.append(event(Kind.COMPLETED, {"result": body.result, "payload": body.payload,
                                          **labels}))
    elif isinstance(body, Fail):
        out.append(event(Kind.FAILED, {"reason": body.reason, "retryable": body.retryable,
                                       **labels}))
    return out


def _check(principal: str, env: Envelope, task: TaskState | None, policy: Policy) -> Rejection | None:
    """Why this envelope must not be recorded as said, or None if it may."""
    if env.sender != principal:
        return Rejection("spoofed_sender",
                         f"envelope says sender {env.sender!r} but arrived on {principal!r}'s subject")
    if not is_token(env.task_id):
        return Rejection("bad_task_id", f"task id {env.task_id!r} must be 1-128 letters, digits, '-' or '_'")
    body = env.body
    if isinstance(body, SubmitTask):
        if task is not None:
            return Rejection("task_exists", f"task {env.task_id} was already submitted")
        if not policy.may_submit(principal):
            return Rejection("submit_denied", f"{principal!r} may not submit tasks")
        if not policy.is_agent(body.to):
            return Rejection("unknown_agent", f"no agent named {body.to!r} in the policy")
        return None
    if task is None:
        return Rejection("unknown_task", f"no task {env.task_id}")
    if not task.is_open:
        return Rejection("task_closed", f"task {env.task_id} is already {task.status}")
    if task.owner != env.sender:
        return Rejection("not_owner", f"{env.sender!r} does not own task {env.task_id} "
                                      f"(owner: {task.owner})")
    if env.attempt != task.attempt:
        return Rejection("stale_attempt", f"output for attempt {env.attempt}, "
                                          f"current attempt is {task.attempt}")
    if isinstance(body, HandoffDecision) and task.offer is None:
        return Rejection("no_pending_handoff", "there is no handoff to accept or decline")
    if isinstance(body, HandoffRequest):
        if not policy.is_agent(body.to):
            return Rejection("unknown_agent", f"no agent named {body.to!r} in the policy")
        if not policy.may_hand_off(env.sender, body.to):
            return Rejection("handoff_denied",
                             f"policy does not allow {env.sender} to hand off to {body.to}")
    return None


def _assign(cause: Envelope, agent: str, *, attempt: int, title: str,
            input: dict[str, object], labels: list[str]) -> dict[str, object]:
    delivery = Delivery(id=delivery_id(cause.id, agent), agent=agent, task_id=cause.task_id,
                        attempt=attempt, title=title, input=input, envelope=cause,
                        labels=tuple(labels))
    return {"agent": agent, "attempt": attempt, "delivery": msgspec.to_builtins(delivery)}


def _merge(labels: list[str], more: tuple[str, ...]) -> list[str]:
    return labels + [label for label in more if label not in labels]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")

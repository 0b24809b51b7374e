"""The messages agents and the coordinator exchange.

Evolution rules (msgspec's schema-evolution): new fields get defaults, types never change,
unknown fields are ignored so that newer senders are still accepted.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec

# A JSON object. Kept as an alias so the JSON Schema reads "object" for payloads.
Payload = dict[str, Any]
# A name that becomes one subject token: agents, principals, task ids.
Name = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{1,128}$")]
# Stamped once by the sender; must carry its timezone (RFC 3339, e.g. ...Z).
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Attempt = Annotated[int, msgspec.Meta(ge=0)]


class _Body(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every body; the ``type`` tag selects the Struct."""


class SubmitTask(_Body, tag="task.submit", frozen=True, kw_only=True):
    """A client asks for a new task; ``to`` is the agent that starts it."""

    to: Name
    title: str
    payload: Payload = {}


class Say(_Body, tag="task.say", frozen=True, kw_only=True):
    """A note for the task's log (reasoning, progress, an answer draft)."""

    text: str


class HandoffRequest(_Body, tag="handoff.request", frozen=True, kw_only=True):
    """The owner of a task hands it to another agent, which may decline it."""

    to: Name
    reason: str
    payload: Payload = {}


class HandoffDecision(_Body, tag="handoff.decision", frozen=True, kw_only=True):
    """The receiver's answer to a handoff. Any other output implies acceptance."""

    accept: bool
    reason: str = ""


class Complete(_Body, tag="task.complete", frozen=True, kw_only=True):
    """The owner finished the task."""

    result: str
    payload: Payload = {}


class Fail(_Body, tag="task.fail", frozen=True, kw_only=True):
    """The owner gives the task up. ``retryable`` lets the coordinator try again."""

    reason: str
    retryable: bool = False


# A tool's name: dotted lowercase words, e.g. "kb.search" (it becomes subject tokens).
ToolName = Annotated[str, msgspec.Meta(pattern="^[a-z0-9_-]{1,64}(\\.[a-z0-9_-]{1,64}){0,4}$")]


class ToolCall(_Body, tag="tool.call", frozen=True, kw_only=True):
    """The owner asks for a tool to run. Sent to the coordinator's tool gateway, not to
    intake: the gateway authorizes, records, runs and answers with a ``ToolOutcome``.
    The envelope id is the idempotency key: a retried call never runs twice."""

    tool: ToolName
    args: Payload = {}


class ApproveTool(_Body, tag="tool.approve", frozen=True, kw_only=True):
    """An operator lets a privileged tool run on a task that policy says needs approval."""

    tool: ToolName
    reason: str = ""


class SuspendAgent(_Body, tag="agent.suspend", frozen=True, kw_only=True):
    """Kill switch (operators only): no deliveries to the agent, its output refused."""

    agent: Name
    reason: str = ""


class ResumeAgent(_Body, tag="agent.resume", frozen=True, kw_only=True):
    agent: Name
    reason: str = ""


Body = (SubmitTask | Say | HandoffRequest | HandoffDecision | Complete | Fail | ToolCall
        | ApproveTool | SuspendAgent | ResumeAgent)
BODY_TYPES: tuple[type[_Body], ...] = (SubmitTask, Say, HandoffRequest, HandoffDecision,
                                       Complete, Fail, ToolCall, ApproveTool, SuspendAgent,
                                       ResumeAgent)


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """An error that crosses NATS: data, never a traceback."""

    type: str  # e.g. "denied", "timeout", "tool_error", "unavailable"
    message: str
    retryable: bool = False


class ToolInvocation(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway sends a tool on ``<prefix>.tool.<name>`` (request/reply).

    ``call_id`` is the idempotency key: a tool with side effects must not apply the same
    call twice (the gateway repeats a call only if it never recorded the answer)."""

    call_id: str
    tool: ToolName
    task_id: Name
    agent: Name
    args: Payload
    labels: tuple[str, ...] = ()


class ToolOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """A tool's answer, and what the gateway answers the agent."""

    ok: bool
    result: Payload = {}
    error: Failure | None = None
    labels: tuple[str, ...] = ()  # provenance of the result, e.g. ("untrusted",)


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """Everything said on an intake subject ``<prefix>.intake.<sender>``.

    ``id`` is stamped once by the sender and is the deduplication key (``Nats-Msg-Id``).
    ``causation_id`` names the message (or delivery) that caused this one.
    """

    id: str
    sender: Name
    task_id: Name
    sent_at: Timestamp
    body: Body
    causation_id: str | None = None
    trace: str | None = None
    labels: tuple[str, ...] = ()
    attempt: Attempt = 0


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """What the coordinator sends on ``<prefix>.deliver.<agent>`` once it is recorded.

    ``envelope`` is the recorded message that made the agent the task's owner (the
    submission, a handoff to it, or a declined handoff handed back to it).
    """

    id: str
    agent: Name
    task_id: Name
    attempt: Attempt
    title: str
    input: Payload
    envelope: Envelope
    labels: tuple[str, ...] = ()
    # When this attempt times out (the coordinator then retries it). A copy redelivered
    # after that is stale: runtimes may drop it instead of doing the work twice.
    deadline: Timestamp | None = None


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    """One of an agent's messages that the coordinator refused, as it recorded it
    (``message.rejected``): why the agent's handoff, result or say changed nothing."""

    message: str  # the Nats-Msg-Id of the intake message that carried it (one in ``ids``)
    # the envelope's id; for bytes that were no envelope, ``message`` (``<message>/<index>``
    # in a batch)
    id: str
    task_id: str  # "" when the bytes named none
    code: str  # e.g. not_owner, stale_attempt, handoff_denied, unknown_agent, malformed
    reason: str


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """What the coordinator sends on ``<prefix>.receipt.<agent>`` after a commit: the
    ``Nats-Msg-Id`` of each of the agent's intake messages it has now recorded (or
    refused, or found already recorded). An agent acks a delivery only once every message
    its handler sent is named in one: JetStream acknowledges before it syncs to disk, so
    its PubAck alone does not survive a machine crash. ``refused``: the envelopes of those
    messages that were recorded as refused, so the agent can say so where its developer
    looks (its log), not only in the ledger."""

    ids: tuple[str, ...]
    refused: tuple[Refusal, ...] = ()


class LedgerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One recorded event as relayed on ``<prefix>.ledger.<aggregate>.<key>.<kind>``.

    ``event`` is the stored event state exactly as the ledger holds it (canonical JSON,
    so an observer can recompute its hash); decode it with ``msgspec.json.decode``.
    """

    position: int
    aggregate_id: str
    version: int
    topic: str
    event: msgspec.Raw

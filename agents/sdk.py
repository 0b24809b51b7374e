"""``Agent`` (handlers by body type) and ``Context`` (what a handler may say).

Output ids are deterministic — the n-th output of a delivery is always the same uuid5 —
so a crash and redelivery republishes the same ids and the duplicates are dropped by
JetStream's and the ledger's deduplication.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from uuid import UUID

from schemas import (
    Body,
    Complete,
    Delivery,
    Envelope,
    Fail,
    Failure,
    HandoffDecision,
    HandoffRequest,
    LedgermeshError,
    Say,
    SubmitTask,
    ToolCall,
    ToolOutcome,
    is_token,
    uuid5_text,
)

_NS_OUTPUT = UUID("3c9f1a7e-5b2d-5f4e-8a6c-7d8e9f0a1b2c")

B = TypeVar("B", SubmitTask, HandoffRequest, HandoffDecision)
Handler = Callable[["Context", Any], Awaitable[None]]


class AgentLoadError(LedgermeshError):
    """``module:attr`` does not name an Agent."""


class Sent(Protocol):
    """An output on its way to intake; ``wait()`` until the stream has stored it."""

    async def wait(self, timeout: float = 10.0) -> object: ...


class Outbox(Protocol):
    """Where a Context sends what it says: the runtime publishes it to intake, and asks
    the coordinator's tool gateway for tool calls."""

    async def send(self, envelope: Envelope) -> Sent: ...

    async def call_tool(self, envelope: Envelope, timeout: float) -> ToolOutcome: ...


class ToolError(LedgermeshError):
    """A tool call did not produce a result; ``failure`` says why (as data)."""

    def __init__(self, tool: str, failure: Failure) -> None:
        super().__init__(f"tool {tool}: {failure.type}: {failure.message}")
        self.tool = tool
        self.failure = failure


class ToolDeniedError(ToolError):
    """Policy refused the call (recorded in the ledger with the rule that refused it)."""


class Agent:
    """An agent's name and its handlers, one per delivered body type."""

    def __init__(self, name: str, *, description: str = "", version: str = "0.1.0",
                 concurrency: int = 8) -> None:
        if not is_token(name):
            raise ValueError(f"agent name must be letters, digits, '-' or '_': {name!r}")
        self.name = name
        self.description = description
        self.version = version
        self.concurrency = concurrency
        self.handlers: dict[type[Any], Handler] = {}

    def on(self, body_type: type[B]) -> Callable[[Callable[[Context, B], Awaitable[None]]],
                                                 Callable[[Context, B], Awaitable[None]]]:
        """Register the handler for deliveries whose envelope carries ``body_type``."""
        if body_type not in (SubmitTask, HandoffRequest, HandoffDecision):
            raise TypeError(f"agents receive SubmitTask, HandoffRequest or HandoffDecision, "
                            f"not {body_type.__name__}")

        def register(
            fn: Callable[[Context, B], Awaitable[None]],
        ) -> Callable[[Context, B], Awaitable[None]]:
            if not (inspect.iscoroutinefunction(fn)
                    or inspect.iscoroutinefunction(type(fn).__call__)):
                # (else it fails only when a task comes, as "can't be used in 'await'")
                raise TypeError(f"{self.name}: the handler for {body_type.__name__} must be "
                                f"an async def, not {fn!r}")
            self.handlers[body_type] = fn
            return fn

        return register

    def handler_for(self, body: Body) -> Handler | None:
        return self.handlers.get(type(body))

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, handles={[t.__name__ for t in self.handlers]})"


class Context:
    """The task as this agent sees it, and the only way a handler speaks."""

    def __init__(self, agent: str, delivery: Delivery, outbox: Outbox,
                 clock: Callable[[], datetime]) -> None:
        self.agent = agent
        self.delivery = delivery
        self._outbox = outbox
        self._clock = clock
        self._count = 0
        self._sent: list[Sent] = []
        self.finished = False  # completed, failed or declined: nothing more to say

    @property
    def task_id(self) -> str:
        return self.delivery.task_id

    @property
    def title(self) -> str:
        return self.delivery.title

    @property
    def input(self) -> dict[str, Any]:
        return self.delivery.input

    @property
    def labels(self) -> tuple[str, ...]:
        return self.delivery.labels

    async def say(self, text: str) -> None:
        await self._send(Say(text=text))

    async def handoff(self, to: str, payload: dict[str, Any] | None = None, *,
                      reason: str) -> None:
        if not is_token(to):  # the coordinator would refuse it as malformed, off the task
            raise ValueError(f"task {self.task_id}: cannot hand off to {to!r}: agent names "
                             "are letters, digits, '-' or '_'")
        await self._send(HandoffRequest(to=to, reason=reason, payload=payload or {}))
        self.finished = True

    async def accept(self) -> None:
        """Accept a handoff explicitly (any other output accepts it implicitly)."""
        await self._send(HandoffDecision(accept=True))

    async def decline(self, reason: str) -> None:
        """Decline a handoff: the task goes back to the agent that offered it."""
        await self._send(HandoffDecision(accept=False, reason=reason))
        self.finished = True

    async def complete(self, result: str, payload: dict[str, Any] | None = None) -> None:
        await self._send(Complete(result=result, payload=payload or {}))
        self.finished = True

    async def tool(self, name: str, *, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Run a tool through the coordinator's gateway: authorized, recorded, once.

        Returns the tool's result; raises ``ToolDeniedError`` if policy refused it and
        ``ToolError`` if it failed. Its id is deterministic, so a handler re-run after a
        crash gets the recorded answer instead of running the tool again.
        """
        envelope = self._envelope(ToolCall(tool=name, args=args))
        outcome = await self._outbox.call_tool(envelope, timeout)
        if outcome.ok:
            return outcome.result
        failure = outcome.error or Failure(type="tool_error", message="no result")
        raise (ToolDeniedError if failure.type == "denied" else ToolError)(name, failure)

    async def fail(self, reason: str, *, retryable: bool = False) -> None:
        await self._send(Fail(reason=reason, retryable=retryable))
        self.finished = True

    def output_id(self, n: int) -> str:
        return uuid5_text(_NS_OUTPUT, f"{self.delivery.id}:{n}")

    async def _send(self, body: Body) -> None:
        if self.finished:
            raise RuntimeError(f"task {self.task_id}: {self.agent} already handed it on "
                               "or finished it; nothing more may be said")
        # The runtime sends what is said in one turn as one message, and settles every
        # output before it acks the delivery: a say + handoff cost one round trip.
        self._sent.append(await self._outbox.send(self._envelope(body)))

    async def settle(self) -> None:
        """Until every output said so far is stored by the intake stream (raises if not)."""
        sent, self._sent = self._sent, []
        for output in sent:
            await output.wait()

    def _envelope(self, body: Body) -> Envelope:
        """The next output, with the n-th deterministic id of this delivery."""
        self._count += 1
        return Envelope(
            id=self.output_id(self._count),
            sender=self.agent,
            task_id=self.task_id,
            sent_at=self._clock(),
            body=body,
            causation_id=self.delivery.envelope.id,
            trace=self.delivery.envelope.trace,
            labels=self.delivery.labels,
            attempt=self.delivery.attempt,
        )


T = TypeVar("T")


def import_attr(spec: str, kind: type[T], example: str) -> T:
    """Import ``module:attr``, a ``kind``; AgentLoadError (one clear line) if it is not."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AgentLoadError(f"expected module:attr (e.g. {example}), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AgentLoadError(f"cannot import {module_name!r}: {exc}"
                             + _hidden(module_name)) from exc
    except Exception as exc:  # the module's own code failed as it ran (--debug: traceback)
        raise AgentLoadError(f"cannot import {module_name!r}: {_failed_at(exc)}") from exc
    found = getattr(module, attr, None)
    if isinstance(found, kind):
        return found
    article = "an" if kind.__name__[0] in "AEIOU" else "a"
    there = sorted(name for name, value in vars(module).items() if isinstance(value, kind))
    offer = (f"; {module_name} has {', '.join(f'{module_name}:{n}' for n in there)}" if there
             else f"; {module_name} has no {kind.__name__}")
    got = "nothing" if found is None else type(found).__name__
    raise AgentLoadError(f"{spec} is {got}, not {article} {kind.__name__}{offer}")


def _failed_at(exc: Exception) -> str:
    """``NameError: name 'x' is not defined (myapp/team.py:12)``: the error, and where in
    the importing code it was raised."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _hidden(module_name: str) -> str:
    """Why ``./pkg/mod.py`` is not found as ``pkg.mod``: an installed ``pkg`` (one of
    ledgermesh's own, say ``agents``) takes the name."""
    top = module_name.partition(".")[0]
    taken = sys.modules.get(top)
    mine = Path(top).is_dir() or Path(f"{top}.py").is_file()
    where = getattr(taken, "__file__", None)
    if taken is None or not mine or where is None or Path(where).is_relative_to(Path.cwd()):
        return ""
    return (f" (the name {top!r} is taken by {Path(where).parent}, which hides ./{top}: "
            f"rename yours, e.g. my{top}/)")


def load_agent(spec: str) -> Agent:
    """Import ``module:attr`` and return the Agent it names."""
    return import_attr(spec, Agent, "agents.examples.support:triage")

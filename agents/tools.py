"""Tool hosts: any process can serve tools on NATS; agents reach them only through the
coordinator's gateway, which authorizes and records every call.

```python
desk = ToolHost("desk")

@desk.tool("kb.search")
async def search(query: str) -> dict[str, object]:
    return {"hits": [...]}
```
Run it: ``ledgermesh tools run myapp.tools:desk --nats URL``.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from agents.sdk import import_attr
from bus.client import BusSettings, Credentials, open_bus
from schemas import Failure, Subjects, ToolInvocation, ToolOutcome

log = logging.getLogger("ledgermesh.tools")

ToolFunction = Callable[..., Awaitable[dict[str, Any]] | dict[str, Any]]


class ToolHost:
    """A named set of tools served by one process (run several for more capacity)."""

    def __init__(self, name: str, *, remember: int = 10_000) -> None:
        self.name = name
        self.tools: dict[str, ToolFunction] = {}
        self._remember = remember

    def tool(self, name: str) -> Callable[[ToolFunction], ToolFunction]:
        def register(fn: ToolFunction) -> ToolFunction:
            self.tools[name] = fn
            return fn

        return register


def load_tool_host(spec: str) -> ToolHost:
    return import_attr(spec, ToolHost, "agents.examples.support:desk_tools")


@dataclass(frozen=True)
class ToolHostSettings:
    nats_url: str
    subjects: Subjects = Subjects()
    credentials: Credentials | None = None  # None: an open (dev) server


async def run_tool_host(host: ToolHost, settings: ToolHostSettings, *,
                        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    decode = msgspec.json.Decoder(ToolInvocation).decode
    encode = msgspec.json.Encoder().encode
    # Answers by call id: the gateway repeats a call only if it never recorded the answer;
    # this process then answers the same instead of running a side effect twice.
    answered: OrderedDict[str, bytes] = OrderedDict()
    running: dict[str, anyio.Event] = {}  # call id -> set when its answer is in answered

    async def handle(subject: str, data: bytes) -> bytes:
        try:
            call = decode(data)
        except msgspec.DecodeError as exc:
            return encode(ToolOutcome(ok=False, error=Failure(type="malformed",
                                                              message=str(exc))))
        while (ongoing := running.get(call.call_id)) is not None:
            await ongoing.wait()  # the same call, still running: its answer, not a 2nd run
        if call.call_id in answered:
            return answered[call.call_id]
        running[call.call_id] = anyio.Event()
        try:
            reply = await run(call)
        finally:
            running.pop(call.call_id).set()
        answered[call.call_id] = reply
        while len(answered) > host._remember:
            answered.popitem(last=False)
        return reply

    async def run(call: ToolInvocation) -> bytes:
        fn = host.tools[call.tool]
        try:
            result = fn(**call.args)
            if inspect.isawaitable(result):
                result = await result
            outcome = ToolOutcome(ok=True, result=result)
        except TypeError as exc:
            outcome = ToolOutcome(ok=False, error=Failure(type="bad_arguments", message=str(exc)))
        except Exception as exc:  # a tool's failure is an answer, not a crash of the host
            log.exception("tool %s failed on call %s", call.tool, call.call_id)
            outcome = ToolOutcome(ok=False, error=Failure(
                type="tool_error", message=f"{type(exc).__name__}: {exc}", retryable=True))
        return encode(outcome)

    # Every host registers under one name: hosts are interchangeable instances.
    name = settings.subjects.service("tools")
    async with open_bus(BusSettings.of(settings.nats_url, name, settings.credentials)) as bus, \
            anyio.create_task_group() as tg:
        for tool in host.tools:
            await tg.start(bus.serve_requests, settings.subjects.tool(tool), f"tool-{tool}",
                           handle)
        await bus.add_service(name, "0.1.0", f"tools: {', '.join(host.tools)}",
                              {"host": host.name, "tools": ",".join(host.tools)},
                              lambda: b'{"ok":true}')
        log.info("tool host %s serving %s", host.name, ", ".join(host.tools))
        task_status.started()

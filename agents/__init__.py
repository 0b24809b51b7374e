"""The agent SDK: declare an ``Agent``, register handlers, run it as a service.

```python
from agents import Agent, Context
from schemas import HandoffRequest

writer = Agent("writer", description="Drafts answers")

@writer.on(HandoffRequest)
async def draft(ctx: Context, req: HandoffRequest) -> None:
    await ctx.handoff("reviewer", {"draft": "..."}, reason="needs review")
```
Run it: ``ledgermesh agent run myapp.agents:writer --nats nats://127.0.0.1:4222``.
"""

from __future__ import annotations

from agents.sdk import Agent, AgentLoadError, Context, ToolDeniedError, ToolError, load_agent
from agents.tools import ToolHost

__all__ = ["Agent", "AgentLoadError", "Context", "ToolDeniedError", "ToolError", "ToolHost",
           "load_agent"]

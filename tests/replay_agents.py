"""Agents changed after a run, for ``ledgermesh replay-agent`` to catch: each behaves like
its namesake in ``agents.examples.support`` except where its docstring says."""

from __future__ import annotations

from agents import Agent, Context
from agents.examples.support import lookup
from schemas import HandoffRequest

researcher = Agent("researcher")


@researcher.on(HandoffRequest)
async def research(ctx: Context, request: HandoffRequest) -> None:
    """Skips the knowledge base and hands the facts straight to the reviewer."""
    question = str(request.payload["question"])
    section, answer = lookup(question)
    await ctx.say(f"policy {section}: {answer}")
    await ctx.handoff("reviewer", {"question": question, "section": section},
                      reason="facts gathered")

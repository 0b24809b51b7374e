"""A small support desk: triage → researcher → writer → reviewer.

The reviewer sends every first draft back once ("cite the policy section"), so each demo
task shows a declined handoff and its retry in the ledger. Deterministic: no model calls.
"""

from __future__ import annotations

from agents import Agent, Context
from schemas import HandoffDecision, HandoffRequest, SubmitTask

# The desk's whole knowledge base: (keyword, policy section, answer).
KNOWLEDGE = (
    ("refund", "4.2", "Refunds are approved within 30 days of delivery"),
    ("shipping", "2.1", "Orders ship within 2 business days"),
    ("password", "7.3", "Passwords are reset from the sign-in page"),
    ("invoice", "5.4", "Invoices are emailed on the first day of each month"),
    ("warranty", "6.1", "Hardware carries a two-year warranty"),
)

triage = Agent("triage", description="Reads a request and routes it")
researcher = Agent("researcher", description="Looks up the relevant policy")
writer = Agent("writer", description="Drafts the answer")
reviewer = Agent("reviewer", description="Checks drafts; completes the task")


def lookup(question: str) -> tuple[str, str]:
    """The policy section and answer for a question (a general answer if none matches)."""
    text = question.lower()
    for keyword, section, answer in KNOWLEDGE:
        if keyword in text:
            return section, answer
    return "1.0", "A support specialist will follow up by email"


def draft(question: str, *, cite: bool) -> str:
    section, answer = lookup(question)
    return f"{answer} (policy {section})." if cite else f"{answer}."


@triage.on(SubmitTask)
async def route(ctx: Context, task: SubmitTask) -> None:
    question = str(task.payload.get("question", task.title))
    await ctx.say(f"routing: {question!r} needs a policy lookup")
    await ctx.handoff("researcher", {"question": question}, reason="needs policy lookup")


@researcher.on(HandoffRequest)
async def research(ctx: Context, request: HandoffRequest) -> None:
    question = str(request.payload["question"])
    section, answer = lookup(question)
    await ctx.say(f"policy {section}: {answer}")
    await ctx.handoff("writer", {"question": question, "section": section},
                      reason="facts gathered")


@writer.on(HandoffRequest)
async def write(ctx: Context, request: HandoffRequest) -> None:
    question = str(request.payload["question"])
    await ctx.handoff("reviewer", {"question": question, "draft": draft(question, cite=False),
                                   "revision": 1}, reason="draft ready")


@writer.on(HandoffDecision)
async def revise(ctx: Context, decision: HandoffDecision) -> None:
    question = str(ctx.input.get("question", ctx.title))
    await ctx.say(f"revising after review: {decision.reason}")
    await ctx.handoff("reviewer", {"question": question, "draft": draft(question, cite=True),
                                   "revision": 2}, reason="revised draft")


@reviewer.on(HandoffRequest)
async def review(ctx: Context, request: HandoffRequest) -> None:
    text = str(request.payload["draft"])
    if "(policy" not in text:
        await ctx.decline("cite the policy section")
        return
    await ctx.complete(text)

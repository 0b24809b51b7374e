"""``ledgermesh.toml``: which agents exist and what each may do. Loaded once, validated.

```toml
submitters = ["client"]          # principals that may submit tasks (besides agents)

[agents.triage]
description = "Reads a request and routes it"
handoff_to = ["researcher"]      # whom triage may hand a task to
deadline_s = 30                  # an assignment not finished by then times out
max_attempts = 3                 # tries (timeouts, retryable failures) before dead letter
```
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

import msgspec

from schemas import LedgermeshError, is_token


class PolicyError(LedgermeshError):
    """ledgermesh.toml is missing or invalid; the message says where."""


class AgentPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    description: str = ""
    handoff_to: tuple[str, ...] = ()
    instances: int = 1  # how many should run (`ledgermesh status` counts them)
    deadline_s: float = 30.0  # an assignment not finished by then times out
    max_attempts: int = 3  # tries of one step (timeouts, retryable failures)
    tools: tuple[str, ...] = ()  # tools this agent may call
    rate_per_s: float | None = None  # envelopes said per second (token bucket)
    burst: int = 100  # bucket size


class ToolPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    description: str = ""
    privileged: bool = False  # refused on a task with a tainting label, unless approved
    untrusted_output: bool = False  # its results label the task (e.g. web, user documents)
    max_args: dict[str, float] = {}  # numeric argument limits, e.g. {amount = 500}
    timeout_s: float = 10.0


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    agents: dict[str, AgentPolicy] = {}
    submitters: tuple[str, ...] = ("client",)
    max_payload_bytes: int = 262_144  # below NATS's own 1 MiB max_payload
    retry_backoff_s: float = 0.5  # first retry delay; doubles per try, at most 30 s
    tools: dict[str, ToolPolicy] = {}
    operators: tuple[str, ...] = ("operator",)  # may approve tools and suspend agents
    # Labels that taint a task: privileged tools then need an operator's approval.
    taint_labels: tuple[str, ...] = ("untrusted",)

    def is_agent(self, name: str) -> bool:
        return name in self.agents

    def may_hand_off(self, sender: str, to: str) -> bool:
        agent = self.agents.get(sender)
        return agent is not None and to in agent.handoff_to

    def retry_delay(self, tries: int) -> float:
        return float(min(self.retry_backoff_s * 2.0 ** max(tries - 1, 0), 30.0))

    def tool_denial(self, agent: str, tool: str, args: dict[str, object],
                    labels: list[str], approved: list[str],
                    task_id: str = "TASK_ID") -> tuple[str, str] | None:
        """(rule, reason) that forbids this call on task ``task_id``, or None if policy
        allows it."""
        spec = self.tools.get(tool)
        if spec is None:
            return "unknown_tool", f"no tool named {tool!r} in the policy"
        if tool not in self.agents[agent].tools:
            return "tool_not_allowed", f"agents.{agent}.tools does not include {tool!r}"
        for name, limit in spec.max_args.items():
            value = args.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > limit:
                return "arg_limit", f"tools.{tool}.max_args.{name} is {limit:g}, got {value:g}"
        tainted = [label for label in labels if label in self.taint_labels]
        if spec.privileged and tainted and tool not in approved:
            return ("taint", f"{tool} is privileged and the task is labelled "
                             f"{', '.join(tainted)}: an operator must approve it "
                             f"(ledgermesh approve {task_id} --tool {tool})")
        return None

    def tool_grounds(self, agent: str, tool: str, labels: list[str]) -> str:
        """Why the policy lets ``agent`` call ``tool`` now (it has no ``tool_denial``): the
        rules an auditor would look up, in words."""
        grounds = f"agents.{agent}.tools lists {tool}"
        tainted = [label for label in labels if label in self.taint_labels]
        if self.tools[tool].privileged and tainted:
            grounds += (f"; privileged on a task labelled {', '.join(tainted)}: an operator "
                        "approved it on this task")
        return grounds

    def may_submit(self, principal: str) -> bool:
        return principal in self.submitters or principal in self.agents


def parse_policy(text: str, source: str = "ledgermesh.toml") -> Policy:
    """Parse and validate; every mistake is reported with its location in ``source``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: {exc}") from exc
    # Every unknown key first, then each agent's and tool's table on its own (without
    # them), so a mistake is reported as agents.NAME, and all at once rather than the first.
    mistakes = _unknown_keys(raw, Policy, "")
    for section, struct in (("agents", AgentPolicy), ("tools", ToolPolicy)):
        tables = raw.get(section, {})
        for name, table in tables.items() if isinstance(tables, dict) else ():
            mistakes += _unknown_keys(table, struct, f"{section}.{name}.")
            known = ({k: v for k, v in table.items() if k in struct.__struct_fields__}
                     if isinstance(table, dict) else table)
            try:
                msgspec.convert(known, struct)
            except msgspec.ValidationError as exc:
                mistakes.append(f"{section}.{name}: {_where(exc)}")
    if mistakes:
        raise PolicyError(f"{source}: " + "; ".join(mistakes))
    try:
        policy = msgspec.convert(raw, Policy)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"{source}: {_where(exc)}") from exc
    problems = list(_problems(policy))
    if problems:
        raise PolicyError(f"{source}: " + "; ".join(problems))
    return policy


def _unknown_keys(table: object, struct: type[msgspec.Struct], where: str) -> list[str]:
    if not isinstance(table, dict):
        return []
    known = struct.__struct_fields__
    out = []
    for key, value in table.items():
        if key in known:
            continue
        near = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        if where.startswith("tools.") and isinstance(value, dict):
            # [tools.kb.search] is the table "search" inside the tool "kb"
            hint = f' (a tool name with dots is quoted: [tools."{where[6:]}{key}"])'
        out.append(f"{where}{key}: unknown key{hint}")
    return out


def _where(exc: msgspec.ValidationError) -> str:
    """msgspec's message with its JSON path turned into TOML dotted keys."""
    text = str(exc)
    head, sep, path = text.rpartition(" - at `$")
    if not sep:
        return text
    path = path.rstrip("`").lstrip(".")
    return f"{head} (at {path})" if path else head


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"no policy file at {path} (write one: README.md's "
                          "'Write an agent' shows one)") from None
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_policy(text, str(path))


# Principals of ledgermesh itself: an agent or client of that name would be taken for
# them in the ledger (the coordinator's own decisions) and in the NATS auth config.
RESERVED = ("coordinator", "observer", "tools")


def _problems(policy: Policy) -> list[str]:
    out: list[str] = []
    if not policy.agents:
        out.append("no agents declared (add an [agents.NAME] table)")
    for name, agent in policy.agents.items():
        if not is_token(name):
            out.append(f"agents.{name}: name must be letters, digits, '-' or '_'")
        if name in RESERVED:
            out.append(f"agents.{name}: {name!r} is ledgermesh's own principal; rename it")
        for target in agent.handoff_to:
            if target not in policy.agents:
                out.append(f"agents.{name}.handoff_to: unknown agent {target!r}")
        if agent.instances < 1:
            out.append(f"agents.{name}.instances: must be at least 1")
        if agent.deadline_s <= 0:
            out.append(f"agents.{name}.deadline_s: must be positive")
        if agent.max_attempts < 1:
            out.append(f"agents.{name}.max_attempts: must be at least 1")
        for tool in agent.tools:
            if tool not in policy.tools:
                out.append(f"agents.{name}.tools: unknown tool {tool!r} "
                           f"(declare [tools.\"{tool}\"])")
        if agent.rate_per_s is not None and agent.rate_per_s <= 0:
            out.append(f"agents.{name}.rate_per_s: must be positive")
    for field in ("submitters", "operators"):
        for name in getattr(policy, field):
            if not is_token(name):
                out.append(f"{field}: {name!r} is not a valid principal name")
            elif name in RESERVED:
                out.append(f"{field}: {name!r} is ledgermesh's own principal; rename it")
    if policy.max_payload_bytes < 1024:
        out.append("max_payload_bytes: must be at least 1024")
    return out

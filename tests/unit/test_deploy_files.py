"""The deploy files' ledgermesh command lines are ones the CLI accepts, and the agents and
tool hosts they name load: a renamed flag or module must not wait for a deploy to fail."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agents.sdk import load_agent
from agents.tools import load_tool_host
from ledgermesh.cli import LEDGER_ENV, build_parser

DEPLOY = Path(__file__).parents[2] / "deploy"
COMMANDS = {"coordinator", "agent", "tools", "submit", "status", "tail", "replay", "audit"}
# Flow-style lists of quoted strings (`command: ["agent", ...]`, `args: [...]`), as the
# compose and k8s files write ledgermesh's: JSON once comments are gone.
_FLOW_LIST = re.compile(r'^\s*(?:command|args):\s*(\["[^\]]*\])', re.MULTILINE)


def yaml_command_lines(path: Path) -> list[list[str]]:
    text = re.sub(r"\s#[^\n]*", "", path.read_text())
    lines = [json.loads(found) for found in _FLOW_LIST.findall(text)]
    return [line for line in lines if line and line[0] in COMMANDS]


def systemd_command_lines(path: Path, instance: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart's arguments after the program, with ``Environment=`` values put in."""
    text = path.read_text().replace("\\\n", " ")
    env: dict[str, str] = dict(re.findall(r"^Environment=(\w+)=(\S+)$", text, re.MULTILINE))
    [start] = re.findall(r"^ExecStart=\S+ (.*)$", text, re.MULTILINE)

    def value(name: str) -> str:
        return env[name].replace("%i", instance)

    return re.sub(r"\$\{(\w+)\}", lambda m: value(m.group(1)), start).split(), env


def check(line: list[str], env: dict[str, str]) -> None:
    args = build_parser().parse_args(line)  # SystemExit (argparse's error) if refused
    if getattr(args, "ledger", "unused") is None:
        assert LEDGER_ENV in env, f"{line}: no --ledger and no {LEDGER_ENV}"
    if line[:2] == ["agent", "run"]:
        load_agent(args.spec)
    if line[:2] == ["tools", "run"]:
        load_tool_host(args.spec)


def test_compose_command_lines_are_accepted() -> None:
    lines = yaml_command_lines(DEPLOY / "docker-compose.yml")
    assert {line[0] for line in lines} == {"coordinator", "agent", "tools"}
    compose = (DEPLOY / "docker-compose.yml").read_text()
    for line in lines:
        check(line, {LEDGER_ENV: "(set)"} if f"{LEDGER_ENV}:" in compose else {})


@pytest.mark.parametrize("name", ["agents.yaml", "coordinator.yaml"])
def test_kubernetes_command_lines_are_accepted(name: str) -> None:
    lines = yaml_command_lines(DEPLOY / "k8s" / name)
    assert lines, f"no ledgermesh command line found in {name}"
    for line in lines:
        check(line, {})


@pytest.mark.parametrize(("unit", "instance"), [("ledgermesh-coordinator.service", ""),
                                                ("ledgermesh-agent@.service", "triage")])
def test_systemd_command_lines_are_accepted(unit: str, instance: str) -> None:
    line, env = systemd_command_lines(DEPLOY / "systemd" / unit, instance)
    check(line, env)

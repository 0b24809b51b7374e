"""``ledgermesh status``: is the coordinator up and keeping up, and are the agents there?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import msgspec

from bus.client import BusSettings, open_bus
from coordinator.policy import Policy, load_policy
from ledgermesh.auth import OBSERVER, load_credentials
from ledgermesh.style import Style, stdout_style
from schemas import Subjects


def status_command(nats_url: str, prefix: str, config: Path, *, nkey: Path | None,
                   as_json: bool) -> int:
    subjects = Subjects(prefix)
    policy = load_policy(config) if config.exists() else None
    agents = list(policy.agents) if policy is not None else []
    settings = BusSettings.of(nats_url, f"{prefix}_status",
                              load_credentials(nkey, subjects, OBSERVER))
    report: dict[str, Any] = {"nats": nats_url, "coordinator": None, "agents": {},
                              "instances": {}}

    async def main() -> None:
        async with open_bus(settings) as bus:
            reply = await bus.service_status(subjects.service("coordinator"))
            report["coordinator"] = None if reply is None else msgspec.json.decode(reply)
            for name in agents:
                replies = await bus.service_statuses(subjects.service(name))
                report["agents"][name] = _summed([msgspec.json.decode(r) for r in replies])

            async def count(name: str) -> None:  # every instance answers a ping
                report["instances"][name] = await bus.count_instances(subjects.service(name))

            async with anyio.create_task_group() as tg:  # the waits overlap
                for name in ["coordinator", *agents]:
                    tg.start_soon(count, name)

    anyio.run(main)
    coordinator = report["coordinator"]
    code = _exit_code(report, policy)
    if as_json:
        print(json.dumps(report))
        return code
    style = stdout_style()
    if policy is None:
        style.out(style.dim(f"no policy at {config}: agents not asked (give --config FILE)"))
    if coordinator is None:
        style.out(style.red(f"coordinator: not answering on {nats_url} (prefix {prefix})"))
    else:
        state = (style.green("ok") if coordinator["status"] == "ok"
                 else style.red(coordinator["status"]))
        style.out(f"coordinator: {state} · connected {coordinator['connected']} · "
                  f"{coordinator['events_recorded']} events recorded since start · "
                  f"ledger position {coordinator['ledger_position']} · relay lag "
                  f"{coordinator['relay_lag']} events")
        if coordinator["last_error"]:
            style.out(f"  last error: {coordinator['last_error']}")
        if report["instances"]["coordinator"] > 1:
            style.out(style.red(f"  {report['instances']['coordinator']} coordinators answer "
                                "on this prefix: one ledger has one writer"))
    for name, agent in report["agents"].items():
        if agent is None:
            style.out(f"agent {name:<12} {style.yellow('not answering')}")
        else:
            style.out(f"agent {name:<12} {style.green('up')} · "
                      f"{_instances(style, report['instances'][name], policy, name)} · "
                      f"handled {agent['handled']} · failed {agent['failed']}"
                      + (f" · last error: {agent['last_error']}" if agent["last_error"] else ""))
        if coordinator is not None:
            _refusals(style, coordinator, name)
    if coordinator is not None:  # and whoever else had output refused (clients, strangers)
        for name in sorted({*coordinator["rejected"], *coordinator["throttled"]}
                           - set(report["agents"])):
            style.out(f"principal {name}")
            _refusals(style, coordinator, name)
    return code


# Exit codes, for scripts and health checks (see `ledgermesh status --help`).
HEALTHY, COORDINATOR_DOWN, AGENTS_SHORT = 0, 1, 3


def _exit_code(report: dict[str, Any], policy: Policy | None) -> int:
    coordinator = report["coordinator"]
    if coordinator is None or coordinator["status"] != "ok":
        return COORDINATOR_DOWN
    if policy is not None and any(report["instances"][name] < policy.agents[name].instances
                                  for name in policy.agents):
        return AGENTS_SHORT
    return HEALTHY


def _summed(instances: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One agent's figures over all its instances (None: none answered)."""
    if not instances:
        return None
    errors = [i["last_error"] for i in instances if i.get("last_error")]
    return {"agent": instances[0].get("agent"),
            "connected": all(i.get("connected", True) for i in instances),
            "handled": sum(i["handled"] for i in instances),
            "failed": sum(i["failed"] for i in instances),
            "last_error": errors[0] if errors else None}


def _instances(style: Style, up: int, policy: Policy | None, name: str) -> str:
    """``2 instances``, or ``1 of 2 instances`` in yellow when fewer run than the policy's
    ``instances``."""
    wanted = policy.agents[name].instances if policy is not None else 1
    if up < wanted:
        return style.yellow(f"{up} of {wanted} instances")
    return f"{up} instance{'s' if up != 1 else ''}"


def _refusals(style: Style, coordinator: dict[str, Any], name: str) -> None:
    """What the coordinator refused of ``name``'s output since it started, if anything."""
    rejected = coordinator["rejected"].get(name, 0)
    throttled = coordinator["throttled"].get(name, 0)
    if rejected:
        style.out(style.red(f"  {rejected} output(s) rejected") + " · last: "
                  + coordinator["last_rejection"].get(name, "?"))
    if throttled:
        style.out(style.yellow(f"  {throttled} envelope(s) dropped by the rate limit"))

"""Offline commands: ``replay`` and ``audit`` over a ledger; ``schema export``;
``policy check``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio
import msgspec

from bus.client import BusSettings, open_bus
from coordinator.ledger.checkpoints import (
    UNTRUSTED_KEY,
    Checkpoint,
    CheckpointError,
    GlobalChain,
    latest_checkpoint,
    read_checkpoint,
    verify_key,
    write_checkpoint,
)
from coordinator.ledger.replay import Break, replay
from coordinator.ledger.store import Ledger, LedgerError, open_ledger
from coordinator.policy import load_policy
from ledgermesh.audit import audit_task, list_tasks, render_audit, render_tasks
from ledgermesh.auth import OBSERVER, load_credentials
from ledgermesh.style import Style, stdout_style
from schemas import LedgermeshError, Subjects


class ReplayReport(msgspec.Struct, frozen=True, kw_only=True):
    ledger: str
    events: int
    position: int
    tasks: int
    tasks_by_status: dict[str, int]
    digest: str
    verified: bool
    seconds: float
    first_break: dict[str, object] | None
    checkpoints: str  # what the signed checkpoints cover
    unsigned: int  # events after the newest verified checkpoint (no signature covers them)
    anchored: int = 0  # external checkpoints (--checkpoint…) the ledger matched


def external_checkpoint(path: Path | None, nats_url: str | None, prefix: str,
                        nkey: Path | None) -> Checkpoint | None:
    """The signed checkpoint to hold the ledger against: from a file or the live stream."""
    if path is not None:
        return read_checkpoint(path)
    if nats_url is None:
        return None
    subjects = Subjects(prefix)
    settings = BusSettings.of(nats_url, f"{prefix}_replay",
                              load_credentials(nkey, subjects, OBSERVER))

    async def fetch() -> Checkpoint | None:
        async with open_bus(settings) as bus:
            return await latest_checkpoint(bus, subjects)

    found = anyio.run(fetch)
    if found is None:
        raise LedgerError(f"no signed checkpoint in the ledger stream at {nats_url} "
                          f"(prefix {prefix}) yet")
    return found


def replay_command(location: str, *, to: int | None, verify: bool, as_json: bool,
                   trusted_keys: tuple[str, ...] = (), checkpoint: Checkpoint | None = None,
                   save_checkpoint: Path | None = None) -> int:
    style = stdout_style()
    if to is not None and to < 1:
        raise LedgermeshError(f"--to {to}: give a ledger position, 1 or more")
    for key in trusted_keys:
        try:
            verify_key(key)
        except CheckpointError as exc:
            raise LedgermeshError(f"--trusted-key {key[:20]!r}: {exc} (the coordinator logs "
                                  "its key at start; replay prints the key of the "
                                  "checkpoints it verified)") from None
    ledger = open_ledger(location, create=False)
    try:
        live = style.live and not as_json

        def progress(position: int) -> None:
            if live:
                print(f"\r  replaying… position {position}", end="", file=sys.stderr, flush=True)

        started = time.perf_counter()
        result = replay(ledger, to=to, progress=progress, trusted_keys=trusted_keys or None,
                        against=[checkpoint] if checkpoint is not None else ())
        seconds = time.perf_counter() - started
        if live:
            print("\r\033[K", end="", file=sys.stderr)
    finally:
        ledger.close()
    statuses: dict[str, int] = {}
    for task in result.tasks.values():
        statuses[task.status] = statuses.get(task.status, 0) + 1
    first = result.breaks[0] if result.breaks else None
    report = ReplayReport(
        ledger=location, events=result.events, position=result.position,
        tasks=len(result.tasks), tasks_by_status=statuses, digest=result.digest,
        verified=result.verified, seconds=round(seconds, 4),
        checkpoints=result.chain.summary(), unsigned=result.chain.unsigned,
        anchored=result.chain.anchored,
        first_break=None if first is None else {
            "position": first.position, "aggregate": first.aggregate, "key": first.key,
            "kind": first.kind, "problem": first.problem},
    )
    if as_json:
        print(msgspec.json.encode(report).decode())
    else:
        for line in render_replay(report, style, verify=verify):
            style.out(line)
    if first is not None and not as_json:
        print(f"{'error' if verify else 'warning'}: chain broken at position "
              f"{first.position} ({first.aggregate} {first.key}, event {first.kind}): "
              f"{first.problem}\n       {_what_it_means(first, result.chain, checkpoint)}",
              file=sys.stderr)
    if save_checkpoint is not None:
        if result.chain.last is not None and result.verified:
            write_checkpoint(save_checkpoint, result.chain.last)
            if not as_json:
                print(f"saved the newest signed checkpoint to {save_checkpoint} "
                      "(verify a later copy with --checkpoint)", file=sys.stderr)
        elif not as_json:
            why = "the chains did not verify" if not result.verified else "none is signed"
            print(f"no checkpoint saved to {save_checkpoint}: {why}", file=sys.stderr)
    return 1 if verify and not result.verified else 0


def _what_it_means(first: Break, chain: GlobalChain, checkpoint: Checkpoint | None) -> str:
    """The likeliest reading of the first break: an edited ledger, unless the keys say
    that a checkpoint came from elsewhere."""
    if UNTRUSTED_KEY in first.problem:
        return ("its checkpoints are signed by a key not given with --trusted-key: another "
                "coordinator's (each logs its key at start), or a forger's")
    if checkpoint is not None and chain.keys and checkpoint.key not in chain.keys:
        return (f"the external checkpoint is signed by {checkpoint.key[:12]}…, this ledger's "
                f"own by {', '.join(k[:12] + '…' for k in sorted(chain.keys))}: most likely "
                "it is another ledger's checkpoint; if not, this ledger was cut or rewritten")
    return (f"the ledger was modified after it was written; last good position "
            f"{first.position - 1}")


def render_replay(report: ReplayReport, style: Style, *, verify: bool) -> list[str]:
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(report.tasks_by_status.items()))
    rate = report.events / report.seconds if report.seconds > 0 else 0.0
    lines = [f"replay: rebuilt {report.tasks} tasks ({by_status or 'none'}) from "
             f"{report.events} events in {report.seconds:.2f} s ({rate:,.0f} events/s)",
             f"digest {report.digest}"]
    lines.append(f"checkpoints: {report.checkpoints}")
    # Replay checks every chain either way; --verify only makes a break the exit status.
    if report.verified:
        lines.append(style.green(f"chains verified ✓ ({report.events} events)"))
        if report.unsigned and verify and not report.anchored:
            lines.append(f"  its last {report.unsigned} events are covered by no signed "
                         "checkpoint: normal while a coordinator runs or after one crashed, "
                         "and also what events cut from the end would look like; hold the "
                         "ledger against a checkpoint kept elsewhere (--checkpoint-from-nats "
                         "URL, --checkpoint FILE) to tell")
    else:
        where = report.first_break or {}
        lines.append(style.red(f"chains NOT verified ✗ (first break at position "
                               f"{where.get('position')}, {where.get('aggregate')} "
                               f"{where.get('key')})"))
    return lines


def audit_command(task_id: str | None, location: str, *, agent: str | None,
                  as_json: bool) -> int:
    if task_id is not None and agent is not None:
        raise LedgermeshError("give a TASK_ID or --agent, not both: --agent lists the tasks "
                              "an agent was assigned")
    ledger = open_ledger(location, create=False)
    try:
        if task_id is None:
            return _list_tasks(ledger, agent, as_json=as_json)
        audit = audit_task(ledger, task_id)
    finally:
        ledger.close()
    if as_json:
        print(msgspec.json.encode(audit).decode())
    else:
        style = stdout_style()
        for line in render_audit(audit, style):
            style.out(line)
    return 0 if audit.chain_ok else 1


def _list_tasks(ledger: Ledger, agent: str | None, *, as_json: bool) -> int:
    listed = list_tasks(ledger, agent)
    if as_json:
        print(msgspec.json.encode(listed).decode())
    else:
        style = stdout_style()
        for line in render_tasks(listed, style, agent):
            style.out(line)
    return 0 if listed.chains_ok else 1


def schema_export(out: Path) -> int:
    from schemas.export import write_json_schemas

    written = write_json_schemas(out)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{out}: JSON Schemas already up to date")
    return 0


def policy_check(path: Path) -> int:
    policy = load_policy(path)
    agents = ", ".join(f"{name} → {', '.join(a.handoff_to) or '(none)'}"
                       for name, a in policy.agents.items())
    print(f"{path}: ok — {len(policy.agents)} agents: {agents}")
    return 0


__all__ = ["LedgerError", "LedgermeshError", "audit_command", "policy_check",
           "replay_command", "schema_export"]

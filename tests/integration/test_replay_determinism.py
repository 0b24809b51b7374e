"""Same ledger ⇒ byte-identical state digest, in any process (determinism: replay never re-decides).

Python salts ``hash()`` of strings per process (PYTHONHASHSEED), so anything that lets set or
dict-of-set iteration order reach the digest differs between processes. Replaying (and
building) the same ledger in subprocesses with different seeds catches that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID, uuid5

import pytest

from coordinator.ledger.replay import replay
from coordinator.ledger.store import open_ledger
from coordinator.ledger.writer import IntakeMessage, LedgerWriter
from schemas import (
    Body,
    Codec,
    Complete,
    Envelope,
    HandoffDecision,
    HandoffRequest,
    Say,
    Subjects,
    SubmitTask,
)
from tests.live import team_policy

SEEDS = ("1", "12345")
TIMEOUT = 30.0
SUBJECTS = Subjects("lm")
POLICY = team_policy()
_NS = UUID("5f0c1d2e-3a4b-5c6d-8e9f-0a1b2c3d4e5f")
SENT_AT = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


def fixed_clock() -> datetime:
    return datetime(2025, 6, 1, 12, 0, 1, tzinfo=UTC)


def scenario() -> list[IntakeMessage]:
    """Tasks with many recorded ids (sets of random-looking strings), labels and rejections."""
    codec = Codec()
    said: list[tuple[str, Envelope | bytes]] = []
    n = 0

    def env(
        sender: str, task: str, body: Body, attempt: int, labels: tuple[str, ...] = ()
    ) -> Envelope:
        nonlocal n
        n += 1
        return Envelope(
            id=str(uuid5(_NS, str(n))),
            sender=sender,
            task_id=task,
            sent_at=SENT_AT,
            body=body,
            attempt=attempt,
            labels=labels,
        )

    for i in range(6):
        task = f"task-{i}"
        said.append(
            (
                "client",
                env(
                    "client",
                    task,
                    SubmitTask(to="triage", title=f"q{i}", payload={"i": i, "z": [1, 2]}),
                    0,
                    ("untrusted", f"src{i}"),
                ),
            )
        )
        for k in range(4):
            said.append(("triage", env("triage", task, Say(text=f"note {k}"), 1, (f"l{k}",))))
        said.append(("triage", env("triage", task, HandoffRequest(to="researcher", reason="r"), 1)))
        if i % 2:
            said.append(
                (
                    "researcher",
                    env("researcher", task, HandoffDecision(accept=False, reason="no"), 2),
                )
            )
        else:
            said.append(("researcher", env("researcher", task, Complete(result=f"done {i}"), 2)))
        said.append(("writer", env("writer", task, Say(text="not mine"), 2)))  # not_owner
    said.append(("mallory", b"\xff not an envelope"))
    said.append(("client", env("triage", "task-0", Say(text="spoof"), 0)))  # spoofed
    out = []
    for seq, (principal, message) in enumerate(said, start=1):
        data = message if isinstance(message, bytes) else codec.encode(message)
        msg_id = message.id if isinstance(message, Envelope) else None
        out.append(IntakeMessage(seq, SUBJECTS.intake(principal), data, msg_id))
    return out


def build_ledger(location: str) -> None:
    """Record the scenario in a few group commits, with a fixed clock."""
    ledger = open_ledger(location, create=True)
    try:
        writer = LedgerWriter(ledger, POLICY, SUBJECTS, fixed_clock)
        messages = scenario()
        for start in range(0, len(messages), 7):
            writer.record(messages[start : start + 7])
    finally:
        ledger.close()


def summary(location: str) -> dict[str, object]:
    """What a process sees of a ledger: replay digest, counts, and the stored bytes' hash."""
    import hashlib

    ledger = open_ledger(location, create=False)
    try:
        result = replay(ledger)
        stored = hashlib.sha256()
        for n in ledger.read(0, 100_000):
            stored.update(str(n.originator_id).encode() + n.state)
        return {
            "digest": result.digest,
            "verified": result.verified,
            "events": result.events,
            "stored": stored.hexdigest(),
        }
    finally:
        ledger.close()


_CHILD = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("determinism_child", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if sys.argv[3] == "build":
        module.build_ledger(sys.argv[2])
    print(json.dumps(module.summary(sys.argv[2])))
""")


def in_subprocess(location: Path, seed: str, *, build: bool = False) -> dict[str, object]:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, __file__, str(location), "build" if build else "read"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    location = tmp_path / "ledger.db"
    build_ledger(str(location))
    return location, summary(str(location))


def test_the_scenario_exercises_sets_labels_and_rejections(
    built: tuple[Path, dict[str, object]],
) -> None:
    """Guard: the digest below is only a strong check if the state holds unordered sets."""
    location, here = built
    ledger = open_ledger(str(location), create=False)
    try:
        result = replay(ledger)
    finally:
        ledger.close()
    assert here["verified"] is True
    assert here["events"] == result.events > 60
    assert all(len(t.seen) >= 6 for t in result.tasks.values())
    # One not_owner per task (on the non-participant's own record) plus one spoof.
    assert sum(p.rejections for p in result.principals.values()) >= len(result.tasks) + 1
    assert result.tasks["task-0"].labels[:2] == ["untrusted", "src0"]
    assert result.principals["mallory"].rejections == 1
    assert {t.status for t in result.tasks.values()} == {"completed", "assigned"}


def test_replay_digest_is_identical_across_hash_seeds(
    built: tuple[Path, dict[str, object]],
) -> None:
    location, here = built
    seen = [in_subprocess(location, seed) for seed in SEEDS]
    for there in seen:
        assert there == here


def test_building_the_same_intake_gives_the_same_ledger_across_hash_seeds(
    tmp_path: Path,
    built: tuple[Path, dict[str, object]],
) -> None:
    """The write path is deterministic too: same intake + same clock ⇒ same stored bytes."""
    _, here = built
    for seed in SEEDS:
        location = tmp_path / f"built-{seed}.db"
        there = in_subprocess(location, seed, build=True)
        assert there == here

"""The CLI as a user runs it: real processes, real NATS, real SQLite."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from coordinator.ledger.checkpoints import Signer, write_checkpoint

CLI = [sys.executable, "-m", "ledgermesh"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Path]:
    data = tmp_path_factory.mktemp("demo")
    done = run_cli("demo", "--json", "--data-dir", str(data))  # the default: 5 tasks
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), data / "ledger.db"


def test_demo_completes_every_task_and_verifies(demo: tuple[dict[str, object], Path]) -> None:
    result, ledger = demo
    assert result["tasks_submitted"] == 5
    assert result["tasks_completed"] == 5
    assert result["verified"] is True
    assert result["unsigned"] == 0  # its coordinator stopped, and signed what was left
    # At least 5 x 23 events: submit, 6 assignments, 4 handoffs, 1 decline, 3 implicit
    # acceptances, 4 notes, a kb.search call (requested, authorized, completed),
    # completion; more for the refund task (a denied tool call) and the crash story.
    events = result["events"]
    assert isinstance(events, int)
    assert events >= 5 * 23 + 3
    assert result["ledger"] == str(ledger)


def test_demo_tells_the_crash_and_the_denial(demo: tuple[dict[str, object], Path]) -> None:
    """A researcher process dies mid-task (a crash point), the deadline passes, the task is
    retried on the other instance; the planted refund instruction is refused by policy."""
    result, ledger = demo
    db = sqlite3.connect(ledger)
    kinds = db.execute("SELECT json_extract(state, '$.kind'), json_extract(state, '$.data') "
                       "FROM stored_events ORDER BY rowid").fetchall()
    db.close()
    timeouts = [json.loads(d) for k, d in kinds if k == "attempt.timed_out"]
    assert timeouts
    assert all(t["agent"] == "researcher" for t in timeouts)
    # The cause, which the ledger cannot see: one researcher instance died at its crash point.
    exited = result["exited"]
    assert isinstance(exited, dict)
    assert list(exited.values()) == [86]
    assert next(iter(exited)) in ("researcher", "researcher-2")
    denials = [json.loads(d) for k, d in kinds if k == "tool.denied"]
    assert denials
    assert {d["rule"] for d in denials} == {"taint"}
    assert {d["tool"] for d in denials} == {"payments.refund"}


def test_replay_after_the_demo_gives_the_same_digest(demo: tuple[dict[str, object], Path]) -> None:
    result, ledger = demo
    first = run_cli("replay", "--ledger", str(ledger), "--verify", "--json")
    second = run_cli("replay", "--ledger", str(ledger), "--verify", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["digest"] == result["digest"] == json.loads(second.stdout)["digest"]
    assert report["tasks_by_status"] == {"completed": 5}
    assert report["verified"] is True
    # The demo stopped its coordinator (SIGTERM), which signed what no checkpoint covered.
    assert report["unsigned"] == 0
    assert report["checkpoints"].endswith("; 0 events after it")


def test_audit_tells_the_story_of_a_task(demo: tuple[dict[str, object], Path]) -> None:
    _, ledger = demo
    listing = sqlite3.connect(ledger).execute(
        "SELECT DISTINCT json_extract(state, '$.key') FROM stored_events "
        "WHERE json_extract(state, '$.aggregate') = 'task'").fetchall()
    task_id = listing[0][0]
    done = run_cli("audit", task_id, "--ledger", str(ledger), "--json")
    assert done.returncode == 0, done.stderr
    audit = json.loads(done.stdout)
    steps = [(e["actor"], e["kind"], e["to"]) for e in audit["timeline"]]
    assert steps[0] == ("client", "submit", "triage")
    assert ("reviewer", "declined", "writer") in steps
    assert steps[-1] == ("reviewer", "complete", None)
    assert audit["chain_ok"] is True
    (result,) = sqlite3.connect(ledger).execute(
        "SELECT json_extract(state, '$.data.result') FROM stored_events WHERE "
        "json_extract(state, '$.kind') = 'task.completed' AND "
        "json_extract(state, '$.key') = ?", (task_id,)).fetchone()
    assert audit["timeline"][-1]["summary"] == f'"{result}"'  # whole, as recorded
    # The path: every assignment and what led to it. The warranty question is the one
    # whose research attempt crashes its researcher: it is retried.
    (warranty,) = sqlite3.connect(ledger).execute(
        "SELECT json_extract(state, '$.key') FROM stored_events WHERE json_extract(state, "
        "'$.kind') = 'task.submitted' AND json_extract(state, '$.data.title') LIKE "
        "'%warranty%'").fetchone()
    audit = json.loads(run_cli("audit", warranty, "--ledger", str(ledger), "--json").stdout)
    path = [(h["via"], h["agent"]) for h in audit["path"]]
    assert audit["submitter"] == "client"
    assert path[:2] == [("submit", "triage"), ("handoff", "researcher")]
    assert ("retry", "researcher") in path
    assert ("declined", "writer") in path
    assert path[-1] == ("handoff", "reviewer")
    human = run_cli("audit", warranty, "--ledger", str(ledger))
    assert "declined" in human.stdout
    assert "cite the policy section" in human.stdout
    assert ("path: client → triage → researcher ⟳ researcher (after a timeout) → writer"
            in human.stdout)
    assert "↩ writer (declined: cite the policy section) → reviewer ✓ completed" in human.stdout
    # The step's try, not the task-wide attempt number (which read as "attempt 2" for the
    # researcher's first try).
    assert "researcher missed its deadline (try 1 of this step) — retry scheduled" in human.stdout


def test_audit_lists_the_tasks_and_those_of_one_agent(
        demo: tuple[dict[str, object], Path]) -> None:
    _, ledger = demo
    db = sqlite3.connect(ledger)
    submitted = [key for (key,) in db.execute(
        "SELECT json_extract(state, '$.key') FROM stored_events WHERE "
        "json_extract(state, '$.kind') = 'task.submitted' ORDER BY rowid")]
    db.close()
    done = run_cli("audit", "--ledger", str(ledger), "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [t["task_id"] for t in listed["tasks"]] == submitted
    assert listed["total"] == len(submitted)
    assert listed["chains_ok"] is True
    assert all(t["agents"][:2] == ["triage", "researcher"] for t in listed["tasks"])
    human = run_cli("audit", "--ledger", str(ledger)).stdout.splitlines()
    assert human[0] == f"{len(submitted)} of {len(submitted)} tasks; chains verified ✓"
    assert "triage → researcher → writer → reviewer" in human[2]
    nobody = json.loads(run_cli("audit", "--ledger", str(ledger), "--agent", "ghost",
                                "--json").stdout)
    assert (nobody["tasks"], nobody["total"]) == ([], len(submitted))


def test_audit_of_a_task_that_was_never_recorded_names_what_was_refused(
        demo: tuple[dict[str, object], Path], tmp_path: Path) -> None:
    """A submission the coordinator rejected (here: to an agent that does not exist) leaves
    no task; the rejection is on its sender's record, and audit points at it."""
    _, original = demo
    ledger = tmp_path / "ledger.db"
    ledger.write_bytes(original.read_bytes())
    db = sqlite3.connect(ledger)
    position = db.execute("SELECT max(rowid) FROM stored_events").fetchone()[0] + 1
    db.close()
    from coordinator.ledger.store import open_ledger
    from coordinator.ledger.writer import IntakeMessage, LedgerWriter
    from schemas import Codec, Envelope, Subjects, SubmitTask
    from tests.live import team_policy

    opened = open_ledger(str(ledger), create=False)
    try:
        envelope = Envelope(id="m-ghost", sender="client", task_id="t-ghost",
                            sent_at=datetime.now(UTC), body=SubmitTask(to="ghost", title="?"))
        writer = LedgerWriter(opened, team_policy(), Subjects("lm"),
                              lambda: datetime.now(UTC))
        writer.record([IntakeMessage(10**6, Subjects("lm").intake("client"),
                                     Codec().encode(envelope), envelope.id)])
    finally:
        opened.close()
    done = run_cli("audit", "t-ghost", "--ledger", str(ledger))
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"error: no task 't-ghost' in this ledger; the ledger refused 1 message(s) naming it "
        f"(position {position}, from client: unknown_agent: no agent named 'ghost'")


def test_audit_names_a_refused_tool_call_and_what_tainted_the_task(
        demo: tuple[dict[str, object], Path]) -> None:
    _, ledger = demo
    (task_id,) = sqlite3.connect(ledger).execute(
        "SELECT DISTINCT json_extract(state, '$.key') FROM stored_events "
        "WHERE json_extract(state, '$.kind') = 'tool.denied'").fetchone()
    audit = json.loads(run_cli("audit", task_id, "--ledger", str(ledger), "--json").stdout)
    (denial,) = audit["denials"]
    labelled = next(e for e in audit["timeline"] if "labels the task" in e["summary"])
    assert denial == {"version": denial["version"], "agent": "researcher",
                      "tool": "payments.refund", "rule": "taint",
                      "because": f"untrusted by kb.search #{labelled['version']}"}
    human = run_cli("audit", task_id, "--ledger", str(ledger)).stdout
    assert (f"denied: researcher → tool payments.refund (#{denial['version']}, taint; task "
            f"labelled untrusted by kb.search #{labelled['version']})") in human
    allowed = [(e["actor"], e["summary"]) for e in audit["timeline"] if e["kind"] == "allowed"]
    assert allowed  # one per search (the researcher may have searched on more than one try)
    assert set(allowed) == {("coordinator", "kb.search — agents.researcher.tools lists kb.search")}


def edited_copy(original: Path, tmp_path: Path, where: str, old: str,
                new: str) -> tuple[Path, int, str, int]:
    """A copy of the ledger with ``old`` replaced by ``new`` in the first event ``where``
    (SQL) holds: the copy, and the event's position, task and version."""
    ledger = tmp_path / "edited.db"
    ledger.write_bytes(original.read_bytes())
    db = sqlite3.connect(ledger)
    rowid, key, version = db.execute(
        "SELECT rowid, json_extract(state, '$.key'), originator_version FROM stored_events "
        f"WHERE {where} ORDER BY rowid LIMIT 1").fetchone()
    db.execute("UPDATE stored_events SET state = replace(state, ?, ?) WHERE rowid = ?",
               (old, new, rowid))
    db.commit()
    db.close()
    return ledger, rowid, key, version


def test_an_edited_event_is_detected_and_located(demo: tuple[dict[str, object], Path],
                                                 tmp_path: Path) -> None:
    _, original = demo
    ledger, rowid, key, version = edited_copy(
        original, tmp_path, "json_extract(state, '$.kind') = 'message.said'", "policy", "POLICY")
    done = run_cli("replay", "--ledger", str(ledger), "--verify")
    assert done.returncode == 1
    assert f"chain broken at position {rowid} (task {key}, event message.said)" in done.stderr
    assert "Traceback" not in done.stderr
    audit = run_cli("audit", key, "--ledger", str(ledger))
    assert audit.returncode == 1
    said = next(line for line in audit.stdout.splitlines() if line.startswith(f"#{version} "))
    assert said.startswith(f"#{version:<3}✗")  # the edited line is marked, not only the header
    assert audit.stdout.splitlines()[-1].startswith("✗ not vouched for by the chain: version")


def test_an_edited_kind_is_located_and_no_agent_is_replayed_on_it(
        demo: tuple[dict[str, object], Path], tmp_path: Path) -> None:
    """An event's kind changed to one whose data it lacks: a located break, not a
    traceback; replay-agent refuses to compare code with an edited record."""
    _, original = demo
    ledger, rowid, key, version = edited_copy(
        original, tmp_path, "json_extract(state, '$.kind') = 'handoff.requested' AND "
        "json_extract(state, '$.sender') = 'researcher'", '"handoff.requested"',
        '"tool.authorized"')
    done = run_cli("replay", "--ledger", str(ledger), "--verify")
    assert done.returncode == 1
    assert (f"chain broken at position {rowid} (task {key}, event tool.authorized): stored "
            "hash") in done.stderr
    assert "Traceback" not in done.stderr
    replayed = run_cli("replay-agent", "agents.examples.support:researcher", "--ledger",
                       str(ledger), "--task", key)
    assert replayed.returncode == 2
    assert replayed.stderr.startswith(
        f"error: the chain of task {key!r} is broken at version {version} (tool.authorized)")
    assert "nothing replayed" in replayed.stderr
    audit = run_cli("audit", key, "--ledger", str(ledger))
    assert audit.returncode == 1, audit.stderr
    assert f"chain BROKEN: version {version} (tool.authorized)" in audit.stdout
    edited = next(line for line in audit.stdout.splitlines() if line.startswith(f"#{version} "))
    assert "(its data does not fit its kind: KeyError 'tool')" in edited


def test_export_writes_every_event_as_a_line(demo: tuple[dict[str, object], Path],
                                             tmp_path: Path) -> None:
    result, ledger = demo
    out = tmp_path / "ledger.jsonl"
    done = run_cli("export", "--ledger", str(ledger), "--out", str(out))
    assert done.returncode == 0, done.stderr
    events = result["events"]
    assert done.stderr.strip() == f"exported {events:,} events (positions 1–{events:,}) to {out}"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["position"] for r in lines] == list(range(1, len(lines) + 1))
    assert len(lines) == events
    stored = sqlite3.connect(ledger).execute(
        "SELECT rowid, state FROM stored_events ORDER BY rowid").fetchall()
    assert [(r["position"], r["event"]) for r in lines] == [
        (rowid, json.loads(state)) for rowid, state in stored]
    task_id = lines[0]["event"]["key"]
    one = run_cli("export", "--ledger", str(ledger), "--task", task_id)
    assert one.returncode == 0, one.stderr
    audit = json.loads(run_cli("audit", task_id, "--ledger", str(ledger), "--json").stdout)
    assert len(one.stdout.splitlines()) == audit["events"]
    missing = run_cli("export", "--ledger", str(ledger), "--task", "t-nobody", "--out",
                      str(tmp_path / "nobody.jsonl"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: no events of task 't-nobody'")
    assert list(tmp_path.glob("nobody.jsonl*")) == []  # no empty or partial file left


def test_export_never_writes_over_a_ledger(demo: tuple[dict[str, object], Path],
                                           tmp_path: Path) -> None:
    """`--out` naming the ledger itself (a slip of the shell's history) must not replace
    the record with its export."""
    _, original = demo
    ledger = tmp_path / "ledger.db"
    ledger.write_bytes(original.read_bytes())
    before = ledger.read_bytes()
    done = run_cli("export", "--ledger", str(ledger), "--out", str(ledger))
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: --out {ledger} is a SQLite database")
    assert ledger.read_bytes() == before


def test_export_stops_at_a_damaged_row_and_leaves_no_file(
        demo: tuple[dict[str, object], Path], tmp_path: Path) -> None:
    _, original = demo
    ledger, *_ = edited_copy(original, tmp_path, "rowid = 7", '"kind":', '"kind"')  # no JSON
    out = tmp_path / "export.jsonl"
    done = run_cli("export", "--ledger", str(ledger), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.startswith("error: position 7 holds no JSON event"), done.stderr
    assert "--to 6 and --after 7" in done.stderr
    assert list(tmp_path.glob("export.jsonl*")) == []
    before = run_cli("export", "--ledger", str(ledger), "--to", "6")
    assert before.returncode == 0, before.stderr
    assert [json.loads(line)["position"] for line in before.stdout.splitlines()] == [
        1, 2, 3, 4, 5, 6]


def test_readers_refuse_a_database_that_is_no_ledger_and_leave_it_alone(
        tmp_path: Path) -> None:
    other = tmp_path / "app.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    for args in (["replay", "--ledger", str(other), "--verify"],
                 ["export", "--ledger", str(other)],
                 ["audit", "t-1", "--ledger", str(other)]):
        done = run_cli(*args)
        assert done.returncode == 2, args
        assert done.stderr.strip() == (f"error: {other} is a SQLite database but not a "
                                       "ledgermesh ledger (it has no stored_events table)")
    tables = sqlite3.connect(other).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("orders",)]


def test_replay_agent_finds_the_code_unchanged_or_shows_what_changed(
        demo: tuple[dict[str, object], Path]) -> None:
    _, ledger = demo
    task_id = sqlite3.connect(ledger).execute(
        "SELECT json_extract(state, '$.key') FROM stored_events WHERE "
        "json_extract(state, '$.kind') = 'tool.denied' LIMIT 1").fetchone()[0]
    for name in ("triage", "researcher", "writer", "reviewer"):
        same = run_cli("replay-agent", f"agents.examples.support:{name}", "--ledger",
                       str(ledger), "--task", task_id)
        assert same.returncode == 0, same.stdout + same.stderr
        assert same.stdout.strip().endswith("the code does what the ledger recorded")
    report = run_cli("replay-agent", "agents.examples.support:researcher", "--ledger",
                     str(ledger), "--task", task_id, "--json")
    steps = json.loads(report.stdout)["steps"]
    finished = [s for s in steps if s["verdict"] == "same"]
    assert len(finished) == 1
    # The tool calls (kb.search answered, payments.refund denied), two notes, the handoff.
    assert [b["type"] for b in finished[0]["replayed"]] == [
        "tool.call", "tool.call", "task.say", "task.say", "handoff.request"]
    assert finished[0]["unrecorded_tool_calls"] == []

    changed = run_cli("replay-agent", "tests.replay_agents:researcher", "--ledger",
                      str(ledger), "--task", task_id)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "differs" in changed.stdout
    assert 'output 1: recorded tool.call {"tool":"kb.search",' in changed.stdout
    assert 'now      task.say {"text":"policy 4.2: ' in changed.stdout
    assert 'now      nothing' in changed.stdout  # it makes 2 outputs where 5 were recorded
    assert changed.stdout.strip().endswith("deliveries differ")

    nobody = run_cli("replay-agent", "agents.examples.support:researcher", "--ledger",
                     str(ledger), "--task", "t-nobody")
    assert nobody.returncode == 2
    assert nobody.stderr.strip() == "error: no task 't-nobody' in this ledger"


def test_a_reader_that_stops_early_is_no_error(demo: tuple[dict[str, object], Path]) -> None:
    """`ledgermesh export | head -1`: the pipe closes before the export is written."""
    _, ledger = demo
    proc = subprocess.Popen([*CLI, "export", "--ledger", str(ledger)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.close()  # long before the command has imported anything
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err
    assert b"Traceback" not in err
    assert err == b""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--ledger", "/nonexistent/ledger.db"], "error: no ledger at /nonexistent"),
        (["export", "--ledger", "/nonexistent/ledger.db"], "error: no ledger at /nonexistent"),
        (["export", "--ledger", "x.db", "--after", "-1"], "error: --after and --to are"),
        (["export", "--ledger", "x.db", "--after", "50", "--to", "10"],
         "error: --to 10 is not after --after 50"),
        (["replay", "--ledger", "x.db", "--trusted-key", "garbage"],
         "error: --trusted-key 'garbage': not an nkey"),
        (["replay", "--ledger", "x.db", "--to", "-5"], "error: --to -5: give a ledger position"),
        (["demo", "--data-dir", "/proc/no-such-dir"], "error: cannot make the demo's directory"),
        (["coordinator", "run", "--ledger", "x.db", "--metrics", "9464"],
         "error: --metrics takes HOST:PORT (e.g. 127.0.0.1:9464), got '9464'"),
        (["audit", "t-1", "--ledger", "/nonexistent/ledger.db"], "error: no ledger at"),
        (["agent", "run", "agents.examples.support:nobody"],
         "error: agents.examples.support:nobody is nothing, not an Agent; "
         "agents.examples.support has agents.examples.support:researcher, "
         "agents.examples.support:reviewer, agents.examples.support:triage, "
         "agents.examples.support:writer"),
        (["tools", "run", "agents.examples.support:triage"],
         "error: agents.examples.support:triage is Agent, not a ToolHost; "
         "agents.examples.support has agents.examples.support:desk_tools"),
        (["agent", "run", "no_such_module:agent"], "error: cannot import 'no_such_module'"),
        (["agent", "run", "missing-colon"], "error: expected module:attr"),
        (["submit", "--to", "triage", "--title", "x", "--payload", "{not json"],
         "error: --payload is not valid JSON"),
        (["submit", "--to", "triage", "--title", "x", "--payload", "[1, 2]"],
         "error: --payload must be a JSON object"),
        (["policy", "check", "/nonexistent/ledgermesh.toml"], "error: no policy file at"),
        (["demo", "--tasks", "0"], "error: --tasks must be at least 1"),
    ],
)
def test_user_mistakes_get_one_clear_line(args: list[str], message: str) -> None:
    done = run_cli(*args, timeout=30)
    assert done.returncode != 0
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_the_ledger_may_come_from_the_environment(tmp_path: Path) -> None:
    """``LEDGERMESH_LEDGER`` for ``--ledger``: a PostgreSQL URL's password stays out of the
    process list. Neither given: one line saying what is missing."""
    env = {k: v for k, v in os.environ.items() if k != "LEDGERMESH_LEDGER"}
    done = subprocess.run([*CLI, "audit"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("error: --ledger is required (a SQLite file or "
                                        "postgresql://… URL; or set LEDGERMESH_LEDGER)")
    done = subprocess.run([*CLI, "audit"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False,
                          env={**env, "LEDGERMESH_LEDGER": str(tmp_path / "none.db")})
    assert done.stderr.strip() == (f"error: no ledger at {tmp_path / 'none.db'} (expected a "
                                   "SQLite file made by ledgermesh, or postgresql://…)")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_wherever_it_is_put(where: str, tmp_path: Path) -> None:
    command = ["replay", "--ledger", str(tmp_path / "none.db")]
    args = ["--debug", *command] if where == "before" else [*command, "--debug"]
    done = run_cli(*args, timeout=30)
    assert done.returncode != 0
    assert "Traceback" in done.stderr
    assert done.stderr.strip().endswith(f"LedgerError: no ledger at {tmp_path / 'none.db'} "
                                        "(expected a SQLite file made by ledgermesh, or "
                                        "postgresql://…)")


def test_a_bad_policy_is_reported_with_its_location(tmp_path: Path) -> None:
    policy = tmp_path / "ledgermesh.toml"
    policy.write_text('[agents.a]\nhandoff_to = ["ghost"]\ncolour = "blue"\n')
    done = run_cli("policy", "check", str(policy), timeout=30)
    assert done.returncode == 2
    assert "agents.a.colour: unknown key" in done.stderr
    policy.write_text('[agents.a]\nhandoff_to = ["ghost"]\n')
    done = run_cli("policy", "check", str(policy), timeout=30)
    assert "agents.a.handoff_to: unknown agent 'ghost'" in done.stderr


def test_a_policy_with_several_mistakes_has_them_all_reported_at_once(tmp_path: Path) -> None:
    """Typos in keys, with the key meant; a wrong type in another table; a dotted tool name
    left unquoted; a name ledgermesh keeps for itself. They came one per run."""
    policy = tmp_path / "ledgermesh.toml"
    policy.write_text('submiters = ["x"]\n[agents.a]\nhandof_to = ["b"]\n'
                      '[agents.b]\ndeadline_s = "soon"\n[tools.kb.search]\ndescription = "s"\n')
    done = run_cli("policy", "check", str(policy), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {policy}: submiters: unknown key (did you mean submitters?); "
        "agents.a.handof_to: unknown key (did you mean handoff_to?); "
        "agents.b: Expected `float`, got `str` (at deadline_s); "
        'tools.kb.search: unknown key (a tool name with dots is quoted: [tools."kb.search"])')
    policy.write_text('operators = ["tools"]\n[agents.coordinator]\n')
    done = run_cli("policy", "check", str(policy), timeout=30)
    assert done.stderr.strip() == (
        f"error: {policy}: agents.coordinator: 'coordinator' is ledgermesh's own principal; "
        "rename it; operators: 'tools' is ledgermesh's own principal; rename it")


def test_demo_refuses_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("keep me")
    done = run_cli("demo", "--data-dir", str(tmp_path / "afile"), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: --data-dir {tmp_path / 'afile'} is a file, not a "
                                   "directory; pass a new or demo-made directory")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    done = run_cli("demo", "--data-dir", str(tmp_path), timeout=30)
    assert done.returncode == 2
    assert "was not made by the demo" in done.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_help_teaches_the_commands() -> None:
    done = run_cli("--help", timeout=30)
    assert done.returncode == 0
    for command in ("demo", "coordinator", "agent", "submit", "tail", "replay", "audit",
                    "export", "replay-agent"):
        assert command in done.stdout


def test_a_truncated_ledger_is_caught_by_a_saved_checkpoint(
        demo: tuple[dict[str, object], Path], tmp_path: Path) -> None:
    """The demo's coordinator signs a checkpoint every second; cut the ledger below the newest
    one (an attacker hiding the last events) and the saved checkpoint exposes it."""
    _, original = demo
    saved = tmp_path / "checkpoint.json"
    done = run_cli("replay", "--ledger", str(original), "--verify", "--save-checkpoint",
                   str(saved))
    assert done.returncode == 0, done.stderr
    assert "signed checkpoints verified" in done.stdout
    assert saved.exists()
    covered = json.loads(saved.read_text())["position"]
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes(original.read_bytes())
    db = sqlite3.connect(truncated)
    db.execute("DELETE FROM stored_events WHERE rowid > ?", (covered - 3,))
    db.commit()
    db.close()
    done = run_cli("replay", "--ledger", str(truncated), "--verify", "--checkpoint", str(saved))
    assert done.returncode == 1
    assert f"truncated: ledger ends at {covered - 3}, signed checkpoint covers {covered}" \
        in done.stderr
    assert "the ledger was modified" in done.stderr
    # Alone, the cut ledger verifies (what is left is intact), and says what it cannot tell.
    alone = run_cli("replay", "--ledger", str(truncated), "--verify")
    assert alone.returncode == 0, alone.stderr
    assert "events are covered by no signed checkpoint" in alone.stdout
    assert "--checkpoint-from-nats URL, --checkpoint FILE" in alone.stdout
    # A checkpoint another coordinator signed (another ledger's): named as such.
    other = Signer.generate()
    elsewhere = tmp_path / "elsewhere.json"
    write_checkpoint(elsewhere, other.sign("lm", covered, "00" * 32))
    done = run_cli("replay", "--ledger", str(original), "--verify", "--checkpoint",
                   str(elsewhere))
    assert done.returncode == 1
    assert (f"the external checkpoint is signed by {other.public_key[:12]}…, this ledger's own "
            "by") in done.stderr
    assert "most likely it is another ledger's checkpoint" in done.stderr
    # Its key given as the only trusted one: the ledger's own checkpoints are not trusted.
    done = run_cli("replay", "--ledger", str(original), "--verify", "--trusted-key",
                   other.public_key)
    assert done.returncode == 1
    assert "signed by a key not given with --trusted-key" in done.stderr


def test_replay_without_verify_still_tells_a_broken_chain(
        demo: tuple[dict[str, object], Path], tmp_path: Path) -> None:
    _, original = demo
    ledger, *_ = edited_copy(original, tmp_path, "json_extract(state, '$.kind') = 'message.said'",
                             "policy", "POLICY")
    done = run_cli("replay", "--ledger", str(ledger), "--save-checkpoint",
                   str(tmp_path / "saved.json"))
    assert done.returncode == 0  # only --verify makes it the exit status
    assert "chains NOT verified ✗ (first break at position" in done.stdout
    assert done.stderr.startswith("warning: chain broken at position")
    assert f"no checkpoint saved to {tmp_path / 'saved.json'}: the chains did not verify" \
        in done.stderr
    assert not (tmp_path / "saved.json").exists()


def test_unknown_arguments_are_refused_except_by_bench() -> None:
    # `bench` hands its arguments to the harness's own parser; every other command keeps
    # refusing what it does not know, with a usage line, not a traceback.
    refused = run_cli("replay", "--ledger", "x.db", "--bogus")
    assert refused.returncode == 2
    assert "unrecognized arguments: --bogus" in refused.stderr
    assert "Traceback" not in refused.stderr
    bench = run_cli("bench", "--help")
    assert bench.returncode == 0, bench.stderr
    assert "--quick" in bench.stdout
    assert "--peers-python" in bench.stdout
    assert bench.stdout.startswith("usage: ledgermesh bench ")  # the name that was typed


def test_the_console_script_imports_agents_from_the_current_directory(tmp_path: Path) -> None:
    """`ledgermesh agent run myapp.agents:writer` run where `myapp/` is, as the README
    says (a console script, unlike `python -m`, does not search the current directory)."""
    script = Path(sys.executable).parent / "ledgermesh"
    assert script.is_file(), "the package's console script is installed beside python"
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "agents.py").write_text(
        "from agents import Agent\nwriter = Agent('writer')\n")
    done = subprocess.run([str(script), "replay-agent", "myapp.agents:writer",
                           "--ledger", "nowhere.db", "--task", "t-1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 2
    assert "cannot import" not in done.stderr
    assert "nowhere.db" in done.stderr  # got as far as the ledger: the agent was loaded


def test_an_agent_module_that_fails_as_it_loads_is_one_line_naming_where(
        tmp_path: Path) -> None:
    """A bug in one's own module (a NameError, a SyntaxError): the error and its file:line,
    not the framework's traceback; --debug shows that."""
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "team.py").write_text("from agents import Agent\nprint(nope)\n")
    (tmp_path / "myapp" / "bad.py").write_text("def f(:\n    pass\n")
    script = Path(sys.executable).parent / "ledgermesh"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)

    done = run("agent", "run", "myapp.team:x")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: cannot import 'myapp.team': NameError: name 'nope' "
                                   f"is not defined ({tmp_path / 'myapp' / 'team.py'}:2)")
    done = run("agent", "run", "myapp.bad:x")
    assert done.stderr.strip() == ("error: cannot import 'myapp.bad': SyntaxError: invalid "
                                   f"syntax ({tmp_path / 'myapp' / 'bad.py'}:1)")
    done = run("agent", "run", "myapp.team:x", "--debug")
    assert "Traceback" in done.stderr
    assert "NameError: name 'nope' is not defined" in done.stderr


def test_a_folder_named_like_a_package_of_ledgermesh_does_not_break_it(tmp_path: Path) -> None:
    """An ``agents/`` folder of one's own (no ``__init__.py``: a namespace package) or a
    ``bus.py`` in the current directory stood in for ledgermesh's own packages: commands
    died with an ImportError traceback. Now they work, and a module in that folder, which
    ledgermesh's package hides, is named as the reason it cannot be imported."""
    script = Path(sys.executable).parent / "ledgermesh"
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "summ.py").write_text("x = 1\n")
    (tmp_path / "bus.py").write_text("x = 1\n")
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "team.py").write_text(
        "from agents import Agent\nwriter = Agent('writer')\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)

    done = run("replay-agent", "myapp.team:writer", "--ledger", "nowhere.db", "--task", "t-1")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "nowhere.db" in done.stderr  # the agent was loaded
    done = run("replay-agent", "agents.summ:x", "--ledger", "nowhere.db", "--task", "t-1")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "cannot import 'agents.summ'" in done.stderr
    assert "which hides ./agents: rename yours" in done.stderr


@pytest.mark.parametrize("command", [
    ["coordinator", "run", "--ledger", "ledger.db", "--config",
     str(Path(__file__).parents[2] / "agents" / "examples" / "ledgermesh.toml")],
    ["tail"],
])
def test_no_nats_server_is_one_clear_error(command: list[str], tmp_path: Path) -> None:
    """Nothing listens at --nats: one line saying so after the connect deadline, not a
    log line per retry (there were ten) or a 'disconnected' that never was connected."""
    from bus.embedded import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    done = subprocess.run([*CLI, *command, "--nats", url], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"error: cannot connect to NATS at {url}: no server answered within 5 s"
    assert sum("Connect call failed" in line for line in lines) <= 1, done.stderr
    assert not any("disconnected" in line or "Traceback" in line for line in lines)


def test_demo_refuses_to_wipe_a_directory_another_demo_is_writing(tmp_path: Path) -> None:
    """A second demo in the same directory would delete the first one's ledger under its
    running coordinator: it says so instead."""
    from coordinator.ledger.owner import sole_writer

    (tmp_path / ".ledgermesh-demo").write_text("made by ledgermesh demo\n")
    with sole_writer(str(tmp_path / "ledger.db")):  # the first demo's coordinator
        done = run_cli("demo", "--data-dir", str(tmp_path), timeout=30)
    assert done.returncode == 2
    assert f"another demo is running in {tmp_path}" in done.stderr
    assert (tmp_path / "ledger.db.lock").exists()

"""``ledgermesh``: the command line. Parses arguments, runs a command, turns errors into
one clear line (the traceback only with ``--debug``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from schemas import LedgermeshError

DEFAULT_NATS = "nats://127.0.0.1:4222"
LEDGER_ENV = "LEDGERMESH_LEDGER"

EPILOG = """\
examples:
  ledgermesh demo                                   run the support-desk team end to end
  ledgermesh replay --ledger ./ledgermesh-data/ledger.db --verify
  ledgermesh audit TASK_ID --ledger ./ledgermesh-data/ledger.db
  ledgermesh export --ledger ./ledgermesh-data/ledger.db --out ledger.jsonl
  ledgermesh coordinator run --nats URL --ledger ledger.db --config ledgermesh.toml
  ledgermesh agent run myapp.agents:writer --nats URL
  ledgermesh submit --nats URL --to triage --title "Refund?" --payload '{"question": "…"}'
  ledgermesh tail --nats URL --from-start
  ledgermesh auth generate --config ledgermesh.toml --out ./nats-auth
  ledgermesh agent run myapp.agents:writer --nats URL --nkey ./nats-auth/writer.nk
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ledgermesh",
        description="Run a team of AI agents over NATS with every message and handoff "
                    "recorded in a verifiable, replayable ledger.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def nats_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nats", default=DEFAULT_NATS, metavar="URL",
                       help=f"NATS server URL (default {DEFAULT_NATS})")
        p.add_argument("--prefix", default="lm",
                       help="subject prefix, to run several deployments on one server "
                            "(default lm)")
        p.add_argument("--nkey", type=Path, default=None, metavar="FILE",
                       help="nkey seed file of this principal, from `ledgermesh auth "
                            "generate` (default: $LEDGERMESH_NKEY; none: connect without "
                            "credentials)")

    def ledger_option(p: argparse.ArgumentParser, what: str) -> None:
        # From the environment too: a PostgreSQL URL with its password stays out of the
        # process list (and a unit's command line).
        p.add_argument("--ledger", default=os.environ.get(LEDGER_ENV), metavar="LEDGER",
                       help=f"{what} (default: ${LEDGER_ENV})")

    demo = commands.add_parser("demo", help="run embedded NATS, a coordinator and a team of "
                               "agents (each its own process), then replay and audit")
    demo.add_argument("--data-dir", type=Path, default=Path("ledgermesh-data"),
                      help="where the ledger, NATS store and logs go (default "
                           "./ledgermesh-data; emptied at start)")
    demo.add_argument("--tasks", type=int, default=5, help="tasks to submit (default 5)")
    demo.add_argument("--json", action="store_true", help="print one JSON object at the end")
    demo.add_argument("--no-auth", action="store_true",
                      help="run NATS without accounts and credentials (default: one account "
                           "and nkey per process, generated into DATA_DIR/auth)")

    coordinator = commands.add_parser("coordinator", help="the coordinator service")
    coord_commands = coordinator.add_subparsers(dest="action", metavar="ACTION", required=True)
    coord_run = coord_commands.add_parser("run", help="consume intake, record, relay (until "
                                          "SIGTERM)")
    nats_options(coord_run)
    ledger_option(coord_run, "SQLite file (created if missing) or postgresql://… URL")
    coord_run.add_argument("--config", type=Path, default=Path("ledgermesh.toml"),
                           help="policy file (default ./ledgermesh.toml)")
    coord_run.add_argument("--checkpoint-every", type=float, default=30.0, metavar="SECONDS",
                           help="sign a checkpoint this often while events arrive (and every "
                                "1000 events, and when stopped; default 30)")
    coord_run.add_argument("--metrics", default=None, metavar="HOST:PORT",
                           help="serve Prometheus metrics at http://HOST:PORT/metrics "
                                "(e.g. 127.0.0.1:9464; :9464 for every interface; "
                                "default: off)")
    coord_run.add_argument("--signing-key", type=Path, default=None, metavar="FILE",
                           help="nkey seed that signs checkpoints, made there on first "
                                "start (default: LEDGER.signing.nk next to a SQLite ledger; "
                                "give one for PostgreSQL, or each start signs with a new key)")

    agent = commands.add_parser("agent", help="agent services")
    agent_commands = agent.add_subparsers(dest="action", metavar="ACTION", required=True)
    agent_run = agent_commands.add_parser("run", help="run an Agent as a service (until "
                                          "SIGTERM)")
    agent_run.add_argument("spec", metavar="MODULE:ATTR",
                           help="where the Agent is, e.g. agents.examples.support:triage")
    nats_options(agent_run)
    agent_run.add_argument("--concurrency", type=int, default=None,
                           help="deliveries handled at once (default: the Agent's own)")
    for action, verb in (("suspend", "kill switch: stop deliveries to an agent, refuse its "
                                     "output, fail its open tasks (recorded)"),
                         ("resume", "lift a suspension (recorded)")):
        cmd = agent_commands.add_parser(action, help=verb)
        cmd.add_argument("name", metavar="AGENT")
        cmd.add_argument("--reason", default="", help="why (recorded)")
        cmd.add_argument("--as", dest="principal", default=None,
                         help="operator principal (default: the --nkey file's, or operator)")
        nats_options(cmd)

    tools = commands.add_parser("tools", help="tool hosts")
    tools_commands = tools.add_subparsers(dest="action", metavar="ACTION", required=True)
    tools_run = tools_commands.add_parser("run", help="serve a ToolHost's tools (until SIGTERM)")
    tools_run.add_argument("spec", metavar="MODULE:ATTR",
                           help="where the ToolHost is, e.g. agents.examples.support:desk_tools")
    nats_options(tools_run)

    approve = commands.add_parser("approve", help="let a privileged tool run on a tainted "
                                  "task (an operator's recorded decision)")
    approve.add_argument("task_id", metavar="TASK_ID")
    approve.add_argument("--tool", required=True, metavar="NAME", help="e.g. payments.refund")
    approve.add_argument("--reason", default="", help="why (recorded)")
    approve.add_argument("--as", dest="principal", default=None,
                         help="operator principal (default: the --nkey file's, or operator)")
    nats_options(approve)

    status = commands.add_parser(
        "status", help="health of the coordinator and agents (reads as the observer: --nkey "
        "AUTH_DIR/observer.nk on a secured server)",
        epilog="exit status:\n"
               "  0  the coordinator is ok, and every agent of the policy runs its instances\n"
               "  1  the coordinator is not answering, or not ok (degraded)\n"
               "  3  the coordinator is ok, but an agent runs fewer instances than the\n"
               "     policy's `instances` (none: not answering)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    nats_options(status)
    status.add_argument("--config", type=Path, default=Path("ledgermesh.toml"),
                        help="policy naming the agents to ask (default ./ledgermesh.toml)")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    submit = commands.add_parser("submit", help="submit a task to an agent")
    nats_options(submit)
    submit.add_argument("--to", required=True, metavar="AGENT", help="agent that starts it")
    submit.add_argument("--title", required=True, help="a short description")
    submit.add_argument("--payload", default="{}", metavar="JSON", help="input as a JSON object")
    submit.add_argument("--task-id", default=None, help="task id (default: a new random one)")
    submit.add_argument("--as", dest="principal", default=None,
                        help="principal submitting it (default: the --nkey file's principal, "
                             "else client)")

    tail = commands.add_parser("tail", help="follow recorded events live")
    nats_options(tail)
    tail.add_argument("--task", default=None, metavar="TASK_ID", help="only this task")
    tail.add_argument("--from-start", action="store_true", help="begin at the first event")
    tail.add_argument("--json", action="store_true",
                      help="one JSON object per event: its ledger position and the event's "
                           "fields, to read; `export` writes records as stored, to verify")
    tail.add_argument("--limit", type=int, default=None, help="stop after N events")
    tail.add_argument("--until-closed", action="store_true",
                      help="with --task: print the task from its first event and stop when it "
                           "closes; exit 0 if it completed, 1 if it failed")

    rep = commands.add_parser("replay", help="rebuild state from the ledger; digest; verify")
    ledger_option(rep, "SQLite file or postgresql://… URL")
    rep.add_argument("--to", type=int, default=None, metavar="N", help="stop at position N")
    rep.add_argument("--verify", action="store_true",
                     help="exit 1 if any hash chain is broken (names the position)")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.add_argument("--trusted-key", action="append", default=[], metavar="PUBKEY",
                     help="only checkpoints signed by this coordinator key count (repeatable; "
                          "the coordinator logs its key at start)")
    rep.add_argument("--checkpoint", type=Path, default=None, metavar="FILE",
                     help="a saved signed checkpoint the ledger must still contain (catches a "
                          "truncated or rewritten ledger)")
    rep.add_argument("--checkpoint-from-nats", default=None, metavar="URL",
                     help="hold the ledger against the newest checkpoint in the ledger stream")
    rep.add_argument("--prefix", default="lm", help="subject prefix (with --checkpoint-from-nats)")
    rep.add_argument("--nkey", type=Path, default=None, metavar="FILE",
                     help="observer nkey seed (with --checkpoint-from-nats on a secured server)")
    rep.add_argument("--save-checkpoint", type=Path, default=None, metavar="FILE",
                     help="after a clean verify, save the newest signed checkpoint here")

    exp = commands.add_parser(
        "export", help="the ledger as JSON Lines (one event per line, as relayed)",
        description="Write recorded events as JSON Lines, in ledger order: one LedgerRecord "
                    "per line, exactly as the relay publishes it on <prefix>.ledger.… "
                    "(the stored event bytes, so every hash can be recomputed from the "
                    "line). For audits, SIEMs and other tools; no NATS needed.",
        epilog="examples:\n"
               "  ledgermesh export --ledger ledger.db --out ledger.jsonl\n"
               "  ledgermesh export --ledger ledger.db --task T-42 | jq .event\n"
               "  ledgermesh export --ledger ledger.db --after 120000 --out next.jsonl"
               "   (incremental: after the last position exported before)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ledger_option(exp, "SQLite file or postgresql://… URL")
    exp.add_argument("--out", type=Path, default=None, metavar="FILE",
                     help="write here (complete or not at all; default: stdout)")
    exp.add_argument("--after", type=int, default=0, metavar="N",
                     help="only events after position N (default 0: from the first)")
    exp.add_argument("--to", type=int, default=None, metavar="N",
                     help="stop at position N (default: the last)")
    exp.add_argument("--task", default=None, metavar="TASK_ID", help="only this task's events")

    rag = commands.add_parser(
        "replay-agent", help="run agent code against what a task recorded, and diff",
        description="Run an agent's handlers again on every delivery the ledger recorded "
                    "for it in one task (tool calls answered from the ledger, never run; "
                    "nothing sent), and compare what it says now with what it said then, "
                    "output by output. Exit 0 if the same, 1 if any delivery differs.",
        epilog="example:\n  ledgermesh replay-agent agents.examples.support:researcher "
               "--ledger ./ledgermesh-data/ledger.db --task T-42",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rag.add_argument("spec", metavar="MODULE:ATTR",
                     help="the Agent to run, e.g. myapp.agents:writer (its name picks the "
                          "deliveries)")
    ledger_option(rag, "SQLite file or postgresql://… URL")
    rag.add_argument("--task", required=True, metavar="TASK_ID", help="the task to replay")
    rag.add_argument("--json", action="store_true", help="print one JSON object")

    aud = commands.add_parser(
        "audit", help="timeline of one task: who did what, and why; or the ledger's tasks",
        epilog="examples:\n"
               "  ledgermesh audit --ledger ledger.db                      (every task)\n"
               "  ledgermesh audit --ledger ledger.db --agent researcher   (its tasks)\n"
               "  ledgermesh audit t-42 --ledger ledger.db                 (one task)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    aud.add_argument("task_id", metavar="TASK_ID", nargs="?", default=None,
                     help="the task to tell (default: list the tasks)")
    ledger_option(aud, "SQLite file or postgresql://… URL")
    aud.add_argument("--agent", default=None, metavar="NAME",
                     help="list only the tasks this agent was assigned")
    aud.add_argument("--json", action="store_true", help="print one JSON object")

    schema = commands.add_parser("schema", help="wire contracts")
    schema_commands = schema.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = schema_commands.add_parser("export", help="write JSON Schema files")
    export.add_argument("--out", type=Path, default=None,
                        help="directory to write them to, for an agent in another language "
                             "(default: the package's own schemas/json, the shipped copies: "
                             "in a source checkout, regenerates them)")

    auth = commands.add_parser("auth", help="NATS accounts and credentials")
    auth_commands = auth.add_subparsers(dest="action", metavar="ACTION", required=True)
    generate = auth_commands.add_parser(
        "generate", help="write a nats-server config include (one account and nkey user per "
                         "principal) and one seed file per principal")
    generate.add_argument("--config", type=Path, default=Path("ledgermesh.toml"),
                          help="policy file (default ./ledgermesh.toml)")
    generate.add_argument("--out", type=Path, required=True, metavar="DIR",
                          help="where auth.conf and the <principal>.nk seed files go")
    generate.add_argument("--prefix", default="lm", help="subject prefix (default lm)")
    generate.add_argument("--rotate", action="store_true",
                          help="new seeds for everyone (default: keep existing seed files)")

    # Its arguments are the harness's own (`ledgermesh bench --help` shows them).
    commands.add_parser("bench", add_help=False,
                        help="measure the handoff chain against the physical limit and peer "
                             "frameworks (in a source checkout; = python -m bench)")

    policy = commands.add_parser("policy", help="ledgermesh.toml")
    policy_commands = policy.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = policy_commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    _debug_anywhere(commands)
    return parser


def _debug_anywhere(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``--debug`` after the command too (``ledgermesh agent run X --debug``), where a
    person adds it. (Not given there, it leaves the top-level value alone.)"""
    for name, sub in commands.choices.items():
        if name == "bench":  # its arguments are the harness's own
            continue
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _debug_anywhere(nested[0])
        else:
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks and debug logs")


def run(args: argparse.Namespace) -> int:
    # Imports are per command: `ledgermesh --help` stays fast and light.
    if args.command == "demo":
        from ledgermesh.demo import run_demo

        if args.tasks < 1:
            raise ValueError("--tasks must be at least 1")
        return run_demo(args.data_dir, args.tasks, as_json=args.json, auth=not args.no_auth)
    if args.command == "coordinator":
        from ledgermesh.serve import coordinator_run

        coordinator_run(args.nats, args.ledger, args.config, args.prefix, args.nkey,
                        args.signing_key, args.checkpoint_every, args.metrics)
        return 0
    if args.command == "agent" and args.action == "run":
        from ledgermesh.serve import agent_run

        agent_run(args.spec, args.nats, args.prefix, args.concurrency, args.nkey)
        return 0
    if args.command == "agent":
        from ledgermesh.live import operator_command
        from schemas import ResumeAgent, SuspendAgent

        kind = SuspendAgent if args.action == "suspend" else ResumeAgent
        return operator_command(args.nats, args.prefix, kind(agent=args.name,
                                                             reason=args.reason),
                                task_id="-", principal=args.principal, nkey=args.nkey)
    if args.command == "approve":
        from ledgermesh.live import operator_command
        from schemas import ApproveTool

        return operator_command(args.nats, args.prefix,
                                ApproveTool(tool=args.tool, reason=args.reason),
                                task_id=args.task_id, principal=args.principal,
                                nkey=args.nkey)
    if args.command == "tools":
        from ledgermesh.serve import tools_run

        tools_run(args.spec, args.nats, args.prefix, args.nkey)
        return 0
    if args.command == "status":
        from ledgermesh.status import status_command

        return status_command(args.nats, args.prefix, args.config, nkey=args.nkey,
                              as_json=args.json)
    if args.command == "submit":
        from ledgermesh.live import submit_command

        return submit_command(args.nats, args.prefix, to=args.to, title=args.title,
                              payload_text=args.payload, task_id=args.task_id,
                              principal=args.principal, nkey=args.nkey)
    if args.command == "tail":
        from ledgermesh.live import tail_command

        return tail_command(args.nats, args.prefix, task_id=args.task,
                            from_start=args.from_start, as_json=args.json, limit=args.limit,
                            nkey=args.nkey, until_closed=args.until_closed)
    if args.command == "auth":
        from ledgermesh.auth import auth_generate_command

        return auth_generate_command(args.config, args.out, args.prefix, rotate=args.rotate)
    if args.command == "replay":
        from ledgermesh.inspect import external_checkpoint, replay_command

        checkpoint = external_checkpoint(args.checkpoint, args.checkpoint_from_nats,
                                         args.prefix, args.nkey)
        return replay_command(args.ledger, to=args.to, verify=args.verify, as_json=args.json,
                              trusted_keys=tuple(args.trusted_key), checkpoint=checkpoint,
                              save_checkpoint=args.save_checkpoint)
    if args.command == "export":
        from ledgermesh.export import export_command

        return export_command(args.ledger, args.out, after=args.after, to=args.to,
                              task_id=args.task)
    if args.command == "replay-agent":
        from ledgermesh.replay_agent import replay_agent_command

        return replay_agent_command(args.spec, args.ledger, args.task, as_json=args.json)
    if args.command == "audit":
        from ledgermesh.inspect import audit_command

        return audit_command(args.task_id, args.ledger, agent=args.agent, as_json=args.json)
    if args.command == "schema":
        from ledgermesh.inspect import schema_export

        out = args.out or Path(__file__).resolve().parent.parent / "schemas" / "json"
        return schema_export(out)
    if args.command == "policy":
        from ledgermesh.inspect import policy_check

        return policy_check(args.file)
    if args.command == "bench":
        return _bench(args.bench_args)
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "bench" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    if getattr(args, "ledger", "") is None:
        parser.error(f"--ledger is required (a SQLite file or postgresql://… URL; or set "
                     f"{LEDGER_ENV})")
    service = getattr(args, "action", None) == "run"  # long-running: log what happens
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.INFO if service else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _search_current_directory()
    try:
        return run(args)
    except BrokenPipeError:
        return _reader_gone()
    except (LedgermeshError, ValueError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(BrokenPipeError) is not None:
            return _reader_gone()  # from a task group (`tail`)
        user_error = _user_error(exc)
        if args.debug or user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# The distribution's top-level packages (pyproject.toml), imported lazily by the commands.
_OWN_PACKAGES = ("agents", "bus", "coordinator", "ledgermesh", "schemas")


def _search_current_directory() -> None:
    """``ledgermesh agent run myapp.agents:writer`` finds ``myapp/`` in the current
    directory, as ``python -m`` would: a console script's import path starts at its own
    ``bin/``. Last, so that nothing there can shadow what ledgermesh itself imports."""
    here = os.getcwd()
    if "" in sys.path or here in sys.path:
        return
    # Last is not enough for a folder of the same name as one of ledgermesh's packages (an
    # ``agents/`` of one's own is common): without an ``__init__.py`` it is a namespace
    # package, found on the path before an editable install's finder is asked. Ours are
    # imported first then (only then: each import costs start-up time).
    for name in _OWN_PACKAGES:
        if os.path.isdir(name) or os.path.isfile(f"{name}.py"):
            importlib.import_module(name)
    sys.path.append(here)


def _reader_gone() -> int:
    """The reader went away (`ledgermesh export | head`): stop quietly, as a tool killed by
    SIGPIPE would, and keep Python's exit-time flush of stdout from complaining."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def _bench(argv: list[str]) -> int:
    """Run the benchmark harness, ``bench/`` beside this package in a source checkout (it
    is not installed: it spawns agents from its own modules and measures peers)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "__main__.py").is_file():
        raise ValueError("the benchmark harness is the bench/ directory of a ledgermesh "
                         "source checkout: clone it, `pip install -e .` there, then run "
                         "`ledgermesh bench` (or `python -m bench`)")
    sys.path.insert(0, str(root))
    harness = importlib.import_module("bench.__main__")  # not a dependency of the package
    return int(harness.main(argv, prog="ledgermesh bench"))


def _user_error(exc: BaseException) -> BaseException | None:
    """The error to show a person: task groups wrap errors in exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _user_error(inner)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, LedgermeshError | ValueError) else None

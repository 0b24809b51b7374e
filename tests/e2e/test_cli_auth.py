"""The CLI with NATS auth on: `auth generate`, and every connecting command's --nkey."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import agents.examples
from bus.client import open_bus
from bus.embedded import EmbeddedNats, find_nats_server, open_embedded_nats
from ledgermesh.auth import OBSERVER, load_credentials, new_seed
from ledgermesh.live import bus_settings
from ledgermesh.processes import Child, spawn, stop_all, wait_ready
from schemas import Subjects

CLI = [sys.executable, "-m", "ledgermesh"]
POLICY = Path(agents.examples.__file__).parent / "ledgermesh.toml"


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if k != "LEDGERMESH_NKEY"}
    with anyio.fail_after(60):
        return await anyio.run_process([*CLI, *args], check=False, env={**base, **(env or {})},
                                       stdin=subprocess.DEVNULL)


def reader_gone(command: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run ``command`` into a pipe whose reader has already gone; its exit code and stderr."""
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_auth_generate_writes_a_valid_include_and_private_seeds(tmp_path: Path) -> None:
    out = tmp_path / "auth"
    done = subprocess.run([*CLI, "auth", "generate", "--config", str(POLICY), "--out", str(out)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "include" in done.stdout
    assert "triage" in done.stdout
    seeds = sorted(p.name for p in out.glob("*.nk"))
    assert seeds == sorted(f"{p}.nk" for p in ("coordinator", "observer", "triage", "researcher",
                                                 "writer", "reviewer", "client", "operator",
                                                 "tools"))
    assert all(stat.S_IMODE((out / s).stat().st_mode) == 0o600 for s in seeds)
    # A production-style server config: JetStream in the file, accounts from the include.
    server = tmp_path / "server.conf"
    server.write_text(f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
                      f'include "auth/auth.conf"\n')
    checked = subprocess.run([str(find_nats_server()), "-t", "-c", str(server)],
                             capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    before = (out / "writer.nk").read_text()
    again = subprocess.run([*CLI, "auth", "generate", "--config", str(POLICY), "--out", str(out)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert "kept 9 existing seeds" in again.stdout
    assert (out / "writer.nk").read_text() == before


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, Path]]:
    """A server running the generated accounts, JetStream from the embedded server's flags."""
    done = await cli("auth", "generate", "--config", str(POLICY), "--out", str(tmp_path / "auth"))
    assert done.returncode == 0, done.stderr
    config = tmp_path / "nats.conf"
    config.write_text('include "auth/auth.conf"\n')
    async with open_embedded_nats(tmp_path / "nats", config_file=config) as server:
        yield server, tmp_path / "auth"


async def test_commands_connect_with_their_own_nkey(secured: tuple[EmbeddedNats, Path],
                                                    tmp_path: Path) -> None:
    server, auth = secured
    url = ["--nats", server.url]
    children: list[Child] = []
    try:
        children.append(spawn("coordinator", ["coordinator", "run", *url, "--ledger",
                                              str(tmp_path / "ledger.db"), "--config",
                                              str(POLICY), "--nkey", str(auth / "coordinator.nk")],
                              tmp_path / "logs"))
        subjects = Subjects("lm")
        observer = bus_settings(server.url, "test_observer",
                                load_credentials(auth / "observer.nk", subjects, OBSERVER))
        async with open_bus(observer) as bus:
            await wait_ready(bus, subjects, children)
        submitted = await cli("submit", *url, "--nkey", str(auth / "client.nk"), "--to", "triage",
                              "--title", "hello", "--task-id", "t-auth-1")
        assert submitted.returncode == 0, submitted.stderr.decode()
        assert b"submitted t-auth-1 to triage (recorded)" in submitted.stdout
        # Its hint works as written on a secured server: it names the seed too.
        assert (f"watch it:  ledgermesh tail --nats {server.url} --nkey {auth / 'client.nk'} "
                "--task t-auth-1 --until-closed").encode() in submitted.stdout
        # The observer's seed from the environment; its principal from the file name.
        tailed = await cli("tail", *url, "--task", "t-auth-1", "--from-start", "--limit", "1",
                           "--json", env={"LEDGERMESH_NKEY": str(auth / "observer.nk")})
        assert tailed.returncode == 0, tailed.stderr.decode()
        assert json.loads(tailed.stdout)["kind"] == "task.submitted"
        # `tail … | head`: the reader closes the pipe; tail stops quietly at its next line.
        env = {**os.environ, "LEDGERMESH_NKEY": str(auth / "observer.nk")}
        returncode, err = await anyio.to_thread.run_sync(
            reader_gone, [*CLI, "tail", *url, "--from-start", "--json"], env)
        assert returncode == 141, err.decode()
        assert b"Traceback" not in err
    finally:
        await stop_all(children)
    assert children[0].process.returncode == 0, children[0].log_tail()
    assert "violation" not in children[0].log_file.read_text().lower()


async def test_missing_or_bad_credentials_get_one_clear_line(secured: tuple[EmbeddedNats, Path],
                                                             tmp_path: Path) -> None:
    server, _ = secured
    garbage = tmp_path / "garbage.nk"
    garbage.write_text("not a seed\n")
    cases = [
        ([], "refused the connection without credentials: Authorization Violation"),
        (["--nkey", str(garbage)], "garbage.nk: not a valid nkey seed"),
        (["--nkey", str(tmp_path / "missing.nk")], "no nkey seed file at"),
    ]
    for extra, message in cases:
        with anyio.fail_after(4):  # refused at once, not after the connect deadline
            done = await cli("tail", "--nats", server.url, "--limit", "1", *extra)
        stderr = done.stderr.decode()
        assert done.returncode == 2, stderr
        assert stderr.startswith("error: "), stderr
        assert message in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
    # A well-formed seed the server does not know: refused too.
    stranger = tmp_path / "stranger.nk"
    stranger.write_text(new_seed() + "\n")
    done = await cli("tail", "--nats", server.url, "--limit", "1", "--nkey", str(stranger))
    assert done.returncode == 2
    assert b"refused the connection with nkey credentials" in done.stderr


async def test_an_agent_with_another_principals_seed_stops_with_one_clear_line(
        secured: tuple[EmbeddedNats, Path], tmp_path: Path) -> None:
    server, auth = secured
    agent = ["agent", "run", "agents.examples.support:writer", "--nats", server.url]
    # Picked from the generated directory: told before connecting.
    with anyio.fail_after(10):
        done = await cli(*agent, "--nkey", str(auth / "reviewer.nk"))
    assert done.returncode == 2
    assert done.stderr.decode().strip() == (
        f"error: {auth / 'reviewer.nk'} is reviewer's seed, and this process is writer: "
        f"give --nkey {auth / 'writer.nk'}")
    # `status` reads as the observer: an operator's seed was the natural guess, and made
    # everything look down.
    done = await cli("status", "--nats", server.url, "--nkey", str(auth / "operator.nk"))
    assert done.returncode == 2
    assert done.stderr.decode().strip() == (
        f"error: {auth / 'operator.nk'} is operator's seed, and this process is observer: "
        f"give --nkey {auth / 'observer.nk'}")
    # Copied elsewhere under another name: NATS refuses its pulls, and it stops (it said
    # "ready" and retried without end), whether or not a coordinator runs.
    copied = tmp_path / "mine.nk"
    copied.write_bytes((auth / "reviewer.nk").read_bytes())
    with anyio.fail_after(30):
        done = await cli(*agent, "--nkey", str(copied))
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert stderr.splitlines()[-1].startswith("error: NATS refuses what agent writer needs ("), \
        stderr
    assert "its --nkey is not writer's" in stderr
    assert "Traceback" not in stderr


async def test_demo_runs_without_auth_for_comparison(tmp_path: Path) -> None:
    # With auth (the default) the demo runs in test_cli.py.
    data = tmp_path / "demo"
    done = await cli("demo", "--json", "--tasks", "1", "--data-dir", str(data), "--no-auth")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["tasks_completed"] == 1
    assert not (data / "auth").exists()
    assert not (data / "nats.conf").exists()

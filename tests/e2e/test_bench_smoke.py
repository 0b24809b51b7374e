"""``ledgermesh bench --quick`` (= ``python -m bench --quick``, the CI smoke check) runs end
to end and writes every figure; no thresholds.

The machine is shared and noisy, so nothing here asserts a timing: only that each figure
was measured (present and positive) and the run was clean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio

from bench import pprof, transit
from bus.client import BusSettings, open_bus
from bus.embedded import EmbeddedNats, free_port, open_embedded_nats
from bus.topology import StreamSpec

SYSTEM_FIGURES = (
    "handoffs_per_s", "handoff_p50_ms_1", "handoff_p99_ms_1", "handoff_p50_ms_half",
    "handoff_p99_ms_half", "ratio_vs_limit", "coordinator_peak_rss_mb",
    "replay_events_per_s", "raw_read_decode_events_per_s",
    "rows_read_decode_events_per_s", "replay_vs_raw", "ledger_bytes_per_event",
)


def positive(stat: dict[str, object]) -> bool:
    keys = {"median", "min", "max", "runs"}
    values = [stat.get(k) for k in ("median", "min", "max")]
    return keys <= stat.keys() and all(isinstance(v, float | int) and v > 0 for v in values)


def test_bench_smoke_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Through the CLI, from outside the checkout: the harness and its agent processes must
    # still find bench/.
    proc = subprocess.run([sys.executable, "-m", "ledgermesh", "bench", "--quick",
                           "--skip-peers", "--json", str(out), "--workdir",
                           str(tmp_path / "work")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "handoffs/s, 64 in flight" in proc.stdout  # the table was printed
    result = json.loads(out.read_text())

    sqlite = result["backends"]["sqlite"]
    missing = [k for k in SYSTEM_FIGURES if not positive(sqlite.get(k, {}))]
    assert missing == []
    assert sqlite["replay_ledger"]["events"] > 0

    limit = result["baselines"]["limit"]
    assert positive(limit["handoffs_per_s"])
    assert positive(limit["handoff_p50_ms_1"])
    assert positive(result["baselines"]["jetstream"]["pipelined_per_s"])
    assert positive(result["baselines"]["jetstream"]["one_at_a_time_per_s"])
    assert positive(result["baselines"]["raw_read_decode"]["events_per_s"])

    assert set(result["peers"]) == {"autogen-core", "autogen-grpc", "langgraph",
                                    "agent-framework"}
    assert all(p["status"] == "skipped" for p in result["peers"].values())
    assert result["meta"]["machine"]["cpus"] >= 1
    assert result["workload"]["hops"] == 5


async def test_transit_measures_core_and_jetstream(nats_server: EmbeddedNats) -> None:
    figures = await transit.measure(nats_server.url, samples=20)
    assert sorted(figures) == [
        "core_p50_ms_pause_0ms", "core_p50_ms_pause_2ms",
        "jetstream_p50_ms_pause_0ms", "jetstream_p50_ms_pause_2ms"]
    assert all(value > 0 for value in figures.values())


async def test_nats_profile_is_read_from_a_real_server(tmp_path: Path, prefix: str) -> None:
    """``bench.stages --nats-profile``: nats-server's own pprof, parsed without Go's tools."""
    port = free_port()
    config = tmp_path / "prof.conf"
    config.write_text(f"prof_port: {port}\n", encoding="utf-8")
    async with (open_embedded_nats(tmp_path / "nats", config_file=config) as server,
                open_bus(BusSettings(url=server.url, name="profiled")) as bus):
        await bus.ensure_streams([StreamSpec(f"{prefix.upper()}_P", (f"{prefix}.p.>",),
                                             "limits")])
        profile: list[bytes] = []

        async def take() -> None:
            profile.append(await anyio.to_thread.run_sync(pprof.fetch, port, 1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            while not profile:  # keep the server busy storing while it is sampled
                await bus.publish_all([(f"{prefix}.p.x", b"x" * 500, {})] * 200)
    parsed = pprof.parse(profile[0])
    assert parsed.total > 0
    assert sum(parsed.flat.values()) == parsed.total  # every sample has a function
    # JetStream stored what was published: its store shows in the stacks.
    assert any("fileStore" in name for name in parsed.cumulative)
    # The summary names the server's functions without their module path.
    assert any(" server.(*" in line for line in parsed.top(50))

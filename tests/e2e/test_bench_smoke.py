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

from bench import transit
from bus.embedded import EmbeddedNats

SYSTEM_FIGURES = (
    "handoffs_per_s", "handoff_p50_ms_1", "handoff_p99_ms_1", "handoff_p50_ms_half",
    "handoff_p99_ms_half", "ratio_vs_limit", "coordinator_peak_rss_mb",
    "replay_events_per_s", "raw_read_decode_events_per_s",
    "rows_read_decode_events_per_s", "replay_vs_raw", "ledger_bytes_per_event",
)


def positive(stat: dict[str, object]) -> bool:
    keys = {"median", "min", "max", "runs"}
    return keys <= stat.keys() and all(
        isinstance(stat[k], float | int) and stat[k] > 0 for k in ("median", "min", "max"))


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

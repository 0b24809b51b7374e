"""A process's CPU work per handoff in instructions: ``python -m bench.instructions``.

On a shared 2-core VM, timings of the same code drift by ±20% within minutes, so a 3%
change cannot be seen by timing it. Counted instructions do not drift: the same stack as
the benchmark runs with the coordinator (or one agent: ``--process hop3``) under
valgrind's callgrind, and the instructions it executes over a fixed number of tasks
(after a warm-up), divided by their handoffs, repeat to within 0.1% from run to run.
Compare two commits by running this in each.

Under callgrind the coordinator runs ~50x slower, so at 64 in flight its batches are
large (per-message costs show; per-commit costs are amortised away), and at 1 in flight
each commit holds one hop (per-commit costs show). Needs ``valgrind`` on the PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio


def _is(process: str, args: list[str]) -> bool:
    if process == "coordinator":
        return "coordinator" in args and "run" in args
    return f"bench.chain:{process}" in args


def _under_callgrind(out_dir: str, process: str) -> Any:
    """A ``Popen`` that starts ``process`` (and only it) under callgrind."""
    popen = subprocess.Popen

    def start(args: list[str], *rest: Any, **kwargs: Any) -> Any:
        if _is(process, args):
            args = ["valgrind", "--tool=callgrind",
                    f"--callgrind-out-file={out_dir}/callgrind.%p", *args]
        return popen(args, *rest, **kwargs)

    return start


def _total(path: Path) -> int:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {path}")


async def measure(in_flight: int, tasks: int, workdir: Path,
                  process: str = "coordinator") -> dict[str, Any]:
    import ledgermesh.processes as processes
    from bench.stack import Driver, open_stack

    out_dir = workdir / "callgrind"
    out_dir.mkdir(parents=True, exist_ok=True)
    processes.subprocess.Popen = _under_callgrind(  # type: ignore[attr-defined]
        str(out_dir), process)
    async with open_stack(workdir, str(workdir / "ledger.db")) as stack:
        driver = Driver(stack)
        pid = stack.pids()[process]

        def dump() -> None:  # close a part of the profile: the counts since the last one
            subprocess.run(["callgrind_control", "--dump", str(pid)], check=True,
                           capture_output=True)

        async with driver.observing():
            await driver.closed_loop("warm", in_flight, tasks=max(20, tasks // 5),
                                     max_seconds=900)
            await anyio.to_thread.run_sync(dump)
            window = await driver.closed_loop("count", in_flight, tasks=tasks,
                                              max_seconds=1800)
            await anyio.to_thread.run_sync(dump)
    parts = sorted(out_dir.glob(f"callgrind.{pid}.*"), key=lambda p: int(p.suffix[1:]))
    handoffs = 5 * len(window.done)
    return {"process": process, "in_flight": in_flight, "handoffs": handoffs,
            "instructions_per_handoff": _total(parts[1]) / handoffs}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-flight", type=int, default=64, metavar="N")
    parser.add_argument("--process", default="coordinator",
                        choices=("coordinator", "hop1", "hop2", "hop3", "hop4", "hop5"),
                        help="the process to count (an agent handles 1 in 5 handoffs: its "
                             "count per handoff is per own delivery / 5)")
    parser.add_argument("--tasks", type=int, default=600,
                        help="tasks counted after the warm-up (default 600; ~90 s at 64)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench.instructions needs valgrind (apt install valgrind)")
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([repo, *filter(None,
                                                              [os.environ.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="ledgermesh-instructions-") as workdir:
        result = anyio.run(measure, args.in_flight, args.tasks, Path(workdir), args.process)
    print(f"{result['instructions_per_handoff']:,.0f} {args.process} instructions per handoff "
          f"at {result['in_flight']} in flight ({result['handoffs']:,} handoffs counted)")


if __name__ == "__main__":
    main()

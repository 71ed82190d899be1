"""Benchmark: `cis dag execute --local` against running the same commands under a PTY by hand.

Workloads (issue 2):
  fan   N independent `true` tasks, max_workers 4   vs  xargs -P 4 script -qec true /dev/null
  chain N `true` tasks, each depending on the last   vs  a shell loop of script -qec true /dev/null

Both sides spawn every command in a fresh PTY, so the difference is what cis_bot adds: parsing,
the engine, session bookkeeping, transcripts, upstream files and the report. Baselines are
measured in the same run, interleaved, and we report medians and ratios (absolute times drift on
shared machines). Usage: python bench/local_run.py [--tasks 200] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compiled import compile_cis_bot

# What `cis dag execute --local` imports before it runs anything.
IMPORTS = "import cis_bot.cli.progress, cis_bot.config, cis_bot.run.local, cis_bot.dag.spec"


def fan_dag(n: int) -> str:
    tasks = "".join(f'[[tasks]]\nid = "t{i}"\ncommand = "true"\n\n' for i in range(n))
    return f'[dag]\nname = "fan"\nmax_workers = 4\n\n{tasks}'.replace("[[tasks]]", "[[dag.tasks]]")


def chain_dag(n: int) -> str:
    parts = ['[dag]\nname = "chain"\n']
    for i in range(n):
        deps = f'deps = ["t{i - 1}"]\n' if i else ""
        parts.append(f'[[dag.tasks]]\nid = "t{i}"\ncommand = "true"\n{deps}')
    return "\n".join(parts)


def timed(cmd: list[str] | str, **kw: object) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - start


def run_cis(dag: Path, state: Path) -> float:
    env = {**os.environ, "CIS_CONFIG": os.devnull}
    cmd = [sys.executable, "-m", "cis_bot", "dag", "execute", "--local", str(dag), "--json"]
    return timed([*cmd, "--state-dir", str(state)], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    compile_cis_bot(sys.executable)
    n = args.tasks
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "fan.toml").write_text(fan_dag(n))
        (root / "chain.toml").write_text(chain_dag(n))
        baselines = {
            "fan": f"seq {n} | xargs -P 4 -I{{}} script -qec true /dev/null",
            "chain": f"for i in $(seq {n}); do script -qec true /dev/null; done",
        }
        python_start = statistics.median(
            timed([sys.executable, "-c", IMPORTS]) for _ in range(args.repeat)
        )
        for name, baseline in baselines.items():
            ours, theirs = [], []
            for i in range(args.repeat):
                theirs.append(timed(baseline, shell=True, executable="/bin/bash"))
                ours.append(run_cis(root / f"{name}.toml", root / f"state-{name}-{i}"))
            cis_s, base_s = statistics.median(ours), statistics.median(theirs)
            results[name] = {
                "tasks": n,
                "cis_s": round(cis_s, 3),
                "baseline_s": round(base_s, 3),
                "ratio": round(cis_s / base_s, 2),
                "overhead_ms_per_task": round((cis_s - base_s) / n * 1000, 2),
                "overhead_ms_per_task_without_python_start": round(
                    (cis_s - python_start - base_s) / n * 1000, 2
                ),
            }
    if args.json:
        print(json.dumps({"python_start_s": round(python_start, 3), **results}, indent=2))
        return
    print(f"python start + imports: {python_start:.3f}s (median of {args.repeat})")
    print(f"{'workload':8} {'cis':>8} {'baseline':>9} {'ratio':>6} {'ms/task':>8} {'ms/task*':>9}")
    for name, r in results.items():
        print(
            f"{name:8} {r['cis_s']:>7.3f}s {r['baseline_s']:>8.3f}s {r['ratio']:>6.2f}"
            f" {r['overhead_ms_per_task']:>8.2f}"
            f" {r['overhead_ms_per_task_without_python_start']:>9.2f}"
        )
    print("* overhead per task after subtracting Python start-up and imports")


if __name__ == "__main__":
    main()

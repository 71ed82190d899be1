"""Benchmark: how long `cis` takes to start, and to answer a shell's Tab.

Baseline, measured in the same run: the interpreter alone (`python -c pass`). Measured: `cis
--help`, `cis dag list --help` (the parser with every subcommand), and a completion of
`cis dag logs --state-dir D <Tab>` as the shell asks for it (argcomplete's environment) in a
state directory of --runs runs of 5 tasks. With --against PYTHON (another checkout's
interpreter, e.g. main's .venv/bin/python) the same commands through it, for a before/after.
Goal: completion support adds nothing to a start that does not complete.
Usage: python bench/startup.py [--repeat 30] [--runs 200] [--against PYTHON] [--json]
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


def medians(commands: dict[str, tuple[list[str], dict[str, str]]], repeat: int) -> dict[str, float]:
    """Each command's median wall time, the commands taking turns (so that a change in the
    machine's load touches every figure alike)."""
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(repeat):
        for label, (argv, env) in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def fill_state_dir(state: Path, runs: int) -> None:
    """Run directories as ``cis dag execute`` leaves them (what completion reads)."""
    for i in range(runs):
        sessions = state / "runs" / f"20261128-{i // 60:04d}{i % 60:02d}-{i:04x}" / "sessions"
        sessions.mkdir(parents=True)
        for task in ("build", "test", "lint", "docs", "ship"):
            (sessions / f"{task}.1.log").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--against", metavar="PYTHON", help="another checkout's interpreter")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        fill_state_dir(state, args.runs)
        env = {**os.environ, "CIS_CONFIG": os.devnull}
        line = f"cis dag logs --state-dir {state} 20261128-00"
        completing = {
            **env,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_SHELL": "bash",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": os.devnull,
        }
        pythons = {"this": sys.executable}
        if args.against:
            pythons["against"] = args.against
        commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        for name, python in pythons.items():
            cis = [python, "-c", "from cis_bot.cli import main; main()"]
            commands[f"{name}: python -c pass"] = ([python, "-c", "pass"], env)
            commands[f"{name}: cis --help"] = ([*cis, "--help"], env)
            commands[f"{name}: cis dag list --help"] = ([*cis, "dag", "list", "--help"], env)
        this = [sys.executable, "-c", "from cis_bot.cli import main; main()"]
        commands["this: completion (Tab)"] = (this, completing)
        results = medians(commands, args.repeat)

    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name in pythons:
        base = results[f"{name}: python -c pass"]
        print(f"{name} ({pythons[name]}): interpreter alone {base * 1000:.0f} ms")
        for key, secs in results.items():
            if key.startswith(f"{name}: ") and not key.endswith("python -c pass"):
                label = key.split(": ", 1)[1]
                print(
                    f"  {label:<24} {secs * 1000:6.0f} ms  +{(secs - base) * 1000:.0f} ms over "
                    f"the interpreter, x{secs / base:.2f}"
                )
    if args.against:
        for label in ("cis --help", "cis dag list --help"):
            ratio = results[f"this: {label}"] / results[f"against: {label}"]
            print(f"{label}: x{ratio:.3f} of the other checkout's")


if __name__ == "__main__":
    main()

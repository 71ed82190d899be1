"""Benchmark: what the node and its embedded homeserver add to `cis dag execute --local`.

Baseline, measured in the same run: the same DAG through the in-process engine alone (RunDriver
+ LocalExecutor on a SessionManager, no node, no homeserver, no room). Both sides are whole
processes timed from spawn to exit, so imports and start-up count. Goal (issue 4): local mode at
most 0.5 s slower. Usage: python bench/local_overhead.py [DAG] [--repeat 7] [--json]
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

REPO = Path(__file__).resolve().parent.parent

ENGINE_ONLY = """
import asyncio, sys
from pathlib import Path
from cis_bot.config import load_config
from cis_bot.dag.engine import RunEngine
from cis_bot.run.attempt import RunPaths
from cis_bot.run.driver import RunDriver
from cis_bot.run.local import LocalExecutor
from cis_bot.dag.load import load_dag
from cis_bot.session.manager import SessionManager

async def main():
    config = load_config(None)
    spec = load_dag(sys.argv[1], agents=config.agents.keys(), default_agent=config.default_agent)
    engine = RunEngine(spec, max_workers=config.dag.local.max_workers)
    driver = RunDriver(engine)
    manager = SessionManager()
    executor = LocalExecutor(driver, manager, run_id="bench", node_id="bench",
                             paths=RunPaths(Path(sys.argv[2])),
                             profiles=config.agents, work_dir=Path.cwd())
    await driver.run(executor)
    await manager.close()
    assert engine.status == "completed", engine.status

asyncio.run(main())
"""


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "CIS_CONFIG": os.devnull}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dag", nargs="?", default=str(REPO / "examples" / "hello.toml"))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    engine_only, local = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            engine_only.append(timed([sys.executable, "-c", ENGINE_ONLY, args.dag, f"{tmp}/e{i}"]))
            cmd = [sys.executable, "-m", "cis_bot", "dag", "execute", "--local", args.dag]
            local.append(timed([*cmd, "--state-dir", f"{tmp}/l{i}", "--json"]))
    base, ours = statistics.median(engine_only), statistics.median(local)
    result = {
        "dag": args.dag,
        "engine_only_s": round(base, 3),
        "local_mode_s": round(ours, 3),
        "added_s": round(ours - base, 3),
        "ratio": round(ours / base, 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{Path(args.dag).name}, median of {args.repeat} whole-process runs:")
    print(f"  in-process engine alone   {base:.3f}s")
    print(f"  cis dag execute --local   {ours:.3f}s  (+{ours - base:.3f}s, x{ours / base:.2f})")


if __name__ == "__main__":
    main()

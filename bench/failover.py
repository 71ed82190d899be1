"""Benchmark: how long a task waits after its worker is SIGKILLed, until it runs again elsewhere.

A chain of N tasks coordinated through a Synapse room (`cis dag execute --matrix`), run by three
`cis node` workers with the default timings (heartbeat 2 s, lease 5 s). Each task's first attempt
sleeps a minute; at a random moment into it (0.5 to 2.5 s, so kills fall anywhere between two
heartbeats) its worker is killed with SIGKILL, and the time until the task's second attempt
starts on another worker is measured (the kill's time against the mtime of the file the second
attempt touches first: one clock, this machine's). The killed worker is started again before the
next task, so every task has workers to go to.

Goal (issue 14): p50 <= 5 s, max <= 10 s. Anchors, for the same "the worker died, when does its
task run again": Airflow's zombie detection ~300 s, Celery/Redis visibility timeout 3,600 s,
Dask's worker-ttl 300 s, Ray ~20-55 s, Nomad ~20 s.
Usage: python bench/failover.py [--kills 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.client import MatrixClient  # noqa: E402
from tests.support.nodes import (  # noqa: E402
    NodePlan,
    NodeProcess,
    cis_command,
    cis_env,
    heartbeats,
    joined_members,
    plan_nodes,
    registration_files,
    run_room,
    wait_for,
    write_configs,
)
from tests.support.synapse import SynapseServer  # noqa: E402

#: The config's defaults, written out.
HEARTBEAT_SECS = 2.0
LEASE_SECS = 5.0
IDLE_HEARTBEAT_SECS = 10.0


def dag_text(n: int) -> str:
    tasks = []
    for i in range(n):
        deps = f'deps = ["k{i - 1}"]\n' if i else ""
        tasks.append(
            f'[[dag.tasks]]\nid = "k{i}"\n{deps}'
            'command = "touch $CIS_TASK_ID.$CIS_ATTEMPT; '
            'if [ $CIS_ATTEMPT = 1 ]; then sleep 60; fi"\n'
        )
    return '[dag]\nname = "failover"\n\n' + "\n".join(tasks)


def started(workers: list[NodePlan], task: str, attempt: int) -> tuple[int, float] | None:
    """Which worker started that attempt, and when (its marker file's mtime)."""
    for i, plan in enumerate(workers):
        marker = plan.workdir / f"{task}.{attempt}"
        if marker.exists():
            return i, marker.stat().st_mtime
    return None


async def bench(kills: int, root: Path, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    plans = plan_nodes(root, "cis.local", "coord", "wa", "wb", "wc")
    coord, *workers = plans
    synapse = SynapseServer(
        workdir=root / "synapse", appservice_files=registration_files(plans), log_level="WARNING"
    )
    synapse.start()
    processes: list[NodeProcess] = []
    proc: subprocess.Popen[str] | None = None
    restarts: list[float] = []
    try:
        async with aiohttp.ClientSession() as http:
            admin_id, token = await synapse.create_user("admin", admin=True)
            admin = MatrixClient(http, synapse.base_url, user_id=admin_id, token=token)
            timings = {
                "heartbeat_secs": HEARTBEAT_SECS,
                "lease_secs": LEASE_SECS,
                "idle_heartbeat_secs": IDLE_HEARTBEAT_SECS,
            }
            write_configs([coord], synapse.base_url, allowed_users=[admin_id], **timings)
            write_configs(
                workers,
                synapse.base_url,
                allowed_users=[admin_id, coord.user_id],
                accept_agents=["shell"],
                **timings,
            )
            processes = [NodeProcess(w).start() for w in workers]
            room = await run_room(admin, [p.user_id for p in plans])

            async def ready() -> bool:
                members, beats = await joined_members(admin, room), await heartbeats(admin, room)
                return all(w.user_id in members and w.user_id in beats for w in workers)

            await wait_for(ready, timeout=60, what="workers in the room")
            dag = root / "failover.toml"
            dag.write_text(dag_text(kills))
            argv = cis_command(
                "dag", "execute", "--matrix", "--room", room, str(dag), "--json",
                "--config", str(coord.config), "--state-dir", str(coord.state_dir),
            )  # fmt: skip
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=cis_env(),
                cwd=root,
                start_new_session=True,
            )
            for i in range(kills):
                task = f"k{i}"
                first = await wait_for(
                    lambda t=task: asyncio.sleep(0, started(workers, t, 1)),
                    timeout=120,
                    what=f"{task} to start",
                )
                victim = first[0]
                await asyncio.sleep(rng.uniform(0.5, 2.5))
                victim_process = processes[victim].process
                assert victim_process is not None
                os.killpg(victim_process.pid, signal.SIGKILL)
                killed_at = time.time()
                second = await wait_for(
                    lambda t=task: asyncio.sleep(0, started(workers, t, 2)),
                    timeout=60,
                    what=f"{task} to run again",
                )
                assert second[0] != victim, f"{task} ran again on the worker that was killed"
                restarts.append(second[1] - killed_at)
                print(
                    f"  kill {i + 1}: {workers[victim].node_id} -> "
                    f"{workers[second[0]].node_id} in {restarts[-1]:.2f}s",
                    file=sys.stderr,
                )
                processes[victim].process = None
                processes[victim].start()
            out, err = await asyncio.to_thread(proc.communicate, timeout=120)
            if proc.returncode != 0:
                raise SystemExit(f"the run failed:\n{err[-3000:]}")
            report = json.loads(out)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in processes:
            p.stop()
        synapse.stop()
    return {
        "kills": kills,
        "restart_s_p50": round(statistics.median(restarts), 2),
        "restart_s_max": round(max(restarts), 2),
        "restart_s_min": round(min(restarts), 2),
        "restarts_s": [round(r, 2) for r in restarts],
        "run_status": report["status"],
        "heartbeat_secs": HEARTBEAT_SECS,
        "lease_secs": LEASE_SECS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the nodes' files and logs here")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(bench(args.kills, args.keep, args.seed))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(bench(args.kills, Path(tmp), args.seed))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['kills']} kills, heartbeat {HEARTBEAT_SECS:g}s, lease {LEASE_SECS:g}s, "
        "3 workers on Synapse:"
    )
    print(
        f"  kill -> running elsewhere  p50 {result['restart_s_p50']}s  "
        f"max {result['restart_s_max']}s  min {result['restart_s_min']}s"
    )
    print(f"  the run: {result['run_status']}")


if __name__ == "__main__":
    main()

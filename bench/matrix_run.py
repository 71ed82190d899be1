"""Benchmark: matrix mode on a real Synapse with two worker nodes, against --local.

N trivial tasks (`true`, independent, max_workers 16: two workers of 8) coordinated through a
Synapse room by `cis dag execute --matrix` and run by two `cis node` workers. Reported:
  - assignment-to-claim latency p50/p95: the homeserver's origin_server_ts of each
    cis.dag.task.claimed minus that of its cis.dag.task.assigned (one clock, the homeserver's);
  - tasks/s over the run's wall time (process spawn to exit);
and, measured in the same run as the baseline, `cis dag execute --local` on the same DAG.
Goals (issue 4): p50 <= 50 ms, >= 20 tasks/s. Usage: python bench/matrix_run.py [--tasks 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    NodeProcess,
    cis_command,
    cis_env,
    heartbeats,
    joined_members,
    plan_nodes,
    registration_files,
    room_events,
    run_room,
    wait_for,
    write_configs,
)
from tests.support.synapse import SynapseServer  # noqa: E402


def dag_text(n: int, max_workers: int) -> str:
    tasks = "".join(f'[[dag.tasks]]\nid = "t{i}"\ncommand = "true"\n\n' for i in range(n))
    return f'[dag]\nname = "bench"\nmax_workers = {max_workers}\n\n{tasks}'


def timed_cis(*args: str, cwd: Path) -> tuple[float, dict[str, object]]:
    start = time.perf_counter()
    proc = subprocess.run(
        cis_command(*args, "--json"), capture_output=True, text=True, env=cis_env(), cwd=cwd
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cis {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return elapsed, json.loads(proc.stdout)


async def bench(
    n: int, root: Path, postgres: str | None = None, max_workers: int = 16
) -> dict[str, object]:
    plans = plan_nodes(root, "cis.local", "coord", "wa", "wb")
    coord, *workers = plans
    extra: dict[str, object] = {}
    if postgres:
        extra["database"] = {"name": "psycopg2", "args": _dsn(postgres)}
    synapse = SynapseServer(
        workdir=root / "synapse",
        appservice_files=registration_files(plans),
        log_level="WARNING",
        extra_config=extra,
    )
    synapse.start()
    processes: list[NodeProcess] = []
    try:
        async with aiohttp.ClientSession() as http:
            admin_id, token = await synapse.create_user("admin", admin=True)
            admin = MatrixClient(http, synapse.base_url, user_id=admin_id, token=token)
            write_configs([coord], synapse.base_url, allowed_users=[admin_id])
            write_configs(
                workers,
                synapse.base_url,
                allowed_users=[admin_id, coord.user_id],
                accept_agents=["shell"],
                heartbeat_secs=5,
                extra="\n[dag.local]\nmax_workers = 8\n",
            )
            processes = [NodeProcess(w).start() for w in workers]

            async def registered() -> bool:
                for w in workers:
                    r = await admin.request("GET", f"/_matrix/client/v3/profile/{w.user_id}")
                    if r.status != 200:
                        return False
                return True

            await wait_for(registered, what="workers")
            room = await run_room(admin, [p.user_id for p in plans])

            async def ready() -> bool:
                members, beats = await joined_members(admin, room), await heartbeats(admin, room)
                return all(w.user_id in members and w.user_id in beats for w in workers)

            await wait_for(ready, what="workers in the room")
            dag = root / "bench.toml"
            dag.write_text(dag_text(n, max_workers))
            local_s, local_report = timed_cis(
                "dag", "execute", "--local", str(dag), "--state-dir", str(root / "local"), cwd=root
            )
            matrix_s, report = timed_cis(
                "dag", "execute", "--matrix", "--room", room, str(dag),
                "--config", str(coord.config), "--state-dir", str(coord.state_dir), cwd=root,
            )  # fmt: skip
            assert report["status"] == local_report["status"] == "completed", report["status"]
            events = await room_events(admin, room)
    finally:
        for p in processes:
            p.stop()
        synapse.stop()
    run_id = report["run_id"]
    assigned: dict[str, int] = {}
    latencies: list[int] = []
    per_worker: dict[str, int] = {}
    for e in events:
        content = e.get("content", {})
        if content.get("run_id") != run_id:
            continue
        key = f"{content.get('task_id')}:{content.get('attempt')}"
        if e["type"] == "cis.dag.task.assigned":
            assigned[key] = e["origin_server_ts"]
            per_worker[content["assigned_to"]] = per_worker.get(content["assigned_to"], 0) + 1
        elif e["type"] == "cis.dag.task.claimed" and key in assigned:
            latencies.append(e["origin_server_ts"] - assigned[key])
    latencies.sort()
    p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)]
    return {
        "tasks": n,
        "claim_latency_ms_p50": statistics.median(latencies),
        "claim_latency_ms_p95": p95,
        "matrix_s": round(matrix_s, 3),
        "matrix_tasks_per_s": round(n / matrix_s, 1),
        "local_s": round(local_s, 3),
        "local_tasks_per_s": round(n / local_s, 1),
        "matrix_vs_local": round(matrix_s / local_s, 2),
        "assignments_per_worker": per_worker,
    }


def _dsn(text: str) -> dict[str, object]:
    """``user:password@host:port/database`` as psycopg2 arguments."""
    credentials, _, location = text.rpartition("@")
    user, _, password = credentials.partition(":")
    address, _, database = location.partition("/")
    host, _, port = address.partition(":")
    return {
        "user": user,
        "password": password,
        "host": host,
        "port": int(port or 5432),
        "database": database,
        "cp_min": 5,
        "cp_max": 10,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--max-workers", type=int, default=16, help="the DAG's max_workers (default 16)"
    )
    parser.add_argument("--keep", type=Path, help="keep the nodes' files and logs here")
    parser.add_argument(
        "--postgres",
        metavar="USER:PW@HOST:PORT/DB",
        help="run Synapse on this PostgreSQL database (an empty one) instead of SQLite",
    )
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(bench(args.tasks, args.keep, args.postgres, args.max_workers))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(bench(args.tasks, Path(tmp), args.postgres, args.max_workers))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['tasks']} tasks, max_workers {args.max_workers}, 2 workers on Synapse:")
    print(
        f"  assignment-to-claim  p50 {result['claim_latency_ms_p50']} ms"
        f"  p95 {result['claim_latency_ms_p95']} ms"
    )
    print(f"  matrix mode  {result['matrix_s']}s  {result['matrix_tasks_per_s']} tasks/s")
    print(f"  --local      {result['local_s']}s  {result['local_tasks_per_s']} tasks/s (baseline)")
    print(f"  ratio matrix/local {result['matrix_vs_local']}")
    print(f"  assignments per worker {result['assignments_per_worker']}")


if __name__ == "__main__":
    main()

"""`cis dag execute --federation`: work spread over the room's workers by their capacity, tasks
placed by `target_node` and `node_selector` (and failed, naming the unmet requirement, when no
worker fits), `--workers` restricting the run (and refusing a worker that is not live), and the
circuit breaker cooling down a worker whose attempts keep failing. Real `cis` processes on both
homeservers."""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.matrix import events as ev
from tests.support.client import MatrixClient
from tests.support.nodes import (
    NodePlan,
    NodeProcess,
    heartbeats,
    joined_members,
    plan_nodes,
    registration_files,
    room_events,
    run_room,
    wait_for,
    write_configs,
)
from tests.support.process import HomeserverUnderTest
from tests.test_node_matrix import run_cis

pytestmark = pytest.mark.slow


async def cluster(
    hs: HomeserverUnderTest,
    http: aiohttp.ClientSession,
    coord: NodePlan,
    workers: list[tuple[NodePlan, str]],
    *,
    coordinator_matrix: str = "",
) -> tuple[MatrixClient, str, list[NodeProcess]]:
    """The coordinator (configured, not started) and the workers (``cis node``, each with its
    own extra ``[node]`` config) in a run room, the workers joined and heartbeating."""
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    write_configs([coord], hs.base_url, allowed_users=[admin_id], matrix_extra=coordinator_matrix)
    for plan, extra in workers:
        write_configs(
            [plan],
            hs.base_url,
            allowed_users=[admin_id, coord.user_id],
            accept_agents=["shell"],
            extra=extra,
        )
    processes = [NodeProcess(w).start() for w, _ in workers]
    try:
        room = await run_room(admin, [coord.user_id, *(w.user_id for w, _ in workers)])

        async def ready() -> bool:
            members, beats = await joined_members(admin, room), await heartbeats(admin, room)
            return all(w.user_id in members and w.user_id in beats for w, _ in workers)

        await wait_for(ready, timeout=60, what="workers to join and heartbeat")
    except BaseException:
        for p in processes:
            p.stop()
        raise
    return admin, room, processes


async def execute(coord: NodePlan, room: str, dag: Path, *extra: str) -> Any:
    return await run_cis(
        "dag", "execute", "--federation", "--room", room, *extra, str(dag), "--json",
        "--config", str(coord.config), "--state-dir", str(coord.state_dir),
    )  # fmt: skip


def capacity(n: int) -> str:
    return f"\n[dag.local]\nmax_workers = {n}\n"


async def test_federation_spreads_by_capacity_and_places_by_target_node_and_selector(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa", "wb", "wc")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa, wb, wc = plans
    workers = [
        (
            wa,
            'features = ["cuda"]\nlabels = { site = "lab" }\ngpu_memory_mb = 8000\n' + capacity(1),
        ),
        (wb, 'features = ["metal"]\n' + capacity(2)),
        (wc, 'labels = { site = "home" }\n' + capacity(3)),
    ]
    admin, room, processes = await cluster(hs, http, coord, workers)
    try:
        # 1. Capacity: 18 equal tasks, 6 at once, on workers that run 1, 2 and 3 at a time.
        spread = tmp_path / "spread.toml"
        spread.write_text(
            '[dag]\nname = "spread"\nmax_workers = 6\n'
            + "".join(f'[[dag.tasks]]\nid = "t{i}"\ncommand = "sleep 1"\n' for i in range(18))
        )
        proc = await execute(coord, room, spread)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        counts = Counter(t["node"] for t in report["tasks"].values())
        print(f"\n{hs.kind}: tasks per worker (capacity 1, 2, 3): {dict(counts)}")
        assert counts["wa"] < counts["wb"] < counts["wc"], counts
        assert counts["wa"] + counts["wb"] + counts["wc"] == 18

        # 2. Placement honoured, and refused with the requirement no worker met.
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(
            platform.machine().lower(), platform.machine().lower()
        )
        placed = tmp_path / "placed.toml"
        placed.write_text(
            f"""
[dag]
name = "placed"
policy = "allow_debt"

[[dag.tasks]]
id = "on-b"
command = "echo b"
target_node = "wb"

[[dag.tasks]]
id = "cuda"
command = "echo cuda"
node_selector = {{ features = ["cuda"], min_resources = {{ requires_gpu = true }} }}

[[dag.tasks]]
id = "home"
command = "echo home"
node_selector = {{ labels = {{ site = "home" }}, arch = "{arch}", os = "linux" }}

[[dag.tasks]]
id = "nowhere"
command = "echo never"
target_node = "computer-z"

[[dag.tasks]]
id = "huge"
command = "echo never"
node_selector = {{ min_resources = {{ min_memory_mb = 1000000000 }} }}
"""
        )
        started = time.monotonic()
        proc = await execute(coord, room, placed)
        report = json.loads(proc.stdout)
        tasks = report["tasks"]
        assert (tasks["on-b"]["node"], tasks["cuda"]["node"], tasks["home"]["node"]) == (
            "wb",
            "wa",
            "wc",
        )
        assert all(tasks[t]["status"] == "completed" for t in ("on-b", "cuda", "home"))
        assert tasks["nowhere"]["status"] == tasks["huge"]["status"] == "failed"
        nowhere, huge = tasks["nowhere"]["reason"], tasks["huge"]["reason"]
        assert "no live worker meets target_node 'computer-z'" in nowhere, nowhere
        assert "wa is not target_node 'computer-z'" in nowhere
        assert "node_selector {min_resources = {min_memory_mb = 1000000000}}" in huge, huge
        assert "MB of memory, needs 1000000000" in huge
        # They waited no_worker_timeout_secs (3 s in tests), not forever.
        assert time.monotonic() - started < 60

        # 3. --workers: only those; one that is not live is named, and the run does not start.
        some = tmp_path / "some.toml"
        some.write_text("".join(f'[[tasks]]\nid = "s{i}"\ncommand = "true"\n' for i in range(4)))
        proc = await execute(coord, room, some, "--workers", "wb,wc")
        assert proc.returncode == 0, proc.stderr
        assert {t["node"] for t in json.loads(proc.stdout)["tasks"].values()} <= {"wb", "wc"}
        started = time.monotonic()
        proc = await execute(coord, room, some, "--workers", "wa,ghost")
        assert proc.returncode == 2
        assert "ghost never heartbeat in the room" in proc.stderr, proc.stderr
        assert "Live workers there: wa, wb, wc" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert time.monotonic() - started < 30
    finally:
        for p in processes:
            p.stop()
    # The refused run never reached the room: three runs were created, not four.
    created = [e for e in await room_events(admin, room) if e["type"] == ev.RunCreatedContent.TYPE]
    assert len(created) == 3


async def test_a_worker_whose_attempts_keep_failing_is_cooled_down(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa", "wb")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa, wb = plans
    (wa.workdir / "broken").touch()  # every task fails on wa, and succeeds on wb
    admin, room, processes = await cluster(
        hs,
        http,
        coord,
        [(wa, capacity(2)), (wb, capacity(2))],
        coordinator_matrix="breaker_failures = 2\nbreaker_cooldown_secs = 600\n",
    )
    dag = tmp_path / "dag.toml"
    dag.write_text(
        '[dag]\nname = "flaky"\nmax_workers = 2\nretry_backoff_secs = 0.2\n'
        + "".join(
            f'[[dag.tasks]]\nid = "t{i}"\nretry = 3\ncommand = "test ! -e broken"\n'
            for i in range(6)
        )
    )
    try:
        proc = await execute(coord, room, dag)
    finally:
        for p in processes:
            p.stop()
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {t["node"] for t in report["tasks"].values()} == {"wb"}

    run = [
        e
        for e in await room_events(admin, room)
        if e["type"].startswith("cis.dag.") and e["content"].get("run_id") == report["run_id"]
    ]
    (cooled,) = [i for i, e in enumerate(run) if e["type"] == ev.WorkerCooldownContent.TYPE]
    cooldown = run[cooled]["content"]
    assert (cooldown["worker"], cooldown["worker_user"], cooldown["failures"]) == (
        "wa",
        wa.user_id,
        2,
    )
    assert cooldown["cooldown_ms"] == 600_000 and "in a row" in cooldown["reason"]
    # Nothing was assigned to wa after it was cooled down.
    later = [e for e in run[cooled:] if e["type"] == ev.TaskAssignedContent.TYPE]
    assert later and all(e["content"]["assigned_user"] == wb.user_id for e in later)


@pytest.mark.synapse
async def test_a_worker_on_another_homeserver_runs_tasks_over_federation(
    synapse_federation: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Two Synapses federating over TLS on loopback: the coordinator and the room on A, the
    only worker on B; `--workers` names it."""
    federation = synapse_federation()
    a, b = federation[0], federation[1]
    (coord,) = plan_nodes(tmp_path / "a", a.server_name, "coord")
    (wb,) = plan_nodes(tmp_path / "b", b.server_name, "wb")
    a.appservice_files = (coord.registration,)
    b.appservice_files = (wb.registration,)
    await federation.astart()
    admin_id, token = await a.create_user("admin", admin=True)
    admin = MatrixClient(http, a.base_url, user_id=admin_id, token=token)
    write_configs([coord], a.base_url, allowed_users=[admin_id])
    write_configs(
        [wb], b.base_url, allowed_users=[admin_id, coord.user_id], accept_agents=["shell"]
    )
    worker = NodeProcess(wb).start()
    try:
        room = await run_room(admin, [coord.user_id, wb.user_id])

        async def ready() -> bool:
            members, beats = await joined_members(admin, room), await heartbeats(admin, room)
            return wb.user_id in members and wb.user_id in beats

        await wait_for(ready, timeout=90, what="the worker on B to join and heartbeat")
        dag = tmp_path / "dag.toml"
        dag.write_text(
            """
[[tasks]]
id = "make"
command = "echo made-on-$(basename $PWD)"
target_node = "wb"

[[tasks]]
id = "use"
deps = ["make"]
command = "cat $CIS_UPSTREAM_DIR/make.txt"
"""
        )
        proc = await execute(coord, room, dag, "--workers", "wb")
    finally:
        worker.stop()
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {t["node"] for t in report["tasks"].values()} == {"wb"}
    results = [
        e["content"]
        for e in await room_events(admin, room)
        if e["type"] == ev.SessionCompletedContent.TYPE
        and e["content"].get("run_id") == report["run_id"]
    ]
    assert {r["task_id"]: r["output"].strip() for r in results} == {
        "make": "made-on-wb",
        "use": "made-on-wb",
    }
    assert all(r["status"] == "completed" for r in results)
    # Every result came from B's user, over federation.
    senders = {
        e["sender"]
        for e in await room_events(admin, room)
        if e["type"] == ev.SessionCompletedContent.TYPE
    }
    assert senders == {wb.user_id} and wb.user_id.endswith(f":{b.server_name}")

"""Failover by breaking things: a worker SIGKILLed mid-task (its lease lapses, the task runs
again on the other worker), a coordinator SIGKILLed with a standby in the room (the standby
takes the run over from the room log). Real `cis` processes, both homeservers, default timings
unless the test says otherwise (docs/federation.md)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.matrix import events as ev
from tests.support.client import MatrixClient
from tests.support.nodes import (
    NodePlan,
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
from tests.support.process import HomeserverUnderTest

pytestmark = pytest.mark.slow

#: The config's defaults, written out: the issue's promise is for them.
DEFAULT_TIMINGS: dict[str, Any] = {
    "heartbeat_secs": 2.0,
    "lease_secs": 5.0,
    "idle_heartbeat_secs": 10.0,
}


def popen_cis(plan: NodePlan, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cis_command(*args, "--config", str(plan.config), "--state-dir", str(plan.state_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=plan.workdir,
        env=cis_env(),
        start_new_session=True,
    )


def decoded(events: list[dict[str, Any]], run_id: str) -> list[tuple[str, ev.EventContent]]:
    found = []
    for e in events:
        if e["type"].startswith("cis.dag."):
            payload = ev.decode(e["type"], e["content"])
            if isinstance(payload, ev.RunContent) and payload.run_id == run_id:
                found.append((e["sender"], payload))
    return found


async def cluster(
    hs: HomeserverUnderTest,
    http: aiohttp.ClientSession,
    coordinators: list[NodePlan],
    workers: list[NodePlan],
    **timings: Any,
) -> tuple[MatrixClient, str, list[NodeProcess]]:
    """A run room with the coordinators (not started) and the workers (``cis node``, started,
    joined and heartbeating) in it."""
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    names = [c.user_id for c in coordinators]
    for plan in coordinators:
        others = [name for name in names if name != plan.user_id]
        write_configs([plan], hs.base_url, allowed_users=[admin_id], coordinators=others, **timings)
    write_configs(
        workers, hs.base_url, allowed_users=[admin_id, *names], accept_agents=["shell"], **timings
    )
    processes = [NodeProcess(w).start() for w in workers]
    try:
        room = await run_room(admin, [p.user_id for p in [*coordinators, *workers]])

        async def ready() -> bool:
            members, beats = await joined_members(admin, room), await heartbeats(admin, room)
            return all(w.user_id in members and w.user_id in beats for w in workers)

        await wait_for(ready, timeout=60, what="workers to join and heartbeat")
    except BaseException:
        for p in processes:
            p.stop()
        raise
    return admin, room, processes


def started(plan: NodePlan, attempt: int) -> float | None:
    """When attempt ``attempt`` of the long task started on that worker (its marker's mtime)."""
    marker = plan.workdir / f"long.started.{attempt}"
    return marker.stat().st_mtime if marker.exists() else None


LONG_DAG = '''
[dag]
name = "failover"

[[dag.tasks]]
id = "long"
command = """touch long.started.$CIS_ATTEMPT; sleep 6
touch long.finished.$CIS_ATTEMPT; echo out-$CIS_ATTEMPT"""

[[dag.tasks]]
id = "after"
deps = ["long"]
command = "cat $CIS_UPSTREAM_DIR/long.txt"
'''


async def test_a_killed_workers_task_restarts_on_the_other_worker_within_ten_seconds(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa", "wb")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa, wb = plans
    admin, room, processes = await cluster(hs, http, [coord], [wa, wb], **DEFAULT_TIMINGS)
    dag = tmp_path / "dag.toml"
    dag.write_text(LONG_DAG)
    proc = popen_cis(coord, "dag", "execute", "--matrix", "--room", room, str(dag), "--json")
    try:

        async def first_start() -> tuple[int, float] | None:
            for i, plan in enumerate((wa, wb)):
                at = started(plan, 1)
                if at is not None:
                    return i, at
            return None

        index, _ = await wait_for(first_start, timeout=60, what="the long task to start")
        victim, survivor = (wa, wb) if index == 0 else (wb, wa)
        killed = processes[index]
        assert killed.process is not None
        os.killpg(killed.process.pid, signal.SIGKILL)  # the node and nothing else: its
        killed_at = time.time()  # sessions die with it (their terminal hangs up)

        async def restarted() -> float | None:
            return await asyncio.sleep(0, started(survivor, 2))

        restart_at = await wait_for(restarted, timeout=30, what="attempt 2 on the other worker")
        out, err = await asyncio.to_thread(proc.communicate, timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in processes:
            p.stop()
    restart = restart_at - killed_at
    print(f"\n{hs.kind}: killed {victim.node_id}; attempt 2 started on {survivor.node_id} "
          f"{restart:.2f}s later")  # fmt: skip
    assert restart <= 10, restart
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["status"] == "completed"
    assert report["tasks"]["long"]["attempts"] == 2
    assert report["tasks"]["long"]["node"] == survivor.node_id
    # The killed worker's session died with it: it never finished.
    assert not (victim.workdir / "long.finished.1").exists()
    assert (survivor.workdir / "long.finished.2").exists()

    run = decoded(await room_events(admin, room), report["run_id"])
    lost = [p for _, p in run if isinstance(p, ev.TaskLostContent)]
    assert [(p.task_id, p.attempt) for p in lost] == [("long", 1)]
    assert lost[0].reason and "lease lapsed" in lost[0].reason
    results = [(sender, p) for sender, p in run if isinstance(p, ev.SessionCompletedContent)]
    longs = [(sender, p.attempt) for sender, p in results if p.task_id == "long"]
    assert longs == [(survivor.user_id, 2)]  # exactly one result, the re-run's
    # The dependent saw the re-run's output.
    (after,) = [p for _, p in results if p.task_id == "after"]
    assert after.output.strip() == "out-2"


CHAIN_DAG = '[dag]\nname = "chain"\nmax_workers = 2\n' + "".join(
    f'[[dag.tasks]]\nid = "t{i}"\n'
    + (f'deps = ["t{i - 2}"]\n' if i >= 2 else "")
    + 'command = "echo $CIS_TASK_ID >> ran.txt; sleep 1.5; echo out-$CIS_TASK_ID"\n'
    for i in range(6)
)


def ran(plan: NodePlan) -> list[str]:
    marker = plan.workdir / "ran.txt"
    return marker.read_text().split() if marker.exists() else []


async def test_a_standby_takes_over_a_killed_coordinators_run_and_nothing_runs_twice(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "standby", "wa", "wb")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, standby, wa, wb = plans
    timings = {"heartbeat_secs": 0.5, "lease_secs": 2.0}
    admin, room, processes = await cluster(hs, http, [coord, standby], [wa, wb], **timings)
    # The standby coordinates and runs nothing itself (its worker takes no shell tasks).
    standby.config.write_text(
        standby.config.read_text().replace("[node]\n", '[node]\naccept_agents = ["claude"]\n')
    )
    backup = NodeProcess(standby, "--coordinator").start()
    dag = tmp_path / "dag.toml"
    dag.write_text(CHAIN_DAG)
    proc = popen_cis(coord, "dag", "execute", "--matrix", "--room", room, str(dag), "--json")
    try:

        async def standby_ready() -> bool:
            # Its worker heartbeats once it joined; its standby has read the room by then.
            return standby.user_id in await heartbeats(admin, room)

        await wait_for(standby_ready, what="the standby in the room")
        await wait_for(
            lambda: asyncio.sleep(0, len(ran(wa) + ran(wb)) >= 3), what="the first tasks"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()

        async def finished() -> tuple[str, ev.RunCompletedContent] | None:
            for e in await room_events(admin, room):
                if e["type"] == ev.RunCompletedContent.TYPE:
                    payload = ev.decode(e["type"], e["content"])
                    assert isinstance(payload, ev.RunCompletedContent)
                    return e["sender"], payload
            return None

        sender, completed = await wait_for(finished, timeout=90, what="the run to complete")
        took = time.monotonic() - killed_at
        run_id = completed.run_id
        assert sender == standby.user_id
        assert completed.status == "completed"
        everything = ran(wa) + ran(wb)
        assert sorted(everything) == [f"t{i}" for i in range(6)], everything  # each ran once
        run = decoded(await room_events(admin, room), run_id)
        takeovers = [(s, p) for s, p in run if isinstance(p, ev.RunTakeoverContent)]
        assert [(s, p.epoch, p.previous) for s, p in takeovers] == [
            (standby.user_id, 2, coord.user_id)
        ]
        assert not [p for _, p in run if isinstance(p, ev.TaskLostContent)]  # all adopted
        assert all(p.alive for p in processes) and backup.alive
        print(f"\n{hs.kind}: the standby completed the run {took:.1f}s after the kill")

        # The coordinator's own reading of the room (it trusts the standby) agrees.
        argv = cis_command(
            "dag", "status", run_id, "--json", "--room", room,
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        status = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, env=cis_env(), timeout=60
        )
        assert status.returncode == 0, status.stderr
        summary = json.loads(status.stdout)
        assert summary["status"] == "completed"
        assert summary["coordinator"] == "standby"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        backup.stop()
        for p in processes:
            p.stop()

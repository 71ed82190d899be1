"""Matrix mode end to end: a coordinator and two worker nodes as separate processes, on the
embedded homeserver and on a real Synapse."""

from __future__ import annotations

import asyncio
import json
import subprocess
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

TASKS = 6


def fan_dag(path: Path) -> Path:
    lines = ['[dag]\nname = "spread"\nmax_workers = 4\n']
    for i in range(TASKS):
        lines.append(
            f'[[dag.tasks]]\nid = "t{i}"\n'
            'command = "echo $CIS_TASK_ID >> ran.txt; echo $CIS_NODE_ID >> nodes.txt; sleep 0.4; '
            'echo done-$CIS_TASK_ID"\n'
        )
    deps = ", ".join(f'"t{i}"' for i in range(TASKS))
    lines.append(
        f'[[dag.tasks]]\nid = "gather"\ndeps = [{deps}]\n'
        'command = "echo $CIS_TASK_ID >> ran.txt; ls $CIS_UPSTREAM_DIR | wc -l"\n'
    )
    path.write_text("\n".join(lines))
    return path


async def bot_exists(admin: MatrixClient, user_id: str) -> bool:
    response = await admin.request("GET", f"/_matrix/client/v3/profile/{user_id}")
    return response.status == 200


async def start_cluster(
    hs: HomeserverUnderTest,
    http: aiohttp.ClientSession,
    plans: list[NodePlan],
    *,
    accept_agents: tuple[str, ...] = ("shell",),
    extra: str = "",
) -> tuple[MatrixClient, str, list[NodeProcess]]:
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    coord, *workers = plans
    write_configs([coord], hs.base_url, allowed_users=[admin_id], extra=extra)
    write_configs(
        workers,
        hs.base_url,
        allowed_users=[admin_id, coord.user_id],
        accept_agents=list(accept_agents),
        extra=extra,
    )
    processes = [NodeProcess(w).start() for w in workers]
    try:
        for w in workers:
            await wait_for(
                lambda w=w: bot_exists(admin, w.user_id), what=f"{w.node_id} to register"
            )
        room = await run_room(admin, [p.user_id for p in plans])

        async def workers_ready() -> bool:
            members = await joined_members(admin, room)
            beats = await heartbeats(admin, room)
            return all(w.user_id in members and w.user_id in beats for w in workers)

        await wait_for(workers_ready, what="workers to join and heartbeat")
    except BaseException:
        for p in processes:
            p.stop()
        raise
    return admin, room, processes


async def run_cis(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        cis_command(*args),
        capture_output=True,
        text=True,
        env=cis_env(),
        timeout=timeout,
    )


def ran(plan: NodePlan) -> list[str]:
    marker = plan.workdir / "ran.txt"
    return marker.read_text().split() if marker.exists() else []


async def test_matrix_mode_spreads_tasks_over_two_workers_and_collects_results(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa", "wb")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa, wb = plans
    admin, room, processes = await start_cluster(hs, http, plans)
    try:
        # A stranger in the room (power 0) cannot post a run's events at all; garbage from the
        # admin follows, and is dropped.
        stranger_id, stranger_token = await hs.create_user("mallory")
        await admin.invite(room, stranger_id)
        mallory = MatrixClient(http, hs.base_url, user_id=stranger_id, token=stranger_token)
        await mallory.join(room)
        forged = ev.TaskAssignedContent(
            run_id="forged-run",
            task_id="evil",
            attempt=1,
            assigned_to="wa",
            assigned_user=wa.user_id,
            assigned_by=stranger_id,
            agent="shell",
            lease_ms=1000,
            task=json.dumps({"id": "evil", "agent": "shell", "prompt": "touch pwned"}),
        )
        refused = await mallory.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{room}/send/{forged.TYPE}/forged1",
            forged.content(),
        )
        assert refused.status == 403, refused.body
        for garbage in ({"v": 1, "run_id": 5}, {"nonsense": True}, {"v": 1, "task": "{"}):
            await admin.send(room, garbage, event_type=ev.TaskAssignedContent.TYPE)

        dag = fan_dag(tmp_path / "dag.toml")
        proc = await run_cis(
            "dag", "execute", "--matrix", "--room", room, str(dag), "--json",
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["status"] == "completed"
        assert {t["status"] for t in report["tasks"].values()} == {"completed"}

        # Every task ran exactly once, and both workers got some.
        ran_a, ran_b = ran(wa), ran(wb)
        assert sorted(ran_a + ran_b) == sorted([*(f"t{i}" for i in range(TASKS)), "gather"])
        assert ran_a and ran_b, (ran_a, ran_b)
        for worker in (wa, wb):  # each task was told which node runs it
            assert set((worker.workdir / "nodes.txt").read_text().split()) == {worker.node_id}
        assert not (wa.workdir / "pwned").exists()
        assert all(p.alive for p in processes), [p.log_text()[-2000:] for p in processes]

        events = await room_events(admin, room)
        ours = [e for e in events if e["type"].startswith("cis.")]
        payloads = []
        for e in ours:
            try:
                payloads.append((e["sender"], ev.decode(e["type"], e["content"])))
            except ev.InvalidEvent:
                assert e["sender"] == admin.user_id  # only our deliberate garbage is invalid
        run = [p for _, p in payloads if isinstance(p, ev.RunContent)]
        run_id = report["run_id"]
        assigned = [p for p in run if isinstance(p, ev.TaskAssignedContent) and p.run_id == run_id]
        assert {p.assigned_to for p in assigned} == {"wa", "wb"}
        claimed = [p for p in run if isinstance(p, ev.TaskClaimedContent) and p.run_id == run_id]
        completed = [
            p for p in run if isinstance(p, ev.SessionCompletedContent) and p.run_id == run_id
        ]
        assert len(assigned) == len(claimed) == len(completed) == TASKS + 1
        assert all(c.transcript and c.transcript.startswith("mxc://") for c in completed)
        gather = next(c for c in completed if c.task_id == "gather")
        assert gather.output.strip().endswith(str(TASKS))
        assert not [
            p for p in run if p.run_id == "forged-run" and not isinstance(p, ev.TaskAssignedContent)
        ]
        ends = [p for p in run if isinstance(p, ev.RunCompletedContent) and p.run_id == run_id]
        assert [e.status for e in ends] == ["completed"]

        # The log alone tells the story: status from the room, with the run's node gone.
        status = await run_cis(
            "dag", "status", run_id[:12], "--json", "--room", room,
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        summary = json.loads(status.stdout)
        assert summary["status"] == "completed"
        assert {t["node"] for t in summary["tasks"].values()} == {"wa", "wb"}
    finally:
        for p in processes:
            p.stop()


async def test_a_worker_refuses_a_raw_command_unless_its_owner_allowed_the_shell(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa = plans
    admin, room, processes = await start_cluster(hs, http, plans, accept_agents=("claude",))
    try:
        (tmp_path / "shell.toml").write_text('[[tasks]]\nid = "raw"\ncommand = "touch pwned"\n')
        proc = await run_cis(
            "dag", "execute", "--matrix", "--room", room, str(tmp_path / "shell.toml"), "--json",
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        # No worker in the room runs the shell profile: the coordinator says so, nothing runs.
        assert proc.returncode == 1
        report = json.loads(proc.stdout)
        assert "no live worker in the room runs agent 'shell'" in report["tasks"]["raw"]["reason"]

        # An allowed user assigns it anyway, straight to the worker: it refuses, and says why.
        order = ev.TaskAssignedContent(
            run_id="manual",
            task_id="raw",
            attempt=1,
            assigned_to="wa",
            assigned_user=wa.user_id,
            assigned_by=admin.user_id or "",
            agent="shell",
            lease_ms=1000,
            task=json.dumps({"id": "raw", "agent": "shell", "prompt": "touch pwned"}),
        )
        await admin.send(room, order.content(), event_type=order.TYPE)

        async def refusal() -> ev.SessionCompletedContent | None:
            for e in await room_events(admin, room):
                if (
                    e["type"] == ev.SessionCompletedContent.TYPE
                    and e["content"].get("run_id") == "manual"
                ):
                    payload = ev.decode(e["type"], e["content"])
                    assert isinstance(payload, ev.SessionCompletedContent)
                    return payload
            return None

        answer = await wait_for(refusal, what="the worker's refusal")
        assert answer.status == "failed"
        assert answer.error and "does not run agent 'shell'" in answer.error
        assert not (wa.workdir / "pwned").exists()
        assert processes[0].alive
    finally:
        for p in processes:
            p.stop()

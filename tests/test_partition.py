"""A worker cut off mid-task: it lives in its own network namespace (tests/support/netns.py),
reaching the homeserver on the host side of a veth pair, and the link is cut while it runs a
task. Its lease lapses and the task runs again on the other worker; the cut-off worker stops its
session itself within its lease period (self-fencing); when the link comes back its late report
is recorded and ignored, and it works again as a healthy worker. Both homeservers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.matrix import events as ev
from tests.support.client import MatrixClient
from tests.support.netns import NetworkNamespace
from tests.support.nodes import (
    NodePlan,
    NodeProcess,
    heartbeats,
    joined_members,
    plan_nodes,
    room_events,
    run_room,
    wait_for,
    write_configs,
)
from tests.test_failover import decoded, popen_cis

pytestmark = pytest.mark.slow

MakeNetns = Callable[[], NetworkNamespace]
HEARTBEAT, LEASE = 0.5, 2.0
#: Scheduling on a loaded 2-core machine, and SIGTERM reaching the session.
SLACK = 1.5

LONG = '''
[[tasks]]
id = "long"
command = """touch long.started.$CIS_ATTEMPT
trap 'touch long.stopped.$CIS_ATTEMPT; exit 1' TERM
if [ $CIS_ATTEMPT = 1 ]; then sleep 60 & wait; fi
echo out-$CIS_ATTEMPT"""
'''

PAIR = """
[dag]
max_workers = 2
[[dag.tasks]]
id = "p1"
command = "sleep 1; echo $CIS_TASK_ID >> ran.txt"
[[dag.tasks]]
id = "p2"
command = "sleep 1; echo $CIS_TASK_ID >> ran.txt"
"""


def marker(plan: NodePlan, name: str) -> float | None:
    path = plan.workdir / name
    return path.stat().st_mtime if path.exists() else None


async def beats_of(admin: MatrixClient, room: str, user_id: str) -> list[int]:
    return [
        e["origin_server_ts"]
        for e in await room_events(admin, room)
        if e["type"] == ev.NodeHeartbeatContent.TYPE and e.get("state_key") == user_id
    ]


async def test_a_cut_off_worker_stops_its_session_and_its_task_runs_elsewhere(
    netns: MakeNetns,
    homeserver_factory: Any,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    ns = netns()
    coord, wb = plan_nodes(tmp_path, "cis.local", "coord", "wb")
    (wa,) = plan_nodes(tmp_path, "cis.local", "wa", namespace=ns)
    hs = homeserver_factory(
        host=ns.host_address,
        appservice_files=tuple(p.registration for p in (coord, wa, wb)),
    )
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    timings: dict[str, Any] = {
        "heartbeat_secs": HEARTBEAT,
        "lease_secs": LEASE,
        "idle_heartbeat_secs": HEARTBEAT,
    }
    write_configs([coord], hs.base_url, allowed_users=[admin_id], **timings)
    write_configs(
        [wa, wb],
        hs.base_url,
        allowed_users=[admin_id, coord.user_id],
        accept_agents=["shell"],
        extra="\n[dag.local]\nmax_workers = 1\n",
        **timings,
    )
    worker_a = NodeProcess(wa, namespace=ns).start()
    worker_b = NodeProcess(wb)
    run: Any = None
    try:
        room = await run_room(admin, [coord.user_id, wa.user_id, wb.user_id])

        async def beating(*plans: NodePlan) -> bool:
            members, beats = await joined_members(admin, room), await heartbeats(admin, room)
            return all(p.user_id in members and p.user_id in beats for p in plans)

        await wait_for(lambda: beating(wa), what="the worker in the namespace to heartbeat")
        dag = tmp_path / "long.toml"
        dag.write_text(LONG)
        run = popen_cis(coord, "dag", "execute", "--matrix", "--room", room, str(dag), "--json")
        await wait_for(
            lambda: asyncio.sleep(0, marker(wa, "long.started.1")), what="attempt 1 on wa"
        )
        worker_b.start()  # only now: attempt 1 had nowhere else to go
        await wait_for(lambda: beating(wb), what="wb to heartbeat")

        ns.cut()
        cut_at = time.time()
        restarted = await wait_for(
            lambda: asyncio.sleep(0, marker(wb, "long.started.2")),
            timeout=30,
            what="attempt 2 on wb",
        )
        stopped = await wait_for(
            lambda: asyncio.sleep(0, marker(wa, "long.stopped.1")),
            timeout=30,
            what="wa to stop its session",
        )
        assert worker_a.alive
        ns.restore()
        restored_ms = time.time() * 1000
        out, err = await asyncio.to_thread(run.communicate, timeout=60)
        assert run.returncode == 0, err
        report = json.loads(out)
        assert report["status"] == "completed"
        assert report["tasks"]["long"]["node"] == "wb"
        assert report["tasks"]["long"]["attempts"] == 2
        print(
            f"\n{hs.kind}: lease {LEASE:g}s; wa stopped its session {stopped - cut_at:.2f}s "
            f"after the cut, attempt 2 started on wb {restarted - cut_at:.2f}s after it"
        )
        assert stopped - cut_at <= LEASE + SLACK

        log = worker_a.log_text()
        assert "worker.self_fenced" in log, log[-3000:]

        # Back: its late report lands in the room, where it counts for nothing.
        run_id = report["run_id"]

        async def late_report() -> ev.SessionCompletedContent | None:
            for sender, payload in decoded(await room_events(admin, room), run_id):
                if (
                    sender == wa.user_id
                    and isinstance(payload, ev.SessionCompletedContent)
                    and payload.attempt == 1
                ):
                    return payload
            return None

        late = await wait_for(late_report, timeout=60, what="wa's late report")
        assert late.status == "killed" and late.error and "self-fenced" in late.error
        events = decoded(await room_events(admin, room), run_id)
        results = [
            (sender, p.attempt, p.status)
            for sender, p in events
            if isinstance(p, ev.SessionCompletedContent)
        ]
        assert (wb.user_id, 2, "completed") in results
        lost = [p.attempt for _, p in events if isinstance(p, ev.TaskLostContent)]
        assert lost == [1]

        # And it is a healthy worker again: heartbeats, then work.
        async def beat_since_restore() -> bool:
            times = await beats_of(admin, room, wa.user_id)
            return bool(times) and times[-1] >= restored_ms

        await wait_for(beat_since_restore, timeout=30, what="wa to heartbeat again")
        dag.write_text(PAIR)
        again = popen_cis(coord, "dag", "execute", "--matrix", "--room", room, str(dag), "--json")
        out, err = await asyncio.to_thread(again.communicate, timeout=60)
        assert again.returncode == 0, err
        pair = json.loads(out)
        assert {t["node"] for t in pair["tasks"].values()} == {"wa", "wb"}
    finally:
        if run is not None and run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        if ns.cut_mode is not None:
            ns.restore()
        worker_a.stop()
        worker_b.stop()

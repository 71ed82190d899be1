"""Items 2 and 3 of the security review, matrix mode, on the embedded homeserver and on Synapse:
a room member at power level 0 forges a run for a coordinator to pick up, and impersonates a
worker to be handed its tasks.

The rooms here are the worst case: an operator who left every ``cis.dag.*`` type open to members
(a room cis_bot creates, or one set up as docs/matrix.md says, refuses them outright: the last
test). The nodes must hold by the sender checks alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.matrix import events as ev
from cis_bot.matrix.batch import BATCH_TYPE, make_batch
from cis_bot.matrix.node import outgoing
from tests.security.support import forge_run_created, marking_spec
from tests.support.client import CS, MatrixClient, q
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
from tests.test_node_matrix import bot_exists, ran, run_cis
from tests.test_node_resilience import popen_cis

pytestmark = pytest.mark.slow


async def open_room(admin: MatrixClient, bots: list[str]) -> str:
    """A room whose operator trusted the bots (power 50) and left the run log open to all."""
    return await admin.create_room(
        name="runs",
        invite=bots,
        power_level_content_override={
            "users": {bot: 50 for bot in bots},
            "events": {ev.NodeHeartbeatContent.TYPE: 0},
        },
    )


async def member(hs: HomeserverUnderTest, http: aiohttp.ClientSession, admin: MatrixClient,
                 room: str, name: str) -> MatrixClient:  # fmt: skip
    """A new account the admin invites: a member at power level 0."""
    user_id, token = await hs.create_user(name)
    await admin.invite(room, user_id)
    client = MatrixClient(http, hs.base_url, user_id=user_id, token=token)
    await client.join(room)
    return client


async def cluster(
    hs: HomeserverUnderTest, http: aiohttp.ClientSession, plans: list[NodePlan], **worker: Any
) -> tuple[MatrixClient, str, NodeProcess]:
    """The admin, an open room with the coordinator and the worker (``cis node``, running and
    heartbeating) in it, and the worker's process."""
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    coord, wa = plans
    write_configs([coord], hs.base_url, allowed_users=[admin_id])
    write_configs([wa], hs.base_url, allowed_users=[admin_id, coord.user_id], **worker)
    process = NodeProcess(wa).start()
    try:
        await wait_for(lambda: bot_exists(admin, wa.user_id), what="the worker to register")
        room = await open_room(admin, [p.user_id for p in plans])

        async def beating() -> bool:
            members, beats = await joined_members(admin, room), await heartbeats(admin, room)
            return wa.user_id in members and wa.user_id in beats

        await wait_for(beating, what="the worker to join and heartbeat")
    except BaseException:
        process.stop()
        raise
    return admin, room, process


def task_dag(path: Path, tasks: int) -> Path:
    path.write_text(
        "".join(
            f'[[tasks]]\nid = "t{i}"\ncommand = "echo $CIS_TASK_ID >> ran.txt; echo real-{i}"\n'
            for i in range(tasks)
        )
    )
    return path


async def payloads(admin: MatrixClient, room: str) -> list[tuple[str, ev.EventContent]]:
    found = []
    for e in await room_events(admin, room):
        if e["type"].startswith("cis."):
            with contextlib.suppress(ev.InvalidEvent):
                found.append((e["sender"], ev.decode(e["type"], e["content"])))
    return found


async def test_a_member_cannot_pass_for_a_worker_nor_get_work_as_itself(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa = plans
    # A slow heartbeat, slower than an idle worker's (10 s by default): a forgery would stand long.
    admin, room, worker = await cluster(hs, http, plans, accept_agents=["shell"], heartbeat_secs=60)
    try:
        mallory = await member(hs, http, admin, room, "mallory")
        beat_type = q(ev.NodeHeartbeatContent.TYPE)

        def beat(**fields: Any) -> dict[str, Any]:
            return ev.NodeHeartbeatContent(
                node_id="wa", agents=("shell",), max_workers=100, load=0, ttl_ms=3_600_000,
                **fields,
            ).content()  # fmt: skip

        # The old way: overwrite the heartbeat keyed by the node's id (the homeserver allows it).
        await mallory.put_state(room, ev.NodeHeartbeatContent.TYPE, beat(), state_key="wa")
        # The homeserver refuses a heartbeat under the worker's own user id...
        as_wa = await mallory.request(
            "PUT", f"{CS}/rooms/{q(room)}/state/{beat_type}/{q(wa.user_id)}", beat()
        )
        assert as_wa.status == 403, as_wa.body
        # ... and under her own, she is a member at power 0: not a worker the coordinator trusts.
        assert mallory.user_id is not None
        await mallory.put_state(
            room, ev.NodeHeartbeatContent.TYPE, beat(), state_key=mallory.user_id
        )

        dag = task_dag(tmp_path / "dag.toml", 4)
        proc = await run_cis(
            "dag", "execute", "--matrix", "--room", room, str(dag), "--json",
            "--config", str(coord.config), "--state-dir", str(coord.state_dir), timeout=90,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert {t["node"] for t in report["tasks"].values()} == {"wa"}
        assert sorted(ran(wa)) == [f"t{i}" for i in range(4)]
        run = [(s, p) for s, p in await payloads(admin, room) if isinstance(p, ev.RunContent)]
        assigned = [p for _, p in run if isinstance(p, ev.TaskAssignedContent)]
        assert {p.assigned_user for p in assigned} == {wa.user_id}
        # Each refusal is said once, whatever the number of beats.
        assert proc.stderr.count("heartbeat.not_own_key") == 1, proc.stderr
        assert proc.stderr.count("heartbeat.untrusted") == 1, proc.stderr
    finally:
        worker.stop()


async def test_a_coordinator_resumes_only_the_runs_its_own_user_created(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa = plans
    admin, room, worker = await cluster(hs, http, plans, accept_agents=["shell"])
    coordinator: NodeProcess | None = None
    try:
        # A real run of the coordinator's, stopped (SIGKILL) while its task runs on the worker.
        dag = tmp_path / "dag.toml"
        dag.write_text(
            '[[tasks]]\nid = "long"\ncommand = "echo $CIS_TASK_ID >> ran.txt; sleep 2"\n'
        )
        proc = popen_cis(coord, "dag", "execute", "--matrix", "--room", room, str(dag), "--json")
        try:
            await wait_for(lambda: asyncio.sleep(0, ran(wa)), what="the task to start")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

        # A member forges a run "of node coord" with a command for the worker to run.
        mallory = await member(hs, http, admin, room, "mallory")
        marker, forged = wa.workdir / "pwned", f"21000101-000000-{uuid.uuid4().hex[:4]}"
        await forge_run_created(
            mallory, room, forged, marking_spec(marker), coordinator="coord", mode="matrix"
        )

        coordinator = NodeProcess(coord, "--coordinator").start()

        async def real_run_done() -> bool:
            return any(
                isinstance(p, ev.RunCompletedContent) and s == coord.user_id
                for s, p in await payloads(admin, room)
            )

        await wait_for(real_run_done, timeout=60, what="the coordinator to finish its own run")
        assert not marker.exists()
        assert not [
            p
            for _, p in await payloads(admin, room)
            if isinstance(p, ev.RunContent) and p.run_id == forged
            and not isinstance(p, ev.RunCreatedContent)
        ]  # fmt: skip

        as_coord = ("--room", room, "--config", str(coord.config),
                    "--state-dir", str(coord.state_dir))  # fmt: skip
        listing = await run_cis("dag", "list", "--json", *as_coord)
        assert listing.returncode == 0, listing.stderr
        assert forged not in [r["run_id"] for r in json.loads(listing.stdout)]
        coordinator.stop()  # resume serves the same appservice
        resume = await run_cis("dag", "resume", forged, *as_coord)
        assert resume.returncode == 2 and f"no run {forged!r}" in resume.stderr
        assert not marker.exists()
    finally:
        if coordinator is not None:
            coordinator.stop()
        worker.stop()


async def test_a_member_of_a_room_set_up_for_runs_cannot_post_the_run_log(
    homeserver: HomeserverUnderTest, http: aiohttp.ClientSession
) -> None:
    admin_id, token = await homeserver.create_user(f"admin{uuid.uuid4().hex[:8]}")
    admin = MatrixClient(http, homeserver.base_url, user_id=admin_id, token=token)
    room = await run_room(admin, [])
    mallory = await member(homeserver, http, admin, room, f"mallory{uuid.uuid4().hex[:8]}")
    for event_type, cls in ev.CATALOGUE.items():
        path = f"{CS}/rooms/{q(room)}/send/{q(event_type)}/{mallory.next_txn()}"
        if cls is ev.NodeHeartbeatContent:
            continue
        answer = await mallory.request("PUT", path, {"v": 1})
        open_to_members = cls in (ev.ControlRequestContent, ev.ControlReplyContent)
        assert answer.status == (200 if open_to_members else 403), (event_type, answer.body)


async def test_a_room_that_refuses_heartbeats_is_told_once_with_the_fix(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (wa,) = plan_nodes(tmp_path, "cis.local", "wa")
    hs = homeserver_factory(appservice_files=registration_files([wa]))
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    write_configs([wa], hs.base_url, allowed_users=[admin_id], heartbeat_secs=0.2)
    worker = NodeProcess(wa).start()
    try:
        await wait_for(lambda: bot_exists(admin, wa.user_id), what="the worker to register")
        beating = await open_room(admin, [wa.user_id])
        # Heartbeats are state events: at the default state_default (50), power 0 may not.
        closed = await admin.create_room(name="no heartbeats", invite=[wa.user_id])

        async def joined_both() -> bool:
            members = [await joined_members(admin, room) for room in (beating, closed)]
            return all(wa.user_id in joined for joined in members)

        await wait_for(joined_both, what="the worker to join both rooms")
        start = len(await beats_of(admin, beating, wa.user_id))

        async def beat_on() -> bool:
            return len(await beats_of(admin, beating, wa.user_id)) >= start + 5

        await wait_for(beat_on, what="five more heartbeats")
        log = worker.log_text()
        assert log.count("heartbeat.refused") == 1, log
        (line,) = [entry for entry in log.splitlines() if "heartbeat.refused" in entry]
        assert closed in line and f'"{ev.NodeHeartbeatContent.TYPE}": 0' in line
        assert "outbox.rejected" not in log
    finally:
        worker.stop()


async def beats_of(admin: MatrixClient, room: str, user_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in await room_events(admin, room)
        if e["type"] == ev.NodeHeartbeatContent.TYPE and e.get("state_key") == user_id
    ]


async def test_a_workers_trust_follows_the_rooms_power_levels(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Trust by power level is the room's as it is now: the room's creator (room version 12: it
    outranks every level) is obeyed, and a coordinator demoted to 0 no longer is."""
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa = plans
    owner_id, token = await hs.create_user("owner")
    owner = MatrixClient(http, hs.base_url, user_id=owner_id, token=token)
    admin_id, token = await hs.create_user("admin")
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    # The admin invites the nodes (their allowed user); only power levels speak for the rest.
    write_configs(plans, hs.base_url, allowed_users=[admin_id], accept_agents=["shell"])
    levels = {admin_id: 100, coord.user_id: 50, wa.user_id: 50}
    room = await owner.create_room(
        name="runs",
        invite=[admin_id],
        power_level_content_override={
            "users": levels, "events": {ev.NodeHeartbeatContent.TYPE: 0}
        },
    )  # fmt: skip
    await admin.join(room)
    worker = NodeProcess(wa).start()
    run: subprocess.Popen[str] | None = None
    try:
        await wait_for(lambda: bot_exists(admin, wa.user_id), what="the worker to register")
        for bot in (coord.user_id, wa.user_id):
            await admin.invite(room, bot)

        async def beating() -> bool:
            return wa.user_id in await heartbeats(admin, room)

        await wait_for(beating, what="the worker to join and heartbeat")
        mark = wa.workdir / "by-the-creator"
        order = ev.TaskAssignedContent(
            run_id="by-hand", task_id="t", attempt=1, assigned_to="wa", assigned_user=wa.user_id,
            assigned_by="owner", agent="shell", lease_ms=1000,
            task=json.dumps({"id": "t", "agent": "shell", "prompt": f"touch {mark}"}),
        )  # fmt: skip
        await owner.send(room, order.content(), event_type=order.TYPE)
        await wait_for(lambda: asyncio.sleep(0, mark.exists()), what="the creator's order")

        dag = task_dag(tmp_path / "dag.toml", 1)
        as_coord = ("--config", str(coord.config), "--state-dir", str(coord.state_dir))
        first = await run_cis("dag", "execute", "--matrix", "--room", room, str(dag), *as_coord)
        assert first.returncode == 0, first.stderr
        assert ran(wa) == ["t0"]

        del levels[coord.user_id]
        current = await owner.get_state(room, "m.room.power_levels")
        await owner.put_state(room, "m.room.power_levels", {**current, "users": levels})
        run = popen_cis(coord, "dag", "execute", "--matrix", "--room", room, str(dag))

        async def refused() -> bool:
            return any(
                "assignment.unauthorised" in line and coord.user_id in line
                for line in worker.log_text().splitlines()
            )

        await wait_for(refused, what="the worker to refuse the demoted coordinator")
        assert ran(wa) == ["t0"]
    finally:
        if run is not None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        worker.stop()


async def test_a_member_cannot_smuggle_an_order_in_a_batch(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """In a room open to members, a batch is theirs to post: what it carries counts as if each
    event were posted alone, by its sender, so an assignment in it is refused like any other
    from a member the worker does not trust; the same batch from a trusted user is obeyed."""
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    _, wa = plans
    admin, room, worker = await cluster(hs, http, plans, accept_agents=["shell"])
    try:
        mallory = await member(hs, http, admin, room, "mallory")

        def order(task: str, mark: Path) -> dict[str, Any]:
            assignment = ev.TaskAssignedContent(
                run_id="by-hand", task_id=task, attempt=1, assigned_to="wa",
                assigned_user=wa.user_id, assigned_by="someone", agent="shell", lease_ms=1000,
                task=json.dumps({"id": task, "agent": "shell", "prompt": f"touch {mark}"}),
            )  # fmt: skip
            return make_batch([outgoing(assignment)]).content

        smuggled, obeyed = wa.workdir / "pwned", wa.workdir / "by-the-admin"
        await mallory.send(room, order("smuggled", smuggled), event_type=BATCH_TYPE)

        async def refused() -> bool:
            return any(
                "assignment.unauthorised" in line and mallory.user_id in line
                for line in worker.log_text().splitlines()
            )

        await wait_for(refused, what="the worker to refuse the smuggled assignment")
        await admin.send(room, order("obeyed", obeyed), event_type=BATCH_TYPE)
        await wait_for(lambda: asyncio.sleep(0, obeyed.exists()), what="the admin's order")
        assert not smuggled.exists()
    finally:
        worker.stop()

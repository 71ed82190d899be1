"""Session control through the room: a coordinator and a worker node as processes, the CLI on a
third identity with nothing of its own on this machine, on the embedded homeserver and Synapse."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.matrix import events as ev
from tests.support.client import MatrixClient
from tests.support.control import AGENT, Background, cis
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

pytestmark = pytest.mark.slow


async def payloads(admin: MatrixClient, room: str) -> list[tuple[str, ev.EventContent]]:
    found = []
    for e in await room_events(admin, room):
        if e["type"].startswith("cis."):
            with contextlib.suppress(ev.InvalidEvent):
                found.append((e["sender"], ev.decode(e["type"], e["content"])))
    return found


async def wait_payload(
    admin: MatrixClient, room: str, test: Any, *, what: str, timeout: float = 60
) -> tuple[str, ev.EventContent]:
    async def found() -> tuple[str, ev.EventContent] | None:
        return next(((s, p) for s, p in await payloads(admin, room) if test(s, p)), None)

    result: tuple[str, ev.EventContent] = await wait_for(found, timeout=timeout, what=what)
    return result


def of_task(task: str, kind: type[ev.EventContent]) -> Any:
    return lambda _, p: isinstance(p, kind) and getattr(p, "task_id", None) == task


def blocked(task: str) -> Any:
    return lambda _, p: (
        isinstance(p, ev.SessionBlockedContent) and p.session_id.split(":")[1] == task
    )


def as_cli(plan: NodePlan, room: str) -> tuple[str, ...]:
    return ("--config", str(plan.config), "--state-dir", str(plan.state_dir), "--room", room)


async def test_remote_input_logs_kill_approve_cancel_and_refusals(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa", "ops", "outsider")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa, ops, outsider = plans
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    write_configs([coord], hs.base_url, allowed_users=[admin_id, ops.user_id])
    # Both read the coordinator's runs; only ops may give the worker orders.
    write_configs(
        [ops, outsider], hs.base_url, allowed_users=[admin_id, ops.user_id],
        coordinators=[coord.user_id],
    )  # fmt: skip
    write_configs(
        [wa], hs.base_url, allowed_users=[admin_id, coord.user_id, ops.user_id],
        accept_agents=["shell"],
    )  # fmt: skip
    worker = NodeProcess(wa).start()
    processes: list[Background] = []
    try:
        room = await run_room(
            admin, [p.user_id for p in plans], trusted=[coord.user_id, wa.user_id]
        )

        async def worker_ready() -> bool:
            members, beats = await joined_members(admin, room), await heartbeats(admin, room)
            return wa.user_id in members and wa.user_id in beats

        await wait_for(worker_ready, what="the worker to join and heartbeat")
        dag = tmp_path / "dag.toml"
        dag.write_text(
            f"[[tasks]]\nid = \"ask\"\ncommand = '''{AGENT} --script "
            "\"print hello; ask Continue?; print after-yes; sleep 60\"'''\n"
            '[[tasks]]\nid = "gate"\ncommand = "echo gated"\nlevel = { type = "confirmed" }\n'
            f"[[tasks]]\nid = \"slow\"\ncommand = '{AGENT} --sleep 60'\n"
        )
        run = Background(
            tmp_path, "coord", "dag", "execute", "--matrix", "--room", room, str(dag), "--json",
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        processes.append(run)
        _, first = await wait_payload(admin, room, blocked("ask"), what="ask to block")
        assert isinstance(first, ev.SessionBlockedContent)
        run_id = first.run_id
        ask = f"{run_id[:15]}:ask"

        # Someone the worker does not trust is refused, through the CLI and by hand.
        refused = await cis("dag", "input", ask, "y", *as_cli(outsider, room))
        assert refused.returncode == 1
        assert "node wa refused" in refused.stderr
        assert f"{outsider.user_id} may not control node wa" in refused.stderr
        stranger_id, stranger_token = await hs.create_user("mallory")
        await admin.invite(room, stranger_id)
        mallory = MatrixClient(http, hs.base_url, user_id=stranger_id, token=stranger_token)
        await mallory.join(room)
        forged = ev.ControlRequestContent(
            request_id=uuid.uuid4().hex, action="kill", node="wa", run_id=run_id,
            session_id=f"{run_id}:ask:1", expires=ev.now_ms() + 60_000,
        )  # fmt: skip
        await mallory.send(room, forged.content(), event_type=forged.TYPE)
        sender, answer = await wait_payload(
            admin,
            room,
            lambda _, p: (
                isinstance(p, ev.ControlReplyContent) and p.request_id == forged.request_id
            ),
            what="the refusal",
        )
        assert sender == wa.user_id and isinstance(answer, ev.ControlReplyContent)
        assert not answer.ok and answer.error and "may not control" in answer.error
        # An expired order (a backlog delivered late) is ignored, even from a trusted user.
        stale = ev.ControlRequestContent(
            request_id=uuid.uuid4().hex, action="kill", node="wa", run_id=run_id,
            session_id=f"{run_id}:ask:1", expires=ev.now_ms() - 1000,
        )  # fmt: skip
        await admin.send(room, stale.content(), event_type=stale.TYPE)

        listing = await cis("dag", "sessions", "--json", *as_cli(ops, room))
        assert listing.returncode == 0, listing.stderr
        sessions = {s["task_id"]: s for s in json.loads(listing.stdout)}
        assert sessions["ask"]["state"] == "blocked"
        assert sessions["ask"]["node"] == "wa" and sessions["ask"]["source"] == "room"
        assert "Continue?" in sessions["ask"]["blocked_reason"]

        # On the worker's own machine, `cis node` answers on its control socket.
        on_worker = await cis(
            "dag", "sessions", "--json", "--local", "--config", str(wa.config),
            "--state-dir", str(wa.state_dir),
        )  # fmt: skip
        assert on_worker.returncode == 0, on_worker.stderr
        held = {s["task_id"]: s for s in json.loads(on_worker.stdout)}
        assert held["ask"]["source"] == "process" and held["ask"]["node"] == "wa"
        assert held["ask"]["state"] == "blocked" and held["ask"]["pid"]

        typed = await cis("dag", "input", ask, "y", *as_cli(ops, room))
        assert typed.returncode == 0, typed.stderr
        assert f"{run_id}:ask:1: typed 1 characters and Enter (running)" in typed.stdout

        async def answered() -> bool:
            logs = await cis("dag", "logs", ask, *as_cli(ops, room))
            assert logs.returncode == 0, logs.stderr
            return "after-yes" in logs.stdout

        await wait_for(answered, what="the agent's answer in the live logs")
        follow = await cis("dag", "logs", ask, "--follow", *as_cli(ops, room))
        assert follow.returncode == 2 and "works on that node's machine" in follow.stderr
        attach = await cis("dag", "attach", ask, *as_cli(ops, room))
        assert attach.returncode == 2 and "attach works on that node's machine" in attach.stderr

        approved = await cis("dag", "approve", run_id[:15], "gate", *as_cli(ops, room))
        assert approved.returncode == 0, approved.stderr
        sender, approval = await wait_payload(
            admin, room, of_task("gate", ev.TaskApprovedContent), what="the approval in the log"
        )
        assert sender == coord.user_id
        assert isinstance(approval, ev.TaskApprovedContent) and approval.by == ops.user_id
        await wait_payload(
            admin,
            room,
            of_task("gate", ev.SessionCompletedContent),
            what="the approved task to run",
        )

        killed = await cis("dag", "kill", ask, *as_cli(ops, room))
        assert killed.returncode == 0, killed.stderr
        assert killed.stdout.strip() == f"{run_id}:ask:1: killed"
        _, done = await wait_payload(
            admin, room, of_task("ask", ev.SessionCompletedContent), what="the killed session's end"
        )
        assert isinstance(done, ev.SessionCompletedContent) and done.status == "killed"
        assert done.transcript and done.transcript.startswith("mxc://")
        transcript = await cis("dag", "logs", ask, *as_cli(ops, room))
        assert transcript.returncode == 0
        assert "hello" in transcript.stdout and "after-yes" in transcript.stdout
        again = await cis("dag", "kill", ask, *as_cli(ops, room))
        assert again.returncode == 1 and "has ended (killed)" in again.stderr

        cancelled = await cis("dag", "cancel", run_id[:15], *as_cli(ops, room))
        assert cancelled.returncode == 0, cancelled.stderr
        assert await run.wait(60) == 1, run.stderr
        report = json.loads(run.stdout)
        assert report["status"] == "cancelled"
        assert {t: v["status"] for t, v in report["tasks"].items()} == {
            "ask": "failed",
            "gate": "completed",
            "slow": "cancelled",
        }
        events = await payloads(admin, room)
        (cancel,) = [
            p for s, p in events if isinstance(p, ev.RunCancelledContent) and s == coord.user_id
        ]
        assert isinstance(cancel, ev.RunCancelledContent) and cancel.by == ops.user_id
        assert not any(isinstance(p, ev.RunContent) and s == ops.user_id for s, p in events)
        replies = [
            p
            for s, p in events
            if isinstance(p, ev.ControlReplyContent) and p.request_id == stale.request_id
        ]
        assert replies == []

        # A second run; then its coordinator and its worker die: reported, never waited for.
        dag.write_text(f"[[tasks]]\nid = \"slow\"\ncommand = '{AGENT} --sleep 60'\n")
        second = Background(
            tmp_path, "coord2", "dag", "execute", "--matrix", "--room", room, str(dag),
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        processes.append(second)
        _, claim = await wait_payload(
            admin,
            room,
            lambda _, p: isinstance(p, ev.TaskClaimedContent) and p.run_id != run_id,
            what="the second run's claim",
        )
        assert isinstance(claim, ev.TaskClaimedContent)
        os.killpg(second.pid, signal.SIGKILL)
        started = time.monotonic()
        silent = await cis("dag", "cancel", claim.run_id, "--timeout", "3", *as_cli(ops, room))
        assert silent.returncode == 1
        assert "no answer from node coord within 3s" in silent.stderr
        os.killpg(worker.process.pid if worker.process else 0, signal.SIGKILL)
        dead = await cis(
            "dag", "input", f"{claim.run_id}:slow", "x", "--timeout", "3", *as_cli(ops, room)
        )
        assert dead.returncode == 1
        assert "node wa" in dead.stderr
        assert "looks down" in dead.stderr or "no answer from node wa" in dead.stderr
        assert time.monotonic() - started < 45
    finally:
        for process in processes:
            process.stop()
        worker.stop()

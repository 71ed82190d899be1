"""Breaking things on purpose: the homeserver goes away mid-run (hybrid mode), the coordinator
is killed with SIGKILL mid-run (matrix mode). Against the embedded homeserver and Synapse."""

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
import yaml

from cis_bot.matrix import events as ev
from tests.support.client import MatrixClient
from tests.support.nodes import (
    NodePlan,
    cis_command,
    cis_env,
    plan_nodes,
    registration_files,
    room_events,
    run_room,
    wait_for,
    write_configs,
)
from tests.support.process import free_port
from tests.test_node_matrix import ran, run_cis, start_cluster

pytestmark = pytest.mark.slow


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


def decoded(events: list[dict[str, Any]], run_id: str) -> list[ev.EventContent]:
    payloads = [ev.decode(e["type"], e["content"]) for e in events if e["type"].startswith("cis.")]
    return [p for p in payloads if isinstance(p, ev.RunContent) and p.run_id == run_id]


async def test_hybrid_run_completes_through_a_homeserver_outage_and_the_room_catches_up(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (plan,) = plan_nodes(tmp_path, "cis.local", "hy")
    hs = homeserver_factory(appservice_files=registration_files([plan]))
    admin_id, token = await hs.create_user("admin", admin=True)
    admin = MatrixClient(http, hs.base_url, user_id=admin_id, token=token)
    write_configs([plan], hs.base_url, allowed_users=[admin_id])
    room = await run_room(admin, [plan.user_id])
    dag = tmp_path / "dag.toml"
    dag.write_text(
        """
[[tasks]]
id = "first"
command = "touch first.started; sleep 1; echo one"
[[tasks]]
id = "second"
deps = ["first"]
command = "sleep 1; echo two"
[[tasks]]
id = "third"
deps = ["second"]
command = "echo three; touch third.done"
"""
    )
    proc = popen_cis(plan, "dag", "execute", "--hybrid", "--room", room, str(dag), "--json")
    try:
        started = plan.workdir / "first.started"
        await wait_for(lambda: asyncio.sleep(0, started.exists()), what="the first task")
        await hs.astop()
        # The run goes on without the homeserver...
        done = plan.workdir / "third.done"
        await wait_for(lambda: asyncio.sleep(0, done.exists()), timeout=30, what="local work")
        assert proc.poll() is None  # ...and waits to deliver what it owes the room
        await hs.astart()
        out, err = await asyncio.to_thread(proc.communicate, timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["status"] == "completed"

    run = decoded(await room_events(admin, room), report["run_id"])
    # Sessions that outlive the broadcast interval are seen running; the instant one only
    # ends; every end is told by session.completed.
    for task, expected in (("first", ["running"]), ("second", ["running"]), ("third", [])):
        states = [
            p.new_state
            for p in run
            if isinstance(p, ev.SessionStateContent) and p.session_id.endswith(f":{task}:1")
        ]
        assert states == expected, (task, states)
        assert any(isinstance(p, ev.SessionCompletedContent) and p.task_id == task for p in run)
    assert [p.status for p in run if isinstance(p, ev.RunCompletedContent)] == ["completed"]


async def test_coordinator_killed_mid_run_resumes_from_the_room_without_rerunning_work(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    plans = plan_nodes(tmp_path, "cis.local", "coord", "wa", "wb")
    hs = homeserver_factory(appservice_files=registration_files(plans))
    coord, wa, wb = plans
    _, room, processes = await start_cluster(hs, http, plans)
    dag = tmp_path / "dag.toml"
    dag.write_text(
        "[dag]\nmax_workers = 2\n"
        + "".join(
            f'[[dag.tasks]]\nid = "t{i}"\n'
            + (f'deps = ["t{i - 2}"]\n' if i >= 2 else "")
            + 'command = "echo $CIS_TASK_ID >> ran.txt; sleep 1.5"\n'
            for i in range(6)
        )
    )
    proc = popen_cis(coord, "dag", "execute", "--matrix", "--room", room, str(dag), "--json")
    try:
        await wait_for(
            lambda: asyncio.sleep(0, len(ran(wa) + ran(wb)) >= 2), what="the first tasks"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()

        listing = await run_cis(
            "dag", "list", "--json", "--room", room,
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        assert listing.returncode == 0, listing.stderr
        (run,) = json.loads(listing.stdout)
        assert run["status"] == "running"

        resumed = await run_cis(
            "dag", "resume", run["run_id"], "--json", "--room", room,
            "--config", str(coord.config), "--state-dir", str(coord.state_dir),
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        report = json.loads(resumed.stdout)
        assert report["run_id"] == run["run_id"]
        assert report["status"] == "completed"
        assert time.monotonic() - killed_at < 60
        everything = ran(wa) + ran(wb)
        assert sorted(everything) == [f"t{i}" for i in range(6)], everything  # each ran once
        assert all(p.alive for p in processes)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in processes:
            p.stop()


async def test_registration_generate_writes_tokens_back_and_the_homeserver_loads_it(
    homeserver_factory: Any, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'# my node\n[node]\nid = "n1"  # keep this\nlisten_port = {port}\n')
    out = tmp_path / "registration.yaml"
    proc = await run_cis("registration", "generate", "--config", str(config), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = config.read_text()
    assert "# keep this" in text
    registration = yaml.safe_load(out.read_text())
    assert registration["url"] == f"http://127.0.0.1:{port}"
    assert registration["sender_localpart"] == "cis_n1"
    assert registration["rate_limited"] is False
    assert registration["namespaces"]["users"][0]["exclusive"] is True
    assert registration["as_token"] in text and registration["hs_token"] in text
    again = await run_cis("registration", "generate", "--config", str(config), "-o", str(out))
    assert again.returncode == 0
    assert yaml.safe_load(out.read_text())["as_token"] == registration["as_token"]

    hs = homeserver_factory(appservice_files=(out,))
    with config.open("a") as f:
        f.write(f'homeserver = "{hs.base_url}"\n')
    # Moving the line under [node]: tomlkit appended it at the end, which is [node] already.
    listing = await run_cis("dag", "list", "--config", str(config), "--state-dir", str(tmp_path))
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "no runs"

"""Local mode is the node on the embedded homeserver: the run's room is its log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cis_bot.app.connect import open_connection
from cis_bot.config import Config, ExecutionMode
from cis_bot.matrix import events as ev
from tests.support.nodes import unbatched

REPO = Path(__file__).resolve().parent.parent


def cis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cis_bot", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "CIS_CONFIG": os.devnull},
    )


async def local_room_events(state_dir: Path, room_id: str) -> list[dict[str, Any]]:
    connection = await open_connection(Config(), ExecutionMode.LOCAL, state_dir)
    try:
        return [e async for e in connection.node.history(room_id)]
    finally:
        await connection.close()


def start_until_touched(dag: Path, state: Path, marker: Path) -> subprocess.Popen[bytes]:
    """A local run in the background, returned once one of its tasks has touched ``marker``."""
    run = subprocess.Popen(
        [sys.executable, "-m", "cis_bot", "dag", "execute", "--local", str(dag), "--json"]
        + ["--state-dir", str(state)],
        cwd=marker.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "CIS_CONFIG": os.devnull},
    )
    deadline = time.monotonic() + 30
    while not marker.exists():
        if time.monotonic() > deadline or run.poll() is not None:
            run.kill()
            raise AssertionError(f"the run never got going: {run.communicate()}")
        time.sleep(0.05)
    return run


def test_local_run_leaves_a_complete_log_that_status_reads_back(tmp_path: Path) -> None:
    dag = tmp_path / "dag.toml"
    dag.write_text(
        '[[tasks]]\nid = "ok"\ncommand = "echo fine"\n'
        '[[tasks]]\nid = "bad"\ncommand = "echo broken >&2; exit 4"\n'
        '[[tasks]]\nid = "after"\ndeps = ["ok", "bad"]\ncommand = "true"\n'
    )
    state = tmp_path / "state"
    run = cis("dag", "execute", "--local", str(dag), "--state-dir", str(state), "--json")
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)

    status = cis("dag", "status", "--state-dir", str(state), "--json")
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["run_id"] == report["run_id"]
    assert summary["status"] == report["status"] == "failed"
    for task_id, task in report["tasks"].items():
        told = summary["tasks"][task_id]
        assert (told["status"], told["attempts"], told["exit_code"]) == (
            task["status"],
            task["attempts"],
            task["exit_code"],
        )
    assert summary["tasks"]["bad"]["transcript"].startswith("mxc://")
    assert summary["tasks"]["after"]["reason"] == "upstream bad failed"

    listing = cis("dag", "list", "--state-dir", str(state))
    assert listing.returncode == 0
    assert report["run_id"] in listing.stdout and "failed" in listing.stdout

    events = asyncio.run(local_room_events(state, report["room_id"]))
    types = [e["type"] for e in events if e["type"].startswith("cis.")]
    for event in events:
        if event["type"].startswith("cis."):
            ev.decode(event["type"], event["content"])  # every event matches the catalogue
    assert types[0] == "cis.dag.run.created"
    assert types[-1] == "cis.dag.run.completed"
    assert types.count("cis.dag.task.assigned") == 2  # "after" was skipped, never assigned
    assert "cis.dag.task.skipped" in types

    # One status notice, edited in place; its last version shows the end of the run.
    notices = [e for e in events if e["type"] == "m.room.message"]
    first, *edits = notices
    assert first["content"]["msgtype"] == "m.notice"
    assert "m.relates_to" not in first["content"]
    assert edits, "the notice is edited as the run moves"
    for edit in edits:
        assert edit["content"]["m.relates_to"] == {
            "rel_type": "m.replace",
            "event_id": first["event_id"],
        }
    final = edits[-1]["content"]["m.new_content"]["body"]
    assert f"run {report['run_id']}: failed" in final
    assert "bad: failed" in final and "after: skipped" in final


def test_federation_mode_needs_a_room(tmp_path: Path) -> None:
    proc = cis("dag", "execute", "--federation", str(REPO / "examples" / "hello.toml"))
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "--federation needs --room R" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_local_run_on_the_same_state_dir_is_refused_clearly(tmp_path: Path) -> None:
    dag = tmp_path / "slow.toml"
    dag.write_text('[[tasks]]\nid = "wait"\ncommand = "touch started; sleep 30"\n')
    state = tmp_path / "state"
    first = start_until_touched(dag, state, tmp_path / "started")
    try:
        second = cis("dag", "execute", "--local", str(REPO / "examples" / "hello.toml"),
                     "--state-dir", str(state))  # fmt: skip
        assert second.returncode == 2
        assert "in use by cis (pid" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=30)
    assert first.returncode == 1  # cancelled


def test_without_status_broadcasts_the_log_still_holds_every_result(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[dag.hybrid]\nbroadcast_status = false\n")
    state = tmp_path / "state"
    env = {**os.environ, "CIS_CONFIG": str(config)}
    run = subprocess.run(
        [sys.executable, "-m", "cis_bot", "dag", "execute", "--local", "--json"]
        + [str(REPO / "examples" / "diamond.toml"), "--state-dir", str(state)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    events = asyncio.run(local_room_events(state, report["room_id"]))
    types = [e["type"] for e in events]
    assert "cis.dag.session.state" not in types and "cis.dag.session.created" not in types
    assert types.count("cis.dag.session.completed") == len(report["tasks"])


def test_a_standalone_homeserver_hosts_local_runs_and_people_can_follow_them(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    server = subprocess.Popen(
        [sys.executable, "-m", "cis_bot", "homeserver", "--state-dir", str(state), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CIS_CONFIG": os.devnull},
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("listening on "), (line, server.stderr)
        base_url = line.split()[-1]
        added = cis(
            "homeserver", "add-user", "--state-dir", str(state), "alice", "--password", "pw"
        )
        assert added.returncode == 0, added.stderr

        run = cis("dag", "execute", "--local", str(REPO / "examples" / "hello.toml"),
                  "--state-dir", str(state), "--json")  # fmt: skip
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)

        async def follow() -> list[str]:
            import aiohttp

            async with aiohttp.ClientSession(base_url) as http:
                login = await http.post(
                    "/_matrix/client/v3/login",
                    json={"type": "m.login.password", "user": "alice", "password": "pw"},
                )
                token = (await login.json())["access_token"]
                headers = {"Authorization": f"Bearer {token}"}
                alias = f"#dag-{report['run_id']}:cis.local"
                joined = await http.post(
                    f"/_matrix/client/v3/join/{alias.replace('#', '%23')}", headers=headers
                )
                room_id = (await joined.json())["room_id"]
                assert room_id == report["room_id"]
                messages = await http.get(
                    f"/_matrix/client/v3/rooms/{room_id}/messages",
                    params={"dir": "b", "limit": "100"},
                    headers=headers,
                )
                chunk = (await messages.json())["chunk"]
                return [e["type"] for e in unbatched(list(reversed(chunk)))]

        types = asyncio.run(follow())
        assert "cis.dag.run.completed" in types and "cis.dag.task.assigned" in types
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0


def test_status_reads_a_local_run_while_it_runs(tmp_path: Path) -> None:
    dag = tmp_path / "slow.toml"
    dag.write_text(
        '[[tasks]]\nid = "quick"\ncommand = "true"\n'
        '[[tasks]]\nid = "wait"\ndeps = ["quick"]\ncommand = "touch started; sleep 30"\n'
    )
    state = tmp_path / "state"
    first = start_until_touched(dag, state, tmp_path / "started")
    try:
        status = cis("dag", "status", "--state-dir", str(state), "--json")
        assert status.returncode == 0, status.stderr
        summary = json.loads(status.stdout)
        assert summary["status"] == "running"
        assert summary["tasks"]["quick"]["status"] == "completed"
        assert summary["tasks"]["wait"]["status"] in ("dispatched", "running")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=30)

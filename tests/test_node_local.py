"""Local mode is the node on the embedded homeserver: the run's room is its log."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
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
    assert "cis.dag.run.completed" in types
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


def homeserver_children(state: Path) -> list[int]:
    """Pids of the ``cis homeserver --for-run`` processes on ``state``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--for-run" in argv and os.fsencode(state) in argv:
            found.append(int(entry.name))
    return found


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        status = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}").exists() else ""
        if ") Z " in status:  # a zombie: gone, its parent (this test's runner) not yet told
            return
        assert time.monotonic() < deadline, f"process {pid} is still there"
        time.sleep(0.02)


def test_a_local_run_serves_its_room_from_a_homeserver_of_its_own_that_ends_with_it(
    tmp_path: Path,
) -> None:
    """The run starts the homeserver in a child (cis_bot/app/hsprocess.py), in a session of its
    own: Ctrl-C reaches the run alone, which puts its last events in the room, then stops it."""
    dag = tmp_path / "slow.toml"
    dag.write_text('[[tasks]]\nid = "wait"\ncommand = "touch started; sleep 30"\n')
    state = tmp_path / "state"
    run = start_until_touched(dag, state, tmp_path / "started")
    try:
        (child,) = homeserver_children(state)
        stat = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[1]) == run.pid  # its parent
        assert os.getsid(child) == child != os.getsid(run.pid)
        endpoint = json.loads((state / "homeserver" / "endpoint.json").read_text())
        assert endpoint["pid"] == run.pid and endpoint["standalone"] is False
    finally:
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=30)
    assert run.returncode == 1  # cancelled
    wait_gone(child)
    assert not (state / "homeserver" / "endpoint.json").exists()
    report = json.loads(out)
    events = asyncio.run(local_room_events(state, report["room_id"]))
    (completed,) = [e for e in events if e["type"] == "cis.dag.run.completed"]
    assert completed["content"]["status"] == "cancelled"


def test_a_killed_local_run_takes_its_homeserver_along_and_the_next_run_goes_ahead(
    tmp_path: Path,
) -> None:
    dag = tmp_path / "slow.toml"
    dag.write_text('[[tasks]]\nid = "wait"\ncommand = "touch started; sleep 30"\n')
    state = tmp_path / "state"
    run = start_until_touched(dag, state, tmp_path / "started")
    (child,) = homeserver_children(state)
    run.kill()
    run.communicate(timeout=30)
    # At once: the homeserver child still holds the directory for a moment, and the next run
    # waits for it rather than calling the directory in use by a process that is gone.
    after = cis("dag", "execute", "--local", str(REPO / "examples" / "hello.toml"),
                "--state-dir", str(state), "--json")  # fmt: skip
    assert after.returncode == 0, after.stderr
    wait_gone(child)
    assert json.loads(after.stdout)["status"] == "completed"
    assert homeserver_children(state) == []


def test_a_taken_appservice_port_moves_the_local_node_and_restarts_its_homeserver(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    hello = str(REPO / "examples" / "hello.toml")
    first = cis("dag", "execute", "--local", hello, "--state-dir", str(state), "--json")
    assert first.returncode == 0, first.stderr
    registration = state / "homeserver" / "appservices" / "local-node.yaml"
    taken = int(re.search(r"url: http://127.0.0.1:(\d+)", registration.read_text()).group(1))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        second = cis("dag", "execute", "--local", hello, "--state-dir", str(state), "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["status"] == "completed"
    moved = int(re.search(r"url: http://127.0.0.1:(\d+)", registration.read_text()).group(1))
    assert moved != taken
    report = json.loads(second.stdout)
    types = [e["type"] for e in asyncio.run(local_room_events(state, report["room_id"]))]
    assert "cis.dag.run.completed" in types


def test_the_directory_waits_for_a_gone_runs_homeserver_to_let_go_and_not_for_a_live_holder(
    tmp_path: Path,
) -> None:
    """A run that died leaves its homeserver child holding the directory for a moment: the
    next one waits for it, bounded; a live holder is refused at once."""
    from cis_bot.app.localhs import InUse, LocalHomeserverDir

    directory = LocalHomeserverDir.of(tmp_path / "state")
    # The "run" takes the lock, starts a "homeserver" that inherits it for 1.5 s, and dies.
    script = (
        "import subprocess, sys\n"
        "from cis_bot.app.localhs import LocalHomeserverDir\n"
        f"lock = LocalHomeserverDir.of(__import__('pathlib').Path({str(tmp_path / 'state')!r}))"
        ".lock('cis')\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1.5)'],"
        " pass_fds=(lock.fileno(),))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=30)
    try:
        directory.lock("next", orphan_wait=0)
        raise AssertionError("the orphaned hold was not there")
    except InUse as exc:
        assert "in use by cis (pid" in str(exc)
    started = time.monotonic()
    directory.lock("next").close()
    assert 0.5 < time.monotonic() - started < 5

    held = directory.lock("live")
    try:
        started = time.monotonic()
        try:
            directory.lock("other")
            raise AssertionError("a live holder's directory was taken")
        except InUse as exc:
            assert f"in use by live (pid {os.getpid()})" in str(exc)
        assert time.monotonic() - started < 0.5
    finally:
        held.close()


def test_a_local_runs_homeserver_killed_midway_comes_back_and_the_room_gets_everything(
    tmp_path: Path,
) -> None:
    """kill -9 of the run's homeserver: the run starts it again at the same address, its tasks
    go on meanwhile, and what it posted while the homeserver was away reaches the room."""
    dag = tmp_path / "gate.toml"
    dag.write_text(
        '[[tasks]]\nid = "gate"\n'
        'command = "touch started; while [ ! -e go ]; do sleep 0.02; done"\n'
        '[[tasks]]\nid = "after"\ndeps = ["gate"]\ncommand = "echo after"\n'
    )
    state = tmp_path / "state"
    run = start_until_touched(dag, state, tmp_path / "started")
    try:
        (first,) = homeserver_children(state)
        endpoint = json.loads((state / "homeserver" / "endpoint.json").read_text())
        os.kill(first, signal.SIGKILL)
        (tmp_path / "go").touch()  # the tasks finish while the homeserver is away, or back
        deadline = time.monotonic() + 30
        while not [pid for pid in homeserver_children(state) if pid != first]:
            assert time.monotonic() < deadline, "the homeserver was not started again"
            assert run.poll() is None, run.communicate()
            time.sleep(0.02)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    assert b"local.homeserver_ended" in err
    report = json.loads(out)
    assert report["status"] == "completed"
    events = asyncio.run(local_room_events(state, report["room_id"]))
    done = [
        e["content"]["task_id"]
        for e in events
        if e["type"] == "cis.dag.session.completed" and e["content"]["status"] == "completed"
    ]
    assert sorted(done) == ["after", "gate"]
    assert any(e["type"] == "cis.dag.run.completed" for e in events)
    assert endpoint["base_url"].startswith("http://127.0.0.1:")

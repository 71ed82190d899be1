"""Item 6 of the security review: runs whose log would need events over Matrix's 64 KiB limit
(a run's end listing thousands of tasks, a task with a long prompt) finish, with a report and a
completed room, and can be read back and resumed."""

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

import pytest

from cis_bot.app.connect import open_connection
from cis_bot.config import Config, ExecutionMode
from cis_bot.matrix import events as ev
from cis_bot.matrix.broadcast import NOTICE_ROWS
from tests.security.support import cis

pytestmark = pytest.mark.slow


async def room_of_run(state: Path, room_id: str, mxc: list[str]) -> tuple[list[Any], list[bytes]]:
    """The run room's events, and the media ``mxc`` names, read as the local node."""
    connection = await open_connection(Config(), ExecutionMode.LOCAL, state, serve=False)
    try:
        node = connection.node
        events = [e async for e in node.history(room_id)]
        return events, [await node.download(uri) for uri in mxc]
    finally:
        await connection.close()


def the(events: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == event_type]


def test_a_run_too_large_for_its_events_ends_with_a_report_and_a_summary(tmp_path: Path) -> None:
    ids = [f"{i:03d}-{'x' * 120}" for i in range(400)]  # long ids: 400 make ~55 KB of table
    long_command = ": " + "y" * 60_000 + "; echo long-done"
    dag = tmp_path / "dag.toml"
    dag.write_text(
        "[dag]\nmax_workers = 8\n"
        + "".join(f'[[dag.tasks]]\nid = "{i}"\ncommand = "true"\n' for i in ids)
        + f'[[dag.tasks]]\nid = "long"\ncommand = "{long_command}"\n'
    )
    state = tmp_path / "state"
    run = cis("dag", "execute", "--local", str(dag), "--state-dir", str(state), "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["status"] == "completed" and len(report["tasks"]) == 401
    assert json.loads((state / "runs" / report["run_id"] / "report.json").read_text()) == report

    events, _ = asyncio.run(room_of_run(state, report["room_id"], []))
    assert all(len(json.dumps(e).encode()) < 65_536 for e in events)
    (end,) = the(events, ev.RunCompletedContent.TYPE)
    summary = ev.decode(end["type"], end["content"])
    assert isinstance(summary, ev.RunCompletedContent) and summary.status == "completed"
    assert summary.counts == {"completed": 401} and summary.tasks_mxc
    (long,) = [
        e for e in the(events, ev.TaskAssignedContent.TYPE) if e["content"]["task_id"] == "long"
    ]
    assert "task" not in long["content"] and long["content"]["task_mxc"].startswith("mxc://")
    files = [e for e in the(events, "m.room.message") if e["content"]["msgtype"] == "m.file"]
    (table_file,) = files
    assert table_file["content"]["body"] == f"run-{report['run_id']}.tasks.txt"
    notices = [e for e in the(events, "m.room.message") if e["content"]["msgtype"] == "m.notice"]
    final = notices[-1]["content"]["m.new_content"]["body"]
    assert "401 tasks: 401 completed" in final and table_file["content"]["body"] in final
    assert final.count("\n") < NOTICE_ROWS + 5

    _, (table, document, listed) = asyncio.run(
        room_of_run(
            state,
            report["room_id"],
            [summary.tasks_mxc, long["content"]["task_mxc"], table_file["content"]["url"]],
        )
    )
    assert json.loads(table) == {tid: "completed" for tid in [*ids, "long"]}
    assert json.loads(document)["prompt"] == long_command
    assert all(tid in listed.decode() for tid in ids)

    status = cis("dag", "status", "--state-dir", str(state), "--json")
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)["tasks"]) == 401


@pytest.mark.timeout(900)
def test_ten_thousand_tasks_run_stop_and_resume_to_the_end(tmp_path: Path) -> None:
    tasks = 10_000
    dag = tmp_path / "dag.toml"
    dag.write_text(
        "[dag]\nmax_workers = 8\n"
        + "".join(f'[[dag.tasks]]\nid = "t{i}"\ncommand = "true"\n' for i in range(tasks))
    )
    state = tmp_path / "state"
    env = {**os.environ, "CIS_CONFIG": os.devnull}
    first = subprocess.Popen(
        [sys.executable, "-m", "cis_bot", "dag", "execute", "--local", str(dag), "--json",
         "--state-dir", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        # Stopped hard once a good part has run: the log holds thousands of results to replay.
        deadline = time.monotonic() + 300
        while len(list(state.glob("runs/*/sessions/*.log"))) < 1500:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the run never got far"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    (run_dir,) = (state / "runs").iterdir()

    resumed = cis("dag", "resume", run_dir.name, "--state-dir", str(state), "--json", timeout=800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "room.events_undelivered" not in resumed.stderr  # its room has the whole story
    report = json.loads(resumed.stdout)
    assert report["run_id"] == run_dir.name and report["status"] == "completed"
    assert len(report["tasks"]) == tasks
    assert {t["status"] for t in report["tasks"].values()} == {"completed"}

    status = cis("dag", "status", run_dir.name, "--state-dir", str(state), "--json", timeout=300)
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["status"] == "completed" and len(summary["tasks"]) == tasks
    events, _ = asyncio.run(room_of_run(state, report["room_id"], []))
    (end,) = the(events, ev.RunCompletedContent.TYPE)
    assert end["content"]["counts"] == {"completed": tasks}
    assert all(len(json.dumps(e).encode()) < 65_536 for e in events)

"""CIS's task keys through the real CLI (`cis dag execute --local` as a subprocess, real PTYs,
the run's room on the embedded homeserver): a fix-up task that runs only on failure, rollback
order and its record in the room, a non-idempotent lost attempt waiting for approval, and what
`cis dag validate` says about keys that are shown but not acted on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from cis_bot.app.connect import open_connection
from cis_bot.config import Config, ExecutionMode
from cis_bot.control.client.process import ProcessClient
from cis_bot.control.registry import discover
from cis_bot.matrix import events as ev
from tests.support.nodes import wait_for

REPO = Path(__file__).resolve().parent.parent


def cis(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "cis_bot", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=90,
        env={**os.environ, "CIS_CONFIG": os.devnull},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def execute(tmp_path: Path, dag_text: str) -> tuple[int, dict[str, Any]]:
    dag = tmp_path / "dag.toml"
    dag.write_text(textwrap.dedent(dag_text))
    state = str(tmp_path / "state")
    proc = cis("dag", "execute", "--local", str(dag), "--state-dir", state, "--json", cwd=tmp_path)
    return proc.returncode, json.loads(proc.stdout)


async def room_events(state_dir: Path, room_id: str) -> list[dict[str, Any]]:
    """The run's room, as the embedded homeserver keeps it (every cis.* event checked against
    the catalogue)."""
    connection = await open_connection(Config(), ExecutionMode.LOCAL, state_dir)
    try:
        events = [e async for e in connection.node.history(room_id)]
    finally:
        await connection.close()
    for event in events:
        if event["type"].startswith("cis."):
            ev.decode(event["type"], event["content"])
    return [e for e in events if e["type"].startswith("cis.")]


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {task: value["status"] for task, value in report["tasks"].items()}


FIXUP = """
[dag]
policy = "all_success"

[[dag.tasks]]
id = "compile"
command = "echo compiling; test -f fixed || { echo 'error: missing header' >&2; exit 2; }"
on_failure = "fix"

[[dag.tasks]]
id = "fix"
command = "echo fixing after: $(cat $CIS_UPSTREAM_DIR/compile.txt | tail -1); touch fixed"
condition = "if compile.status == 'failed' and compile.exit_code == 2"
retry = 2

[[dag.tasks]]
id = "test"
command = "test -f fixed && echo tested"
deps = ["compile"]
"""


def test_a_fixup_runs_only_when_its_task_failed_and_the_pipeline_goes_on(tmp_path: Path) -> None:
    code, report = execute(tmp_path, FIXUP)
    assert code == 0, report
    assert report["status"] == "completed"
    assert statuses(report) == {"compile": "failed", "fix": "completed", "test": "completed"}
    assert report["tasks"]["compile"]["handled_by"] == "fix"
    assert report["debts"] == []
    fix_log = Path(report["tasks"]["fix"]["transcript"]).read_text()
    assert "fixing after: error: missing header" in fix_log

    # The same DAG when nothing fails: the fix-up is skipped, and says why.
    (tmp_path / "fixed").touch()
    code, report = execute(tmp_path, FIXUP)
    assert code == 0, report
    assert statuses(report) == {"compile": "completed", "fix": "skipped", "test": "completed"}
    assert report["tasks"]["fix"]["reason"] == "compile completed: nothing to fix"
    events = asyncio.run(room_events(tmp_path / "state", report["room_id"]))
    skipped = [e["content"] for e in events if e["type"] == "cis.dag.task.skipped"]
    assert skipped == [
        {**skipped[0], "task_id": "fix", "reason": "compile completed: nothing to fix"}
    ]


def test_a_false_condition_skips_with_the_values_it_read(tmp_path: Path) -> None:
    code, report = execute(
        tmp_path,
        """
        [[tasks]]
        id = "probe"
        command = "echo gpu=none; exit 0"

        [[tasks]]
        id = "cuda"
        command = "echo building for cuda"
        deps = ["probe"]
        condition = "probe.output == 'gpu=nvidia' or probe.exit_code != 0"
        """,
    )
    assert code == 0, report
    assert statuses(report) == {"probe": "completed", "cuda": "skipped"}
    assert report["tasks"]["cuda"]["reason"] == (
        "condition is false: probe.output == 'gpu=nvidia' or probe.exit_code != 0 "
        "(probe.output = 'gpu=none'; probe.exit_code = 0)"
    )


ROLLBACK = """
[dag]
policy = "all_success"

[[dag.tasks]]
id = "fetch"
command = "touch fetched"
rollback = ["rm fetched", "echo undone >> undo.log; echo fetch >> undo.log"]

[[dag.tasks]]
id = "build"
command = "sleep 0.2; touch built"
deps = ["fetch"]
rollback = ["rm built && echo build >> undo.log"]

[[dag.tasks]]
id = "notes"
command = "echo no rollback for me"

[[dag.tasks]]
id = "deploy"
command = "sleep 0.4; touch deployed"
deps = ["build"]
rollback = ["{deploy_rollback}"]

[[dag.tasks]]
id = "verify"
command = "echo verification failed; exit 1"
deps = ["deploy"]
"""


def test_a_failed_run_rolls_back_newest_first_and_the_room_records_it(tmp_path: Path) -> None:
    code, report = execute(
        tmp_path, ROLLBACK.format(deploy_rollback="rm deployed && echo deploy >> undo.log")
    )
    assert code == 1
    assert report["status"] == "failed"
    assert [(r["task"], r["status"]) for r in report["rollback"]] == [
        ("deploy", "completed"),
        ("build", "completed"),
        ("fetch", "completed"),
    ]
    assert (tmp_path / "undo.log").read_text().split() == ["deploy", "build", "undone", "fetch"]
    assert not any((tmp_path / f).exists() for f in ("fetched", "built", "deployed"))
    for entry in report["rollback"]:
        assert Path(entry["transcript"]).is_file()

    events = asyncio.run(room_events(tmp_path / "state", report["room_id"]))
    rollbacks = [e["content"] for e in events if e["type"] == "cis.dag.task.rollback"]
    assert [(r["task_id"], r["commands"]) for r in rollbacks] == [
        ("deploy", ["rm deployed && echo deploy >> undo.log"]),
        ("build", ["rm built && echo build >> undo.log"]),
        ("fetch", ["rm fetched", "echo undone >> undo.log; echo fetch >> undo.log"]),
    ]
    # Each rollback is an attempt of its own: assigned, claimed, its session completed, all
    # before the run's end.
    types = [e["type"] for e in events]
    assert types[-1] == "cis.dag.run.completed"
    for rollback in rollbacks:
        mine = [
            e["type"]
            for e in events
            if e["content"].get("task_id") == rollback["task_id"]
            and e["content"].get("attempt") == rollback["attempt"]
        ]
        assert mine[:3] == [
            "cis.dag.task.rollback",
            "cis.dag.task.assigned",
            "cis.dag.task.claimed",
        ]
        completed = [
            e["content"]
            for e in events
            if e["type"] == "cis.dag.session.completed"
            and e["content"]["task_id"] == rollback["task_id"]
            and e["content"]["attempt"] == rollback["attempt"]
        ]
        assert [c["status"] for c in completed] == ["completed"]

    status = cis("dag", "status", "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert [(r["task"], r["status"]) for r in summary["rollback"]] == [
        ("deploy", "completed"),
        ("build", "completed"),
        ("fetch", "completed"),
    ]


def test_a_failing_rollback_is_reported_and_stops_the_older_ones(tmp_path: Path) -> None:
    code, report = execute(
        tmp_path, ROLLBACK.format(deploy_rollback="echo cannot undeploy >&2; exit 7")
    )
    assert code == 1
    assert [(r["task"], r["status"]) for r in report["rollback"]] == [
        ("deploy", "failed"),
        ("build", "not run"),
        ("fetch", "not run"),
    ]
    assert report["rollback"][0]["exit_code"] == 7
    assert report["rollback"][0]["reason"] == "exited with status 7"
    assert report["rollback"][1]["reason"] == "the rollback of deploy failed"
    assert (tmp_path / "built").exists() and (tmp_path / "fetched").exists()


def test_a_run_that_completes_rolls_nothing_back(tmp_path: Path) -> None:
    code, report = execute(
        tmp_path,
        ROLLBACK.format(deploy_rollback="rm deployed").replace("exit 1", "exit 0"),
    )
    assert code == 0
    assert report["rollback"] == []
    assert (tmp_path / "deployed").exists()


class Background:
    """A `cis` command left running, in its own process group."""

    def __init__(self, cwd: Path, name: str, *args: str) -> None:
        self.cwd = cwd
        self.out = cwd / f"{name}.out"
        self.err = cwd / f"{name}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cis_bot", *args],
                stdout=out,
                stderr=err,
                cwd=cwd,
                env={**os.environ, "CIS_CONFIG": os.devnull},
                start_new_session=True,
            )

    async def task_status(self, run_id: str, task: str) -> str | None:
        """The task's status in this process's run, through its control socket."""
        for entry in discover(self.cwd / "state", clean=False).live:
            if entry.pid == self.process.pid:
                async with ProcessClient(entry, timeout=10) as client:
                    data = await client.request("GET", "/v1/runs")
                    for run in data["runs"]:
                        if run["run_id"] == run_id:
                            status: str = run["tasks"][task]
                            return status
        if self.process.poll() is not None:
            raise AssertionError(f"it ended early:\n{self.err.read_text()[-3000:]}")
        return None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(15)


def wait_until(path: Path, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before the task started"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
async def test_a_lost_attempt_of_a_non_idempotent_task_waits_for_approval(tmp_path: Path) -> None:
    dag = tmp_path / "dag.toml"
    dag.write_text(
        textwrap.dedent(
            """
            [[tasks]]
            id = "migrate"
            command = "echo migrating >> runs.log; touch started; sleep 30"
            idempotent = false

            [[tasks]]
            id = "reindex"
            command = "echo indexing >> runs.log"

            [[tasks]]
            id = "report"
            command = "wc -l < runs.log"
            deps = ["migrate", "reindex"]
            """
        )
    )
    first = Background(tmp_path, "first", "dag", "execute", "--local", str(dag),
                       "--state-dir", str(tmp_path / "state"), "--json")  # fmt: skip
    try:
        wait_until(tmp_path / "started", first.process)
    finally:
        first.kill()  # the node dies: its attempts will never report
    (tmp_path / "started").unlink()
    listing = cis("dag", "list", "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path)
    run_id = json.loads(listing.stdout)[0]["run_id"]
    assert (tmp_path / "runs.log").read_text().count("migrating") == 1

    state = str(tmp_path / "state")
    resumed = Background(
        tmp_path, "resume", "dag", "resume", run_id, "--state-dir", state, "--json"
    )
    try:

        async def held() -> bool:
            return await resumed.task_status(run_id, "migrate") == "awaiting_approval"

        await wait_for(held, timeout=60, what="the lost migration to wait for approval")
        status = cis(
            "dag", "status", run_id, "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path
        )
        reason = json.loads(status.stdout)["tasks"]["migrate"]["reason"]
        assert reason == (
            "attempt 1 was lost (its node stopped before it reported); task migrate is not "
            "idempotent and may have half-happened: approve it to run again"
        )
        # Not run again by itself, while the rest of the run goes on.
        assert (tmp_path / "runs.log").read_text().count("migrating") == 1

        async def reindexed() -> bool:
            return await resumed.task_status(run_id, "reindex") == "completed"

        await wait_for(reindexed, timeout=30, what="the rest of the run to go on")
        approved = cis(
            "dag",
            "approve",
            run_id,
            "migrate",
            "--state-dir",
            str(tmp_path / "state"),
            cwd=tmp_path,
        )
        assert approved.returncode == 0, approved.stderr
        wait_until(tmp_path / "started", resumed.process, timeout=60)
    finally:
        resumed.kill()
    # Approved, it ran again.
    assert (tmp_path / "runs.log").read_text().count("migrating") == 2

    events = await room_events(tmp_path / "state", json.loads(listing.stdout)[0]["room_id"])
    requested = [
        e["content"]
        for e in events
        if e["type"] == "cis.dag.task.approval_requested" and e["content"]["task_id"] == "migrate"
    ]
    assert len(requested) == 1 and requested[0]["reason"] == reason
    lost = [
        (e["content"]["task_id"], e["content"]["attempt"])
        for e in events
        if e["type"] == "cis.dag.task.lost"
    ]
    assert ("migrate", 1) in lost
    # reindex, if it was lost too, went again by itself: it is idempotent.
    asked = {
        e["content"]["task_id"] for e in events if e["type"] == "cis.dag.task.approval_requested"
    }
    assert asked == {"migrate"}


def test_an_idempotent_lost_attempt_runs_again_by_itself(tmp_path: Path) -> None:
    dag = tmp_path / "dag.toml"
    dag.write_text(
        '[[tasks]]\nid = "sync"\n'
        'command = "echo run >> runs.log; test -f second || { touch second started; sleep 30; }"\n'
    )
    first = Background(tmp_path, "first", "dag", "execute", "--local", str(dag),
                       "--state-dir", str(tmp_path / "state"), "--json")  # fmt: skip
    try:
        wait_until(tmp_path / "started", first.process)
    finally:
        first.kill()
    run_id = json.loads(
        cis("dag", "list", "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path).stdout
    )[0]["run_id"]
    resumed = cis(
        "dag", "resume", run_id, "--state-dir", str(tmp_path / "state"), "--json", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["tasks"]["sync"]["status"] == "completed"
    assert (tmp_path / "runs.log").read_text() == "run\nrun\n"


def test_validate_shows_what_is_informational(tmp_path: Path) -> None:
    dag = tmp_path / "dag.toml"
    dag.write_text(
        textwrap.dedent(
            """
            [dag]
            dag.env = { BRANCH = "main" }

            [[dag.tasks]]
            id = "review"
            agent_runtime = "claude"
            prompt = "review"
            [dag.tasks.agent_config]
            model = "claude-3-5-sonnet-20241022"
            temperature = 0.7

            [[dag.todo]]
            id = "init"
            description = "set things up"
            priority = 100
            assignee = "computer-b"

            [dag.adaptive]
            rules = ["if review.fail_count > 2 then notify"]
            """
        )
    )
    proc = cis("dag", "validate", str(dag), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{dag}: ok (dag: 1 tasks)",
        "  note: 'dag.env = ...' inside [dag] is the key dag.dag.env; it was read as [dag.env] "
        "(write [dag.env] to say so)",
        "  note: [[dag.todo]]: 1 items, shown with the DAG; they do not change the run",
        "  note: [dag.adaptive]: 1 rules, shown with the DAG; they are not applied",
        "  note: task 'review': agent_config.temperature is not honoured: agent profile 'claude' "
        "has no way to pass it to its CLI (config_args / config_env)",
        "  todo init: set things up (priority 100, assignee computer-b)",
        "  adaptive rule (not applied): if review.fail_count > 2 then notify",
    ]
    proc = cis("dag", "validate", str(dag), "--json", cwd=tmp_path)
    assert len(json.loads(proc.stdout)["notes"]) == 4

"""`cis dag execute --local` end to end, as a subprocess, on real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def cis(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cis_bot", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env={**os.environ, "CIS_CONFIG": os.devnull},
    )


def execute_json(dag: Path, state: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = cis("dag", "execute", "--local", str(dag), "--state-dir", str(state), "--json", *extra)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def write(tmp_path: Path, text: str, name: str = "dag.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_hello_example_completes_with_a_json_report(tmp_path: Path) -> None:
    code, report = execute_json(REPO / "examples" / "hello.toml", tmp_path)
    assert code == 0
    assert report["status"] == "completed"
    assert report["tasks"], "the example has tasks"
    for task_id, task in report["tasks"].items():
        assert task["status"] == "completed", task_id
        assert task["attempts"] == 1
        assert task["exit_code"] == 0
        assert task["duration_s"] >= 0
        assert Path(task["transcript"]).is_file()
    run_dir = tmp_path / "runs" / report["run_id"]
    assert json.loads((run_dir / "report.json").read_text()) == report


@pytest.mark.parametrize(
    "example",
    sorted(
        p.name for p in (REPO / "examples").iterdir() if p.is_file() and p.name != "config.toml"
    ),
)
def test_every_example_runs_to_completion(example: str, tmp_path: Path) -> None:
    code, report = execute_json(REPO / "examples" / example, tmp_path)
    assert code == 0, report
    assert report["status"] == "completed"
    for task_id, task in report["tasks"].items():
        # fixup.toml: its build fails and its fix-up handles that; its diagnosis is not needed.
        handled = task["status"] == "failed" and task.get("handled_by")
        assert task["status"] in ("completed", "skipped") or handled, (task_id, task)


def test_failure_exits_1_skips_downstream_and_keeps_the_exit_code(tmp_path: Path) -> None:
    dag = write(
        tmp_path,
        """
        [[tasks]]
        id = "broken"
        command = "echo about to fail; exit 3"

        [[tasks]]
        id = "after"
        deps = ["broken"]
        command = "echo should not run"

        [[tasks]]
        id = "independent"
        command = "echo fine"
        """,
    )
    code, report = execute_json(dag, tmp_path / "state")
    assert code == 1
    assert report["status"] == "failed"
    tasks = report["tasks"]
    assert tasks["broken"]["status"] == "failed"
    assert tasks["broken"]["exit_code"] == 3
    assert "about to fail" in Path(tasks["broken"]["transcript"]).read_text()
    assert tasks["after"]["status"] == "skipped"
    assert tasks["after"]["attempts"] == 0
    assert tasks["independent"]["status"] == "completed"


def test_upstream_outputs_reach_the_downstream_task(tmp_path: Path) -> None:
    dag = write(
        tmp_path,
        """
        [[tasks]]
        id = "produce"
        command = "echo the-answer-is-42"

        [[tasks]]
        id = "consume"
        deps = ["produce"]
        command = 'cat "$CIS_UPSTREAM_DIR/produce.txt"; echo "task=$CIS_TASK_ID"'
        """,
    )
    code, report = execute_json(dag, tmp_path / "state")
    assert code == 0, report
    transcript = Path(report["tasks"]["consume"]["transcript"]).read_text()
    assert "the-answer-is-42" in transcript
    assert "task=consume" in transcript


def test_every_task_is_told_where_it_runs(tmp_path: Path) -> None:
    """The CIS_* variables, as a task sees them, and each one documented."""
    show = (
        'env | grep ^CIS_ | sort; echo "run=$CIS_RUN_ID task=$CIS_TASK_ID attempt=$CIS_ATTEMPT '
        'session=$CIS_SESSION_ID node=$CIS_NODE_ID upstream=${CIS_UPSTREAM_DIR:-none}"'
    )
    dag = write(
        tmp_path,
        f"""
        [[tasks]]
        id = "first"
        command = '''{show}'''

        [[tasks]]
        id = "second"
        deps = ["first"]
        retry = 1
        command = '''{show}; test "$CIS_ATTEMPT" = 2'''
        """,
    )
    state = tmp_path / "state"
    code, report = execute_json(dag, state)
    assert code == 0, report
    run_id = report["run_id"]
    first = Path(report["tasks"]["first"]["transcript"]).read_text()
    assert (
        f"run={run_id} task=first attempt=1 session={run_id}:first:1 node=local upstream=none"
        in first
    )
    second = Path(report["tasks"]["second"]["transcript"]).read_text()
    upstream = state / "runs" / run_id / "upstream" / "second"
    assert (
        f"run={run_id} task=second attempt=2 session={run_id}:second:2 node=local "
        f"upstream={upstream}"
    ) in second
    # Whatever a task finds in its environment is documented.
    documented = (REPO / "docs" / "dag-format.md").read_text()
    names = set(re.findall(r"^(CIS_[A-Z_]+)=", first + second, re.MULTILINE))
    assert {"CIS_NODE_ID", "CIS_UPSTREAM_DIR"} < names
    assert [name for name in sorted(names) if f"| `{name}` |" not in documented] == []


def test_timeout_kills_the_session_and_reports_timeout(tmp_path: Path) -> None:
    dag = write(
        tmp_path,
        """
        [[tasks]]
        id = "slow"
        command = "sleep 30"
        timeout_secs = 0.5
        """,
    )
    started = time.monotonic()
    code, report = execute_json(dag, tmp_path / "state")
    assert code == 1
    assert report["tasks"]["slow"]["status"] == "timeout"
    assert time.monotonic() - started < 15


def test_retry_until_success(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    dag = write(
        tmp_path,
        f"""
        [dag]
        retry_backoff_secs = 0.05

        [[dag.tasks]]
        id = "flaky"
        retry = 2
        command = "echo x >> {counter}; test $(wc -l < {counter}) -ge 2"
        """,
    )
    code, report = execute_json(dag, tmp_path / "state")
    assert code == 0
    assert report["tasks"]["flaky"]["attempts"] == 2
    assert counter.read_text().count("x") == 2


def test_invalid_dag_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    dag = write(tmp_path, '[[tasks]]\nid = "a"\ncommand = "true"\ndeps = ["nope"]\n')
    proc = cis("dag", "execute", "--local", str(dag), "--state-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(dag) in proc.stderr
    assert "nope" in proc.stderr
    assert proc.stdout == ""


def test_validate_reports_ok_and_errors(tmp_path: Path) -> None:
    ok = cis("dag", "validate", str(REPO / "examples" / "hello.toml"))
    assert ok.returncode == 0
    assert "ok" in ok.stdout
    bad = write(tmp_path, '[[tasks]]\nid = "a"\ncomand = "true"\n')
    proc = cis("dag", "validate", str(bad))
    assert proc.returncode == 2
    assert "comand" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["dag", "execute"],
        ["dag", "execute", "--local", "--bogus", "x.toml"],
        ["dag", "execute", "--max-workers", "0", "--local", "x.toml"],
        ["dag", "execute", "--local", "--matrix", "x.toml"],
        ["dag", "execute", "--local", "--workers", "a,b", "x.toml"],
        ["dag", "execute", "--matrix", "--room", "!r:hs", "--workers", "a", "x.toml"],
        ["dag", "execute", "--federation", "--room", "!r:hs", "--workers", ",", "x.toml"],
        ["dag"],
        ["frobnicate"],
    ],
)
def test_wrong_usage_exits_2_with_a_usage_line(args: list[str]) -> None:
    proc = cis(*args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_a_mode_and_a_homeserver_the_default_runs_locally(tmp_path: Path) -> None:
    proc = cis(
        "dag", "execute", str(REPO / "examples" / "hello.toml"), "--json",
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "completed"
    hybrid = cis("dag", "execute", "--hybrid", str(REPO / "examples" / "hello.toml"))
    assert hybrid.returncode == 2  # asked for explicitly, hybrid needs its room
    assert "--room" in hybrid.stderr


def test_matrix_mode_needs_a_room(tmp_path: Path) -> None:
    proc = cis("dag", "execute", "--matrix", str(REPO / "examples" / "hello.toml"))
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
    assert "--room" in proc.stderr


def test_plain_progress_lines_when_not_a_terminal(tmp_path: Path) -> None:
    dag = write(tmp_path, '[[tasks]]\nid = "only"\ncommand = "true"\n')
    proc = cis("dag", "execute", "--local", str(dag), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.endswith("only: started") for line in lines)
    assert any(line.endswith("only: completed") for line in lines)
    assert lines[-1].startswith("run ") and " completed in " in lines[-1]


@pytest.mark.slow
def test_ctrl_c_cancels_kills_sessions_and_records_cancelled(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    dag = write(
        tmp_path,
        f"""
        [[tasks]]
        id = "long"
        command = "echo $$ > {pidfile}; sleep 60 & wait"

        [[tasks]]
        id = "later"
        deps = ["long"]
        command = "true"
        """,
    )
    state = str(tmp_path / "state")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cis_bot",
            "dag",
            "execute",
            "--local",
            str(dag),
            "--json",
            *("--state-dir", state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "CIS_CONFIG": os.devnull},
    )
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline, "the task never started"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    shell_pid = int(pidfile.read_text())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["status"] == "cancelled"
    assert report["tasks"]["long"]["status"] == "cancelled"
    assert report["tasks"]["later"]["status"] == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.kill(shell_pid, 0)

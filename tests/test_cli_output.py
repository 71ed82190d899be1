"""What `cis dag` prints for a person and for a pipe: `list` with its header, newest first;
the end of a failed run pointing at its failed tasks' logs; output into a closed pipe."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from tests.support.control import AGENT, REPO, cis_argv, cis_env

RUN_ID = r"\d{8}-\d{6}-[0-9a-f]{4}"


def cis(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cis_argv(*args), capture_output=True, text=True, env=cis_env(), cwd=cwd, timeout=120
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_a_failed_run_ends_with_the_commands_that_show_its_failed_tasks_logs(
    tmp_path: Path,
) -> None:
    dag = tmp_path / "dag.toml"
    dag.write_text(
        '[[tasks]]\nid = "fine"\ncommand = "echo fine"\n'
        '[[tasks]]\nid = "bad(1)"\n'
        f"command = '''{AGENT} --script \"print the disk is full; exit 3\"'''\n"
        '[[tasks]]\nid = "slow"\ntimeout_secs = 0.2\ncommand = "echo started; exec sleep 30"\n'
        '[[tasks]]\nid = "after"\ndeps = ["bad(1)"]\ncommand = "true"\n'
    )
    state = tmp_path / "state"
    run = cis("dag", "execute", "--local", str(dag), "--state-dir", str(state))
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if re.match(rf"run {RUN_ID} failed in", line))
    run_id = lines[summary].split()[1]
    # One line per failed task, in file order; the skipped task has no log to read.
    where = f"--state-dir {state}"
    assert lines[summary + 1 :] == [
        f"  bad(1) failed (exited with status 3): cis dag logs '{run_id}:bad(1)' {where}",
        f"  slow timeout (timed out after 0.2s): cis dag logs {run_id}:slow {where}",
    ]
    # Each command works as printed, from anywhere.
    for line, said in zip(lines[summary + 1 :], ("the disk is full", "started"), strict=True):
        argv = shlex.split(line.split(": ", 1)[1])
        logs = cis(*argv[1:], cwd=tmp_path)
        assert logs.returncode == 0, logs.stderr
        assert said in logs.stdout


def test_list_has_a_header_and_shows_the_newest_run_first(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    empty = cis("dag", "list", "--state-dir", state)
    assert (empty.returncode, empty.stdout) == (0, "no runs\n")
    dags = {}
    for name, command in (("first", "true"), ("second", "false")):
        dags[name] = tmp_path / f"{name}.toml"
        dags[name].write_text(f'name = "{name}"\n[[tasks]]\nid = "t"\ncommand = "{command}"\n')
    reports = []
    for name in ("first", "second"):
        run = cis("dag", "execute", "--local", str(dags[name]), "--state-dir", state, "--json")
        reports.append(json.loads(run.stdout))
    older, newer = (r["run_id"] for r in reports)

    listing = cis("dag", "list", "--state-dir", state)
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["RUN", "CREATED", "STATUS", "DONE", "MODE", "DAG"]
    assert [row.split()[0] for row in rows] == [newer, older]
    assert re.fullmatch(
        rf"{newer}  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d  failed     0/1   local  second", rows[0]
    ), rows[0]
    assert rows[1].endswith("completed  1/1   local  first")
    # The columns line up under the header.
    assert header.index("STATUS") == rows[0].index("failed") == rows[1].index("completed")

    as_json = json.loads(cis("dag", "list", "--json", "--state-dir", state).stdout)
    assert [(r["run_id"], r["dag"], r["status"]) for r in as_json] == [
        (newer, "second", "failed"),
        (older, "first", "completed"),
    ]


def test_a_closed_pipe_ends_list_quietly(tmp_path: Path) -> None:
    """`cis dag list | head` and the like: whoever reads our output went away before we wrote
    (the read end is closed from the start, so the first write meets it, however short)."""
    state = str(tmp_path / "state")
    dag = tmp_path / "dag.toml"
    dag.write_text('[[tasks]]\nid = "t"\ncommand = "true"\n')
    assert cis("dag", "execute", "--local", str(dag), "--state-dir", state).returncode == 0
    for args in (
        ["dag", "list", "--state-dir", state],
        ["dag", "list", "--json", "--state-dir", state],
        ["dag", "status", "--state-dir", state],
    ):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run(
                cis_argv(*args), stdout=write_end, stderr=subprocess.PIPE, env=cis_env(), timeout=60
            )
        finally:
            os.close(write_end)
        assert result.returncode == 141, (args, result.stderr)
        assert result.stderr == b"", (args, result.stderr)

    # And through a shell's pipe into head, as typed.
    typed = subprocess.run(
        ["/bin/sh", "-c", f"{shlex.join(cis_argv('dag', 'list', '--state-dir', state))} | head -1"],
        capture_output=True,
        text=True,
        env=cis_env(),
        timeout=60,
    )
    assert typed.stdout.split() == ["RUN", "CREATED", "STATUS", "DONE", "MODE", "DAG"]
    assert typed.stderr == ""

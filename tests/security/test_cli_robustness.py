"""Item 9 of the security review: what used to end in a Python traceback (a reader that goes
away, an endless input file, an output path that is a directory or the config itself, a full
disk) ends in one clear line, or quietly, and loses nothing."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.security.support import REPO, cis

pytestmark = pytest.mark.slow


def many_tasks(path: Path, tasks: int) -> Path:
    path.write_text(
        "[dag]\nmax_workers = 8\n"
        + "".join(f'[[dag.tasks]]\nid = "t{i}"\ncommand = "true"\n' for i in range(tasks))
    )
    return path


def first_line_then_hang_up(*args: str) -> tuple[int, str, str]:
    """Run ``cis ARGS``, read one line of its output and close the pipe, as ``| head -1`` does;
    (exit status, that line, its stderr). The pipe holds one page, so any output longer than
    that meets the closed end, however fast it is written."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    process = subprocess.Popen(
        [sys.executable, "-m", "cis_bot", *args],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env={**os.environ, "CIS_CONFIG": os.devnull},
        cwd=REPO,
    )
    os.close(write_end)
    assert process.stderr is not None
    with os.fdopen(read_end, "rb") as output:
        line = output.readline().decode()
    stderr = process.stderr.read().decode()
    return process.wait(timeout=120), line, stderr


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    # Every output below is longer than the pipe holds: printing must meet the closed end.
    dag = str(many_tasks(tmp_path / "dag.toml", 150))
    for args in (
        ["dag", "execute", "--local", dag, "--json", "--state-dir", state],
        ["dag", "status", "--state-dir", state],
        ["dag", "status", "--json", "--state-dir", state],
        ["dag", "execute", "--local", dag, "--state-dir", state],  # progress lines
    ):
        status, line, stderr = first_line_then_hang_up(*args)
        assert line.strip(), args
        assert status == 141, (args, stderr)  # as if SIGPIPE ended it, like other Unix tools
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr, (args, stderr)
    # The run whose progress lines met a closed pipe went on to its end all the same.
    listing = cis("dag", "list", "--json", "--state-dir", state)
    assert [r["status"] for r in json.loads(listing.stdout)] == ["completed", "completed"]


def test_an_endless_input_file_is_refused(tmp_path: Path) -> None:
    for args in (
        ["dag", "validate", "/dev/zero"],
        ["dag", "validate", "x", "--config", "/dev/zero"],
    ):
        result = cis(*args, cwd=tmp_path, timeout=30)
        assert result.returncode == 2, result
        assert "/dev/zero: larger than 16 MiB" in result.stderr and "Traceback" not in result.stderr


def test_registration_generate_never_writes_over_a_directory_or_the_config(tmp_path: Path) -> None:
    config = tmp_path / "n.toml"
    original = '[node]\nid = "n1"\nhomeserver = "http://127.0.0.1:8008"\n'
    config.write_text(original)
    (tmp_path / "link.toml").symlink_to(config)
    for output, said in (
        (str(tmp_path), "is a directory"),
        (str(config), "is the config itself"),
        (str(tmp_path / "link.toml"), "is the config itself"),
        (str(tmp_path / "missing" / "r.yaml"), "no directory"),
    ):
        result = cis("registration", "generate", "--config", str(config), "-o", output)
        assert result.returncode == 2, result
        assert said in result.stderr and "Traceback" not in result.stderr
        assert config.read_text() == original  # untouched, tokens and all
    good = cis("registration", "generate", "--config", str(config), "-o", str(tmp_path / "r.yaml"))
    assert good.returncode == 0, good.stderr
    assert (
        "as_token" in config.read_text() and (tmp_path / "r.yaml").stat().st_mode & 0o777 == 0o600
    )
    assert config.stat().st_mode & 0o777 == 0o600


def require_private_mounts() -> None:
    """A tmpfs in a namespace of our own (``unshare`` from util-linux, user namespaces allowed):
    skipped on a developer's machine without them, a failure under CI."""
    problem = "unshare (util-linux) is not installed"
    if shutil.which("unshare") is not None:
        probe = subprocess.run(
            ["unshare", "--map-root-user", "--mount", "true"], capture_output=True, text=True
        )
        if probe.returncode == 0:
            return
        problem = f"user namespaces are not allowed here: {probe.stderr.strip()}"
    if os.environ.get("CI"):
        pytest.fail(f"{problem} (CI is set: the suites that need it must run)")
    pytest.skip(problem)


def test_a_full_disk_ends_the_run_with_its_report_and_one_clear_error(tmp_path: Path) -> None:
    """The state directory on a small tmpfs (in a user and mount namespace of its own, so no
    privilege is needed): a task's output fills it up."""
    mount = tmp_path / "small"
    mount.mkdir()
    config = tmp_path / "config.toml"
    config.write_text("[dag.matrix]\nflush_timeout_secs = 2\n")
    dag = tmp_path / "dag.toml"
    dag.write_text(
        '[[tasks]]\nid = "fill"\ncommand = "head -c 3000000 /dev/zero | tr \'\\\\0\' x; echo"\n'
        '[[tasks]]\nid = "after"\ndeps = ["fill"]\ncommand = "echo after"\n'
    )
    require_private_mounts()
    result = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c",
         'mount -t tmpfs -o size=1500k tmpfs "$0" && exec "$@"', str(mount),
         sys.executable, "-m", "cis_bot", "dag", "execute", "--local", str(dag), "--json",
         "--state-dir", str(mount / "state")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "CIS_CONFIG": str(config)},
    )  # fmt: skip
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)  # the report is not lost: it is on stdout
    assert report["status"] == "completed"
    assert {t["status"] for t in report["tasks"].values()} == {"completed"}
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cis: error: run {report['run_id']} completed, but its report")
    assert "No space left on device" in last

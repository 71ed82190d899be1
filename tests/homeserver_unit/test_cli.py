"""``cis homeserver`` as a user runs it: ready line, add-user while it runs, clean SIGTERM,
and one-line errors (exit 2, no traceback) for bad registrations, names and ports."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CIS = [sys.executable, "-m", "cis_bot", "homeserver"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CIS, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cis: error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [*CIS, "--state-dir", str(tmp_path / "state"), "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the server prints its ready line
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield process, line.split()[-1]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def test_serves_adds_users_and_stops_cleanly(
    tmp_path: Path, running: tuple[subprocess.Popen[str], str]
) -> None:
    process, base = running
    with urllib.request.urlopen(f"{base}/_matrix/client/versions", timeout=10) as response:
        assert response.status == 200

    added = run("add-user", "--state-dir", str(tmp_path / "state"), "erin", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    user_id, password = added.stdout.split()
    assert user_id == "@erin:cis.local"
    body = json.dumps(
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "erin"},
            "password": password,
        }
    ).encode()
    login = urllib.request.Request(f"{base}/_matrix/client/v3/login", data=body, method="POST")
    with urllib.request.urlopen(login, timeout=30) as response:
        assert json.loads(response.read())["user_id"] == user_id

    again = run(
        "add-user", "--state-dir", str(tmp_path / "state"), "erin", "--password", "x", cwd=tmp_path
    )
    assert_one_line_error(again, "already exists")
    bad = run("add-user", "--state-dir", str(tmp_path / "state"), "Erin Smith", cwd=tmp_path)
    assert_one_line_error(bad, "invalid user name")

    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert process.stderr is not None
    assert "Traceback" not in process.stderr.read()


def test_bad_registration_files(tmp_path: Path) -> None:
    missing_key = tmp_path / "missing.yaml"
    missing_key.write_text("id: x\nurl: http://127.0.0.1:1\nhs_token: h\nsender_localpart: b\n")
    result = run("--state-dir", "s", "--appservice", str(missing_key), cwd=tmp_path)
    assert_one_line_error(result, "'as_token'")

    garbage = tmp_path / "garbage.yaml"
    garbage.write_text(": : :\n")
    assert_one_line_error(
        run("--state-dir", "s", "--appservice", str(garbage), cwd=tmp_path), "not valid YAML"
    )
    bad_regex = tmp_path / "regex.yaml"
    bad_regex.write_text(
        "id: x\nurl: null\nas_token: a\nhs_token: h\nsender_localpart: b\n"
        "namespaces:\n  users:\n    - regex: '@x(['\n      exclusive: true\n"
    )
    assert_one_line_error(
        run("--state-dir", "s", "--appservice", str(bad_regex), cwd=tmp_path), "invalid regex"
    )
    assert_one_line_error(
        run("--state-dir", "s", "--appservice", "nowhere.yaml", cwd=tmp_path), "cannot read"
    )


def test_port_in_use_and_bad_flags(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--state-dir", "s", "--port", str(port), cwd=tmp_path)
    assert_one_line_error(result, "address already in use")
    flags = run("--port", "70000", cwd=tmp_path)
    assert flags.returncode == 2 and "port out of range" in flags.stderr


def test_starts_fast(tmp_path: Path) -> None:
    """Time to the first 200 on /versions; the goal is 0.5 s, the deadline here is generous
    because other tests share the two cores."""
    started = time.monotonic()
    process = subprocess.Popen(
        [*CIS, "--state-dir", str(tmp_path / "s"), "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        base = process.stdout.readline().split()[-1]
        with urllib.request.urlopen(f"{base}/_matrix/client/versions", timeout=10) as response:
            assert response.status == 200
        assert time.monotonic() - started < 3.0
    finally:
        process.kill()
        process.wait(30)

"""Item 5 of the security review: the state directory (tokens, password hashes, transcripts,
task outputs) is for its owner only, whatever the umask; and item 9's state directory mistakes
end in one clear line, never a traceback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.support import REPO
from tests.support.embedded import EmbeddedServer
from tests.support.fixtures import start_or_fail

pytestmark = pytest.mark.slow


def cis_with_umask(
    *args: str, umask: int = 0o022, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    def set_umask() -> None:
        os.umask(umask)

    return subprocess.run(
        [sys.executable, "-m", "cis_bot", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=120,
        env={**os.environ, "CIS_CONFIG": os.devnull},
        preexec_fn=set_umask,
    )


def loose(root: Path) -> list[str]:
    """Everything under ``root`` (and ``root``) that is not 0700 (directories) / 0600 (files)."""
    found = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        wanted = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != wanted:
            found.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(root.parent)}")
    return found


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask for this test's own processes too (the standalone homeserver)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_everything_in_the_state_directory_is_for_its_owner_only(
    tmp_path: Path, umask_022: None
) -> None:
    state = tmp_path / "state"
    server = EmbeddedServer(workdir=tmp_path / "hs")
    server.state_dir = state  # cis homeserver on the run's state directory
    start_or_fail(server)
    try:
        server.create_user_sync("alice")
        work = tmp_path / "work"
        work.mkdir()
        dag = work / "dag.toml"
        dag.write_text(
            '[[tasks]]\nid = "make"\ncommand = "echo made; touch by-the-task"\n'
            '[[tasks]]\nid = "use"\ndeps = ["make"]\ncommand = "cat $CIS_UPSTREAM_DIR/make.txt"\n'
        )
        run = cis_with_umask(
            "dag", "execute", "--local", str(dag), "--state-dir", str(state), "--json", cwd=work
        )
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        run_dir = state / "runs" / report["run_id"]
        # What the run and the homeserver keep is all there...
        for kept in (
            run_dir / "report.json",
            run_dir / "sessions" / "make.1.log",
            run_dir / "upstream" / "use" / "make.txt",
            state / "homeserver" / "homeserver.db",
            state / "homeserver" / "homeserver.db-wal",
            state / "homeserver" / "appservices" / "local-node.yaml",
            state / "homeserver" / "endpoint.json",
        ):
            assert kept.exists(), kept
        assert [p for p in (state / "homeserver" / "media").rglob("*") if p.is_file()]
        # ... and none of it is readable by anyone else.
        assert loose(state) == []
    finally:
        server.stop()
    # The task's own files follow the umask it inherited: the user's, untouched.
    assert stat.S_IMODE((work / "by-the-task").stat().st_mode) == 0o644


def test_an_older_state_directory_is_made_private_when_opened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = cis_with_umask(
        "dag", "execute", "--local", str(REPO / "examples" / "hello.toml"), "--state-dir",
        str(state),
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    # As an older cis left it: readable by all, and no mark that it was seen to.
    for path in [state, *state.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (state / ".private").unlink()
    listing = cis_with_umask("dag", "list", "--state-dir", str(state))
    assert listing.returncode == 0, listing.stderr
    assert loose(state) == []


@pytest.mark.parametrize(
    "where",
    ["a-file", "a-file/below", "/proc/nonexistent/state", "/proc/self/state"],
)
@pytest.mark.parametrize(
    "command",
    [
        ["dag", "execute", "--local", str(REPO / "examples" / "hello.toml")],
        ["dag", "status"],
        ["dag", "list"],
        ["dag", "resume", "x"],
        ["dag", "sessions"],
        ["homeserver", "add-user", "bob"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_an_unusable_state_directory_is_one_clear_line(
    tmp_path: Path, where: str, command: list[str]
) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    state = where if where.startswith("/") else str(tmp_path / where)
    result = cis_with_umask(*command, "--state-dir", state, cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.startswith("cis: error: cannot use ") and state in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1

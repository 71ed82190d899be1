"""DAGs of the shape of CIS's three examples (tests/fixtures/cis/, written for the tests) run end
to end with `cis dag execute --local --dry-run`: agent tasks against the fake model, shell tasks
for real (those that need what this machine lacks standing in for themselves under
CIS_DRY_RUN), approvals given with `cis dag approve` as the run asks for them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cis_bot.control.client.process import ControlError, ProcessClient
from cis_bot.control.registry import discover
from cis_bot.dag.load import load_dag
from cis_bot.dag.spec import DagSpec, LevelKind
from cis_bot.session.profiles import BUILTIN_PROFILES, session_uuid
from cis_bot.testing.claude_home import ClaudeHome
from tests.support.claude import require_claude

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "cis"
DEADLINE = 240.0


@pytest.fixture(scope="module")
def claude() -> str:
    return require_claude()


def env() -> dict[str, str]:
    # No model anywhere: a request that left the machine would fail the run.
    base = ClaudeHome(home=Path("/nonexistent"), base_url="", env={}).environ()
    return {
        **base,
        "CIS_CONFIG": os.devnull,
        "PYTHONPATH": str(REPO),
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
    }


def cis(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "cis_bot", *args],
        capture_output=True, text=True, cwd=cwd, env=env(), timeout=60,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


async def waiting(state: Path, pid: int) -> list[tuple[str, str]]:
    """(run, task) of the tasks awaiting approval in the run process ``pid``."""
    for entry in discover(state, clean=False).live:
        if entry.pid == pid:
            try:
                async with ProcessClient(entry, timeout=10) as client:
                    data = await client.request("GET", "/v1/runs")
            except ControlError:
                return []
            return [
                (run["run_id"], task)
                for run in data["runs"]
                for task, status in run["tasks"].items()
                if status == "awaiting_approval"
            ]
    return []


async def dry_run(name: str, tmp_path: Path, *, leave: frozenset[str] = frozenset()) -> Any:
    """Run the fixture DAG ``name`` in a copy of its folder; approve each task that waits (as
    each of its stakeholders), but those in ``leave``; return (report, stderr, folder)."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    spec: DagSpec = load_dag(
        folder / "dag.toml", agents=frozenset(BUILTIN_PROFILES), default_agent="claude"
    )
    state = tmp_path / "state"
    out, err = folder / "run.out", folder / "run.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "cis_bot", "dag", "execute", "--local", "--dry-run",
             "dag.toml", "--state-dir", str(state), "--json"],
            stdout=stdout, stderr=stderr, cwd=folder, env=env(), start_new_session=True,
        )  # fmt: skip
    approved: set[str] = set()
    try:
        async with asyncio.timeout(DEADLINE):
            while process.poll() is None:
                for run_id, task in await waiting(state, process.pid):
                    if task in approved or task in leave:
                        continue
                    level = spec.task(task).level
                    people = level.stakeholders if level.kind is LevelKind.ARBITRATED else ()
                    for who in people or (None,):
                        extra = ("--as", who) if who else ()
                        answer = cis("dag", "approve", run_id, task, "--state-dir", str(state),
                                     *extra, cwd=folder)  # fmt: skip
                        assert answer.returncode == 0, answer.stderr
                    approved.add(task)
                await asyncio.sleep(0.1)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stderr_text = err.read_text()
    assert "Traceback" not in stderr_text, stderr_text
    try:
        report = json.loads(out.read_text())
    except ValueError:
        raise AssertionError(f"no report; stderr:\n{stderr_text[-3000:]}") from None
    return report, stderr_text, folder, approved


def output(report: dict[str, Any], task: str) -> str:
    return Path(report["tasks"][task]["transcript"]).read_text(errors="replace")


@pytest.mark.slow
async def test_the_cross_compile_pipeline_builds_fixes_and_releases(
    claude: str, tmp_path: Path
) -> None:
    report, stderr, _, approved = await dry_run("cross_compile", tmp_path)
    assert report["status"] == "completed", (report, stderr)
    statuses = {t: v["status"] for t, v in report["tasks"].items()}
    assert statuses.pop("metal-compile") == "failed"
    assert statuses.pop("cuda-fix-and-retry") == "skipped"
    assert set(statuses.values()) == {"completed"}
    assert approved == {
        "cuda-compile", "metal-compile", "metal-fix-and-retry", "merge-results", "publish-release"
    }  # fmt: skip
    # The Metal build failed here (no Xcode); its fix-up, an agent, got the error log in its
    # rendered prompt, and the pipeline went on.
    tasks = report["tasks"]
    assert tasks["metal-compile"]["handled_by"] == "metal-fix-and-retry"
    assert tasks["cuda-fix-and-retry"]["reason"] == "cuda-compile completed: nothing to fix"
    fix = output(report, "metal-fix-and-retry")
    assert "dry run: You fix builds." in fix
    run = report["run_id"]
    assert f"Project: ml-accelerator (cross-platform-build, run {run}, attempt 1)" in fix
    assert "error: no Xcode at /Applications/Xcode.app/Contents/Developer" in fix
    assert "Task: Build the Metal modules (metal-compile), fixed by Fix the Metal build" in fix
    assert "{{FIX_SUMMARY}}" in fix
    # Commands that need what this machine lacks stood in for themselves.
    fetched = output(report, "fetch-code")
    assert "dry run: git fetch origin main" in fetched and "fetched" in fetched
    assert "CUDA_HOME=/usr/local/cuda" in output(report, "cuda-setup")
    assert "dry run: Carry out these steps in order:" in output(report, "cuda-compile")
    assert "dry run: git push origin main --tags" in output(report, "publish-release")


@pytest.mark.slow
async def test_the_agent_review_keeps_one_conversation(claude: str, tmp_path: Path) -> None:
    report, stderr, _, approved = await dry_run("agents", tmp_path)
    assert report["status"] == "completed", (report, stderr)
    assert {t["status"] for t in report["tasks"].values()} == {"completed"}
    assert approved == {"3", "6"}
    assert "ran kimi as Claude Code print mode" in stderr
    # Tasks 1, 2, 3 and 5 are one conversation, kept with Claude Code's --session-id and
    # continued with --resume: its record holds each of their prompts, in order.
    run = report["run_id"]
    (home,) = (tmp_path / "state" / "dry-run").glob("*/home")
    (record,) = home.glob(f".claude/projects/*/{session_uuid(f'{run}:1:1')}.jsonl")
    said = []
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") == "user" and isinstance(entry["message"]["content"], str):
            said.append(entry["message"]["content"])
    assert [s.split("\n")[0] for s in said] == [
        "You review code. Say READY when you have read this.",
        "Here is the change to review: +1 -1 lines in parser-speedup.",
        "Analyse the quality of the change you just read.",
        "Write the review, from everything above.",
    ]
    assert "remember that the change is called parser-speedup" in said[0]
    # The security scan's agent (kimi, run as Claude Code here) is a conversation of its own:
    # the review sees only its output, among the upstream outputs.
    assert not any(s.startswith("You look for security issues.") for s in said)
    assert "### 4\ndry run: You look for security issues." in said[-1]


@pytest.mark.slow
async def test_the_simulation_runs_every_level(claude: str, tmp_path: Path) -> None:
    # "merge" is recommended with a one-second countdown: left alone, it executes by itself.
    report, stderr, folder, approved = await dry_run(
        "simulation", tmp_path, leave=frozenset({"merge"})
    )
    assert report["status"] == "completed", (report, stderr)
    assert {t["status"] for t in report["tasks"].values()} == {"completed"}
    assert approved == {"compile-cuda", "compile-metal", "publish"}
    assert output(report, "merge").split() == ["cuda", "metal"]
    assert (folder / "sim-project" / "build" / "cuda.o").exists()
    assert "publishing to sim-project/dist" in output(report, "publish")


def test_the_cis_shaped_dags_validate_with_their_notes() -> None:
    for name in ("cross_compile", "agents", "simulation"):
        proc = cis("dag", "validate", str(FIXTURES / name / "dag.toml"), "--json", cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["valid"] is True
    notes = json.loads(
        cis("dag", "validate", str(FIXTURES / "agents" / "dag.toml"), "--json", cwd=REPO).stdout
    )["notes"]
    assert any("agent_config.temperature is not honoured" in n for n in notes)

"""DAGs of Claude Code tasks through `cis dag execute --local` (a subprocess), the real CLI from
npm talking to the fake Anthropic API: upstream outputs reach the next task's prompt as the model
sees it; `--dry-run` runs a whole pipeline against the built-in fake model."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from cis_bot.session.profiles import BUILTIN_PROFILES
from cis_bot.testing.claude_home import ClaudeHome, prepare_claude_home
from cis_bot.testing.fake_anthropic import FakeAnthropic, TextReply, ToolUseReply
from tests.support.claude import require_claude

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 120.0


@pytest.fixture(scope="module")
def claude() -> str:
    return require_claude()


async def cis(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cis_bot",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def write_config(path: Path, claude: str, home: ClaudeHome) -> Path:
    argv = [claude, *BUILTIN_PROFILES["claude"].argv[1:]]
    path.write_text(tomli_w.dumps({"agents": {"claude": {"argv": argv, "env": dict(home.env)}}}))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without variables that would send Claude Code elsewhere."""
    env = ClaudeHome(home=Path("/nonexistent"), base_url="", env={}).environ()
    env.update(extra)
    env["PYTHONPATH"] = str(REPO)
    return env


def report_of(code: int, stdout: str, stderr: str) -> dict[str, Any]:
    assert "Traceback" not in stderr, stderr
    try:
        report: dict[str, Any] = json.loads(stdout)
    except ValueError:
        raise AssertionError(f"exit {code}, no JSON report; stderr:\n{stderr}") from None
    return report


@pytest.mark.slow
async def test_the_second_task_gets_the_first_tasks_output_in_its_prompt(
    claude: str, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    dag = tmp_path / "dag.toml"
    dag.write_text(
        """
        name = "two-claudes"

        [[tasks]]
        id = "research"
        agent = "claude"
        prompt = "Find where the answer is kept."

        [[tasks]]
        id = "report"
        agent = "claude"
        deps = ["research"]
        prompt = "Write a one-line report."
        """
    )
    finding = "The answer is 42; it is kept in notes/answer.md."
    async with FakeAnthropic([TextReply(finding), TextReply("Report: 42.")]) as fake:
        home = prepare_claude_home(tmp_path / "home", base_url=fake.url, work_dirs=[work])
        config = write_config(tmp_path / "config.toml", claude, home)
        code, stdout, stderr = await cis(
            "dag",
            "execute",
            "--local",
            str(dag),
            "--state-dir",
            str(tmp_path / "state"),
            "--json",
            env=clean_env(CIS_CONFIG=str(config)),
            cwd=work,
        )
    report = report_of(code, stdout, stderr)
    assert code == 0, report
    assert {t: v["status"] for t, v in report["tasks"].items()} == {
        "research": "completed",
        "report": "completed",
    }
    first, second = fake.message_requests
    assert first.prompt == "Find where the answer is kept."
    # The model, asked for the report, saw the research task's result.
    assert second.prompt.startswith("Write a one-line report.")
    assert "### research" in second.prompt
    assert finding in second.prompt
    upstream = tmp_path / "state" / "runs" / report["run_id"] / "upstream" / "report"
    assert (upstream / "research.txt").read_text() == finding


@pytest.mark.slow
async def test_dry_run_runs_a_pipeline_against_the_fake_model(claude: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    dag = tmp_path / "dag.toml"
    dag.write_text(
        """
        name = "dry"

        [[tasks]]
        id = "plan"
        agent = "claude"
        prompt = "Plan the work"

        [[tasks]]
        id = "count"
        command = "echo 3 files"

        [[tasks]]
        id = "review"
        agent = "claude-interactive"
        deps = ["plan", "count"]
        prompt = "Review the plan"
        work_dir = "sub"

        [[tasks]]
        id = "fix"
        agent = "aider"
        deps = ["review"]
        prompt = "Fix it"
        """
    )
    state = tmp_path / "state"
    # No model anywhere: a request that left the machine, or went to an API key, would fail.
    env = clean_env(CIS_CONFIG=os.devnull, ANTHROPIC_BASE_URL="http://127.0.0.1:9")
    code, stdout, stderr = await cis(
        "dag",
        "execute",
        "--local",
        "--dry-run",
        str(dag),
        "--state-dir",
        str(state),
        "--json",
        env=env,
        cwd=work,
    )
    report = report_of(code, stdout, stderr)
    assert code == 0, (report, stderr)
    assert {t["status"] for t in report["tasks"].values()} == {"completed"}
    upstream = state / "runs" / report["run_id"] / "upstream"
    assert (upstream / "review" / "plan.txt").read_text() == "dry run: Plan the work"
    assert (upstream / "review" / "count.txt").read_text() == "3 files"
    review = (upstream / "fix" / "review.txt").read_text()
    # The interactive task's echo shows the prompt it was given, upstream outputs included.
    assert review.startswith("dry run: Review the plan")
    assert "### plan\ndry run: Plan the work" in review
    assert "### count\n3 files" in review
    assert "3 model requests answered by the fake" in stderr
    assert "ran aider as Claude Code print mode" in stderr
    # Claude Code ran three times in a HOME under the state dir (it keeps a record of each
    # conversation per project dir), the interactive task in its own work dir.
    (home,) = (state / "dry-run").glob("*/home")
    records = [p.parent.name for p in (home / ".claude" / "projects").glob("*/*.jsonl")]
    assert len(records) == 3
    assert sum(name.endswith("-work-sub") for name in records) == 1


def test_dry_run_refuses_matrix_mode(tmp_path: Path) -> None:
    dag = tmp_path / "dag.toml"
    dag.write_text('[[tasks]]\nid = "a"\ncommand = "true"\n')
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "cis_bot", "dag", "execute", "--matrix", "--room", "!r:x"]
        + ["--dry-run", str(dag), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=clean_env(CIS_CONFIG=os.devnull),
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--dry-run runs the tasks on this machine" in proc.stderr


@pytest.mark.slow
async def test_interactive_task_blocks_on_permission_and_cis_dag_input_approves(
    claude: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claude-interactive task in `cis dag execute --local`: blocked on the permission prompt
    with a reason quoting it; `cis dag input` (another process) approves; the tool runs; the
    task completes, and its output (the final reply) reaches the next task."""
    from tests.support import control

    final = "Created made.txt for you."
    script = [
        ToolUseReply(
            "Bash",
            {"command": "echo approved > made.txt", "description": "Create made.txt"},
            text="I will create the file.",
        ),
        TextReply(final),
    ]
    dag = """
        [[tasks]]
        id = "make"
        agent = "claude-interactive"
        prompt = "Please create made.txt"

        [[tasks]]
        id = "check"
        deps = ["make"]
        command = 'cat "$CIS_UPSTREAM_DIR/make.txt"'
        """
    async with FakeAnthropic(script) as fake:
        home = prepare_claude_home(tmp_path / "home", base_url=fake.url, work_dirs=[tmp_path])
        interactive = BUILTIN_PROFILES["claude-interactive"]
        config = tmp_path / "config.toml"
        config.write_text(
            tomli_w.dumps(
                {
                    "agents": {
                        "claude-interactive": {
                            "argv": [claude, *interactive.argv[1:]],
                            "env": dict(home.env),
                        }
                    }
                }
            )
        )
        env = clean_env(CIS_CONFIG=str(config), PYTHONUNBUFFERED="1")
        monkeypatch.setattr(control, "cis_env", lambda: env)
        run = control.LocalRun(tmp_path, dag)
        try:
            await run.wait_for_run_id(timeout=DEADLINE)
            session = await run.session("make", "blocked", timeout=DEADLINE)
            assert session["blocked_reason"] == (
                'prompt: "echo approved > made.txt | Do you want to proceed?"'
            )
            assert not (tmp_path / "made.txt").exists()
            state = str(run.state)
            typed = await control.cis(
                "dag", "input", "make", "1", "--no-newline", "--state-dir", state
            )
            assert typed.returncode == 0, typed.stderr
            code, report = await run.report(timeout=DEADLINE)
        finally:
            run.stop()
    assert code == 0, (report, run.stderr)
    assert {t: v["status"] for t, v in report["tasks"].items()} == {
        "make": "completed",
        "check": "completed",
    }
    assert (tmp_path / "made.txt").read_text() == "approved\n"
    (result,) = fake.message_requests[1].tool_results
    assert result["is_error"] is False
    upstream = run.state / "runs" / report["run_id"] / "upstream" / "check" / "make.txt"
    assert upstream.read_text() == final

"""Kept agents (keep_agent / reuse_agent) with the real Claude Code CLI, through `cis dag execute
--local` as a subprocess, against the fake Anthropic API on loopback: a later task continues an
earlier task's conversation (the model's request carries the earlier turns), in print mode by
`--resume` and in the TUI by typing into the kept process; agent_config reaches the CLI; a kept
agent that died fails the task that needs it, and its retry starts a fresh one, saying so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from cis_bot.app.connect import open_connection
from cis_bot.config import Config, ExecutionMode
from cis_bot.session.profiles import BUILTIN_PROFILES, session_uuid
from cis_bot.testing.claude_home import ClaudeHome, prepare_claude_home
from cis_bot.testing.fake_anthropic import FakeAnthropic, RecordedRequest, TextReply
from tests.support.claude import require_claude

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 120.0


@pytest.fixture(scope="module")
def claude() -> str:
    return require_claude()


def config_for(path: Path, claude: str, home: ClaudeHome) -> Path:
    agents = {
        name: {"argv": [claude, *BUILTIN_PROFILES[name].argv[1:]], "env": dict(home.env)}
        for name in ("claude", "claude-interactive")
    }
    path.write_text(tomli_w.dumps({"agents": agents}))
    return path


async def execute(dag: Path, work: Path, config: Path, state: Path) -> dict[str, Any]:
    env = ClaudeHome(home=Path("/nonexistent"), base_url="", env={}).environ()
    env.update(CIS_CONFIG=str(config), PYTHONPATH=str(REPO))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cis_bot", "dag", "execute", "--local", str(dag),
        "--state-dir", str(state), "--json",
        cwd=work, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(DEADLINE):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in stderr.decode(), stderr.decode()
    try:
        report: dict[str, Any] = json.loads(stdout)
    except ValueError:
        raise AssertionError(f"no report; stderr:\n{stderr.decode()}") from None
    report["_stderr"] = stderr.decode()
    return report


def turns(request: RecordedRequest) -> list[tuple[str, str]]:
    """(role, text) of the conversation the model was sent, without Claude Code's reminders."""
    found = []
    for message in request.messages:
        content = message["content"]
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for block in blocks:
            text = block.get("text", "")
            if block.get("type") == "text" and not text.startswith("<system-reminder>"):
                found.append((message["role"], text))
    return [t for t in found if t[0] != "system"]


async def room_events(state: Path, room_id: str, event_type: str) -> list[dict[str, Any]]:
    connection = await open_connection(Config(), ExecutionMode.LOCAL, state)
    try:
        return [
            e["content"] async for e in connection.node.history(room_id) if e["type"] == event_type
        ]
    finally:
        await connection.close()


def still_running(conversation: str) -> list[str]:
    """Processes whose command line names the conversation's UUID."""
    found = subprocess.run(["pgrep", "-f", conversation], capture_output=True, text=True)
    return found.stdout.split()


REVIEW = """
[[tasks]]
id = "analyse"
agent = "{agent}"
prompt = "Analyse module X and remember the word PAPAYA."
keep_agent = true
[tasks.agent_config]
provider_type = "claude"
model = "claude-review-model"
max_tokens = 2048

[[tasks]]
id = "list"
command = "echo 3 findings"
deps = ["analyse"]

[[tasks]]
id = "refactor"
prompt = "Refactor what you found."
deps = ["list"]
reuse_agent = "analyse"

[[tasks]]
id = "report"
prompt = "Which word did I ask you to remember?"
deps = ["refactor"]
reuse_agent = "analyse"
"""


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["claude", "claude-interactive"])
async def test_a_later_task_continues_the_conversation(
    claude: str, agent: str, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    dag = tmp_path / "dag.toml"
    dag.write_text(REVIEW.format(agent=agent))
    replies = [
        TextReply("Module X has 3 problems.", chunk_delay_secs=0.01),
        TextReply("Refactored all three.", chunk_delay_secs=0.01),
        TextReply("You asked me to remember PAPAYA.", chunk_delay_secs=0.01),
    ]
    async with FakeAnthropic(replies) as fake:
        home = prepare_claude_home(tmp_path / "home", base_url=fake.url, work_dirs=[work])
        config = config_for(tmp_path / "config.toml", claude, home)
        report = await execute(dag, work, config, tmp_path / "state")
    assert report["status"] == "completed", report
    assert {t: v["status"] for t, v in report["tasks"].items()} == dict.fromkeys(
        ("analyse", "list", "refactor", "report"), "completed"
    )
    first, second, third = fake.message_requests
    # Each request carries the conversation so far: the model sees the earlier turns.
    assert turns(first) == [("user", "Analyse module X and remember the word PAPAYA.")]
    said = turns(third)
    assert said[:3] == [
        ("user", "Analyse module X and remember the word PAPAYA."),
        ("assistant", "Module X has 3 problems."),
        ("user", said[2][1]),
    ]
    assert said[2][1].startswith("Refactor what you found.")
    assert "### list\n3 findings" in said[2][1]
    assert said[3] == ("assistant", "Refactored all three.")
    assert said[4][1].startswith("Which word did I ask you to remember?")
    assert turns(second)[:2] == said[:2]
    # agent_config reached the CLI: the model, and max_tokens as its output cap.
    for request in (first, second, third):
        assert request.body["model"] == "claude-review-model"
        assert request.body["max_tokens"] == 2048
    output = Path(report["tasks"]["report"]["transcript"]).read_text(errors="replace")
    assert "PAPAYA" in output
    # The agent ended with the last task that used it.
    conversation = session_uuid(f"{report['run_id']}:analyse:1")
    assert still_running(conversation) == []
    if agent == "claude-interactive":
        # One process all along: the later tasks' sessions took over the kept one.
        states = await room_events(tmp_path / "state", report["room_id"], "cis.dag.session.state")
        reasons = [s.get("reason") for s in states if s["new_state"] == "running"]
        assert f"continues the agent of {report['run_id']}:analyse:1" in reasons
        assert f"continues the agent of {report['run_id']}:refactor:1" in reasons


KILLED = """
[[tasks]]
id = "analyse"
agent = "claude-interactive"
prompt = "Remember the word PAPAYA."
keep_agent = true

[[tasks]]
id = "crash"
command = "pkill -f {uuid}; while pgrep -f {uuid} > /dev/null; do sleep 0.05; done; echo killed"
deps = ["analyse"]

[[tasks]]
id = "report"
prompt = "Which word?"
deps = ["crash"]
reuse_agent = "analyse"
retry = 1
"""


@pytest.mark.slow
async def test_a_kept_agent_that_died_fails_its_task_and_the_retry_starts_afresh(
    claude: str, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    dag = tmp_path / "dag.toml"
    # The middle task kills the kept TUI, and waits for it to be gone: its command line holds
    # the conversation's UUID, made from the session id (known once the run has started).
    finder = (
        f'$({sys.executable} -c "import os; from cis_bot.session.profiles import session_uuid; '
        "print(session_uuid(os.environ['CIS_RUN_ID'] + ':analyse:1'))\")"
    )
    dag.write_text(KILLED.replace("{uuid}", finder.replace('"', '\\"')))
    replies = [TextReply("Noted: PAPAYA."), TextReply("I do not know which word.")]
    async with FakeAnthropic(replies) as fake:
        home = prepare_claude_home(tmp_path / "home", base_url=fake.url, work_dirs=[work])
        config = config_for(tmp_path / "config.toml", claude, home)
        report = await execute(dag, work, config, tmp_path / "state")
    assert report["status"] == "completed", report
    assert report["tasks"]["report"]["attempts"] == 2
    _, second = fake.message_requests
    # The retry's agent is a fresh one: the earlier turn is gone from what the model sees.
    assert [role for role, _ in turns(second)] == ["user"]
    assert turns(second)[0][1].startswith("Which word?")
    state, room, run = tmp_path / "state", report["room_id"], report["run_id"]
    completed = await room_events(state, room, "cis.dag.session.completed")
    (refused,) = [c for c in completed if c["session_id"] == f"{run}:report:1"]
    assert refused["status"] == "failed"
    # Gone before the task came (the usual case), or dying as it took the agent over.
    assert refused["error"].startswith(
        (
            "the agent of task analyse is gone (its process exited while it waited",
            f"the kept agent of {run}:analyse:1 exited",
        )
    ), refused["error"]
    states = await room_events(state, room, "cis.dag.session.state")
    fresh = [s.get("reason") or "" for s in states if s["session_id"] == f"{run}:report:2"]
    assert any(
        r.startswith("a fresh agent: the agent of task analyse is gone (")
        and r.endswith("and with it the conversation so far")
        for r in fresh
    ), fresh

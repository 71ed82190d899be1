"""The built-in claude and claude-interactive profiles, driving the real Claude Code CLI (npm,
node_modules/.bin/claude) in AgentSessions against the fake Anthropic API on loopback.

Print mode: the result becomes the task's output; API errors, retries and a cut stream fail the
task with the agent's own account. Interactive mode: the permission prompt blocks the session with
a reason that quotes it, input approves, the tool runs, and when the turn is over the session
types /exit and the task completes with the final reply.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

import attrs
import pytest

from cis_bot.session.events import (
    SessionBlocked,
    SessionCompleted,
    SessionState,
    SessionStateChanged,
)
from cis_bot.session.manager import SessionManager, SessionSpec
from cis_bot.session.output import claude_conversation_record
from cis_bot.session.profiles import BUILTIN_PROFILES
from cis_bot.session.session import SessionSettings
from cis_bot.testing.claude_home import ClaudeHome, prepare_claude_home
from cis_bot.testing.fake_anthropic import (
    CutStream,
    FakeAnthropic,
    TextReply,
    ToolUseReply,
    overloaded,
    server_error,
)
from tests.support.claude import require_claude

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from cis_bot.session.events import SessionEvent
    from cis_bot.session.profile import AgentProfile

#: Generous: other suites run at the same time on two cores.
DEADLINE = 90.0
SETTINGS = SessionSettings(
    settle_secs=0.2, settle_max_secs=1.0, output_interval=0.1, kill_grace_secs=1.0
)


@pytest.fixture(scope="module")
def claude() -> str:
    return require_claude()


@pytest.fixture(autouse=True)
def _no_inherited_claude_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Sessions inherit this process's environment: keep a developer's API key or config dir
    from redirecting the CLI (ClaudeHome.environ strips the same names)."""
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_CONFIG_DIR")) or name in (
            "IS_SANDBOX",
            "CLAUDECODE",
        ):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
async def manager() -> AsyncIterator[SessionManager]:
    mgr = SessionManager(SETTINGS)
    yield mgr
    await mgr.close(grace_secs=0.5)


def profile(name: str, claude: str) -> AgentProfile:
    """The built-in profile, running the CLI this checkout installed."""
    builtin = BUILTIN_PROFILES[name]
    return attrs.evolve(builtin, argv=(claude, *builtin.argv[1:]))


class Run:
    """One session of a Claude profile against a fake, its events recorded."""

    def __init__(self, manager: SessionManager, tmp_path: Path, fake: FakeAnthropic) -> None:
        self.manager = manager
        self.work_dir = tmp_path / "project"
        self.work_dir.mkdir(exist_ok=True)
        self.tmp_path = tmp_path
        self.fake = fake
        self.events: list[SessionEvent] = []
        self._arrived = asyncio.Event()
        self.session_id = "run-1:task:1"

    def home(self, **kwargs: object) -> ClaudeHome:
        return prepare_claude_home(
            self.tmp_path / "home",
            base_url=self.fake.url,
            work_dirs=[self.work_dir],
            **kwargs,  # type: ignore[arg-type]
        )

    async def start(self, agent: AgentProfile, prompt: str, home: ClaudeHome) -> None:
        subscription = self.manager.subscribe()

        async def record() -> None:
            async for event in subscription:
                self.events.append(event)
                self._arrived.set()

        self._reader = asyncio.create_task(record())
        await self.manager.start(
            SessionSpec(
                session_id=self.session_id,
                profile=agent,
                prompt=prompt,
                work_dir=self.work_dir,
                transcript_path=self.tmp_path / "transcript.log",
                env=dict(home.env),
            )
        )

    async def wait_for(self, kind: type, **fields: object) -> SessionEvent:
        async with asyncio.timeout(DEADLINE):
            while True:
                for event in self.events:
                    if isinstance(event, kind) and all(
                        getattr(event, k) == v for k, v in fields.items()
                    ):
                        return event
                self._arrived.clear()
                await self._arrived.wait()

    async def done(self) -> SessionCompleted:
        event = await self.wait_for(SessionCompleted)
        assert isinstance(event, SessionCompleted)
        return event

    def states(self) -> list[SessionState]:
        return [e.new for e in self.events if isinstance(e, SessionStateChanged)]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as server:
        yield server


@pytest.fixture
def run(manager: SessionManager, tmp_path: Path, fake: FakeAnthropic) -> Run:
    return Run(manager, tmp_path, fake)


# -- print mode --------------------------------------------------------------------------------


async def test_print_mode_result_is_the_output(claude: str, run: Run, fake: FakeAnthropic) -> None:
    fake.push(TextReply("All four checks passed."))
    # A leading "-" would be an option without the profile's "--".
    prompt = "-v is not an option here: summarise the checks"
    await run.start(profile("claude", claude), prompt, run.home())
    done = await run.done()
    assert (done.state, done.exit_code, done.error) == (SessionState.COMPLETED, 0, None)
    assert done.output == "All four checks passed."
    assert [r.prompt for r in fake.message_requests] == [prompt]
    assert SessionState.BLOCKED not in run.states()


async def test_print_mode_takes_a_leading_slash_as_text(
    claude: str, run: Run, fake: FakeAnthropic
) -> None:
    """Without the escape Claude Code would run "/tmp/..." as a (non-existent) slash command
    and never ask the model."""
    await run.start(profile("claude", claude), "/tmp/build.log shows an error", run.home())
    done = await run.done()
    assert done.state is SessionState.COMPLETED, done.error
    assert [r.prompt for r in fake.message_requests] == [" /tmp/build.log shows an error"]
    assert done.output == "echo:  /tmp/build.log shows an error"


async def test_print_mode_500_fails_after_the_configured_retries(
    claude: str, run: Run, fake: FakeAnthropic
) -> None:
    fake.default = server_error()
    started = time.monotonic()
    await run.start(profile("claude", claude), "hello", run.home(max_retries=1))
    done = await run.done()
    assert done.state is SessionState.FAILED
    assert done.exit_code == 1
    assert done.error is not None
    assert done.error.startswith(
        "exited with status 1 (agent error: API Error: 500 Internal server error."
    )
    assert done.output.startswith("API Error: 500")
    assert len(fake.message_requests) == 2  # the first attempt and one retry
    assert time.monotonic() - started < 60


async def test_print_mode_529_fails_without_retrying_when_told_so(
    claude: str, run: Run, fake: FakeAnthropic
) -> None:
    fake.default = overloaded()
    await run.start(profile("claude", claude), "hello", run.home(max_retries=0))
    done = await run.done()
    assert done.state is SessionState.FAILED
    assert done.error is not None and "API Error: 529 Overloaded" in done.error
    assert len(fake.message_requests) == 1


async def test_print_mode_cut_stream_fails_not_succeeds(
    claude: str, run: Run, fake: FakeAnthropic
) -> None:
    fake.default = CutStream("The first half of an ans")
    await run.start(profile("claude", claude), "hello", run.home(max_retries=0))
    done = await run.done()
    assert done.state is SessionState.FAILED
    assert done.error is not None and "agent error: API Error" in done.error
    assert "The first half" not in done.output
    # The cut stream, then Claude Code's non-streamed fallback, which is cut too.
    assert [r.stream for r in fake.message_requests] == [True, False]


# -- interactive mode --------------------------------------------------------------------------


@pytest.mark.slow
async def test_interactive_permission_prompt_blocks_input_approves_and_the_task_completes(
    claude: str, run: Run, fake: FakeAnthropic, manager: SessionManager
) -> None:
    final = "Created made.txt.\n\nIt holds one line:\n\n- approved"
    fake.push(
        ToolUseReply(
            "Bash",
            {"command": "echo approved > made.txt", "description": "Create made.txt"},
            text="I will create the file.",
        ),
        TextReply(final),
    )
    await run.start(
        profile("claude-interactive", claude),
        "Please create made.txt",
        run.home(max_retries=0),
    )
    blocked = await run.wait_for(SessionBlocked)
    assert isinstance(blocked, SessionBlocked)
    assert blocked.reason == 'prompt: "echo approved > made.txt | Do you want to proceed?"'
    assert "1. Yes" in blocked.preview
    session = manager.get(run.session_id)
    assert session is not None and session.state is SessionState.BLOCKED
    assert not (run.work_dir / "made.txt").exists()

    # What `cis dag input ID 1` sends: the option, then Enter (which lands in the empty prompt
    # box and does nothing); tests/test_claude_dag.py sends "1" alone.
    await manager.send_input(run.session_id, "1\r")
    done = await run.done()
    assert (done.state, done.exit_code, done.error) == (SessionState.COMPLETED, 0, None)
    assert (run.work_dir / "made.txt").read_text() == "approved\n"
    # The reply exactly as the model sent it (markdown and blank lines kept), from the
    # conversation record that --session-id names.
    assert done.output == final
    assert claude_conversation_record(session.env, run.session_id) is not None
    (result,) = fake.message_requests[1].tool_results
    assert result["is_error"] is False
    assert run.states() == [
        SessionState.RUNNING,
        SessionState.BLOCKED,
        SessionState.RUNNING,
        SessionState.COMPLETED,
    ]


@pytest.mark.slow
async def test_interactive_api_error_fails_the_task_with_the_error(
    claude: str, run: Run, fake: FakeAnthropic
) -> None:
    fake.default = server_error()
    await run.start(profile("claude-interactive", claude), "hello", run.home(max_retries=1))
    done = await run.done()
    assert done.state is SessionState.FAILED
    assert done.exit_code == 0  # /exit worked; the turn itself failed
    assert done.error is not None
    assert done.error.startswith("agent error: API Error: 500 Internal server error.")
    assert len(fake.message_requests) == 2


@pytest.mark.slow
async def test_interactive_cut_stream_fails_the_task(
    claude: str, run: Run, fake: FakeAnthropic
) -> None:
    fake.default = CutStream("The first half of an ans")
    await run.start(profile("claude-interactive", claude), "hello", run.home(max_retries=0))
    done = await run.done()
    assert done.state is SessionState.FAILED
    assert done.error is not None and done.error.startswith("agent error: API Error")
    assert "The first half" not in done.output


async def test_interactive_setup_dialog_blocks_with_its_question(
    claude: str, run: Run, fake: FakeAnthropic, manager: SessionManager
) -> None:
    """A HOME that does not trust the work dir: blocked at the dialog, never mistaken for a
    finished turn."""
    home = prepare_claude_home(run.tmp_path / "home", base_url=fake.url, work_dirs=())
    await run.start(profile("claude-interactive", claude), "hello", home)
    blocked = await run.wait_for(SessionBlocked)
    assert isinstance(blocked, SessionBlocked)
    assert blocked.reason.startswith('prompt: "Accessing workspace: | ')
    assert str(run.work_dir) in blocked.reason
    done = await manager.kill(run.session_id, reason="test over")
    assert done.state is SessionState.KILLED
    assert fake.message_requests == []

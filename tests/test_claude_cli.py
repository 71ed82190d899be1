"""The real Claude Code CLI (npm, node_modules/.bin/claude) offline against the fake Anthropic API.

Print mode (``claude -p --output-format stream-json --verbose``) through pipes and through a PTY,
and the interactive TUI in a 120x40 PTY read with the patterns of cis_bot.testing.claude_screens.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from cis_bot.testing.claude_home import (
    FAKE_CREDENTIAL,
    ClaudeHome,
    prepare_claude_home,
)
from cis_bot.testing.claude_screens import (
    TURN_DONE,
    ScreenState,
    api_error,
    read_screen,
)
from cis_bot.testing.fake_anthropic import (
    CutStream,
    FakeAnthropic,
    TextReply,
    ToolUseReply,
    overloaded,
    server_error,
)
from tests.support.claude import require_claude
from tests.support.pty_screen import PtyScreen

#: Generous: other suites run at the same time on two cores.
DEADLINE = 90.0


@pytest.fixture(scope="module")
def claude() -> str:
    return require_claude()


@pytest.fixture
def work_dir(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def home_for(tmp_path: Path, fake: FakeAnthropic, work_dir: Path, **kwargs: Any) -> ClaudeHome:
    return prepare_claude_home(tmp_path / "home", base_url=fake.url, work_dirs=[work_dir], **kwargs)


@attrs.frozen
class PrintRun:
    exit_code: int
    lines: list[dict[str, Any]]
    stderr: str
    seconds: float

    @property
    def result(self) -> dict[str, Any]:
        """The final ``{"type": "result"}`` line: ``result`` holds the text, ``is_error`` the
        outcome (``subtype`` says "success" even for an API error)."""
        assert self.lines, f"no stream-json output; stderr: {self.stderr}"
        last = self.lines[-1]
        assert last["type"] == "result"
        return last

    def of_type(self, kind: str, subtype: str | None = None) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines
            if line["type"] == kind and (subtype is None or line.get("subtype") == subtype)
        ]


async def run_print(
    claude: str, home: ClaudeHome, work_dir: Path, prompt: str, *args: str
) -> PrintRun:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        claude,
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        *args,
        env=home.environ(),
        cwd=work_dir,
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
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    return PrintRun(process.returncode, lines, stderr.decode(), time.monotonic() - started)


def assistant_text(run: PrintRun) -> str:
    return "".join(
        block["text"]
        for line in run.of_type("assistant")
        for block in line["message"]["content"]
        if block["type"] == "text"
    )


# -- print mode --------------------------------------------------------------------------------


async def test_print_mode_sends_the_prompt_and_returns_the_reply(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    prompt = "Summarise the upstream output: 'build ok, 12 tests passed'"
    async with FakeAnthropic([TextReply("Build passed with 12 tests.")]) as fake:
        home = home_for(tmp_path, fake, work_dir)
        run = await run_print(claude, home, work_dir, prompt)
    assert run.exit_code == 0, run.stderr
    init = run.lines[0]
    assert (init["type"], init["subtype"]) == ("system", "init")
    assert init["cwd"] == str(work_dir)
    assert assistant_text(run) == "Build passed with 12 tests."
    assert run.result["subtype"] == "success"
    assert run.result["is_error"] is False
    assert run.result["result"] == "Build passed with 12 tests."
    assert run.result["terminal_reason"] == "completed"
    # With nonessential traffic off, the only request is the Messages call, always streamed.
    assert [(r.method, r.path, dict(r.query)) for r in fake.requests] == [
        ("POST", "/v1/messages", {"beta": "true"})
    ]
    (request,) = fake.message_requests
    assert request.stream
    assert request.prompt == prompt
    assert request.headers["authorization"] == f"Bearer {FAKE_CREDENTIAL}"
    assert request.headers["user-agent"].startswith("claude-cli/")


async def test_print_mode_returns_a_tool_result_to_the_api(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    target = work_dir / "notes.txt"
    script = [
        ToolUseReply("Write", {"file_path": str(target), "content": "from the fake\n"}),
        TextReply("Wrote notes.txt."),
    ]
    async with FakeAnthropic(script) as fake:
        home = home_for(tmp_path, fake, work_dir)
        run = await run_print(
            claude, home, work_dir, "write notes", "--permission-mode", "acceptEdits"
        )
    assert run.exit_code == 0, run.stderr
    assert target.read_text() == "from the fake\n"
    assert run.result["result"] == "Wrote notes.txt."
    assert run.result["num_turns"] == 2
    _, second = fake.message_requests
    tool_use_id = run.of_type("assistant")[0]["message"]["content"][0]["id"]
    assert [r["tool_use_id"] for r in second.tool_results] == [tool_use_id]
    assert not second.tool_results[0].get("is_error")
    assert "File created successfully" in second.all_text


async def test_print_mode_denies_a_tool_that_needs_permission(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    """Print mode never asks: in the default mode a shell write is refused and the model is told."""
    script = [
        ToolUseReply("Bash", {"command": "echo hi > made.txt", "description": "Create made.txt"}),
        TextReply("Could not create it."),
    ]
    async with FakeAnthropic(script) as fake:
        home = home_for(tmp_path, fake, work_dir)
        run = await run_print(claude, home, work_dir, "make a file")
    assert run.exit_code == 0, run.stderr
    assert not (work_dir / "made.txt").exists()
    (denied,) = run.of_type("system", "permission_denied")
    assert denied["tool_name"] == "Bash"
    assert run.result["result"] == "Could not create it."
    assert [d["tool_name"] for d in run.result["permission_denials"]] == ["Bash"]
    (refusal,) = fake.message_requests[1].tool_results
    assert refusal["is_error"] is True


async def test_print_mode_fails_on_500_after_the_configured_retries(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    async with FakeAnthropic(default=server_error()) as fake:
        home = home_for(tmp_path, fake, work_dir, max_retries=1)
        run = await run_print(claude, home, work_dir, "hello")
    assert run.exit_code == 1
    assert run.result["is_error"] is True
    assert run.result["api_error_status"] == 500
    assert run.result["terminal_reason"] == "api_error"
    assert run.result["result"].startswith("API Error: 500 Internal server error.")
    (retry,) = run.of_type("system", "api_retry")
    assert (retry["attempt"], retry["max_retries"], retry["error_status"]) == (1, 1, 500)
    assert len(fake.message_requests) == 2
    assert run.seconds < 30


async def test_print_mode_fails_on_529_without_retrying_when_told_so(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    async with FakeAnthropic(default=overloaded()) as fake:
        home = home_for(tmp_path, fake, work_dir, max_retries=0)
        run = await run_print(claude, home, work_dir, "hello")
    assert run.exit_code == 1
    assert run.result["is_error"] is True
    assert run.result["api_error_status"] == 529
    assert run.result["result"].startswith("API Error: 529 Overloaded.")
    assert run.of_type("system", "api_retry") == []
    assert len(fake.message_requests) == 1


@pytest.mark.slow
async def test_print_mode_stops_after_three_529s_whatever_the_retry_setting(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    """Outside a sandbox (IS_SANDBOX unset) repeated 529s end the run after 3 attempts."""
    async with FakeAnthropic(default=overloaded()) as fake:
        home = home_for(tmp_path, fake, work_dir, max_retries=6)
        run = await run_print(claude, home, work_dir, "hello")
    assert run.exit_code == 1
    assert run.result["result"].startswith("API Error: Repeated 529 Overloaded errors.")
    assert [r["attempt"] for r in run.of_type("system", "api_retry")] == [1, 2]
    assert len(fake.message_requests) == 3


async def test_print_mode_fails_when_every_stream_is_cut(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    async with FakeAnthropic(default=CutStream("This answer never ends")) as fake:
        home = home_for(tmp_path, fake, work_dir, max_retries=0)
        run = await run_print(claude, home, work_dir, "hello")
    assert run.exit_code == 1
    assert run.result["is_error"] is True
    assert run.result["terminal_reason"] == "api_error"
    assert run.result["result"].startswith("API Error:")
    assert "This answer never ends" not in run.result["result"]
    # The cut stream, then one non-streamed attempt (Claude Code's fallback), which also drops.
    assert [r.stream for r in fake.message_requests] == [True, False]


async def test_print_mode_recovers_from_one_cut_by_retrying(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    async with FakeAnthropic([CutStream("half an ans"), TextReply("A whole answer.")]) as fake:
        home = home_for(tmp_path, fake, work_dir, max_retries=1)
        run = await run_print(claude, home, work_dir, "hello")
    assert run.exit_code == 0, run.stderr
    assert run.result["is_error"] is False
    assert run.result["result"] == "A whole answer."
    (retry,) = run.of_type("system", "api_retry")
    assert retry["error_status"] is None
    assert len(fake.message_requests) == 2


async def test_print_mode_in_a_pty_prints_the_same_lines_with_crlf(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    """What a PTY session transcript holds: CRLF line ends and a cursor escape at the end."""
    async with FakeAnthropic() as fake:
        home = home_for(tmp_path, fake, work_dir)
        argv = [claude, "-p", "through a pty", "--output-format", "stream-json", "--verbose"]
        tui = PtyScreen(argv, env=home.environ(), cwd=work_dir)
        try:
            assert await tui.wait_exit(DEADLINE) == 0
        finally:
            tui.close()
    raw = bytes(tui.raw)
    assert b"\r\n" in raw
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", raw).decode()
    lines = [json.loads(line) for line in text.split("\r\n") if line.strip()]
    assert lines[-1]["type"] == "result"
    assert lines[-1]["result"] == "echo: through a pty"


# -- interactive mode --------------------------------------------------------------------------


async def wait_state(tui: PtyScreen, state: ScreenState, timeout: float = DEADLINE) -> str:
    return await tui.wait_for(lambda text: read_screen(text).state == state, timeout)


async def submit(tui: PtyScreen, text: str) -> None:
    """Type a message, wait until the box shows it, then press Enter."""
    tui.write(text)
    await tui.wait_for(lambda screen: text in screen, DEADLINE)
    tui.write("\r")


@pytest.mark.slow
async def test_interactive_permission_prompt_approval_and_clean_exit(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    script = [
        ToolUseReply(
            "Bash",
            {"command": "echo approved > made.txt", "description": "Create made.txt"},
            text="I will create the file.",
            chunk_chars=2,
            chunk_delay_secs=0.1,  # about two seconds of "working"
        ),
        TextReply("Created made.txt for you."),
    ]
    async with FakeAnthropic(script) as fake:
        home = home_for(tmp_path, fake, work_dir, max_retries=0)
        tui = PtyScreen([claude], env=home.environ(), cwd=work_dir)
        try:
            started = time.monotonic()
            await wait_state(tui, ScreenState.IDLE)
            startup = time.monotonic() - started
            assert fake.requests == []  # nothing is sent before the first message

            await submit(tui, "Please create made.txt")
            await wait_state(tui, ScreenState.WORKING)
            screen = await wait_state(tui, ScreenState.PERMISSION)
            reason = read_screen(screen).reason
            assert reason is not None
            assert "echo approved > made.txt" in reason
            assert "Do you want to proceed? | 1. Yes" in reason
            assert not (work_dir / "made.txt").exists()
            assert fake.message_requests[0].prompt == "Please create made.txt"

            tui.write("1")
            screen = await tui.wait_for(
                lambda s: read_screen(s).state == ScreenState.IDLE and TURN_DONE.search(s), DEADLINE
            )
            assert "Created made.txt for you." in screen
            assert (work_dir / "made.txt").read_text() == "approved\n"
            (result,) = fake.message_requests[1].tool_results
            assert result["is_error"] is False

            # A second turn that fails on the API ends idle, with the error on screen.
            fake.default = server_error()
            await submit(tui, "And now fail")
            screen = await tui.wait_for(
                lambda s: read_screen(s).state == ScreenState.IDLE and api_error(s) is not None,
                DEADLINE,
            )
            message = api_error(screen)
            assert message is not None
            assert message.startswith("API Error: 500 Internal server error.")
            assert len(TURN_DONE.findall(screen)) == 1

            await submit(tui, "/exit")
            exited = time.monotonic()
            assert await tui.wait_exit(DEADLINE) == 0
            assert time.monotonic() - exited < 30
        finally:
            tui.close()
    assert startup < 30


async def test_interactive_exits_on_two_ctrl_d(claude: str, tmp_path: Path, work_dir: Path) -> None:
    async with FakeAnthropic() as fake:
        home = home_for(tmp_path, fake, work_dir)
        tui = PtyScreen([claude], env=home.environ(), cwd=work_dir)
        try:
            await wait_state(tui, ScreenState.IDLE)
            tui.write("\x04")
            await tui.wait_for("Press Ctrl-D again to exit", DEADLINE)
            tui.write("\x04")
            assert await tui.wait_exit(DEADLINE) == 0
        finally:
            tui.close()


async def test_interactive_without_trust_stops_at_a_setup_dialog(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    """A work dir the HOME does not trust: blocked at a dialog, not mistaken for idle."""
    async with FakeAnthropic() as fake:
        home = prepare_claude_home(tmp_path / "home", base_url=fake.url, work_dirs=())
        tui = PtyScreen([claude], env=home.environ(), cwd=work_dir)
        try:
            screen = await wait_state(tui, ScreenState.SETUP)
        finally:
            tui.close()
    reading = read_screen(screen)
    assert reading.dialog == "trust_folder"
    assert reading.reason is not None
    assert str(work_dir) in reading.reason


async def test_interactive_takes_a_long_multiline_prompt_as_its_argument(
    claude: str, tmp_path: Path, work_dir: Path
) -> None:
    """The prompt as argv reaches the API verbatim; typed this fast, Claude Code would take it as
    a paste and wrap it in <pasted_content> tags (which its system prompt calls untrusted)."""
    lines = [f"upstream line {i}: " + "y" * 60 for i in range(60)]
    prompt = "\n".join(["-starts with a dash", "", "!not a shell command", *lines])
    async with FakeAnthropic([TextReply("Read it all.")]) as fake:
        home = home_for(tmp_path, fake, work_dir)
        tui = PtyScreen([claude, "--", prompt], env=home.environ(), cwd=work_dir)
        try:
            screen = await tui.wait_for(
                lambda s: read_screen(s).state == ScreenState.IDLE and TURN_DONE.search(s), DEADLINE
            )
        finally:
            tui.close()
    assert "Read it all." in screen
    (request,) = fake.message_requests
    assert request.prompt == prompt

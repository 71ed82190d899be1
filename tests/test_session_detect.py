"""Blocked detection against real processes: prompt patterns (plain text and a pyte-rendered
TUI screen), the tty-read rule, the quiet period; and input moving a session back to running."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import attrs
import pytest

from cis_bot.session.detect import TextView, compile_patterns, find_prompt, quote
from cis_bot.session.events import (
    SessionBlocked,
    SessionCompleted,
    SessionEvent,
    SessionState,
    SessionStateChanged,
)
from cis_bot.session.manager import SessionManager, Subscription
from cis_bot.session.profiles import BUILTIN_PROFILES
from tests.test_session import DEADLINE, FAST, SHELL, Spawner, fake_profile

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

YES_NO = BUILTIN_PROFILES["aider"].blocked_patterns


@pytest.fixture
async def manager() -> AsyncIterator[SessionManager]:
    mgr = SessionManager(FAST)
    yield mgr
    await mgr.close(grace_secs=0.2)


@pytest.fixture
def spawner(manager: SessionManager, tmp_path: Path) -> Spawner:
    return Spawner(manager, tmp_path)


class Recorder:
    """Reads a subscription as events arrive (a subscriber that keeps up)."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.events: list[SessionEvent] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.sub:
            self.events.append(event)
            self._arrived.set()

    async def wait_for(self, kind: type, start: int = 0, **fields: object) -> int:
        """Index of the first event at or after ``start`` of ``kind`` with ``fields``."""
        async with asyncio.timeout(DEADLINE):
            while True:
                for i in range(start, len(self.events)):
                    event = self.events[i]
                    if isinstance(event, kind) and all(
                        getattr(event, k) == v for k, v in fields.items()
                    ):
                        return i
                self._arrived.clear()
                await self._arrived.wait()

    def states(self) -> list[SessionState]:
        return [e.new for e in self.events if isinstance(e, SessionStateChanged)]

    async def close(self) -> None:
        self.sub.close()
        await self._task


@pytest.fixture
async def recorder(manager: SessionManager) -> AsyncIterator[Recorder]:
    rec = Recorder(manager.subscribe())
    yield rec
    await rec.close()


async def test_fake_agent_question_blocks_then_input_completes(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    profile = fake_profile(blocked_patterns=YES_NO, detect_tty_read=False)
    sid, _ = await spawner.start("print working; ask Continue?; print done; exit 0", profile)
    i = await recorder.wait_for(SessionBlocked)
    blocked = recorder.events[i]
    assert isinstance(blocked, SessionBlocked)
    assert blocked.reason == 'prompt: "Continue? [y/N]"'
    assert blocked.preview.splitlines() == ["working", "Continue? [y/N] "]
    session = manager.get(sid)
    assert session is not None
    assert session.state is SessionState.BLOCKED
    assert session.blocked_reason == blocked.reason
    await manager.send_input(sid, "y\n")
    assert session.state is SessionState.RUNNING
    done = await session.wait()
    assert done.state is SessionState.COMPLETED
    assert done.exit_code == 0
    assert done.output.splitlines()[-2:] == ["answer: yes", "done"]
    assert recorder.states()[:4] == [
        SessionState.RUNNING,
        SessionState.BLOCKED,
        SessionState.RUNNING,
        SessionState.COMPLETED,
    ]
    changed = [e for e in recorder.events if isinstance(e, SessionStateChanged)]
    assert changed[1].reason == blocked.reason
    assert changed[2].reason == "input"


async def test_refusing_the_question_ends_with_the_agents_exit_code(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    profile = fake_profile(blocked_patterns=YES_NO)
    sid, _ = await spawner.start("ask Delete everything?; exit 0", profile)
    await recorder.wait_for(SessionBlocked)
    await manager.send_input(sid, "n\n")
    session = manager.get(sid)
    assert session is not None
    done = await session.wait()
    assert (done.state, done.exit_code, done.error) == (
        SessionState.FAILED,
        1,
        "exited with status 1",
    )


async def test_blocked_by_tty_read_on_plain_sh(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    sid, _ = await spawner.start('printf "Name: "; read name; echo "hello $name"')
    i = await recorder.wait_for(SessionBlocked)
    blocked = recorder.events[i]
    assert isinstance(blocked, SessionBlocked)
    assert blocked.reason == 'waiting for input on the terminal: "Name: "'
    await manager.send_input(sid, "Ada\n")
    session = manager.get(sid)
    assert session is not None
    done = await session.wait()
    assert done.state is SessionState.COMPLETED
    assert done.output.splitlines()[-1] == "hello Ada"


async def test_tty_read_that_starts_later_without_output_is_found(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    # Nothing is printed before the read: only the backed-off re-checks can see it.
    sid, _ = await spawner.start("echo start; sleep 0.6; read x; echo got $x")
    i = await recorder.wait_for(SessionBlocked)
    blocked = recorder.events[i]
    assert isinstance(blocked, SessionBlocked)
    assert blocked.reason == 'waiting for input on the terminal: "start"'
    await manager.send_input(sid, "it\n")
    session = manager.get(sid)
    assert session is not None
    assert (await session.wait()).output.splitlines()[-1] == "got it"


async def test_sleeping_process_is_not_blocked_without_a_quiet_period(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    sid, _ = await spawner.start("echo start; sleep 1.2; echo end")
    session = manager.get(sid)
    assert session is not None
    done = await session.wait()
    assert done.state is SessionState.COMPLETED
    assert not [e for e in recorder.events if isinstance(e, SessionBlocked)]


async def test_quiet_period_blocks_and_output_resumes_running(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    profile = attrs.evolve(SHELL, quiet_secs=0.4, detect_tty_read=False)
    sid, _ = await spawner.start("echo thinking; sleep 1.2; echo more; sleep 1000", profile)
    first = await recorder.wait_for(SessionBlocked)
    blocked = recorder.events[first]
    assert isinstance(blocked, SessionBlocked)
    assert blocked.reason == 'no output for 0.4s; last line: "thinking"'
    resumed = await recorder.wait_for(SessionStateChanged, first, new=SessionState.RUNNING)
    change = recorder.events[resumed]
    assert isinstance(change, SessionStateChanged) and change.reason == "new output"
    again = await recorder.wait_for(SessionBlocked, resumed)
    blocked_again = recorder.events[again]
    assert isinstance(blocked_again, SessionBlocked)
    assert blocked_again.reason == 'no output for 0.4s; last line: "more"'
    # Input also counts as activity: running again, and quiet again later.
    await manager.send_input(sid, "\n")
    session = manager.get(sid)
    assert session is not None
    assert session.state is SessionState.RUNNING
    await recorder.wait_for(SessionBlocked, again + 1)
    await manager.kill(sid)


async def test_pattern_on_a_pyte_rendered_tui_screen(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    profile = fake_profile(
        screen=True,
        blocked_patterns=(r"Do you want to proceed\?",),
        detect_tty_read=False,
    )
    sid, transcript = await spawner.start(
        "tui Fake Agent; tui-ask Do you want to proceed?; sleep 0.2; exit 0", profile
    )
    i = await recorder.wait_for(SessionBlocked)
    blocked = recorder.events[i]
    assert isinstance(blocked, SessionBlocked)
    assert blocked.reason == 'prompt: "Do you want to proceed?"'
    session = manager.get(sid)
    assert session is not None
    screen = session.screen_lines()
    assert screen is not None
    assert len(screen) == FAST.rows
    assert screen[0].startswith("┌") and "Fake Agent" in screen[0]
    assert "❯ 1. Yes" in blocked.preview
    assert screen[-1] == "waiting for approval"
    # The raw transcript has the question only as cursor-addressed fragments: the screen is
    # what makes the pattern meaningful.
    assert b"\x1b[" in transcript.read_bytes()
    await manager.send_input(sid, "1")
    assert session.state is SessionState.RUNNING
    done = await session.wait()
    assert done.state is SessionState.COMPLETED
    assert not [e for e in recorder.events[i + 1 :] if isinstance(e, SessionBlocked)], (
        "the answered question must not block again"
    )


async def test_prompt_that_scrolls_past_is_not_flagged(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    profile = attrs.evolve(SHELL, blocked_patterns=YES_NO, detect_tty_read=False)
    script = (
        "echo 'Continue? [y/N]'; for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; done; sleep 0.8"
    )
    sid, _ = await spawner.start(script, profile)
    session = manager.get(sid)
    assert session is not None
    done = await session.wait()
    assert done.state is SessionState.COMPLETED
    assert not [e for e in recorder.events if isinstance(e, SessionBlocked)]


async def test_new_output_that_no_longer_matches_unblocks(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    # The agent asks, then answers itself (a timeout in the agent, say) and carries on.
    profile = attrs.evolve(SHELL, blocked_patterns=YES_NO, detect_tty_read=False)
    script = "printf 'Proceed? [y/N] '; sleep 0.8; echo; echo 'auto-approved'; sleep 0.5"
    sid, _ = await spawner.start(script, profile)
    i = await recorder.wait_for(SessionBlocked)
    j = await recorder.wait_for(SessionStateChanged, i, new=SessionState.RUNNING)
    change = recorder.events[j]
    assert isinstance(change, SessionStateChanged) and change.reason == "no longer waiting"
    session = manager.get(sid)
    assert session is not None
    assert (await session.wait()).state is SessionState.COMPLETED


async def test_spinner_does_not_hide_a_prompt_forever(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    # Output never settles, but patterns are still checked after settle_max_secs.
    profile = fake_profile(blocked_patterns=(r"Approve\?",), pattern_lines=2, detect_tty_read=False)
    sid, _ = await spawner.start(r"print Approve? (the spinner keeps going); spinner 3", profile)
    i = await recorder.wait_for(SessionBlocked)
    blocked = recorder.events[i]
    assert isinstance(blocked, SessionBlocked)
    assert blocked.reason.startswith('prompt: "Approve?')
    await manager.kill(sid)


async def test_completion_after_block_comes_exactly_once(
    manager: SessionManager, spawner: Spawner, recorder: Recorder
) -> None:
    sid, _ = await spawner.start("read x")
    await recorder.wait_for(SessionBlocked)
    done = await manager.kill(sid, reason="nobody answered")
    assert done.state is SessionState.KILLED
    # Once the manager is closed nothing more is published; the recorder has read it all
    # when its subscription ends.
    await manager.close()
    await recorder.close()
    completed = [e for e in recorder.events if isinstance(e, SessionCompleted)]
    assert completed == [done]


# ------------------------------------------------------------------------------- pure parts


def test_find_prompt_takes_the_lowest_matching_line() -> None:
    patterns = compile_patterns(YES_NO)
    lines = ["Overwrite a.txt? [y/N]", "ok", "Overwrite b.txt? [y/N] "]
    assert find_prompt(patterns, lines) == "Overwrite b.txt? [y/N] "
    assert find_prompt(patterns, ["nothing to see"]) is None


def test_invalid_pattern_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"invalid blocked pattern '\(unclosed'"):
        compile_patterns(["(unclosed"])


def test_text_view_keeps_last_non_empty_lines() -> None:
    view = TextView(keep_bytes=64)
    for i in range(100):
        view.feed(f"line {i}\r\n".encode())
    view.feed(b"\x1b[1mQuestion?\x1b[0m ")
    assert view.last_lines(3) == ["line 98", "line 99", "Question? "]


def test_quote_escapes_and_bounds() -> None:
    assert quote('say "hi"') == '"say \\"hi\\""'
    assert len(quote("x" * 500)) == 202

"""The claude-interactive profile's detection (detect.py) over the real CLI's screens in
tests/fixtures/claude/: what a session would decide on each, exactly as AgentSession reads it (the
profile's last ``pattern_lines`` non-blank lines, blocked patterns first, then idle patterns).

A Claude Code release that moves its screens fails here instead of hanging sessions; recapture
with ``.venv/bin/python -m tests.fixtures.claude.capture`` and compare.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import pytest

from cis_bot.session.detect import compile_patterns, find_prompt, idle_blocked, prompt_blocked
from cis_bot.session.output import Extracted, claude_screen_reply
from cis_bot.session.profiles import BUILTIN_PROFILES

FIXTURES = Path(__file__).parent / "fixtures" / "claude"
PROFILE = BUILTIN_PROFILES["claude-interactive"]


class Verdict(StrEnum):
    #: A blocked pattern matched: the session is blocked, waiting for a person.
    BLOCKED = "blocked"
    #: An idle pattern matched: the turn is over, the session types /exit.
    TURN_OVER = "turn-over"
    #: Neither: starting, working, or idle before its first turn has ended.
    RUNNING = "running"


#: Every captured screen and what the session makes of it. A new fixture needs an entry.
EXPECTED: dict[str, Verdict] = {
    "onboarding_theme": Verdict.BLOCKED,
    "onboarding_offline": Verdict.BLOCKED,
    "trust_dialog": Verdict.BLOCKED,
    "api_key_question": Verdict.BLOCKED,
    "auto_mode_offer": Verdict.BLOCKED,
    "bypass_warning": Verdict.BLOCKED,
    "permission_bash": Verdict.BLOCKED,
    "permission_write": Verdict.BLOCKED,
    "idle_after_turn": Verdict.TURN_OVER,
    "api_error": Verdict.TURN_OVER,
    # Idle at start-up (the prompt given as an argument is submitted a moment later), or idle
    # between tool calls, is not the end of the turn: no "done" line above the prompt box.
    "idle": Verdict.RUNNING,
    "idle_auto_mode": Verdict.RUNNING,
    "idle_bypass_mode": Verdict.RUNNING,
    "typed": Verdict.RUNNING,
    "working": Verdict.RUNNING,
    "api_error_retrying": Verdict.RUNNING,
}

#: What the blocked reason quotes, per blocked screen.
REASONS = {
    "onboarding_theme": 'prompt: "Choose the text style that looks best with your terminal"',
    "onboarding_offline": 'prompt: "Unable to connect to Anthropic services"',
    "trust_dialog": 'prompt: "Accessing workspace: | /tmp/cis-claude-fixtures/project"',
    "api_key_question": 'prompt: "Do you want to use this API key?"',
    "auto_mode_offer": 'prompt: "Make auto mode your default permission mode?"',
    "bypass_warning": 'prompt: "WARNING: Claude Code running in Bypass Permissions mode"',
    "permission_bash": 'prompt: "echo hi > made.txt | Do you want to proceed?"',
    "permission_write": 'prompt: "Do you want to create notes.txt?"',
}


def screen(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")


def bottom_lines(text: str) -> list[str]:
    """What ScreenView.last_lines(pattern_lines) gives the session for this screen."""
    assert PROFILE.pattern_lines is not None
    return [line.rstrip() for line in text.splitlines() if line.strip()][-PROFILE.pattern_lines :]


def decide(text: str) -> tuple[Verdict, str | None]:
    lines = bottom_lines(text)
    shown = find_prompt(compile_patterns(PROFILE.blocked_patterns), lines)
    if shown is not None:
        return Verdict.BLOCKED, prompt_blocked(shown).reason
    idle = find_prompt(compile_patterns(PROFILE.idle_patterns), lines)
    if idle is not None:
        return Verdict.TURN_OVER, idle_blocked(idle).reason
    return Verdict.RUNNING, None


def test_every_fixture_has_an_expectation() -> None:
    assert {p.stem for p in FIXTURES.glob("*.txt")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_session_reads_each_screen_as_expected(name: str) -> None:
    verdict, reason = decide(screen(name))
    assert verdict == EXPECTED[name]
    if verdict is Verdict.BLOCKED:
        assert reason == REASONS[name]


def test_the_turn_over_reason_quotes_the_done_line_or_the_error() -> None:
    _, done = decide(screen("idle_after_turn"))
    assert done is not None
    assert "Worked for 7s · done" in done
    _, error = decide(screen("api_error"))
    assert error is not None
    assert "API Error: 500 Internal server error." in error


def test_a_reply_that_quotes_a_question_or_a_done_line_decides_nothing() -> None:
    """Model text above the prompt box that looks like a permission panel, a setup dialog or a
    finished turn, while the footer says the turn is still running."""
    lines = screen("working").splitlines()
    box = next(i for i, line in enumerate(lines) if line.startswith("─"))
    reply = [
        "● Before I go on:",
        "  Do you want to proceed?",
        "  ❯ 1. Yes",
        "  Esc to cancel",
        "  Do you want to use this API key?",
        "✻ Worked for 3s · done 9:00 PM",
    ]
    text = "\n".join(lines[:box] + reply + lines[box:])
    assert decide(text) == (Verdict.RUNNING, None)


def test_the_reply_is_read_from_the_screen_when_there_is_no_record() -> None:
    assert claude_screen_reply(screen("idle_after_turn").splitlines()) == Extracted(
        "Created made.txt."
    )
    error = claude_screen_reply(screen("api_error").splitlines())
    assert error is not None
    assert error.output.startswith("API Error: 500 Internal server error.")
    assert "If it persists" in error.output  # the wrapped line, joined
    assert error.error == f"agent error: {error.output}"
    # No finished turn on screen: nothing to report.
    assert claude_screen_reply(screen("working").splitlines()) is None
    assert claude_screen_reply(screen("permission_bash").splitlines()) is None


def test_a_multi_line_reply_keeps_its_lines() -> None:
    lines = screen("idle_after_turn").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("● Created made.txt."))
    lines[at : at + 1] = ["● First line.", "  Second line.", "", "  - a bullet"]
    assert claude_screen_reply(lines) == Extracted("First line.\nSecond line.\n\n- a bullet")

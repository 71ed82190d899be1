"""The session watcher (session/watcher.py): its rules on their own, with no PTY.

First, the claude-interactive profile over every one of the real CLI's screens in
tests/fixtures/claude/: what a session decides on each (the watcher is shown the profile's last
``pattern_lines`` non-blank lines, as AgentSession shows it the screen). A Claude Code release
that moves its screens fails here instead of hanging sessions; recapture with
``.venv/bin/python -m tests.fixtures.claude.capture`` and compare. Then each rule: settling,
re-checks, readiness for the prompt, the quiet period, unblocking, and how a session ended.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import attrs
import pytest

from cis_bot.session.detect import BlockRule
from cis_bot.session.events import SessionState
from cis_bot.session.output import Extracted, claude_screen_reply
from cis_bot.session.profile import AgentProfile, PromptVia
from cis_bot.session.profiles import BUILTIN_PROFILES
from cis_bot.session.watcher import (
    Block,
    Evaluation,
    Screen,
    TurnOver,
    TypePrompt,
    Unblock,
    Watcher,
    exit_code_of,
    outcome,
)

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


SETTLE = 0.3


def watcher(profile: AgentProfile = PROFILE, now: float = 0.0) -> Watcher:
    return Watcher(profile, settle_secs=SETTLE, settle_max_secs=2.0, tty_poll_max_secs=2.0, now=now)


def decide(text: str) -> tuple[Verdict, str | None]:
    """What a session decides once the screen has settled after the agent drew it."""
    w = watcher()
    assert w.output(0.0) is None
    assert w.settle_check(SETTLE) is None
    decision = w.evaluate(Screen(bottom_lines(text)), SETTLE).decision
    match decision:
        case Block(blocked=blocked):
            assert blocked.rule is BlockRule.PROMPT
            return Verdict.BLOCKED, blocked.reason
        case TurnOver(shown=shown):
            return Verdict.TURN_OVER, shown
        case None:
            return Verdict.RUNNING, None
    raise AssertionError(f"unexpected decision {decision!r}")


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


# --- the rules, one by one ----------------------------------------------------------------------

SHELL = BUILTIN_PROFILES["shell"]
YES_NO = attrs.evolve(SHELL, blocked_patterns=BUILTIN_PROFILES["aider"].blocked_patterns)


def test_a_screen_that_blocks_blocks_once_and_clears_when_it_goes() -> None:
    w = watcher(YES_NO)
    w.output(0.0)
    asking = Screen(["Overwrite a.txt? [y/N]"])
    first = w.evaluate(asking, 1.0).decision
    assert isinstance(first, Block) and first.blocked.reason == 'prompt: "Overwrite a.txt? [y/N]"'
    assert w.evaluate(asking, 2.0).decision is None  # the same question: no second notice
    w.output(3.0)  # the question stays up (a prompt is only cleared by what the screen shows)
    assert w.blocked is not None
    assert w.evaluate(Screen(["writing a.txt"]), 4.0).decision == Unblock("no longer waiting")


def test_patterns_see_only_output_since_the_last_input() -> None:
    w = watcher(YES_NO)
    w.output(0.0)
    assert isinstance(w.evaluate(Screen(["Continue? [y/N]"]), 1.0).decision, Block)
    assert w.input(2.0) == Unblock("input")
    # The answered question is still on the last line until the agent writes more.
    assert w.evaluate(Screen(["Continue? [y/N] y"]), 3.0).decision is None


def test_the_settle_check_waits_for_quiet_but_not_past_the_maximum() -> None:
    w = watcher(SHELL)
    w.output(0.0)
    assert w.settle_check(0.1) == SETTLE  # quiet for settle_secs after the last output
    w.output(0.2)
    assert w.settle_check(0.3) == 0.2 + SETTLE
    for t in (0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8):  # a spinner: output keeps coming
        w.output(t)
    assert w.settle_check(1.9) == 2.0  # the first unchecked output was at 0.0
    assert w.settle_check(2.0) is None
    assert w.settle_check(2.05) == 1.8 + SETTLE  # the next round waits for quiet again


def test_a_tty_read_blocks_and_quiet_agents_are_rechecked_with_backoff() -> None:
    w = watcher(SHELL)
    w.tty_probe = True
    w.output(0.0)
    waiting = w.evaluate(Screen(["Name:"], reading_tty=True), 1.0)
    assert isinstance(waiting.decision, Block)
    assert waiting.decision.blocked.reason == 'waiting for input on the terminal: "Name:"'
    assert waiting.recheck_in == 2 * SETTLE
    assert w.evaluate(Screen(["Name:"]), 2.0).recheck_in == 4 * SETTLE
    assert w.evaluate(Screen(["Name:"]), 3.0).recheck_in == 2.0  # capped
    assert w.poll_check(3.0 + SETTLE / 2) is None  # quiet since 0.0: look now
    w.output(5.0)
    assert w.poll_check(5.1) == SETTLE  # output since: the settle check leads
    assert watcher(SHELL).evaluate(Screen(["x"]), 1.0).recheck_in is None  # no probe: no polls


def test_the_quiet_period_blocks_and_any_output_ends_it() -> None:
    w = watcher(attrs.evolve(SHELL, quiet_secs=5.0))
    w.output(1.0)
    assert w.quiet_due() == 6.0
    quiet = w.quiet("thinking...")
    assert isinstance(quiet, Block) and quiet.blocked.rule is BlockRule.QUIET
    assert quiet.blocked.reason == 'no output for 5s; last line: "thinking..."'
    assert w.quiet("thinking...") is None  # already blocked
    # A settle check finds nothing, and does not undo the quiet rule.
    assert w.evaluate(Screen(["thinking..."]), 7.0).decision is None
    assert w.output(8.0) == Unblock("new output")
    assert w.quiet_due() == 13.0
    assert watcher(SHELL).quiet_due() is None


def test_the_prompt_is_typed_once_the_agent_is_ready() -> None:
    pty = attrs.evolve(SHELL, prompt_via=PromptVia.PTY)
    w = watcher(pty)
    assert w.evaluate(Screen([]), 1.0) == Evaluation(None, 2 * SETTLE)  # nothing drawn yet
    w.output(1.0)
    assert w.evaluate(Screen(["$"]), 1.1).decision is None  # output, not settled yet
    assert w.evaluate(Screen(["$"]), 1.0 + SETTLE).decision == TypePrompt()
    assert not w.prompt_pending
    assert w.prompt_typed(2.0) is None
    # A reader of the terminal is ready at once; a ready_pattern overrules both.
    assert watcher(pty).evaluate(Screen([], reading_tty=True), 0.0).decision == TypePrompt()
    patterned = watcher(attrs.evolve(pty, ready_pattern=r"^> $"))
    patterned.output(0.0)
    assert patterned.evaluate(Screen(["loading"], reading_tty=True), 9.0).decision is None
    assert patterned.evaluate(Screen(["> "]), 9.0).decision == TypePrompt()
    # With a quiet period, its end types the prompt too.
    quiet = watcher(attrs.evolve(pty, quiet_secs=2.0))
    assert quiet.quiet(None) == TypePrompt()


def test_an_idle_agent_without_exit_input_is_blocked_with_exit_input_its_turn_is_over() -> None:
    idle = attrs.evolve(SHELL, idle_patterns=(r"^ready>",))
    w = watcher(idle)
    w.output(0.0)
    blocked = w.evaluate(Screen(["ready>"]), 1.0).decision
    assert isinstance(blocked, Block) and blocked.blocked.rule is BlockRule.IDLE
    w = watcher(attrs.evolve(idle, exit_input="/exit\r"))
    w.output(0.0)
    assert w.evaluate(Screen(["ready>"]), 1.0) == Evaluation(TurnOver("ready>"), None)
    assert w.turn_over and w.quiet_due() is None
    assert w.evaluate(Screen(["ready>"]), 2.0).decision is None  # decided once


def test_an_invalid_pattern_is_named() -> None:
    with pytest.raises(ValueError, match=r"invalid blocked pattern '\[unclosed'"):
        watcher(attrs.evolve(SHELL, idle_patterns=("[unclosed",)))


@pytest.mark.parametrize(
    ("exit_code", "kw", "expected"),
    [
        (0, {}, (SessionState.COMPLETED, 0, None)),
        (3, {}, (SessionState.FAILED, 3, "exited with status 3")),
        (-9, {}, (SessionState.FAILED, -9, "killed by SIGKILL")),
        (None, {}, (SessionState.FAILED, None, "exit status unavailable (reaped elsewhere)")),
        (-15, {"killed": SessionState.TIMEOUT, "kill_reason": "too slow"},
         (SessionState.TIMEOUT, -15, "too slow")),
        (127, {"spawn_failure": "cannot execute 'x'"},
         (SessionState.FAILED, 127, "cannot execute 'x'")),
        (-15, {"exit_overdue": True}, (SessionState.COMPLETED, -15, None)),
    ],
)  # fmt: skip
def test_outcome(exit_code: int | None, kw: dict[str, object], expected: object) -> None:
    assert outcome(exit_code, **kw) == expected  # type: ignore[arg-type]


def test_exit_code_of_a_wait_status() -> None:
    assert exit_code_of(None) is None
    assert exit_code_of(-1) is None
    assert exit_code_of(3 << 8) == 3
    assert exit_code_of(9) == -9

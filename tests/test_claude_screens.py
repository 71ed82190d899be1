"""Claude Code screen patterns against the real CLI's screens kept in tests/fixtures/claude/."""

from __future__ import annotations

from pathlib import Path

import pytest

from cis_bot.testing.claude_screens import (
    API_RETRYING,
    IDLE,
    IDLE_MANUAL_FOOTER,
    PERMISSION_PROMPT,
    SETUP_DIALOGS,
    TURN_DONE,
    WORKING,
    Reading,
    ScreenState,
    api_error,
    bottom,
    permission_question,
    read_screen,
    screen_text,
)

FIXTURES = Path(__file__).parent / "fixtures" / "claude"

#: What each captured screen is. A new fixture needs an entry here.
EXPECTED: dict[str, Reading] = {
    "onboarding_theme": Reading(ScreenState.SETUP, dialog="onboarding"),
    "onboarding_offline": Reading(ScreenState.SETUP, dialog="onboarding_offline"),
    "trust_dialog": Reading(ScreenState.SETUP, dialog="trust_folder"),
    "api_key_question": Reading(ScreenState.SETUP, dialog="api_key"),
    "auto_mode_offer": Reading(ScreenState.SETUP, dialog="auto_mode_offer"),
    "bypass_warning": Reading(ScreenState.SETUP, dialog="bypass_permissions"),
    "idle": Reading(ScreenState.IDLE),
    "idle_auto_mode": Reading(ScreenState.IDLE),
    "idle_bypass_mode": Reading(ScreenState.IDLE),
    "typed": Reading(ScreenState.IDLE),
    "idle_after_turn": Reading(ScreenState.IDLE),
    "api_error": Reading(ScreenState.IDLE),
    "working": Reading(ScreenState.WORKING),
    "api_error_retrying": Reading(ScreenState.WORKING),
    "permission_bash": Reading(ScreenState.PERMISSION),
    "permission_write": Reading(ScreenState.PERMISSION),
}


def screen(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")


def test_every_fixture_has_an_expectation() -> None:
    on_disk = {p.stem for p in FIXTURES.glob("*.txt")}
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_read_screen_classifies_each_fixture(name: str) -> None:
    reading = read_screen(screen(name))
    expected = EXPECTED[name]
    assert (reading.state, reading.dialog) == (expected.state, expected.dialog)
    if reading.state in (ScreenState.SETUP, ScreenState.PERMISSION):
        assert reading.reason
    else:
        assert reading.reason is None


def _fires(pattern_name: str, name: str) -> bool:
    pattern = {"permission": PERMISSION_PROMPT, "working": WORKING, "idle": IDLE}[pattern_name]
    return pattern.search(bottom(screen(name))) is not None


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize(
    ("pattern_name", "state"),
    [
        ("permission", ScreenState.PERMISSION),
        ("working", ScreenState.WORKING),
        ("idle", ScreenState.IDLE),
    ],
)
def test_each_state_pattern_fires_on_its_screens_only(
    pattern_name: str, state: ScreenState, name: str
) -> None:
    """Each regex alone, on the bottom lines, as a profile's pattern list would apply it."""
    assert _fires(pattern_name, name) == (EXPECTED[name].state == state)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_setup_dialog_patterns_fire_on_their_own_screen_only(name: str) -> None:
    fired = {key for key, pattern in SETUP_DIALOGS.items() if pattern.search(screen(name))}
    expected = {EXPECTED[name].dialog} if EXPECTED[name].dialog else set()
    assert fired == expected


def test_manual_footer_marks_manual_mode_idle_with_an_empty_box() -> None:
    with_footer = {name for name in EXPECTED if IDLE_MANUAL_FOOTER.search(bottom(screen(name)))}
    assert with_footer == {"idle", "idle_after_turn", "api_error"}


def test_permission_reason_quotes_the_question_and_its_options() -> None:
    bash = read_screen(screen("permission_bash")).reason
    assert bash is not None
    assert "Bash command" in bash
    assert "echo hi > made.txt" in bash
    assert "Do you want to proceed? | 1. Yes |" in bash
    assert bash.endswith("4. No")
    write = permission_question(screen("permission_write"))
    assert write is not None
    assert "Do you want to create notes.txt? | 1. Yes" in write
    assert write.endswith("3. No")


def test_setup_reason_quotes_the_dialog() -> None:
    reason = read_screen(screen("trust_dialog")).reason
    assert reason is not None
    assert reason.startswith("Accessing workspace:")
    assert "No, exit | Yes, I trust this folder" in reason
    key = read_screen(screen("api_key_question")).reason
    assert key is not None
    assert "Do you want to use this API key? | Yes | No (recommended)" in key


def test_api_error_joins_the_wrapped_message() -> None:
    message = api_error(screen("api_error"))
    assert message is not None
    assert message.startswith("API Error: 500 Internal server error.")
    assert "try again in a moment. If it persists" in message  # the wrapped line, joined
    assert all(api_error(screen(name)) is None for name in EXPECTED if name != "api_error")


def test_retry_progress_is_readable() -> None:
    found = API_RETRYING.search(screen("api_error_retrying"))
    assert found is not None
    assert found.groups() == ("1", "1")
    assert all(
        API_RETRYING.search(screen(name)) is None
        for name in EXPECTED
        if name != "api_error_retrying"
    )


def test_turn_done_lines_count_finished_turns() -> None:
    counts = {name: len(TURN_DONE.findall(screen(name))) for name in EXPECTED}
    assert counts["idle"] == 0
    assert counts["working"] == 0
    assert counts["idle_after_turn"] == 1
    assert counts["permission_write"] == 1
    # The failed third turn prints an API error, not a done line.
    assert counts["api_error"] == 2


def test_model_text_that_looks_like_a_prompt_does_not_block() -> None:
    """A reply quoting a permission question, or saying "esc to interrupt", stays idle."""
    lines = screen("idle_after_turn").splitlines()
    box = next(i for i, line in enumerate(lines) if line.startswith("─"))
    reply = [
        "● Before I go on:",
        "  Do you want to proceed?",
        "  1. Yes",
        "  2. No",
        "  (press esc to interrupt me at any time)",
    ]
    text = "\n".join(lines[:box] + reply + lines[box:])
    assert read_screen(text).state == ScreenState.IDLE
    assert PERMISSION_PROMPT.search(bottom(text)) is None
    assert WORKING.search(bottom(text)) is None


def test_bottom_keeps_the_last_non_blank_lines() -> None:
    assert bottom("a\n\n b \n\n\nc\n\n", lines=2) == " b\nc"
    assert screen_text(["x  ", "", "y ", "   "]) == "x\n\ny"

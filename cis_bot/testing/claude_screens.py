"""What Claude Code's interactive screen says, read from its text as a terminal emulator renders it.

Patterns measured on Claude Code 2.1.332 at 120x40 (pyte); the screens they were tuned on are kept
in ``tests/fixtures/claude/`` and checked by ``tests/test_claude_screens.py``, so a CLI release that
moves them fails a test instead of hanging a session. They are the proposal for the interactive
``claude`` profile's blocked / working / idle detection.

Apply them to the screen's last non-blank lines (:func:`bottom`): Claude Code draws its prompt box,
its footer and its permission questions at the bottom, and its transcript above them may contain
anything the model wrote.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping

#: How many non-blank bottom lines the patterns need: a permission question with four options
#: and its footer take 7; the idle box and footer 4.
BOTTOM_LINES = 12

#: A tool waits for approval: "Do you want to proceed?" (Bash), "Do you want to create X?"
#: (Write), "Do you want to make this edit to X?" (Edit), followed by numbered options of which the
#: first is "1. Yes", and the panel's "Esc to cancel" footer as the last line (so a model that
#: writes such a question in its reply does not match). Typing ``1`` or Enter approves (Enter
#: takes the highlighted option, 1 at first); Esc refuses.
PERMISSION_PROMPT = re.compile(
    r"(?m)^ *Do you want to .+\?\n(?: *\n)?\s*(?:❯\s*)?1\. Yes\b[\s\S]*^ *Esc to cancel\b.*\s*\Z"
)

#: A turn is running: the footer under the prompt box (the last line) says how to interrupt it,
#: in every permission mode.
WORKING = re.compile(r"(?m)^ .*\besc to interrupt\b.*\s*\Z")

#: Waiting for the next message: the prompt box (a ``❯`` line closed by a rule) with a footer that
#: does not offer to interrupt. Holds in every permission mode; in manual mode the footer also
#: reads "? for shortcuts" (see :data:`IDLE_MANUAL_FOOTER`) unless text is typed in the box.
IDLE = re.compile(r"(?m)^❯.*\n─{20,}\n(?![\s\S]*\besc to interrupt\b)[\s\S]*\Z")

#: The manual-mode idle footer; missing in auto and bypass modes and while the box holds text.
IDLE_MANUAL_FOOTER = re.compile(r"\? for shortcuts")

#: The line Claude Code prints under a finished turn: "✻ Crunched for 4s · done 9:19 PM". A turn
#: that ends on an API error prints :data:`API_ERROR` instead.
TURN_DONE = re.compile(r"(?m)^\S \w+ for (?:\d+[hms] ?)+· done\b")

#: A turn that failed on the API (after Claude Code's own retries): the message, whose continuation
#: lines are indented by two spaces, and the idle prompt comes back.
API_ERROR = re.compile(r"(?m)^● (API Error: .*(?:\n  \S.*)*)")

#: While Claude Code retries (with the working footer): "✻ API error · retrying in 1s · attempt
#: 1/2", or with the status text: "✻ 500 Internal server error · retrying in 1s · attempt 1/1".
API_RETRYING = re.compile(r"· retrying in \S+ · attempt (\d+)/(\d+)")

#: Screens that appear before the prompt when HOME is not prepared (see claude_home.py). Each
#: waits for a key press and none of them is the agent's work, so each means blocked.
SETUP_DIALOGS: Mapping[str, re.Pattern[str]] = {
    # No hasCompletedOnboarding: the onboarding starts with a theme picker (bearer token), or
    # with a check of api.anthropic.com that fails offline (API key).
    "onboarding": re.compile(r"Choose the text style that looks best with your terminal"),
    "onboarding_offline": re.compile(r"Unable to connect to Anthropic services"),
    # The work dir is not in projects.<dir>.hasTrustDialogAccepted; the default answer exits.
    "trust_folder": re.compile(r"Yes, I trust this folder"),
    # ANTHROPIC_API_KEY not in customApiKeyResponses.approved; the default answer is No.
    "api_key": re.compile(r"Do you want to use this API key\?"),
    # permissions.defaultMode set to a mode other than auto, and no hasSeenAutoDefaultNudge.
    "auto_mode_offer": re.compile(r"Make auto mode your default permission mode\?"),
    # --dangerously-skip-permissions without skipDangerousModePermissionPrompt.
    "bypass_permissions": re.compile(r"Claude Code running in Bypass Permissions mode"),
}


class ScreenState(StrEnum):
    SETUP = "setup"
    PERMISSION = "permission"
    WORKING = "working"
    IDLE = "idle"
    #: Starting, exiting, or a screen these patterns do not know.
    UNKNOWN = "unknown"


@attrs.frozen
class Reading:
    state: ScreenState
    #: For SETUP and PERMISSION: the question as shown, to quote in a "blocked" reason.
    reason: str | None = None
    #: For SETUP: which dialog (a key of :data:`SETUP_DIALOGS`).
    dialog: str | None = None


def screen_text(lines: list[str]) -> str:
    """Join rendered screen rows (e.g. ``pyte.Screen.display``) without trailing blanks."""
    return "\n".join(line.rstrip() for line in lines).rstrip("\n")


def bottom(text: str, lines: int = BOTTOM_LINES) -> str:
    """The last ``lines`` non-blank lines of a screen."""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def read_screen(text: str) -> Reading:
    """Classify a rendered screen. Dialogs are checked on the whole screen (they are drawn at the
    top); the permission, working and idle states on its bottom lines only."""
    for name, pattern in SETUP_DIALOGS.items():
        found = pattern.search(text)
        if found:
            return Reading(ScreenState.SETUP, reason=_panel(text, found.start()), dialog=name)
    tail = bottom(text)
    if PERMISSION_PROMPT.search(tail):
        return Reading(ScreenState.PERMISSION, reason=permission_question(text))
    if WORKING.search(tail):
        return Reading(ScreenState.WORKING)
    if IDLE.search(tail):
        return Reading(ScreenState.IDLE)
    return Reading(ScreenState.UNKNOWN)


def permission_question(text: str) -> str | None:
    """The permission panel as one line: what the tool wants, the question and its options."""
    questions = list(re.finditer(r"(?m)^ *Do you want to .+\?$", text))
    return _panel(text, questions[-1].start()) if questions else None


def api_error(text: str) -> str | None:
    """The last "API Error: ..." message on the screen, its wrapped lines joined."""
    found = API_ERROR.findall(text)
    if not found:
        return None
    return " ".join(part.strip() for part in found[-1].splitlines())


def _is_rule(line: str, char: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 20 and set(stripped) == {char}


def _panel(text: str, offset: int, limit: int = 600) -> str:
    """The panel holding ``offset`` as one line: from the full-width rule above it (dialogs and
    permission prompts open with one) to its "Esc to cancel" footer, decorations left out."""
    lines = text.splitlines()
    at = text.count("\n", 0, offset)
    start = next((i + 1 for i in range(at, -1, -1) if _is_rule(lines[i], "─")), 0)
    parts: list[str] = []
    for line in lines[start:]:
        stripped = line.strip().lstrip("❯").strip()
        if "Esc to cancel" in stripped:
            break
        # Keep words; skip rules, banners of block characters and blank lines.
        if any(c.isalpha() for c in stripped) and not _is_rule(line, "╌"):
            parts.append(stripped)
    return " | ".join(parts)[:limit]

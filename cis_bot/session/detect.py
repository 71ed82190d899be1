"""Blocked detection: is the agent waiting for a person?

Three rules, each configured per profile, evaluated by ``AgentSession`` once output has settled:

1. ``blocked_patterns``: regexes over the last lines of what the terminal shows. For TUI agents
   (``screen = true``) the output is rendered through a terminal emulator (pyte) so the lines are
   the screen a person would see; otherwise they are the plain-text tail. ``idle_patterns`` are
   read the same way: the agent's turn is over (the session then types the profile's
   ``exit_input``, or reports the agent as blocked when it has none).
2. ``quiet_secs``: no output for that long while the process is alive.
3. ``detect_tty_read``: the kernel says the PTY's foreground process group waits in ``read()`` on
   this PTY (``procfs.TtyReadProbe``).

What the rules decide is ``watcher.py``'s; this module holds their pure parts: the reasons, the
pattern matching, and the views of what the terminal shows.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

import attrs

from cis_bot.session.output import terminal_text

if TYPE_CHECKING:
    from collections.abc import Sequence


class BlockRule(StrEnum):
    PROMPT = "prompt"
    #: The profile's idle_patterns matched and it has no exit_input.
    IDLE = "idle"
    TTY_READ = "tty-read"
    QUIET = "quiet"


@attrs.frozen
class Blocked:
    rule: BlockRule
    #: Says which rule fired and quotes the line that shows it.
    reason: str


_BOX = "".join(chr(c) for c in range(0x2500, 0x2580)) + "|"
_SPACES = re.compile(r"\s{2,}")


def tidy(line: str) -> str:
    """A screen line as a person would quote it: without the window border around it, and with
    runs of padding collapsed."""
    stripped = line.strip()
    if stripped and (stripped[0] in _BOX or stripped[-1] in _BOX):
        line = stripped.strip(_BOX).strip()
    return _SPACES.sub(" ", line)


def quote(line: str, limit: int = 200) -> str:
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return '"' + line.replace("\\", "\\\\").replace('"', '\\"') + '"'


def shown_text(text: str) -> str:
    """Matched screen text as one line: each line tidied, lines without a letter or digit (rules,
    borders) left out, the rest joined with " | "."""
    lines = (tidy(line).strip() for line in text.split("\n"))
    return " | ".join(line for line in lines if any(c.isalnum() for c in line))


def prompt_blocked(text: str) -> Blocked:
    return Blocked(BlockRule.PROMPT, f"prompt: {quote(shown_text(text))}")


def idle_blocked(text: str) -> Blocked:
    return Blocked(
        BlockRule.IDLE, f"idle: the agent finished its turn and waits: {quote(shown_text(text))}"
    )


def tty_read_blocked(last_line: str | None) -> Blocked:
    shown = f": {quote(tidy(last_line))}" if last_line else ""
    return Blocked(BlockRule.TTY_READ, f"waiting for input on the terminal{shown}")


def quiet_blocked(quiet_secs: float, last_line: str | None) -> Blocked:
    shown = f"; last line: {quote(tidy(last_line))}" if last_line else ""
    return Blocked(BlockRule.QUIET, f"no output for {quiet_secs:g}s{shown}")


def compile_patterns(patterns: Sequence[str]) -> tuple[re.Pattern[str], ...]:
    """Compile a profile's regexes; a bad one raises ValueError naming it."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"invalid blocked pattern {pattern!r}: {e}") from None
    return tuple(compiled)


def find_prompt(patterns: Sequence[re.Pattern[str]], lines: Sequence[str]) -> str | None:
    """What to quote of the lowest (most recent) line one of ``patterns`` matches; failing that,
    of the last match of a pattern in the lines joined with newlines (a ``(?m)`` pattern can
    describe a whole panel). The quote is the match's ``quote`` group when it has one, else the
    matched line, or the matched text for a match across lines."""
    for line in reversed(lines):
        for pattern in patterns:
            found = pattern.search(line)
            if found:
                return _quoted(found, line)
    text = "\n".join(lines)
    for pattern in patterns:
        matches = list(pattern.finditer(text))
        if matches:
            return _quoted(matches[-1], matches[-1].group(0))
    return None


def find_idle(patterns: Sequence[re.Pattern[str]], lines: Sequence[str]) -> tuple[str, str] | None:
    """Like :func:`find_prompt`, with the text above the match: (quote, what is above it). A
    screen whose turn-over line has the same text above it as before is still the old turn."""
    for i in range(len(lines) - 1, -1, -1):
        for pattern in patterns:
            found = pattern.search(lines[i])
            if found:
                return _quoted(found, lines[i]), "\n".join(lines[:i])
    text = "\n".join(lines)
    for pattern in patterns:
        matches = list(pattern.finditer(text))
        if matches:
            last = matches[-1]
            return _quoted(last, last.group(0)), text[: last.start()]
    return None


def _quoted(found: re.Match[str], default: str) -> str:
    if "quote" in found.re.groupindex and found.group("quote") is not None:
        return found.group("quote")
    return default


class TerminalView(Protocol):
    """What the terminal shows, fed with the raw output."""

    def feed(self, data: bytes) -> None: ...

    def last_lines(self, count: int) -> list[str]:
        """The last ``count`` non-empty lines, oldest first."""
        ...

    def resize(self, rows: int, cols: int) -> None: ...


class TextView:
    """Plain-text view for line-oriented CLIs: the tail of the output, escapes stripped."""

    def __init__(self, keep_bytes: int = 16 * 1024) -> None:
        self._keep = keep_bytes
        self._buf = bytearray()
        self._truncated = False

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > 2 * self._keep:
            del self._buf[: -self._keep]
            self._truncated = True

    def last_lines(self, count: int) -> list[str]:
        text = terminal_text(bytes(self._buf[-self._keep :]), truncated=self._truncated)
        lines = [line for line in text.split("\n") if line.strip()]
        return lines[-count:]

    def resize(self, rows: int, cols: int) -> None:
        pass


class ScreenView:
    """A rendered screen (pyte) for full-screen TUI agents.

    Output is queued and fed to the emulator when the screen is looked at, or once a little has
    queued up: pyte renders about 1 MB/s, so feeding in small steps keeps each step short.
    """

    def __init__(self, rows: int, cols: int, *, feed_threshold: int = 8 * 1024) -> None:
        import pyte  # only TUI profiles pay for the emulator

        self._screen = pyte.Screen(cols, rows)
        self._stream = pyte.ByteStream(self._screen)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._threshold = feed_threshold

    def feed(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self._threshold:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._stream.feed(data)

    def display(self) -> list[str]:
        self._flush()
        return [line.rstrip() for line in self._screen.display]

    def last_lines(self, count: int) -> list[str]:
        return [line for line in self.display() if line.strip()][-count:]

    def resize(self, rows: int, cols: int) -> None:
        self._flush()
        self._screen.resize(rows, cols)

"""A transcript as a person reads it: what ``cis dag logs`` prints and the chat's ``logs`` shows.

A transcript holds the raw bytes an agent wrote to its terminal. For most agents the readable form
is the terminal's text (escapes stripped, carriage returns applied). Claude Code's print mode
writes stream-json instead, one JSON event per line: the session's start, the assistant's text
and tool calls, the tool results, the final result with its cost. Those lines are rendered as the
conversation they describe; any other line is kept as text, so a transcript that mixes both (an
error printed before the stream began) loses nothing.

``readable(raw)`` renders a whole transcript; ``ReadableLines`` renders one line at a time, for
output that is followed as it comes. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cis_bot.session.output import terminal_text

#: A tool result or a thinking block shows at most this many lines, each at most LINE_CHARS.
RESULT_LINES = 8
LINE_CHARS = 300
#: Tool inputs are summed up in at most this many characters.
INPUT_CHARS = 200

#: The ``type`` of each stream-json event Claude Code writes.
STREAM_JSON_TYPES = frozenset({"system", "assistant", "user", "result", "stream_event"})

#: For well-known tools, the input that says what the call does (else: all of it, clipped).
_MAIN_INPUT = {
    "Bash": "command",
    "Read": "file_path",
    "Write": "file_path",
    "Edit": "file_path",
    "MultiEdit": "file_path",
    "NotebookEdit": "notebook_path",
    "Glob": "pattern",
    "Grep": "pattern",
    "WebFetch": "url",
    "WebSearch": "query",
    "Task": "description",
}


def readable(raw: bytes, *, truncated: bool = False, prompt: str | None = None) -> str:
    """The transcript as text for people (see the module docstring). ``truncated``: ``raw``
    starts mid-stream (its first line is dropped). ``prompt``: the prompt the agent was given,
    shown first when known (print mode takes it as an argument, so the stream lacks it)."""
    lines = ReadableLines(prompt=prompt)
    rendered = [*lines.feed_lines(terminal_text(raw, truncated=truncated).split("\n"))]
    return "\n".join(rendered)


def is_stream_json_event(line: str) -> dict[str, Any] | None:
    """The event a stream-json line holds, or None when the line is something else."""
    stripped = line.strip()
    if not stripped.startswith("{"):
        return None
    try:
        event = json.loads(stripped)
    except ValueError:
        return None
    if isinstance(event, dict) and event.get("type") in STREAM_JSON_TYPES:
        return event
    return None


class ReadableLines:
    """Renders a transcript's text one line at a time (it remembers nothing but the prompt)."""

    def __init__(self, *, prompt: str | None = None) -> None:
        self._prompt = prompt

    def feed_lines(self, lines: Iterable[str]) -> Iterable[str]:
        for line in lines:
            yield from self.feed(line)

    def feed(self, line: str) -> list[str]:
        """The readable lines for one line of the transcript's text."""
        event = is_stream_json_event(line)
        if event is None:
            return [line]
        out = render_event(event)
        if self._prompt is not None and event.get("type") == "system":
            out += _block("▶ ", self._prompt)
            self._prompt = None
        return out


def render_event(event: Mapping[str, Any]) -> list[str]:
    """One stream-json event as readable lines (none for the events people need not see)."""
    kind = event.get("type")
    if kind == "system":
        return _system(event)
    if kind == "assistant":
        return _message_blocks(event, assistant=True)
    if kind == "user":
        return _message_blocks(event, assistant=False)
    if kind == "result":
        return _result(event)
    return []  # stream_event: partial deltas, repeated by the whole message after them


def _system(event: Mapping[str, Any]) -> list[str]:
    subtype = _text(event.get("subtype"))
    if subtype != "init":
        return [f"── {subtype or 'system'}"]
    parts = ["Claude Code"]
    if version := _text(event.get("claude_code_version")):
        parts[0] += f" {version}"
    if model := _text(event.get("model")):
        parts.append(model)
    if cwd := _text(event.get("cwd")):
        parts.append(f"in {cwd}")
    return [f"── {' · '.join(parts)}"]


def _message_blocks(event: Mapping[str, Any], *, assistant: bool) -> list[str]:
    message = event.get("message")
    content = message.get("content") if isinstance(message, Mapping) else None
    if isinstance(content, str):
        return _block("● " if assistant else "▶ ", content)
    out: list[str] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text":
            out += _block("● " if assistant else "▶ ", _text(block.get("text")))
        elif kind == "thinking":
            out += _clipped("✻ ", _text(block.get("thinking")))
        elif kind == "tool_use":
            out.append(f"⚙ {_text(block.get('name')) or 'tool'}({_tool_input(block)})")
        elif kind == "tool_result":
            error = block.get("is_error") is True
            out += _clipped("  ⎿ error: " if error else "  ⎿ ", _result_text(block))
    return out


def _result(event: Mapping[str, Any]) -> list[str]:
    failed = event.get("is_error") is True or _text(event.get("subtype")) not in ("", "success")
    facts = [_text(event.get("subtype")) or ("error" if failed else "success")]
    turns = event.get("num_turns")
    if isinstance(turns, int) and not isinstance(turns, bool):
        facts.append(f"{turns} turn{'s' if turns != 1 else ''}")
    duration = event.get("duration_ms")
    if isinstance(duration, int | float) and not isinstance(duration, bool):
        facts.append(f"{duration / 1000:.1f}s")
    cost = event.get("total_cost_usd")
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        facts.append(f"${cost:.4f}")
    out = [f"{'✘' if failed else '✔'} result: {' · '.join(facts)}"]
    text = _text(event.get("result"))
    if text:
        out += _block("  ", text)
    return out


def _tool_input(block: Mapping[str, Any]) -> str:
    given = block.get("input")
    if not isinstance(given, Mapping) or not given:
        return ""
    main = _MAIN_INPUT.get(_text(block.get("name")))
    if main and isinstance(given.get(main), str):
        shown = given[main]
    else:
        shown = json.dumps(given, ensure_ascii=False, separators=(",", ":"))
    shown = " ".join(shown.split())
    return shown if len(shown) <= INPUT_CHARS else shown[: INPUT_CHARS - 1] + "…"


def _result_text(block: Mapping[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    parts = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, Mapping):
            if part.get("type") == "text":
                parts.append(_text(part.get("text")))
            elif isinstance(part.get("type"), str):
                parts.append(f"[{part['type']}]")
    return "\n".join(parts)


def _block(lead: str, text: str) -> list[str]:
    """``text`` with ``lead`` before its first line and the rest indented to match."""
    lines = text.rstrip("\n").split("\n") if text else []
    pad = " " * len(lead)
    return [f"{lead if i == 0 else pad}{line}" for i, line in enumerate(lines)]


def _clipped(lead: str, text: str) -> list[str]:
    """Like ``_block``, at most RESULT_LINES lines of at most LINE_CHARS characters."""
    lines = [_cut(line) for line in (text.rstrip("\n").split("\n") if text else [""])]
    shown: Sequence[str] = lines
    if len(lines) > RESULT_LINES:
        shown = [*lines[:RESULT_LINES], f"… (+{len(lines) - RESULT_LINES} lines)"]
    return _block(lead, "\n".join(shown))


def _cut(line: str) -> str:
    return line if len(line) <= LINE_CHARS else line[: LINE_CHARS - 1] + "…"


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""

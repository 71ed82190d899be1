"""Turning raw terminal output into text, and a task's output from its transcript.

Extractors are looked up by the profile's ``output`` name in ``EXTRACTORS``; add one with
``register_extractor``. Each gets the end of the raw output (and the transcript path, for one that
needs more) and returns the task's output, plus an error when the output says the task failed
although the process exited 0.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs

from cis_bot.session.profiles import session_uuid

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

#: The text extractor keeps this much of the end of the output (UTF-8 bytes).
TEXT_OUTPUT_LIMIT = 64 * 1024

# ESC-based sequences: CSI (with private/intermediate bytes), OSC (ended by BEL or ST),
# DCS/SOS/PM/APC strings (ended by ST), charset designations, and the remaining two-byte escapes;
# plus 8-bit CSI. A sequence cut off at the end of the data is dropped too.
_ESCAPES = re.compile(
    r"""
      \x1b\[[0-?]*[ -/]*[@-~]
    | \x9b[0-?]*[ -/]*[@-~]
    | \x1b\][^\x07\x1b]*(?:\x07|\x1b\\|$)
    | \x1b[PX^_][^\x1b]*(?:\x1b\\|$)
    | \x1b[()*+\-./][ -~]
    | \x1b\[[0-?]*[ -/]*$
    | \x1b[ -/]*[0-~]
    | \x1b$
    """,
    re.VERBOSE,
)
# Control characters that carry no text once escapes are gone (keeps \t, \n, \r for later).
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x80-\x9f]")
_CR_BEFORE_LF = re.compile(r"\r+\n")


def strip_escapes(text: str) -> str:
    """Remove terminal escape sequences and stray control characters (keeps \\t, \\n, \\r)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def normalise_newlines(text: str) -> str:
    """CR LF -> LF; a bare CR returns to column 0, so later text overwrites earlier text."""
    text = _CR_BEFORE_LF.sub("\n", text)
    if "\r" not in text:
        return text
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            shown = ""
            for segment in line.split("\r"):
                shown = segment + shown[len(segment) :]
            line = shown
        lines.append(line)
    return "\n".join(lines)


def terminal_text(raw: bytes, *, truncated: bool = False) -> str:
    """Plain text of raw terminal output. ``truncated``: ``raw`` starts mid-stream, so its first
    (possibly partial) line is dropped."""
    text = raw.decode("utf-8", errors="replace")
    if truncated:
        newline = text.find("\n")
        text = text[newline + 1 :] if newline >= 0 else ""
    return normalise_newlines(strip_escapes(text))


def last_bytes_of_text(text: str, limit: int) -> str:
    """The end of ``text`` that fits in ``limit`` UTF-8 bytes, cut at a character boundary."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[-limit:].decode("utf-8", errors="ignore")


@attrs.frozen
class ExtractorInput:
    #: The end of the raw output (the whole output when ``complete``).
    raw_tail: bytes
    complete: bool
    transcript_path: Path
    #: The session whose UUID names the agent's conversation (``--session-id``): this session,
    #: or the first session of a conversation that later sessions continue.
    session_id: str = ""
    #: The agent's environment (where an agent keeps its own records: HOME, ...).
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: Screen profiles: the rendered screen when the agent's turn was seen to end (else at exit).
    screen: Sequence[str] | None = None


@attrs.frozen
class Extracted:
    output: str
    #: Set when the output itself says the task failed (overrides a 0 exit status).
    error: str | None = None


class Extractor(Protocol):
    def __call__(self, source: ExtractorInput, /) -> Extracted: ...


def extract_text(source: ExtractorInput) -> Extracted:
    """The transcript as plain text (escapes stripped, newlines normalised), its last 64 KiB."""
    raw = source.raw_tail
    if not source.complete and len(raw) < 4 * TEXT_OUTPUT_LIMIT:
        raw = read_end(source.transcript_path, 4 * TEXT_OUTPUT_LIMIT) or raw
    text = terminal_text(raw, truncated=not source.complete)
    return Extracted(last_bytes_of_text(text.strip("\n"), TEXT_OUTPUT_LIMIT))


def extract_claude_stream_json(source: ExtractorInput) -> Extracted:
    """Claude Code ``--output-format stream-json``: the ``result`` event's text, or an error.

    Without a result event (the CLI died, or the stream was cut) the task failed even if the
    process exited 0; the output is then the plain text, for a person to read.
    """
    text = terminal_text(source.raw_tail, truncated=not source.complete)
    found = _claude_result(text)
    if found is None and not source.complete:
        # The result line may be longer than the in-memory tail: look further back on disk.
        text = terminal_text(
            read_end(source.transcript_path, _STREAM_JSON_LOOKBACK), truncated=True
        )
        found = _claude_result(text)
    if found is not None:
        return found
    plain = last_bytes_of_text(text.strip("\n"), TEXT_OUTPUT_LIMIT)
    return Extracted(plain, "no result event in the agent's stream-json output")


_STREAM_JSON_LOOKBACK = 8 * 1024 * 1024


def read_end(path: Path, limit: int) -> bytes:
    """The last ``limit`` bytes of a file (empty when it cannot be read)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - limit))
            return f.read()
    except OSError:
        return b""


def _claude_result(text: str) -> Extracted | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and '"result"' in line):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("type") != "result":
            continue
        result = event.get("result")
        output = result if isinstance(result, str) else ""
        if event.get("is_error") or str(event.get("subtype", "success")) != "success":
            detail = output or str(event.get("subtype", "error"))
            return Extracted(
                last_bytes_of_text(output, TEXT_OUTPUT_LIMIT), f"agent error: {detail}"
            )
        return Extracted(last_bytes_of_text(output, TEXT_OUTPUT_LIMIT))
    return None


def extract_claude_interactive(source: ExtractorInput) -> Extracted:
    """Claude Code's TUI: the final reply of its turn, or the API error the turn ended on.

    Read from the conversation record Claude Code keeps (``<config dir>/projects/*/<uuid>.jsonl``,
    the UUID given with ``--session-id {session_uuid}``), which holds the reply exactly as the
    model sent it; failing that, from the screen at the end of the turn (markdown rendered, and
    only what fits on the screen).
    """
    record = claude_conversation_record(source.env, source.session_id)
    if record is not None:
        found = _claude_record_reply(record)
        if found is not None:
            return found
    if source.screen:
        found = claude_screen_reply(source.screen)
        if found is not None:
            return found
    plain = extract_text(source).output
    return Extracted(plain, "the agent's turn did not finish (no reply found)")


def claude_config_dir(env: Mapping[str, str]) -> Path | None:
    """Where Claude Code keeps its records in an agent with environment ``env``."""
    if env.get("CLAUDE_CONFIG_DIR"):
        return Path(env["CLAUDE_CONFIG_DIR"])
    home = env.get("HOME") or os.environ.get("HOME")
    return Path(home) / ".claude" if home else None


def claude_conversation_record(env: Mapping[str, str], session_id: str) -> Path | None:
    """The conversation record of the session's ``--session-id {session_uuid}``, if written."""
    config_dir = claude_config_dir(env)
    if config_dir is None or not session_id:
        return None
    found = sorted((config_dir / "projects").glob(f"*/{session_uuid(session_id)}.jsonl"))
    return found[0] if found else None


def _record_entries(path: Path) -> Iterator[dict[str, object]]:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line being written as we read
                if isinstance(entry, dict):
                    yield entry
    except OSError:
        return


def _claude_record_reply(path: Path) -> Extracted | None:
    """The last assistant message of the main conversation: its text, or its API error."""
    last_id: object = None
    texts: list[str] = []
    stop_reason: object = None
    api_error = False
    for entry in _record_entries(path):
        if entry.get("type") != "assistant" or entry.get("isSidechain"):
            continue
        message = entry.get("message")
        if not isinstance(message, dict):
            continue
        # A message streamed as several blocks is recorded as one entry per block.
        if message.get("id") != last_id or last_id is None:
            last_id, texts = message.get("id"), []
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "text":
                texts.append(str(block.get("text", "")))
        stop_reason = message.get("stop_reason")
        api_error = bool(entry.get("isApiErrorMessage"))
    if last_id is None:
        return None
    text = last_bytes_of_text("\n\n".join(t for t in texts if t), TEXT_OUTPUT_LIMIT)
    if api_error:
        return Extracted(text, f"agent error: {text or 'API error'}")
    if stop_reason == "tool_use":
        return Extracted(text, "the agent's turn did not finish (it was waiting on a tool)")
    return Extracted(text)


# The end of a turn on Claude Code's screen: "✻ Worked for 7s · done 9:25 PM".
_CLAUDE_TURN_DONE = re.compile(r"^\S \w+ for (?:\d+[hms] ?)+· done\b")
_CLAUDE_API_ERROR = re.compile(r"^● (API Error: .*)")


def claude_screen_reply(screen: Sequence[str]) -> Extracted | None:
    """The reply above the last "done" line: the last "● " block (its continuation lines are
    indented by two spaces); or the last "● API Error: ..." message, as an error."""
    lines = [line.rstrip() for line in screen]
    for end in range(len(lines) - 1, -1, -1):
        line = lines[end]
        error = _CLAUDE_API_ERROR.match(line)
        if error:
            parts = [error.group(1)]
            parts += [n.strip() for n in _continuation(lines, end + 1)]
            message = " ".join(parts)
            return Extracted(message, f"agent error: {message}")
        if _CLAUDE_TURN_DONE.match(line):
            for start in range(end - 1, -1, -1):
                if lines[start].startswith("● "):
                    body = [lines[start][2:], *(n[2:] for n in _continuation(lines, start + 1))]
                    return Extracted("\n".join(body).strip("\n"))
            return None
    return None


def _continuation(lines: Sequence[str], start: int) -> Iterator[str]:
    for line in lines[start:]:
        if not (line.startswith("  ") or not line.strip()):
            return
        yield line


_EXTRACTORS: dict[str, Extractor] = {
    "text": extract_text,
    "claude-stream-json": extract_claude_stream_json,
    "claude-interactive": extract_claude_interactive,
}


def register_extractor(name: str, extractor: Extractor) -> None:
    _EXTRACTORS[name] = extractor


def extractors() -> Mapping[str, Extractor]:
    """The registered extractors by name (for validating a profile's ``output``)."""
    return _EXTRACTORS


def get_extractor(name: str) -> Extractor:
    try:
        return _EXTRACTORS[name]
    except KeyError:
        known = ", ".join(sorted(_EXTRACTORS))
        raise KeyError(f"unknown output extractor {name!r} (known: {known})") from None

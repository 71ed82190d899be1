"""Turning raw terminal output into text, and a task's output from its transcript.

Extractors are looked up by the profile's ``output`` name in ``EXTRACTORS``; add one with
``register_extractor``. Each gets the end of the raw output (and the transcript path, for one that
needs more) and returns the task's output, plus an error when the output says the task failed
although the process exited 0.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

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
    | \x1b[ -/]*[0-~]
    | \x1b\[[0-?]*[ -/]*$
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


_EXTRACTORS: dict[str, Extractor] = {
    "text": extract_text,
    "claude-stream-json": extract_claude_stream_json,
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

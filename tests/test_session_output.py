"""Output extractors, argv building and the fake agent's script parsing (no processes)."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

import pytest

from cis_bot.session.launch import build_argv
from cis_bot.session.output import (
    TEXT_OUTPUT_LIMIT,
    Extracted,
    ExtractorInput,
    extractors,
    get_extractor,
    normalise_newlines,
    register_extractor,
    strip_escapes,
)
from cis_bot.session.profile import AgentProfile, PromptVia
from cis_bot.session.profiles import BUILTIN_PROFILES, session_uuid
from cis_bot.testing.fake_agent import ScriptError, parse_script, parse_size, unescape

if TYPE_CHECKING:
    from pathlib import Path


def source(raw: bytes, tmp_path: Path, *, complete: bool = True) -> ExtractorInput:
    transcript = tmp_path / "t.log"
    transcript.write_bytes(raw)
    return ExtractorInput(raw_tail=raw, complete=complete, transcript_path=transcript)


def test_strip_escapes_handles_csi_osc_dcs_and_cut_sequences() -> None:
    text = (
        "\x1b[?1049h\x1b[2J\x1b[1;1Hhello\x1b[0m "
        "\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ "
        "\x1bP1$r0m\x1b\\\x1b(Bdone\x1b7\x1b8\x07\x1b["
    )
    assert strip_escapes(text) == "hello link done"


def test_normalise_newlines_overwrites_on_carriage_return() -> None:
    assert normalise_newlines("a\r\nb\r\r\n") == "a\nb\n"
    assert normalise_newlines("hello\rab\n10%\r100%") == "abllo\n100%"


def test_text_extractor_keeps_the_last_64_kib(tmp_path: Path) -> None:
    lines = [f"\x1b[32mline {i:06d}\x1b[0m" for i in range(20000)]
    raw = "\r\n".join(lines).encode()
    out = get_extractor("text")(source(raw, tmp_path))
    assert out.error is None
    assert len(out.output.encode()) <= TEXT_OUTPUT_LIMIT
    assert out.output.endswith("line 019999")
    assert "\x1b" not in out.output and "\r" not in out.output


def test_text_extractor_reads_the_transcript_when_the_tail_is_short(tmp_path: Path) -> None:
    raw = b"".join(b"row %06d\r\n" % i for i in range(30000))
    transcript = tmp_path / "t.log"
    transcript.write_bytes(raw)
    short_tail = ExtractorInput(raw_tail=raw[-1000:], complete=False, transcript_path=transcript)
    out = get_extractor("text")(short_tail).output
    assert len(out.encode()) > TEXT_OUTPUT_LIMIT - 20
    assert out.endswith("row 029999")


def test_text_extractor_drops_a_partial_first_line(tmp_path: Path) -> None:
    out = get_extractor("text")(source(b"tial line\r\nwhole line\r\n", tmp_path, complete=False))
    assert out.output == "whole line"


def stream_json(*events: dict[str, object]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\r\n" for e in events)


def test_claude_stream_json_result(tmp_path: Path) -> None:
    raw = stream_json(
        {"type": "system", "subtype": "init"},
        {"type": "assistant", "message": {"content": [{"type": "text", "text": "thinking"}]}},
        {"type": "result", "subtype": "success", "is_error": False, "result": "All done."},
    )
    assert get_extractor("claude-stream-json")(source(raw, tmp_path)) == Extracted("All done.")


def test_claude_stream_json_error_result_fails_the_task(tmp_path: Path) -> None:
    raw = stream_json(
        {"type": "result", "subtype": "success", "is_error": True, "result": "API Error: 529"}
    )
    out = get_extractor("claude-stream-json")(source(raw, tmp_path))
    assert out.error == "agent error: API Error: 529"


def test_claude_stream_json_without_result_fails_the_task(tmp_path: Path) -> None:
    raw = stream_json({"type": "system", "subtype": "init"}) + b'{"type": "assis'
    out = get_extractor("claude-stream-json")(source(raw, tmp_path))
    assert out.error == "no result event in the agent's stream-json output"


def test_extractor_registry() -> None:
    assert {"text", "claude-stream-json"} <= set(extractors())
    with pytest.raises(KeyError, match="unknown output extractor 'nope'"):
        get_extractor("nope")

    def shout(src: ExtractorInput) -> Extracted:
        return Extracted(src.raw_tail.decode().upper())

    register_extractor("test-shout", shout)
    try:
        assert get_extractor("test-shout") is shout
    finally:
        del extractors()["test-shout"]  # type: ignore[attr-defined]


def test_builtin_profiles() -> None:
    assert set(BUILTIN_PROFILES) == {
        "shell",
        "claude",
        "claude-interactive",
        "aider",
        "codex",
        "opencode",
        "kimi",
    }
    for name, profile in BUILTIN_PROFILES.items():
        assert profile.name == name
        assert profile.output in extractors()
        assert build_argv(profile, "the prompt", "s:t:1").count("the prompt") == 1
    shell = BUILTIN_PROFILES["shell"]
    assert shell.argv == ("/bin/sh", "-c", "{prompt}")
    assert not shell.upstream_in_prompt and not shell.screen
    # `--` ends the options: a prompt starting with "-" stays the prompt; one starting with "/"
    # gets a space so Claude Code does not run it as a slash command.
    assert build_argv(BUILTIN_PROFILES["claude"], "-hi") == [
        "claude",
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--",
        "-hi",
    ]
    assert build_argv(BUILTIN_PROFILES["claude"], "/tmp/x is broken")[-1] == " /tmp/x is broken"
    interactive = build_argv(BUILTIN_PROFILES["claude-interactive"], "hi", "run:task:1")
    assert interactive == [
        "claude",
        "--permission-mode",
        "default",
        "--session-id",
        session_uuid("run:task:1"),
        "--",
        "hi",
    ]
    assert session_uuid("run:task:1") == str(uuid.UUID(session_uuid("run:task:1")))
    assert session_uuid("run:task:2") != session_uuid("run:task:1")


def test_build_argv_substitutes_tokens_without_format() -> None:
    profile = AgentProfile(name="x", argv=("tool", "--msg={prompt}", "{prompt}", "{other}"))
    prompt = "{prompt} {0} {other} }{"
    assert build_argv(profile, prompt) == ["tool", f"--msg={prompt}", prompt, "{other}"]
    typed = AgentProfile(name="t", argv=("tui", "{prompt}"), prompt_via=PromptVia.PTY)
    assert build_argv(typed, "p") == ["tui", "{prompt}"]
    with pytest.raises(ValueError, match="empty argv"):
        build_argv(AgentProfile(name="e", argv=()), "p")


def test_fake_agent_script_parsing() -> None:
    assert parse_script("print a b; ask Go?\nexit 3;;") == [
        ("print", "a b"),
        ("ask", "Go?"),
        ("exit", "3"),
    ]
    with pytest.raises(ScriptError, match="unknown step 'dance'"):
        parse_script("dance now")
    assert parse_size("2K") == 2048 and parse_size("1M") == 1 << 20 and parse_size("7") == 7
    with pytest.raises(ScriptError):
        parse_size("lots")
    assert unescape(r"a\tb\n\e[1m\\") == "a\tb\n\x1b[1m\\"


def test_an_escape_cut_off_at_the_end_leaves_nothing_behind() -> None:
    from cis_bot.session.output import strip_escapes

    assert strip_escapes("done\x1b[3") == "done"
    assert strip_escapes("done\x1b[38;5") == "done"
    assert strip_escapes("a\x1b[31mred\x1b[0m") == "ared"

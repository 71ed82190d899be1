"""Transcripts as people read them (cis_bot/session/readable.py): Claude Code's stream-json as
the conversation, other output as text; `cis dag logs` renders, `--raw` does not. The real
transcripts come from the Claude Code CLI talking to the fake Anthropic API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cis_bot.control.client.terminal import ReadableStream
from cis_bot.session.readable import RESULT_LINES, readable
from cis_bot.testing.claude_home import prepare_claude_home
from cis_bot.testing.fake_anthropic import FakeAnthropic, TextReply, ToolUseReply
from tests.support.claude import require_claude
from tests.test_claude_dag import cis, clean_env, report_of, write_config


def line(event: dict[str, object]) -> bytes:
    return json.dumps(event).encode() + b"\r\n"


INIT = line(
    {
        "type": "system",
        "subtype": "init",
        "cwd": "/srv/app",
        "model": "claude-opus-5-5",
        "claude_code_version": "2.1.0",
        "tools": ["Bash", "Read"],
    }
)


def test_a_conversation_with_a_tool_call_and_its_result() -> None:
    raw = b"".join(
        [
            INIT,
            line(
                {
                    "type": "assistant",
                    "message": {"content": [{"type": "thinking", "thinking": "hmm\nso"}]},
                }
            ),
            line(
                {
                    "type": "assistant",
                    "message": {"content": [{"type": "text", "text": "Let me look.\nAt it."}]},
                }
            ),
            line(
                {
                    "type": "assistant",
                    "message": {
                        "content": [
                            {
                                "type": "tool_use",
                                "name": "Bash",
                                "input": {"command": "ls -la\n/tmp", "timeout": 5},
                            },
                            {"type": "tool_use", "name": "Custom", "input": {"a": [1, 2]}},
                        ]
                    },
                }
            ),
            line(
                {
                    "type": "user",
                    "message": {
                        "content": [
                            {
                                "type": "tool_result",
                                "content": "\n".join(f"f{i}" for i in range(20)),
                            },
                            {
                                "type": "tool_result",
                                "is_error": True,
                                "content": [{"type": "text", "text": "denied"}],
                            },
                        ]
                    },
                }
            ),
            line({"type": "stream_event", "event": {"type": "content_block_delta"}}),
            line(
                {
                    "type": "result",
                    "subtype": "success",
                    "is_error": False,
                    "num_turns": 3,
                    "duration_ms": 2500,
                    "total_cost_usd": 0.01234,
                    "result": "Done: 20 files.",
                }
            ),
            b"\x1b[?25h",
        ]
    )
    shown = readable(raw, prompt="List the files")
    assert shown.split("\n") == [
        "── Claude Code 2.1.0 · claude-opus-5-5 · in /srv/app",
        "▶ List the files",
        "✻ hmm",
        "  so",
        "● Let me look.",
        "  At it.",
        "⚙ Bash(ls -la /tmp)",
        '⚙ Custom({"a":[1,2]})',
        *(["  ⎿ f0"] + [f"    f{i}" for i in range(1, RESULT_LINES)] + ["    … (+12 lines)"]),
        "  ⎿ error: denied",
        "✔ result: success · 3 turns · 2.5s · $0.0123",
        "  Done: 20 files.",
        "",
    ]


def test_a_failed_result_and_text_around_the_stream_are_kept() -> None:
    raw = (
        b"Error: cannot reach the API\r\n"
        + INIT
        + line(
            {"type": "result", "subtype": "error_during_execution", "is_error": True, "result": ""}
        )
        + b"{not json\r\n"
    )
    shown = readable(raw)
    assert shown.split("\n")[:4] == [
        "Error: cannot reach the API",
        "── Claude Code 2.1.0 · claude-opus-5-5 · in /srv/app",
        "✘ result: error_during_execution",
        "{not json",
    ]


def test_other_agents_output_is_terminal_text() -> None:
    assert (
        readable(b"\x1b[1mbold\x1b[0m\r\nprogress 10%\rprogress 99%\r\n") == "bold\nprogress 99%\n"
    )


def test_malformed_stream_json_never_raises() -> None:
    odd = [
        {"type": "assistant"},
        {"type": "assistant", "message": "x"},
        {
            "type": "assistant",
            "message": {"content": [1, None, {"type": "tool_use", "input": "s"}]},
        },
        {"type": "user", "message": {"content": "a prompt"}},
        {
            "type": "user",
            "message": {"content": [{"type": "tool_result", "content": [{"type": "image"}]}]},
        },
        {"type": "result", "num_turns": True, "duration_ms": "x", "total_cost_usd": None},
        {"type": "system", "subtype": "compact_boundary"},
    ]
    shown = readable(b"".join(line(e) for e in odd))
    assert "⚙ tool()" in shown
    assert "▶ a prompt" in shown
    assert "⎿ [image]" in shown
    assert "✔ result: success" in shown
    assert "── compact_boundary" in shown


def test_following_stream_json_shows_whole_lines_only() -> None:
    stream = ReadableStream()
    half = INIT[:30]
    assert stream.feed(half) == ""
    assert stream.flush() == ""  # half a JSON line is never shown
    out = stream.feed(INIT[30:])
    assert out == "── Claude Code 2.1.0 · claude-opus-5-5 · in /srv/app\n"
    event = line({"type": "assistant", "message": {"content": [{"type": "text", "text": "hi"}]}})
    assert stream.feed(event[:10]) == "" and stream.flush() == ""
    assert stream.feed(event[10:]) == "● hi\n"


def test_following_text_shows_a_waiting_prompt() -> None:
    stream = ReadableStream()
    assert stream.feed(b"hello\r\nContinue? [y/N] ") == "hello\n"
    assert stream.flush() == "Continue? [y/N] "
    assert stream.feed(b"y\r\n") == "y\n"


@pytest.mark.slow
async def test_cis_dag_logs_renders_a_real_claude_transcript_and_raw_keeps_it(
    tmp_path: Path,
) -> None:
    claude = require_claude()
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the answer is 42\n")
    dag = tmp_path / "dag.toml"
    dag.write_text('[[tasks]]\nid = "look"\nagent = "claude"\nprompt = "What do the notes say?"\n')
    script = [
        ToolUseReply("Read", {"file_path": str(work / "notes.txt")}, text="Let me read them."),
        TextReply("The notes say the answer is 42."),
    ]
    async with FakeAnthropic(script) as fake:
        home = prepare_claude_home(tmp_path / "home", base_url=fake.url, work_dirs=[work])
        config = write_config(tmp_path / "config.toml", claude, home)
        env = clean_env(CIS_CONFIG=str(config))
        state = str(tmp_path / "state")
        report = report_of(
            *await cis(
                "dag",
                "execute",
                "--local",
                str(dag),
                "--state-dir",
                state,
                "--json",
                env=env,
                cwd=work,
            )
        )
    assert report["status"] == "completed", report
    session = f"{report['run_id']}:look"
    code, shown, stderr = await cis("dag", "logs", session, "--state-dir", state, env=env, cwd=work)
    assert code == 0, stderr
    lines = shown.split("\n")
    assert lines[0].startswith("── Claude Code ") and lines[0].endswith(f"· in {work}")
    assert lines[1:6] == [
        "● Let me read them.",
        f"⚙ Read({work / 'notes.txt'})",
        "  ⎿ 1\tthe answer is 42",
        "    2\t",
        "● The notes say the answer is 42.",
    ]
    assert lines[6].startswith("✔ result: success · 2 turns · ")
    assert lines[7] == "  The notes say the answer is 42."
    assert "{" not in shown
    code, raw, stderr = await cis(
        "dag", "logs", session, "--raw", "--state-dir", state, env=env, cwd=work
    )
    assert code == 0, stderr
    events = [json.loads(x) for x in raw.replace("\r", "").split("\n") if x.startswith("{")]
    assert [e["type"] for e in events] == [
        "system",
        "assistant",
        "assistant",
        "user",
        "assistant",
        "result",
    ]
    assert events[-1]["result"] == "The notes say the answer is 42."
    code, tail, _ = await cis(
        "dag", "logs", session, "--tail", "2", "--state-dir", state, env=env, cwd=work
    )
    assert code == 0 and tail.split("\n")[-3:-1] == lines[6:8]

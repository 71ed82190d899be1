"""The fake Anthropic Messages API over real HTTP: SSE framing, errors, cuts, recording, scripts."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.errors import InputError
from cis_bot.testing.fake_anthropic import (
    CutStream,
    EchoReply,
    ErrorReply,
    FakeAnthropic,
    RecordedRequest,
    TextReply,
    ToolUseReply,
    load_script,
    overloaded,
    parse_script,
    server_error,
)

ROOT = Path(__file__).resolve().parents[1]

SYSTEM_REMINDER = "<system-reminder>\nsome harness note\n</system-reminder>\n"


def body(prompt: str = "hello", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A request shaped like Claude Code's: a reminder block before the prompt, a system turn."""
    return {
        "model": "claude-test-1",
        "max_tokens": 1024,
        "stream": stream,
        "system": [{"type": "text", "text": "You are a test."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": SYSTEM_REMINDER},
                    {"type": "text", "text": prompt},
                ],
            },
            {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
        ],
        **extra,
    }


def parse_sse(raw: str) -> list[tuple[str, dict[str, Any]]]:
    """Split an SSE body into (event, data) pairs, checking the framing strictly."""
    assert raw.endswith("\n\n"), "an SSE body ends with a blank line"
    events = []
    for frame in raw[:-2].split("\n\n"):
        lines = frame.split("\n")
        assert len(lines) == 2, f"a frame is one event line and one data line: {frame!r}"
        assert lines[0].startswith("event: ")
        assert lines[1].startswith("data: ")
        name = lines[0].removeprefix("event: ")
        data = json.loads(lines[1].removeprefix("data: "))
        assert data["type"] == name
        events.append((name, data))
    return events


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    client: aiohttp.ClientSession, fake: FakeAnthropic, payload: Any, **kwargs: Any
) -> aiohttp.ClientResponse:
    return await client.post(
        f"{fake.url}/v1/messages?beta=true",
        json=payload,
        headers={"x-api-key": "sk-test", "anthropic-version": "2023-06-01"},
        **kwargs,
    )


async def test_text_reply_streams_the_exact_event_sequence(client: aiohttp.ClientSession) -> None:
    async with FakeAnthropic(
        [TextReply("Hello there, this is a longer reply.", chunk_chars=8)]
    ) as f:
        response = await post(client, f, body())
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(await response.text())
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert deltas == 5  # 36 characters in chunks of 8
    start = events[0][1]["message"]
    assert start["role"] == "assistant"
    assert start["model"] == "claude-test-1"
    assert start["content"] == []
    assert start["usage"]["input_tokens"] > 0
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "Hello there, this is a longer reply."
    assert all(d["delta"]["type"] == "text_delta" for n, d in events if n == "content_block_delta")
    assert events[2][1]["content_block"] == {"type": "text", "text": ""}
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "end_turn"
    assert final["usage"]["output_tokens"] > 0


async def test_tool_use_streams_input_json_then_the_final_reply_follows(
    client: aiohttp.ClientSession,
) -> None:
    tool_input = {"command": "echo hi > made.txt", "description": "Create a file"}
    script = [ToolUseReply("Bash", tool_input, text="Running it."), TextReply("Done.")]
    async with FakeAnthropic(script) as fake:
        events = parse_sse(await (await post(client, fake, body("make a file"))).text())
        starts = [d for n, d in events if n == "content_block_start"]
        assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"]
        tool = starts[1]["content_block"]
        assert tool["name"] == "Bash"
        assert tool["input"] == {}
        assert tool["id"].startswith("toolu_fake_")
        partial = "".join(
            d["delta"]["partial_json"]
            for n, d in events
            if n == "content_block_delta" and d["index"] == 1
        )
        assert json.loads(partial) == tool_input
        assert [d["index"] for n, d in events if n == "content_block_stop"] == [0, 1]
        assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

        result_turn = body()
        result_turn["messages"].append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": tool["id"],
                        "content": [{"type": "text", "text": "(Bash completed with no output)"}],
                    }
                ],
            }
        )
        events = parse_sse(await (await post(client, fake, result_turn)).text())
        text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
        assert text == "Done."
        second = fake.message_requests[1]
        assert [r["tool_use_id"] for r in second.tool_results] == [tool["id"]]
        assert "(Bash completed with no output)" in second.all_text
        assert fake.pending == 0


async def test_non_streamed_request_gets_a_whole_message(client: aiohttp.ClientSession) -> None:
    script = [TextReply("plain"), ToolUseReply("Write", {"file_path": "/x", "content": "y"})]
    async with FakeAnthropic(script) as fake:
        first = await (await post(client, fake, body(stream=False))).json()
        second = await (await post(client, fake, body(stream=False))).json()
    assert first["type"] == "message"
    assert first["content"] == [{"type": "text", "text": "plain"}]
    assert first["stop_reason"] == "end_turn"
    assert second["stop_reason"] == "tool_use"
    assert second["content"][0]["name"] == "Write"
    assert second["content"][0]["input"] == {"file_path": "/x", "content": "y"}


async def test_slow_stream_spaces_its_chunks(client: aiohttp.ClientSession) -> None:
    reply = TextReply("abcdefgh", chunk_chars=2, chunk_delay_secs=0.1)
    async with FakeAnthropic([reply]) as fake:
        response = await post(client, fake, body())
        arrivals = []
        started = time.monotonic()
        async for line in response.content:
            if line.startswith(b"event: content_block_delta"):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    # Three pauses of 0.1 s between four chunks: a lower bound holds however loaded the machine is.
    assert arrivals[-1] - arrivals[0] >= 0.29


@pytest.mark.parametrize(
    ("reply", "status", "error_type", "message"),
    [
        (server_error(), 500, "api_error", "Internal server error"),
        (overloaded(), 529, "overloaded_error", "Overloaded"),
        (ErrorReply(429), 429, "rate_limit_error", "Rate limited"),
        (ErrorReply(400, message="bad thing"), 400, "invalid_request_error", "bad thing"),
    ],
)
async def test_errors_have_anthropics_body(
    client: aiohttp.ClientSession, reply: ErrorReply, status: int, error_type: str, message: str
) -> None:
    async with FakeAnthropic([reply]) as fake:
        response = await post(client, fake, body())
        payload = await response.json()
    assert response.status == status
    assert payload["type"] == "error"
    assert payload["error"] == {"type": error_type, "message": message}
    assert payload["request_id"] == response.headers["request-id"]
    assert "retry-after" not in response.headers
    assert "x-should-retry" not in response.headers


async def test_error_retry_headers(client: aiohttp.ClientSession) -> None:
    async with FakeAnthropic([overloaded(retry_after_secs=2, should_retry=False)]) as fake:
        response = await post(client, fake, body())
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-should-retry"] == "false"


async def test_cut_stream_drops_the_connection_mid_reply(client: aiohttp.ClientSession) -> None:
    async with FakeAnthropic([CutStream("partial text", chunk_chars=4)]) as fake:
        response = await post(client, fake, body())
        assert response.status == 200
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    text = received.decode()
    assert "partial text" not in text  # split over deltas
    assert text.count("event: content_block_delta\n") == 3
    assert "content_block_stop" not in text
    assert "message_stop" not in text


async def test_cut_stream_without_reset_ends_cleanly_but_incomplete(
    client: aiohttp.ClientSession,
) -> None:
    cut = CutStream("partial", error_type="overloaded_error", reset=False)
    async with FakeAnthropic([cut, cut]) as fake:
        events = parse_sse(await (await post(client, fake, body())).text())
        truncated = await (await post(client, fake, body(stream=False))).read()
    names = [name for name, _ in events]
    assert names[-1] == "error"
    assert events[-1][1]["error"]["type"] == "overloaded_error"
    assert "message_stop" not in names
    assert "message_delta" not in names
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated)


async def test_non_streamed_cut_drops_the_connection(client: aiohttp.ClientSession) -> None:
    async with FakeAnthropic([CutStream()]) as fake:
        with pytest.raises(aiohttp.ClientError):
            await (await post(client, fake, body(stream=False))).read()


async def test_records_every_request_with_its_prompt(client: aiohttp.ClientSession) -> None:
    async with FakeAnthropic() as fake:
        response = await client.head(f"{fake.url}/")
        assert response.status == 200
        response = await client.head(f"{fake.url}/api/hello")
        assert response.status == 200
        await (await post(client, fake, body("what is 2+2?"))).read()
        missing = await client.get(f"{fake.url}/v1/models")
        assert missing.status == 404
        assert (await missing.json())["error"]["type"] == "not_found_error"
    methods = [(r.method, r.path) for r in fake.requests]
    assert methods == [
        ("HEAD", "/"),
        ("HEAD", "/api/hello"),
        ("POST", "/v1/messages"),
        ("GET", "/v1/models"),
    ]
    (message,) = fake.message_requests
    assert message.query == {"beta": "true"}
    assert message.headers["x-api-key"] == "sk-test"
    assert message.headers["anthropic-version"] == "2023-06-01"
    assert message.body["model"] == "claude-test-1"
    assert message.stream
    assert message.prompt == "what is 2+2?"  # the reminder block left out
    assert "You are a test." in message.all_text
    assert isinstance(message.reply, TextReply)
    assert message.reply.text == "echo: what is 2+2?"


async def test_default_echo_answers_deterministically_when_unscripted(
    client: aiohttp.ClientSession,
) -> None:
    async with FakeAnthropic([TextReply("scripted")]) as fake:
        texts = []
        for prompt in ("one", "two", "two"):
            events = parse_sse(await (await post(client, fake, body(prompt))).text())
            texts.append(
                "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
            )
    assert texts == ["scripted", "echo: two", "echo: two"]


async def test_default_can_be_a_fixed_reply_or_a_function(client: aiohttp.ClientSession) -> None:
    def by_prompt(request: RecordedRequest) -> TextReply | ErrorReply:
        return overloaded() if "busy" in request.prompt else TextReply(request.prompt.upper())

    async with FakeAnthropic(default=by_prompt) as fake:
        assert (await post(client, fake, body("be busy"))).status == 529
        ok = await (await post(client, fake, body("shout", stream=False))).json()
        assert ok["content"][0]["text"] == "SHOUT"
        fake.default = server_error()
        assert (await post(client, fake, body())).status == 500
        fake.default = EchoReply(prefix="> ")
        fake.push(TextReply("pushed"))
        pushed = await (await post(client, fake, body(stream=False))).json()
        echoed = await (await post(client, fake, body("x", stream=False))).json()
    assert pushed["content"][0]["text"] == "pushed"
    assert echoed["content"][0]["text"] == "> x"


async def test_bad_requests_get_invalid_request_errors(client: aiohttp.ClientSession) -> None:
    async with FakeAnthropic([TextReply("kept for the valid request")]) as fake:
        not_json = await client.post(f"{fake.url}/v1/messages", data=b"{nope")
        no_messages = await client.post(f"{fake.url}/v1/messages", json={"model": "m"})
        for response in (not_json, no_messages):
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
        # Rejected requests do not use up the script.
        assert fake.pending == 1
        assert len(fake.requests) == 2


async def test_count_tokens(client: aiohttp.ClientSession) -> None:
    async with FakeAnthropic() as fake:
        response = await client.post(f"{fake.url}/v1/messages/count_tokens", json=body("x" * 400))
        assert response.status == 200
        assert (await response.json())["input_tokens"] >= 100


async def test_wait_for_messages_wakes_on_arrival(client: aiohttp.ClientSession) -> None:
    async with FakeAnthropic() as fake:
        waiter = asyncio.create_task(fake.wait_for_messages(2))
        await (await post(client, fake, body("a"))).read()
        assert not waiter.done()
        await (await post(client, fake, body("b"))).read()
        async with asyncio.timeout(5):
            requests = await waiter
    assert [r.prompt for r in requests] == ["a", "b"]


async def test_client_that_goes_away_mid_stream_does_not_break_the_server(
    client: aiohttp.ClientSession,
) -> None:
    slow = TextReply("x" * 50, chunk_chars=1, chunk_delay_secs=0.02)
    async with FakeAnthropic([slow]) as fake:
        response = await post(client, fake, body())
        await response.content.readline()
        response.close()
        # The server keeps answering.
        ok = await (await post(client, fake, body("still there", stream=False))).json()
    assert ok["content"][0]["text"] == "echo: still there"


async def test_two_servers_get_different_ports() -> None:
    async with FakeAnthropic() as one, FakeAnthropic() as two:
        assert one.url != two.url
    with pytest.raises(RuntimeError, match="not started"):
        _ = FakeAnthropic().url


def test_parse_script_builds_each_reply_kind() -> None:
    script = parse_script(
        {
            "replies": [
                {"type": "text", "text": "hi", "chunk_delay_secs": 0.5, "chunk_chars": 3},
                {"type": "tool_use", "name": "Bash", "input": {"command": "ls"}, "id": "t1"},
                {"type": "error", "status": 529},
                {"type": "cut", "text": "par", "reset": False},
                {"type": "echo", "prefix": "> "},
            ],
            "default": {"type": "error", "status": 500, "message": "down"},
        }
    )
    assert script.replies == (
        TextReply("hi", chunk_chars=3, chunk_delay_secs=0.5),
        ToolUseReply("Bash", {"command": "ls"}, tool_use_id="t1"),
        ErrorReply(529),
        CutStream("par", reset=False),
        EchoReply("> "),
    )
    assert script.default == ErrorReply(500, message="down")
    assert parse_script([{"type": "text", "text": "x"}]).default == EchoReply()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"replies": [{"type": "txt"}]}, "key 'replies[0]': type must be one of"),
        ([{"type": "text"}], "key 'replies[0]': a 'text' reply needs 'text'"),
        ([{"type": "text", "text": 3}], "key 'replies[0].text': must be str, got int"),
        ([{"type": "error", "status": True}], "key 'replies[0].status': must be int, got bool"),
        ([{"type": "error", "status": 200}], "key 'replies[0]': invalid value"),
        ([{"type": "text", "text": "x", "colour": 1}], "key 'replies[0].colour': unknown key"),
        ([{"type": "text", "text": "x", "chunk_chars": 0}], "key 'replies[0]': invalid value"),
        ({"replies": {}}, "key 'replies': must be a list"),
        ({"reply": []}, "key 'reply': unknown key"),
        ({"default": "echo"}, "key 'default': must be a table"),
        ("text", "a script is a list of replies"),
    ],
)
def test_parse_script_errors_name_the_key(data: Any, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_script(data, file="s.json")
    assert str(caught.value).startswith("s.json: ")
    assert message in str(caught.value)


def test_load_script_reads_json_and_toml(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text(
        'default = { type = "error", status = 529 }\n'
        '[[replies]]\ntype = "tool_use"\nname = "Write"\n'
        'input = { file_path = "/tmp/x", content = "y" }\n'
    )
    script = load_script(toml)
    assert script.replies == (ToolUseReply("Write", {"file_path": "/tmp/x", "content": "y"}),)
    assert script.default == ErrorReply(529)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON"):
        load_script(bad)
    with pytest.raises(InputError, match=r"ends in \.json or \.toml"):
        load_script(tmp_path / "s.yaml")
    with pytest.raises(InputError, match="cannot read the script"):
        load_script(tmp_path / "missing.json")


async def test_command_line_serves_a_script_and_stops_on_sigterm(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"type": "text", "text": "from the file"}]))
    record = tmp_path / "requests.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cis_bot.testing.fake_anthropic",
        "--script",
        str(script),
        "--record",
        str(record),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            url = (await process.stdout.readline()).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        response = await client.post(f"{url}/v1/messages", json=body("hi", stream=False))
        assert (await response.json())["content"][0]["text"] == "from the file"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    (line,) = record.read_text().splitlines()
    recorded = json.loads(line)
    assert recorded["path"] == "/v1/messages"
    assert recorded["reply"] == "TextReply"
    assert recorded["body"]["messages"][0]["content"][1]["text"] == "hi"


def test_command_line_rejects_a_bad_script_in_one_line(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"type": "nope"}]))
    done = subprocess.run(
        [sys.executable, "-m", "cis_bot.testing.fake_anthropic", "--script", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {script}: key 'replies[0]': type must be one of")
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1

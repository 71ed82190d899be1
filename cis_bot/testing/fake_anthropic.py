"""A fake Anthropic Messages API on loopback, scripted per test, to drive real agent CLIs offline.

Agent CLIs such as Claude Code talk to whatever ``ANTHROPIC_BASE_URL`` names. This server answers
them like the real API would, from a script of replies: plain text, a tool call (the agent then
asks for permission, runs the tool and sends the result back), slow streams, API errors with
Anthropic's error body, and a stream cut mid-way. When the script runs out, a default responder
answers (by default it echoes the prompt), so an unscripted run still gets a deterministic answer.

Every request is recorded (method, path, headers, JSON body) so a test can read the prompt the
agent sent. The same server backs ``python -m cis_bot.testing.fake_anthropic`` for manual runs and
dry runs of a whole DAG without spending tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import signal
import sys
import tomllib
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

import attrs
import structlog
from aiohttp import web

from cis_bot.errors import InputError, UserError
from cis_bot.log import configure as configure_logging

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

log = structlog.get_logger(__name__)

#: The model name the fake reports when a request names none.
FAKE_MODEL = "claude-fake"

#: The error ``type`` Anthropic's API uses for each HTTP status, used when a script names none.
ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_DEFAULT_ERROR_MESSAGES: Mapping[str, str] = {
    "overloaded_error": "Overloaded",
    "api_error": "Internal server error",
    "rate_limit_error": "Rate limited",
}

# Claude Code prepends <system-reminder> blocks to the user's turn; they are not the prompt.
_SYSTEM_REMINDER = "<system-reminder>"


@attrs.frozen
class TextReply:
    """An assistant message holding one text block, streamed in chunks of ``chunk_chars``."""

    text: str
    chunk_chars: int = attrs.field(default=16, validator=attrs.validators.gt(0))
    #: Pause between two streamed chunks: makes a slow stream (the agent shows "working").
    chunk_delay_secs: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    stop_reason: str = "end_turn"


@attrs.frozen
class ToolUseReply:
    """An assistant message that calls a tool; the agent answers with a ``tool_result``.

    Script the reply to that result as the next entry (often a :class:`TextReply`).
    """

    name: str
    input: Mapping[str, Any]
    #: Text streamed before the tool call, as models often say what they are about to do.
    text: str = ""
    #: The tool_use id; a deterministic ``toolu_fake_NNNN`` when not given.
    tool_use_id: str | None = None
    chunk_chars: int = attrs.field(default=16, validator=attrs.validators.gt(0))
    chunk_delay_secs: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))


@attrs.frozen
class ErrorReply:
    """An HTTP error with Anthropic's body: ``{"type": "error", "error": {type, message}}``."""

    status: int = attrs.field(validator=[attrs.validators.ge(400), attrs.validators.le(599)])
    error_type: str = ""
    message: str = ""
    #: Sent as ``retry-after`` (seconds): clients wait that long before retrying.
    retry_after_secs: float | None = None
    #: Sent as ``x-should-retry``; None sends no header and leaves the decision to the client.
    should_retry: bool | None = None

    def body(self, request_id: str) -> dict[str, Any]:
        error_type = self.error_type or ERROR_TYPES.get(self.status, "api_error")
        message = self.message or _DEFAULT_ERROR_MESSAGES.get(error_type, f"HTTP {self.status}")
        return {
            "type": "error",
            "error": {"type": error_type, "message": message},
            "request_id": request_id,
        }


def overloaded(**kwargs: Any) -> ErrorReply:
    """HTTP 529 ``overloaded_error``, what the API answers when it is at capacity."""
    return ErrorReply(status=529, error_type="overloaded_error", **kwargs)


def server_error(**kwargs: Any) -> ErrorReply:
    """HTTP 500 ``api_error``."""
    return ErrorReply(status=500, error_type="api_error", **kwargs)


@attrs.frozen
class CutStream:
    """A streamed reply that stops mid-way: ``text`` is streamed, then the stream ends.

    No content_block_stop, message_delta or message_stop is sent. With ``error_type``, an SSE
    ``error`` event carrying that type is sent first, as the real API does when it becomes
    overloaded in the middle of a stream. ``reset`` drops the TCP connection (a crash or a network
    failure); without it the HTTP response ends cleanly, as a proxy that gives up would do.
    """

    text: str = "This reply stops in the mid"
    chunk_chars: int = attrs.field(default=16, validator=attrs.validators.gt(0))
    chunk_delay_secs: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    error_type: str | None = None
    reset: bool = True


@attrs.frozen
class EchoReply:
    """Answers with ``prefix`` followed by the prompt (or the tool results) the request carried."""

    prefix: str = "echo: "

    def resolve(self, request: RecordedRequest) -> TextReply:
        results = request.tool_results
        if results:
            shown = "\n".join(tool_result_text(r) for r in results)
            return TextReply(f"{self.prefix}tool result: {shown}")
        return TextReply(f"{self.prefix}{request.prompt}")


Reply: TypeAlias = TextReply | ToolUseReply | ErrorReply | CutStream | EchoReply
#: Computes a reply from the request, for answers a fixed script cannot express.
Responder: TypeAlias = "Callable[[RecordedRequest], Reply]"


@attrs.frozen
class RecordedRequest:
    """One HTTP request the fake received, with what it answered."""

    method: str
    path: str
    query: Mapping[str, str]
    #: Header names in lower case.
    headers: Mapping[str, str]
    #: The parsed JSON body; None when there was no body or it was not JSON.
    body: Any
    #: What the fake answered a Messages request with (None for other requests).
    reply: Reply | None = None

    @property
    def is_message(self) -> bool:
        return self.method == "POST" and self.path == "/v1/messages"

    @property
    def messages(self) -> list[dict[str, Any]]:
        if not isinstance(self.body, dict):
            return []
        messages = self.body.get("messages")
        return [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True

    def _last_user_blocks(self) -> list[dict[str, Any]]:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _blocks(message.get("content"))
        return []

    @property
    def prompt(self) -> str:
        """The text of the last user turn, without the ``<system-reminder>`` blocks agents add."""
        texts = [
            b["text"]
            for b in self._last_user_blocks()
            if b.get("type") == "text"
            and isinstance(b.get("text"), str)
            and not b["text"].lstrip().startswith(_SYSTEM_REMINDER)
        ]
        return "\n".join(texts)

    @property
    def tool_results(self) -> list[dict[str, Any]]:
        """The ``tool_result`` blocks of the last user turn (empty unless a tool just ran)."""
        return [b for b in self._last_user_blocks() if b.get("type") == "tool_result"]

    @property
    def all_text(self) -> str:
        """Every text in the request (system prompt, all turns, tool results), for assertions."""
        parts: list[str] = []
        if isinstance(self.body, dict):
            parts.extend(_texts(self.body.get("system")))
        for message in self.messages:
            parts.extend(_texts(message.get("content")))
        return "\n".join(parts)


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


def _texts(content: Any) -> list[str]:
    out: list[str] = []
    for block in _blocks(content):
        if isinstance(block.get("text"), str):
            out.append(block["text"])
        elif block.get("type") == "tool_result":
            out.append(tool_result_text(block))
    return out


def tool_result_text(block: Mapping[str, Any]) -> str:
    """The text of a ``tool_result`` block (its content is a string or a list of text blocks)."""
    return "\n".join(_texts(block.get("content")))


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class FakeAnthropic:
    """The fake API server. Use as ``async with FakeAnthropic([...]) as fake: fake.url ...``.

    Each ``POST /v1/messages`` takes the next reply from the script; when the script is empty,
    ``default`` answers (a fixed reply, or a function of the request). ``HEAD``/``GET`` of ``/``
    and ``/api/hello`` answer 200 (clients probe the base URL), ``POST
    /v1/messages/count_tokens`` an estimate, anything else 404 with Anthropic's error body.
    """

    def __init__(
        self,
        script: Iterable[Reply] = (),
        *,
        default: Reply | Responder = EchoReply(),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._script: deque[Reply] = deque(script)
        self.default = default
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[RecordedRequest], None]] = []
        #: Every request received, in order.
        self.requests: list[RecordedRequest] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the fake Anthropic server is already running")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        # Claude Code probes the base URL with HEAD /api/hello unless nonessential traffic is off.
        for path in ("/", "/api/hello"):
            app.router.add_route("HEAD", path, self._handle_root)
            app.router.add_route("GET", path, self._handle_root)
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_post("/v1/messages/count_tokens", self._handle_count_tokens)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise UserError(f"cannot listen on {self._host}:{self._port}: {exc.strerror}") from exc
        server = site._server  # aiohttp exposes the bound port only through the asyncio server
        assert isinstance(server, asyncio.Server)
        self._bound_port = server.sockets[0].getsockname()[1]
        self._runner = runner
        log.info("fake_anthropic.started", url=self.url)

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> FakeAnthropic:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """The base URL to give clients as ``ANTHROPIC_BASE_URL``."""
        if self._bound_port is None:
            raise RuntimeError("the fake Anthropic server is not started")
        return f"http://{self._host}:{self._bound_port}"

    # -- scripting and inspection ---------------------------------------------------------------

    def push(self, *replies: Reply) -> None:
        """Append replies to the script."""
        self._script.extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not yet used."""
        return len(self._script)

    @property
    def message_requests(self) -> list[RecordedRequest]:
        """The ``POST /v1/messages`` requests, in order."""
        return [r for r in self.requests if r.is_message]

    def add_listener(self, listener: Callable[[RecordedRequest], None]) -> None:
        """Call ``listener`` with each request as it is recorded."""
        self._listeners.append(listener)

    async def wait_for_messages(self, count: int) -> list[RecordedRequest]:
        """Wait until at least ``count`` Messages requests arrived (bound it with a timeout)."""
        while len(self.message_requests) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.message_requests

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        self._changed.set()
        for listener in self._listeners:
            listener(request)

    def _next_reply(self, request: RecordedRequest) -> Reply:
        if self._script:
            reply = self._script.popleft()
        elif callable(self.default):
            reply = self.default(request)
        else:
            reply = self.default
        if isinstance(reply, EchoReply):
            return reply.resolve(request)
        return reply

    # -- handlers -------------------------------------------------------------------------------

    async def _read(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        return RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )

    async def _handle_root(self, request: web.Request) -> web.StreamResponse:
        self._record(await self._read(request))
        return web.Response(status=200)

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        self._record(await self._read(request))
        return self._error(ErrorReply(404, message=f"{request.method} {request.path} not found"))

    async def _handle_count_tokens(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._read(request)
        self._record(recorded)
        if not isinstance(recorded.body, dict):
            return self._error(ErrorReply(400, message="the body must be a JSON object"))
        return web.json_response({"input_tokens": _estimate_tokens(recorded.all_text)})

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._read(request)
        problem = _invalid_messages_body(recorded.body)
        if problem is not None:
            self._record(recorded)
            return self._error(ErrorReply(400, message=problem))
        reply = self._next_reply(recorded)
        recorded = attrs.evolve(recorded, reply=reply)
        self._record(recorded)
        log.debug("fake_anthropic.reply", kind=type(reply).__name__, stream=recorded.stream)
        if isinstance(reply, ErrorReply):
            return self._error(reply)
        assert not isinstance(reply, EchoReply)  # resolved by _next_reply
        message_id = f"msg_fake_{next(self._ids):04d}"
        model = recorded.body.get("model") or FAKE_MODEL
        if isinstance(reply, ToolUseReply) and reply.tool_use_id is None:
            reply = attrs.evolve(reply, tool_use_id=f"toolu_fake_{next(self._ids):04d}")
        input_tokens = _estimate_tokens(recorded.all_text)
        if not recorded.stream:
            if isinstance(reply, CutStream):
                # Not streamed, the same failure is a dropped connection or a truncated body.
                if reply.reset:
                    _drop(request)
                    return web.Response(status=500)
                whole = json.dumps(_whole_message(message_id, model, TextReply(reply.text), 1))
                return web.Response(body=whole[: len(whole) // 2], content_type="application/json")
            return web.json_response(_whole_message(message_id, model, reply, input_tokens))
        return await self._stream(request, message_id, model, reply, input_tokens)

    def _error(self, reply: ErrorReply) -> web.Response:
        request_id = f"req_fake_{next(self._ids):04d}"
        headers = {"request-id": request_id}
        if reply.retry_after_secs is not None:
            headers["retry-after"] = f"{reply.retry_after_secs:g}"
        if reply.should_retry is not None:
            headers["x-should-retry"] = "true" if reply.should_retry else "false"
        return web.json_response(reply.body(request_id), status=reply.status, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        message_id: str,
        model: str,
        reply: TextReply | ToolUseReply | CutStream,
        input_tokens: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
                "request-id": f"req_fake_{next(self._ids):04d}",
            }
        )
        await response.prepare(request)
        delay = reply.chunk_delay_secs
        try:
            await response.write(
                _sse("message_start", _message_start(message_id, model, input_tokens))
            )
            await response.write(_sse("ping", {"type": "ping"}))
            index = 0
            text = reply.text
            if text or not isinstance(reply, ToolUseReply):
                await self._stream_text(response, index, text, reply.chunk_chars, delay)
                if isinstance(reply, CutStream):
                    if reply.error_type is not None:
                        status = 529 if reply.error_type == "overloaded_error" else 500
                        error = ErrorReply(status, error_type=reply.error_type)
                        await response.write(_sse("error", error.body(message_id)))
                    if reply.reset:
                        _drop(request)
                    else:
                        await response.write_eof()
                    return response
                await response.write(_block_stop(index))
                index += 1
            stop_reason = "end_turn"
            if isinstance(reply, ToolUseReply):
                await self._stream_tool_use(response, index, reply, delay)
                stop_reason = "tool_use"
            elif isinstance(reply, TextReply):
                stop_reason = reply.stop_reason
            await response.write(
                _sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                        "usage": {"output_tokens": _output_tokens(reply)},
                    },
                )
            )
            await response.write(_sse("message_stop", {"type": "message_stop"}))
            await response.write_eof()
        except (ConnectionResetError, ConnectionError) as exc:
            # The client went away (it was interrupted or killed): nothing left to send.
            log.info("fake_anthropic.client_gone", message_id=message_id, error=str(exc))
        return response

    async def _stream_text(
        self, response: web.StreamResponse, index: int, text: str, size: int, delay: float
    ) -> None:
        start = {"type": "text", "text": ""}
        await response.write(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
        )
        for n, chunk in enumerate(_chunks(text, size)):
            if n and delay:
                await asyncio.sleep(delay)
            delta = {"type": "text_delta", "text": chunk}
            await response.write(
                _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )

    async def _stream_tool_use(
        self, response: web.StreamResponse, index: int, reply: ToolUseReply, delay: float
    ) -> None:
        block: dict[str, Any] = {
            "type": "tool_use",
            "id": reply.tool_use_id,
            "name": reply.name,
            "input": {},
        }
        await response.write(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        arguments = json.dumps(dict(reply.input))
        for n, chunk in enumerate(_chunks(arguments, reply.chunk_chars)):
            if n and delay:
                await asyncio.sleep(delay)
            delta = {"type": "input_json_delta", "partial_json": chunk}
            await response.write(
                _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        await response.write(_block_stop(index))


def _drop(request: web.Request) -> None:
    """Close the TCP connection without finishing the HTTP response."""
    if request.transport is not None:
        request.transport.abort()


def _block_stop(index: int) -> bytes:
    return _sse("content_block_stop", {"type": "content_block_stop", "index": index})


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _output_tokens(reply: TextReply | ToolUseReply | CutStream) -> int:
    size = len(reply.text)
    if isinstance(reply, ToolUseReply):
        size += len(json.dumps(dict(reply.input)))
    return _estimate_tokens(" " * size)


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _message_start(message_id: str, model: str, input_tokens: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(input_tokens, 1),
        },
    }


def _whole_message(
    message_id: str, model: str, reply: TextReply | ToolUseReply, input_tokens: int
) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if reply.text or isinstance(reply, TextReply):
        content.append({"type": "text", "text": reply.text})
    stop_reason = reply.stop_reason if isinstance(reply, TextReply) else "tool_use"
    if isinstance(reply, ToolUseReply):
        content.append(
            {
                "type": "tool_use",
                "id": reply.tool_use_id,
                "name": reply.name,
                "input": dict(reply.input),
            }
        )
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(input_tokens, _output_tokens(reply)),
    }


def _invalid_messages_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return "messages: a non-empty list is required"
    if "model" in body and not isinstance(body["model"], str):
        return "model: must be a string"
    return None


# -- script files -------------------------------------------------------------------------------


@attrs.frozen
class Script:
    """A script file's content: the replies in order, and what answers once they are used up."""

    replies: tuple[Reply, ...]
    default: Reply = EchoReply()


_REPLY_FIELDS: Mapping[str, Mapping[str, tuple[type, ...]]] = {
    "text": {
        "text": (str,),
        "chunk_chars": (int,),
        "chunk_delay_secs": (int, float),
        "stop_reason": (str,),
    },
    "tool_use": {
        "name": (str,),
        "input": (dict,),
        "text": (str,),
        "id": (str,),
        "chunk_chars": (int,),
        "chunk_delay_secs": (int, float),
    },
    "error": {
        "status": (int,),
        "error_type": (str,),
        "message": (str,),
        "retry_after_secs": (int, float),
        "should_retry": (bool,),
    },
    "cut": {
        "text": (str,),
        "chunk_chars": (int,),
        "chunk_delay_secs": (int, float),
        "error_type": (str,),
        "reset": (bool,),
    },
    "echo": {"prefix": (str,)},
}

_REQUIRED: Mapping[str, tuple[str, ...]] = {
    "text": ("text",),
    "tool_use": ("name", "input"),
    "error": ("status",),
}


def parse_reply(table: Any, *, file: str | None = None, key: str = "reply") -> Reply:
    """Build a reply from a script entry such as ``{"type": "text", "text": "hello"}``."""
    if not isinstance(table, dict):
        raise InputError("must be a table with a 'type'", file=file, key=key)
    kind = table.get("type")
    if not isinstance(kind, str) or kind not in _REPLY_FIELDS:
        choices = ", ".join(_REPLY_FIELDS)
        raise InputError(f"type must be one of {choices}, got {kind!r}", file=file, key=key)
    fields = _REPLY_FIELDS[kind]
    values: dict[str, Any] = {}
    for name, value in table.items():
        if name == "type":
            continue
        if name not in fields:
            known = ", ".join(fields)
            raise InputError(
                f"unknown key for a {kind!r} reply (known: {known})", file=file, key=f"{key}.{name}"
            )
        types = fields[name]
        # bool is an int subclass in Python; a script's `true` is not a number.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join(t.__name__ for t in types)
            raise InputError(
                f"must be {expected}, got {type(value).__name__}", file=file, key=f"{key}.{name}"
            )
        values[name] = value
    for name in _REQUIRED.get(kind, ()):
        if name not in values:
            raise InputError(f"a {kind!r} reply needs {name!r}", file=file, key=key)
    if "id" in values:
        values["tool_use_id"] = values.pop("id")
    try:
        if kind == "text":
            return TextReply(**values)
        if kind == "tool_use":
            return ToolUseReply(**values)
        if kind == "error":
            return ErrorReply(**values)
        if kind == "cut":
            return CutStream(**values)
        return EchoReply(**values)
    except ValueError as exc:
        # attrs validators: a count that must be positive, a status outside 400-599.
        raise InputError(f"invalid value: {exc.args[0]}", file=file, key=key) from exc


def parse_script(data: Any, *, file: str | None = None) -> Script:
    """A script is a list of replies, or a table ``{replies = [...], default = {...}}``."""
    if isinstance(data, list):
        entries: Any = data
        default: Any = None
    elif isinstance(data, dict):
        unknown = sorted(set(data) - {"replies", "default"})
        if unknown:
            raise InputError("unknown key (known: replies, default)", file=file, key=unknown[0])
        entries = data.get("replies", [])
        default = data.get("default")
        if not isinstance(entries, list):
            raise InputError("must be a list of replies", file=file, key="replies")
    else:
        raise InputError("a script is a list of replies or a table with 'replies'", file=file)
    replies = tuple(
        parse_reply(entry, file=file, key=f"replies[{i}]") for i, entry in enumerate(entries)
    )
    if default is None:
        return Script(replies)
    return Script(replies, parse_reply(default, file=file, key="default"))


def load_script(path: Path) -> Script:
    """Read a script from a ``.json`` or ``.toml`` file."""
    if path.suffix not in (".json", ".toml"):
        raise InputError("a script file ends in .json or .toml", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the script: {exc.strerror}", file=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise InputError("the script is not UTF-8 text", file=str(path)) from exc
    try:
        data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not valid {path.suffix[1:].upper()}: {exc}", file=str(path)) from exc
    return parse_script(data, file=str(path))


# -- command line -------------------------------------------------------------------------------


def _request_json(request: RecordedRequest) -> str:
    return json.dumps(
        {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": dict(request.headers),
            "body": request.body,
            "reply": None if request.reply is None else type(request.reply).__name__,
        }
    )


async def _serve(args: argparse.Namespace, script: Script, record: TextIO | None) -> None:
    fake = FakeAnthropic(script.replies, default=script.default, host=args.host, port=args.port)
    if record is not None:

        def write(request: RecordedRequest) -> None:
            record.write(_request_json(request) + "\n")
            record.flush()

        fake.add_listener(write)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with fake:
        print(fake.url, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cis_bot.testing.fake_anthropic",
        description="Serve a fake Anthropic Messages API on loopback; prints its base URL.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (the default)")
    parser.add_argument("--script", help="replies to give, in order (.json or .toml)")
    parser.add_argument("--record", help="append each request as a JSON line to this file")
    parser.add_argument("--log-level", default="info", help="stderr log level (default: info)")
    args = parser.parse_args(argv)
    # stdout carries the URL only; logs go to stderr.
    configure_logging(args.log_level)
    try:
        script = load_script(Path(args.script)) if args.script else Script(())
        with contextlib.ExitStack() as stack:
            record = stack.enter_context(Path(args.record).open("a")) if args.record else None
            asyncio.run(_serve(args, script, record))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

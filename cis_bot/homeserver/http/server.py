"""A small HTTP/1.1 server on ``asyncio.Protocol``: keep-alive, pipelining (answered in order),
Content-Length and chunked bodies, ``Expect: 100-continue``, body and header limits, and
cancellation of the handler when the client goes away (a long-poll ``/sync`` stops waiting).

Why not aiohttp: importing aiohttp costs ~0.25 s and ~13 MiB (it builds TLS contexts at import),
which alone breaks the homeserver's start-up (<= 0.5 s to the first 200) and memory (<= 1/3 of
Synapse's) goals. The server only ever speaks plain HTTP on loopback, so this is all it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING

import attrs
import structlog

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = structlog.get_logger(__name__)

MAX_HEADER_BYTES = 64 * 1024
IDLE_TIMEOUT = 120.0
MAX_PIPELINED = 16  # parsed requests waiting behind the running one before reading pauses
_REASONS = {status.value: status.phrase for status in HTTPStatus}


@attrs.define
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, list[str]]
    body: bytes = b""
    peer: str = ""

    @property
    def path(self) -> str:
        """The raw (still percent-encoded) path, without the query."""
        return self.target.split("?", 1)[0]

    @property
    def query_string(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


@attrs.define
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = attrs.field(factory=list)
    content_type: str = "application/json"


Handler = "Callable[[Request], Awaitable[Response]]"


class BodyTooLarge(Exception):
    pass


class _BadRequest(Exception):
    pass


class HttpProtocol(asyncio.Protocol):
    def __init__(
        self,
        handler: Callable[[Request], Awaitable[Response]],
        *,
        max_body: int,
        too_large: Callable[[], Response],
        connections: set[HttpProtocol],
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.too_large = too_large
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.peer = ""
        # Parser state for the request being read.
        self._head: tuple[str, str, str, dict[str, list[str]]] | None = None
        self._continue_sent = False
        self._idle: asyncio.TimerHandle | None = None
        self._paused = False

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.closing = True
        if self._idle is not None:
            self._idle.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._arm_idle()
        try:
            self._parse()
        except BodyTooLarge:
            self._fail(self.too_large())
        except _BadRequest as err:
            body = f'{{"errcode":"M_UNKNOWN","error":"Bad request: {err}"}}'.encode()
            self._fail(Response(400, body))

    # --- parsing ----------------------------------------------------------------------------

    def _parse(self) -> None:
        while not self.closing:
            if self._head is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEADER_BYTES:
                        raise _BadRequest("headers too large")
                    return
                self._head = _parse_head(bytes(self.buffer[:end]))
                del self.buffer[: end + 4]
                self._continue_sent = False
            method, target, version, headers = self._head
            body = self._take_body(headers)
            if body is None:
                return
            self._head = None
            self.pending.append(Request(method, target, version, headers, body, self.peer))
            if len(self.pending) >= MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()
                self._paused = True
            self._next()

    def _take_body(self, headers: dict[str, list[str]]) -> bytes | None:
        encoding = ",".join(headers.get("transfer-encoding", [])).lower()
        if "chunked" in encoding:
            self._maybe_continue(headers)
            return self._take_chunked()
        lengths = headers.get("content-length")
        if not lengths:
            return b""
        try:
            length = int(lengths[0])
        except ValueError:
            raise _BadRequest("bad Content-Length") from None
        if length < 0:
            raise _BadRequest("bad Content-Length")
        if length > self.max_body:
            raise BodyTooLarge
        if len(self.buffer) < length:
            self._maybe_continue(headers)
            return None
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return body

    def _take_chunked(self) -> bytes | None:
        """Decode a complete chunked body from the buffer, or None if it is not all here."""
        position = 0
        chunks: list[bytes] = []
        total = 0
        while True:
            line_end = self.buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size_text = bytes(self.buffer[position:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            total += size
            if total > self.max_body:
                raise BodyTooLarge
            start = line_end + 2
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return None
                del self.buffer[: trailer_end + 4]
                return b"".join(chunks)
            if len(self.buffer) < start + size + 2:
                return None
            chunks.append(bytes(self.buffer[start : start + size]))
            position = start + size + 2

    def _maybe_continue(self, headers: dict[str, list[str]]) -> None:
        expect = ",".join(headers.get("expect", [])).lower()
        if "100-continue" in expect and not self._continue_sent and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._continue_sent = True

    # --- handling ---------------------------------------------------------------------------

    def _next(self) -> None:
        if self.task is not None or not self.pending or self.closing:
            return
        request = self.pending.popleft()
        if self._paused and len(self.pending) < MAX_PIPELINED // 2 and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False
        self.task = asyncio.get_running_loop().create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            response = await self.handler(request)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("http.handler_crashed", method=request.method, path=request.path)
            response = Response(500, b'{"errcode":"M_UNKNOWN","error":"Internal server error"}')
        keep_alive = _keep_alive(request)
        self._write(response, request, keep_alive)
        self.task = None
        if not keep_alive:
            self._close()
            return
        self._next()

    def _write(self, response: Response, request: Request | None, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        body = response.body
        head_only = request is not None and request.method == "HEAD"
        lines = [
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(body)}",
            "Server: cis-homeserver",
        ]
        if not keep_alive:
            lines.append("Connection: close")
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
        self.transport.write(head if head_only else head + body)

    def _fail(self, response: Response) -> None:
        self._write(response, None, keep_alive=False)
        self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(IDLE_TIMEOUT, self._idle_check)

    def _idle_check(self) -> None:
        if self.task is None and not self.pending:
            self._close()
        else:
            self._arm_idle()

    def shutdown(self) -> None:
        """Server stopping: cancel what runs, close the connection."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._close()


def _keep_alive(request: Request) -> bool:
    connection = ",".join(request.header_all("connection")).lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def _parse_head(raw: bytes) -> tuple[str, str, str, dict[str, list[str]]]:
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:
        raise _BadRequest("undecodable headers") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest("bad request line")
    method, target, version = parts
    if not target.startswith("/"):
        raise _BadRequest("bad request target")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest("bad header line")
        headers.setdefault(name.lower(), []).append(value.strip())
    return method.upper(), target, version, headers


def parse_query(query_string: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(query_string, keep_blank_values=True)


class HttpServer:
    """Binds and serves; ``stop()`` closes the listener and every connection."""

    def __init__(
        self,
        handler: Callable[[Request], Awaitable[Response]],
        *,
        max_body: int,
        too_large: Callable[[], Response],
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.too_large = too_large
        self.connections: set[HttpProtocol] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: HttpProtocol(
                self.handler,
                max_body=self.max_body,
                too_large=self.too_large,
                connections=self.connections,
            ),
            host,
            port,
            reuse_address=True,
        )
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for connection in list(self.connections):
            connection.shutdown()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 5)
        self.server = None

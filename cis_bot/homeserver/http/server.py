"""The homeserver's HTTP/1.1 server: h11 parses and frames, this module is the asyncio shell
around it. Keep-alive, pipelining (answered in order), Content-Length and chunked bodies,
``Expect: 100-continue``, body and header limits, an idle timeout, and cancellation of the
handler when the client goes away (a long-poll ``/sync`` stops waiting).

Why h11: it is the sans-I/O HTTP/1.1 parser httpcore and uvicorn build on, strict where a
hand-written parser gets it wrong (a chunk size of ``-6`` once looped this server forever), and
it imports in ~20 ms. aiohttp's server costs ~0.16 s and ~13 MiB at import, which alone breaks
the homeserver's start-up (<= 0.5 s to the first 200) and memory (<= 1/3 of Synapse's) goals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from http import HTTPStatus
from typing import TYPE_CHECKING

import attrs
import h11
import structlog

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = structlog.get_logger(__name__)

MAX_HEADER_BYTES = 64 * 1024
IDLE_TIMEOUT = 120.0
# Bytes of pipelined requests buffered behind the running one before reading pauses.
MAX_PIPELINED_BYTES = 256 * 1024
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_SERVER = b"cis-homeserver"


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


class HttpProtocol(asyncio.Protocol):
    """One connection. Requests are read one at a time: while a handler runs, what arrives
    waits in h11's buffer (a pipelined request) or tells us the client is gone (EOF)."""

    def __init__(
        self,
        handler: Callable[[Request], Awaitable[Response]],
        *,
        max_body: int,
        too_large: Callable[[], Response],
        connections: set[HttpProtocol],
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.too_large = too_large
        self.connections = connections
        self.idle_timeout = idle_timeout
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.peer = ""
        self._request: h11.Request | None = None
        self._body = bytearray()
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

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._arm_idle()
        self._process()

    # EOF (the client closed or half-closed): the default eof_received closes the transport,
    # and connection_lost cancels a running handler: nobody is left to read its answer.

    # --- reading requests -------------------------------------------------------------------

    def _process(self) -> None:
        """Take events from h11 until it needs more data, or a request is complete."""
        while not self.closing and self.task is None:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as err:
                self._fail(err.error_status_hint, f"Bad request: {err}")
                return
            if event is h11.NEED_DATA:
                if self._request is not None and self.conn.they_are_waiting_for_100_continue:
                    self._send(
                        h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                    )
                return
            if event is h11.PAUSED:
                return  # only after a response completes; _finish starts the next cycle
            if isinstance(event, h11.Request):
                if not self._start_request(event):
                    return
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self.max_body:
                    self._fail_with(self.too_large())
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            else:  # ConnectionClosed
                self._close()
                return
        self._limit_buffer()

    def _start_request(self, event: h11.Request) -> bool:
        if not event.target.startswith(b"/"):
            self._fail(400, "Bad request: bad request target")
            return False
        for name, value in event.headers:
            if name == b"content-length" and int(value) > self.max_body:
                self._fail_with(self.too_large())
                return False
        self._request = event
        self._body = bytearray()
        return True

    def _dispatch(self) -> None:
        event = self._request
        assert event is not None
        headers: dict[str, list[str]] = {}
        for name, value in event.headers:
            headers.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
        request = Request(
            method=event.method.decode("ascii").upper(),
            target=event.target.decode("ascii"),
            version="HTTP/" + event.http_version.decode("ascii"),
            headers=headers,
            body=bytes(self._body),
            peer=self.peer,
        )
        self._request = None
        self._body = bytearray()
        self.task = asyncio.get_running_loop().create_task(self._run(request))

    def _limit_buffer(self) -> None:
        """While a handler runs, stop reading once enough pipelined bytes wait behind it."""
        if self.transport is None or self._paused:
            return
        if self.task is not None and len(self.conn.trailing_data[0]) > MAX_PIPELINED_BYTES:
            self.transport.pause_reading()
            self._paused = True

    # --- answering --------------------------------------------------------------------------

    async def _run(self, request: Request) -> None:
        try:
            response = await self.handler(request)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("http.handler_crashed", method=request.method, path=request.path)
            response = Response(500, b'{"errcode":"M_UNKNOWN","error":"Internal server error"}')
        self.task = None
        if self.closing:
            return
        self._respond(response, head_only=request.method == "HEAD")
        self._finish()

    def _respond(self, response: Response, *, head_only: bool = False) -> None:
        try:
            head = self._head(response)
        except h11.LocalProtocolError as err:
            # A handler put a value into a header that HTTP cannot carry: never send it.
            log.error("http.bad_response_header", status=response.status, error=str(err))
            response = Response(500, b'{"errcode":"M_UNKNOWN","error":"Internal server error"}')
            head = self._head(response)
        self._send(head)
        if response.body and not head_only:
            self._send(h11.Data(data=response.body))
        self._send(h11.EndOfMessage())

    @staticmethod
    def _head(response: Response) -> h11.Response:
        headers = [
            (b"Content-Type", _header_value(response.content_type)),
            (b"Content-Length", str(len(response.body)).encode()),
            (b"Server", _SERVER),
            *((name.encode("ascii"), _header_value(value)) for name, value in response.headers),
        ]
        return h11.Response(
            status_code=response.status,
            headers=headers,
            reason=_REASONS.get(response.status, b""),
        )

    def _finish(self) -> None:
        """After a response: close, or start the next request (maybe already buffered)."""
        if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
            self._close()
            return
        self.conn.start_next_cycle()
        if self._paused and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False
        self._process()

    def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, status: int, message: str) -> None:
        body = json.dumps({"errcode": "M_UNKNOWN", "error": message}).encode()
        self._fail_with(Response(status, body))

    def _fail_with(self, response: Response) -> None:
        """Answer a request we will not handle, then close (its body may still be coming)."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                response.headers = [*response.headers, ("Connection", "close")]
                self._respond(response)
        self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        if self.task is None:
            self._close()
        else:
            self._arm_idle()

    def shutdown(self) -> None:
        """Server stopping: cancel what runs, close the connection."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._close()


def _header_value(value: str) -> bytes:
    """Header values go out as Latin-1; h11 refuses CR, LF and NUL in them."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise h11.LocalProtocolError(f"header value not Latin-1: {value!r}") from None


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
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.too_large = too_large
        self.idle_timeout = idle_timeout
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
                idle_timeout=self.idle_timeout,
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

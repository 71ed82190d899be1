"""The HTTP/1.1 client that pushes transactions to appservices: h11 frames requests and parses
responses (Content-Length, chunked or read-to-close bodies, 100 Continue), this module keeps
one keep-alive connection per origin, reused while the server keeps it open. TLS is set up (and
``ssl`` imported) only for an ``https`` appservice URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from typing import TYPE_CHECKING, Any

import attrs
import h11

if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
_READ_SIZE = 65536


class HttpClientError(Exception):
    """The request did not get an HTTP answer (connection refused, reset, bad response)."""


@attrs.frozen
class ClientResponse:
    status: int
    reason: str
    body: bytes


@attrs.define
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection

    def usable(self) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and self.protocol.our_state is h11.IDLE
        )


class HttpClient:
    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: Any = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> ClientResponse:
        """Raises HttpClientError, or TimeoutError after ``timeout`` seconds."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpClientError(f"unsupported URL {url!r}")
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        key = (parts.scheme, parts.hostname, port)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            request = h11.Request(
                method=method,
                target=target,
                headers=[
                    ("Host", parts.netloc.rsplit("@", 1)[-1]),
                    *(headers or {}).items(),
                    ("Content-Length", str(len(body))),
                ],
            )
        except h11.LocalProtocolError as exc:
            raise HttpClientError(f"cannot send this request: {exc}") from None
        async with asyncio.timeout(timeout):
            # A pooled connection may have been closed by the server meanwhile: one retry on a
            # fresh connection when a reused one fails before any answer.
            for reused in (True, False):
                connection = self._take(key) if reused else None
                if reused and connection is None:
                    continue
                if connection is None:
                    connection = await self._connect(parts.hostname, port, secure)
                try:
                    response = await _exchange(connection, request, body)
                except (OSError, asyncio.IncompleteReadError, h11.ProtocolError) as exc:
                    connection.writer.close()
                    if reused:
                        continue
                    raise HttpClientError(f"{type(exc).__name__}: {exc}") from None
                except HttpClientError:
                    connection.writer.close()
                    raise
                if _reusable(connection.protocol):
                    connection.protocol.start_next_cycle()
                    self._idle.setdefault(key, []).append(connection)
                else:
                    connection.writer.close()
                return response
        raise HttpClientError("unreachable")  # pragma: no cover - the loop always returns

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        pool = self._idle.get(key)
        while pool:
            connection = pool.pop()
            if connection.usable():
                return connection
            connection.writer.close()
        return None

    async def _connect(self, host: str, port: int, secure: bool) -> _Connection:
        ssl_context: Any = None
        if secure:
            if self._ssl is None:
                import ssl

                self._ssl = ssl.create_default_context()
            ssl_context = self._ssl
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
        except OSError as exc:
            raise HttpClientError(f"{type(exc).__name__}: {exc}") from None
        return _Connection(
            reader, writer, h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        )

    async def close(self) -> None:
        for pool in self._idle.values():
            for connection in pool:
                connection.writer.close()
                with contextlib.suppress(OSError):
                    await connection.writer.wait_closed()
        self._idle.clear()


def _reusable(conn: h11.Connection) -> bool:
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _exchange(connection: _Connection, request: h11.Request, body: bytes) -> ClientResponse:
    conn = connection.protocol
    payload = conn.send(request)
    if body:
        payload += conn.send(h11.Data(data=body))
    payload += conn.send(h11.EndOfMessage())
    connection.writer.write(payload)
    await connection.writer.drain()

    response: h11.Response | None = None
    chunks: list[bytes] = []
    total = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await connection.reader.read(_READ_SIZE)
            if not data and response is None:
                raise asyncio.IncompleteReadError(b"", None)  # closed before any answer
            conn.receive_data(data)
        elif isinstance(event, h11.InformationalResponse):
            continue  # 100 Continue: the real answer follows
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            total += len(event.data)
            if total > MAX_RESPONSE_BYTES:
                raise HttpClientError("response too large")
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return ClientResponse(
                response.status_code, response.reason.decode("latin-1"), b"".join(chunks)
            )
        else:  # ConnectionClosed or PAUSED: the server went away mid-answer
            raise HttpClientError("connection closed before the response ended")

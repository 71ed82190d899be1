"""A minimal HTTP/1.1 client for pushing to appservices: one keep-alive connection per origin,
reused while the server keeps it open; Content-Length or chunked or read-to-close responses.
TLS is set up (and ``ssl`` imported) only for an ``https`` appservice URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class HttpClientError(Exception):
    """The request did not get an HTTP answer (connection refused, reset, bad response)."""


@attrs.frozen
class ClientResponse:
    status: int
    reason: str
    body: bytes


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


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
        host_header = parts.netloc.rsplit("@", 1)[-1]
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
        lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
        lines.append(f"Content-Length: {len(body)}")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        async with asyncio.timeout(timeout):
            # A pooled connection may have been closed by the server meanwhile: one retry on a
            # fresh connection when a reused one fails before any answer.
            for reused in (True, False):
                connection = self._take(key) if reused else None
                if reused and connection is None:
                    continue
                if connection is None:
                    connection = await self._connect(parts.hostname, port, secure)
                reader, writer = connection
                try:
                    writer.write(payload)
                    await writer.drain()
                    response, keep = await _read_response(reader, method)
                except (OSError, ValueError, asyncio.IncompleteReadError, HttpClientError) as exc:
                    writer.close()
                    if reused:
                        continue
                    raise HttpClientError(f"{type(exc).__name__}: {exc}") from None
                if keep:
                    self._idle.setdefault(key, []).append(connection)
                else:
                    writer.close()
                return response
        raise HttpClientError("unreachable")  # pragma: no cover - the loop always returns

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        pool = self._idle.get(key)
        while pool:
            reader, writer = pool.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
        return None

    async def _connect(self, host: str, port: int, secure: bool) -> _Connection:
        ssl_context: Any = None
        if secure:
            if self._ssl is None:
                import ssl

                self._ssl = ssl.create_default_context()
            ssl_context = self._ssl
        try:
            return await asyncio.open_connection(host, port, ssl=ssl_context)
        except OSError as exc:
            raise HttpClientError(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        for pool in self._idle.values():
            for _, writer in pool:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[ClientResponse, bool]:
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise HttpClientError("response headers too large") from None
        lines = head.decode("latin-1").split("\r\n")
        status_parts = lines[0].split(" ", 2)
        if len(status_parts) < 2 or not status_parts[0].startswith("HTTP/1."):
            raise HttpClientError(f"bad status line {lines[0]!r}")
        try:
            status = int(status_parts[1])
        except ValueError:
            raise HttpClientError(f"bad status line {lines[0]!r}") from None
        reason = status_parts[2] if len(status_parts) > 2 else ""
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            continue  # interim response (100 Continue): the real one follows
        break
    keep = "close" not in headers.get("connection", "").lower() and status_parts[0] == "HTTP/1.1"
    if method == "HEAD" or status in (204, 304):
        return ClientResponse(status, reason, b""), keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_RESPONSE_BYTES:
            raise HttpClientError("response too large")
        body = await reader.readexactly(length)
    else:
        body = await reader.read(MAX_RESPONSE_BYTES)
        keep = False
    return ClientResponse(status, reason, body), keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_RESPONSE_BYTES:
            raise HttpClientError("response too large")
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)

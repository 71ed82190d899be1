"""The homeserver's own HTTP/1.1 server and client, over real sockets: framing (Content-Length,
chunked, 100-continue), keep-alive and pipelining, limits, and cancellation on disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from cis_bot.homeserver.http.client import HttpClient, HttpClientError
from cis_bot.homeserver.http.server import HttpServer, Request, Response


class Echo:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def __call__(self, request: Request) -> Response:
        if request.path == "/hang":
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        body = json.dumps(
            {"method": request.method, "target": request.target, "body": request.body.decode()}
        )
        return Response(200, body.encode())


@pytest.fixture
async def served() -> AsyncIterator[tuple[HttpServer, Echo, int]]:
    echo = Echo()
    server = HttpServer(echo, max_body=1000, too_large=lambda: Response(413, b'{"too":"large"}'))
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, echo, port
    finally:
        await server.stop()


async def exchange(port: int, raw: bytes, responses: int = 1) -> list[tuple[int, bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    out = []
    for _ in range(responses):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
        out.append((status, await reader.readexactly(length)))
    writer.close()
    return out


async def test_content_length_and_pipelining(served: tuple[HttpServer, Echo, int]) -> None:
    _, _, port = served
    raw = (
        b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    (s1, b1), (s2, b2) = await exchange(port, raw, responses=2)
    assert (s1, json.loads(b1)) == (200, {"method": "POST", "target": "/a?x=1", "body": "hello"})
    assert (s2, json.loads(b2)["target"]) == (200, "/b")


async def test_chunked_body_and_continue(served: tuple[HttpServer, Echo, int]) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert json.loads(await reader.readexactly(length))["body"] == "abcdefg"
    writer.close()


async def test_limits_and_garbage(served: tuple[HttpServer, Echo, int]) -> None:
    _, _, port = served
    [(status, body)] = await exchange(
        port, b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10
    )
    assert status == 413 and json.loads(body) == {"too": "large"}
    [(status, _)] = await exchange(port, b"NONSENSE\r\n\r\n")
    assert status == 400
    [(status, _)] = await exchange(
        port, b"GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: -3\r\n\r\n"
    )
    assert status == 400


async def test_disconnect_cancels_the_handler(served: tuple[HttpServer, Echo, int]) -> None:
    _, echo, port = served
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hang HTTP/1.1\r\nHost: h\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(echo.started.wait(), 10)
    writer.close()
    await asyncio.wait_for(echo.cancelled.wait(), 10)


async def test_client_reuses_connections_and_reports_failures(
    served: tuple[HttpServer, Echo, int],
) -> None:
    server, _, port = served
    client = HttpClient()
    try:
        for n in range(3):
            response = await client.request(
                "PUT", f"http://127.0.0.1:{port}/t/{n}", body=b'{"n":1}', timeout=10
            )
            assert response.status == 200 and json.loads(response.body)["target"] == f"/t/{n}"
        assert len(server.connections) == 1, "keep-alive: one connection for three requests"
    finally:
        await client.close()
    await server.stop()
    with pytest.raises(HttpClientError):
        await HttpClient().request("GET", f"http://127.0.0.1:{port}/", timeout=10)


async def test_many_pipelined_requests_answered_in_order(
    served: tuple[HttpServer, Echo, int],
) -> None:
    """More pipelined requests than the server queues before pausing its reads."""
    _, _, port = served
    raw = b"".join(f"GET /p/{n} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for n in range(60))
    answers = await exchange(port, raw, responses=60)
    assert [json.loads(body)["target"] for _, body in answers] == [f"/p/{n}" for n in range(60)]


@pytest.mark.parametrize(
    ("answer", "body", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", True),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
            True,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nch\r\n3\r\nunk\r\n0\r\n\r\n",
            b"chunk",
            True,
        ),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil close", b"until close", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", b"x", False),
    ],
)
async def test_client_reads_every_framing(answer: bytes, body: bytes, reused: bool) -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError):  # the client closed
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(answer)
                await writer.drain()
                if not reused:
                    break
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = HttpClient()
    try:
        for _ in range(2):
            response = await client.request("GET", f"http://127.0.0.1:{port}/", timeout=10)
            assert (response.status, response.body) == (200, body)
        assert connections == (1 if reused else 2)
    finally:
        await client.close()
        listener.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nhello!\r\n0\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    ],
)
async def test_client_refuses_broken_answers(answer: bytes) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = HttpClient()
    try:
        with pytest.raises(HttpClientError):
            await client.request("GET", f"http://127.0.0.1:{port}/", timeout=10)
    finally:
        await client.close()
        listener.close()

"""Hostile HTTP/1.1 against the real ``cis homeserver`` process on loopback: malformed chunked
bodies (the negative chunk size that once looped the server at 100 % CPU), and hypothesis over
raw request bytes. Every input must end in an answer or a closed connection within a deadline,
the server must stay responsive, and its CPU time and memory must stay bounded."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.embedded import EmbeddedServer
from tests.support.fixtures import start_or_fail
from tests.support.process import read_rss_kib

DEADLINE = 5.0
VERSIONS = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    served = EmbeddedServer(workdir=tmp_path_factory.mktemp("hostile"))
    start_or_fail(served)
    try:
        yield served
    finally:
        served.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exchange(port: int, raw: bytes, *, half_close: bool) -> bytes:
    """Send ``raw`` (then EOF when ``half_close``) and read until the server closes, or, without
    ``half_close``, until one complete answer head has arrived. Fails past the deadline."""
    deadline = time.monotonic() + DEADLINE
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        try:
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking everything: allowed
        received = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no answer and no close within {DEADLINE}s for {raw[:200]!r}; "
                    f"got {received[:200]!r}"
                )
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            except TimeoutError:
                continue
            if not chunk:
                return received
            received += chunk
            if not half_close and b"\r\n\r\n" in received:
                return received


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def assert_alive(server: EmbeddedServer) -> None:
    assert status_of(exchange(server.port, VERSIONS, half_close=False)) == 200


CHUNKED_HEAD = (
    b"PUT /_matrix/client/v3/rooms/!r:cis.local/send/m.room.message/t HTTP/1.1\r\n"
    b"Host: h\r\nTransfer-Encoding: chunked\r\n\r\n"
)
MALFORMED_CHUNKS = {
    "negative": b"-6\r\nhello!\r\n0\r\n\r\n",
    "negative zero": b"-0\r\n\r\n",
    "plus sign": b"+5\r\nhello\r\n0\r\n\r\n",
    "hex prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "not hex": b"zz\r\nhello\r\n0\r\n\r\n",
    "empty size": b"\r\nhello\r\n0\r\n\r\n",
    "huge, 64 hex digits": b"f" * 64 + b"\r\nhello\r\n0\r\n\r\n",
    "huge, 21 hex digits": b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n",
    "missing CRLF after data": b"5\r\nhelloXX0\r\n\r\n",
    "bare LF after data": b"5\r\nhello\n0\r\n\r\n",
    "space inside the size": b"5 5\r\nhello\r\n0\r\n\r\n",
    "chunk size line that never ends": b"5" + b";x" * 40_000,
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CHUNKS))
def test_malformed_chunk_sizes_get_a_prompt_400(server: EmbeddedServer, case: str) -> None:
    cpu_before = cpu_seconds(server.pid)
    rss_before, _ = read_rss_kib(server.pid)
    answer = exchange(server.port, CHUNKED_HEAD + MALFORMED_CHUNKS[case], half_close=False)
    assert status_of(answer) in (400, 431), answer[:300]
    assert_alive(server)
    assert cpu_seconds(server.pid) - cpu_before < 1.0, "the server burned CPU on one request"
    assert read_rss_kib(server.pid)[0] - rss_before < 16 * 1024, "the server's memory grew"


def test_a_chunk_bigger_than_any_body_is_cut_off(server: EmbeddedServer) -> None:
    """A 20-hex-digit chunk size parses, but the body limit ends it once data exceeds it; with
    the client gone first, the connection just closes."""
    cpu_before = cpu_seconds(server.pid)
    answer = exchange(
        server.port, CHUNKED_HEAD + b"f" * 20 + b"\r\n" + b"x" * 4096, half_close=True
    )
    assert answer == b"" or status_of(answer) in (400, 413)
    assert_alive(server)
    assert cpu_seconds(server.pid) - cpu_before < 1.0


# --- hypothesis over raw request bytes --------------------------------------------------------

line_ends = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"", b"\r\r\n"])
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"get"]) | (
    st.binary(max_size=8)
)
targets = st.sampled_from(
    [
        b"/_matrix/client/versions",
        b"/_matrix/client/v3/login",
        b"/_matrix/client/v3/sync?timeout=30000",
        b"/_matrix/media/v3/upload?filename=a",
        b"*",
        b"http://h/x",
        b"/%",
        b"/%ff%fe",
    ]
) | st.binary(max_size=24)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b"", b"http/1.1"])
header_names = st.sampled_from(
    [b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection", b"Content-Type"]
) | st.binary(max_size=12)
numbers = st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: str(n).encode())
header_values = (
    st.sampled_from(
        [b"h", b"chunked", b"gzip, chunked", b"chunked, chunked", b"100-continue", b"close"]
        + [b"keep-alive", b"0", b"5", b" 5 ", b"5, 6", b"application/json", b"", b"\x00"]
    )
    | numbers
    | st.binary(max_size=24)
)
headers = st.lists(st.tuples(header_names, header_values, line_ends), max_size=6)
chunk_sizes = (
    st.sampled_from([b"0", b"-6", b"-0", b"+5", b"0x5", b"f" * 20, b"1" * 25, b"5;e=1", b"5 ;x"])
    | st.integers(min_value=0, max_value=2**90).map(lambda n: b"%x" % n)
    | st.binary(max_size=6)
)
chunked_bodies = st.lists(
    st.tuples(chunk_sizes, line_ends, st.binary(max_size=40), line_ends), max_size=5
).map(lambda chunks: b"".join(size + a + data + b for size, a, data, b in chunks))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = draw(methods) + b" " + draw(targets) + b" " + draw(versions) + draw(line_ends)
    head = b"".join(name + b": " + value + end for name, value, end in draw(headers))
    body = draw(st.binary(max_size=200) | chunked_bodies)
    return line + head + draw(line_ends) + body


raw_inputs = st.one_of(
    st.binary(max_size=3000),
    requests(),
    st.lists(requests(), min_size=2, max_size=4).map(b"".join),
)


@pytest.mark.slow
def test_fuzz_raw_requests(server: EmbeddedServer) -> None:
    rss_before, _ = read_rss_kib(server.pid)
    seen = 0

    @settings(
        max_examples=400,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(raw=raw_inputs)
    def one(raw: bytes) -> None:
        nonlocal seen
        # EOF after the bytes: a request cut short must not keep the connection open either.
        answer = exchange(server.port, raw, half_close=True)
        if answer:
            status_of(answer)  # whatever came back is HTTP, not garbage
        seen += 1
        if seen % 25 == 0:
            assert_alive(server)

    one()
    assert_alive(server)
    rss_after, _ = read_rss_kib(server.pid)
    assert rss_after - rss_before < 32 * 1024, f"RSS grew {rss_after - rss_before} KiB"

"""Response splitting through media: what an uploader says (Content-Type, file name) comes back
in a download's headers, so an upload that tries to end those headers early is refused, and
nothing stored is echoed unchecked. End to end over raw sockets (HTTP clients refuse to send
most of these headers)."""

from __future__ import annotations

import asyncio
import json
import urllib.parse

import pytest

from cis_bot.homeserver.rest.media import _media_path
from cis_bot.homeserver.server import EmbeddedHomeserver

UPLOAD = "/_matrix/media/v3/upload"


async def raw_request(
    hs: EmbeddedHomeserver, head: bytes, body: bytes = b""
) -> tuple[int, dict[str, list[str]], bytes]:
    """One request on its own connection: (status, headers by lower-case name, body)."""
    reader, writer = await asyncio.open_connection(hs.host, hs.port)
    try:
        writer.write(head + body)
        await writer.drain()
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = raw_head.decode("latin-1").split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.setdefault(name.lower(), []).append(value.strip())
        length = int(headers["content-length"][0])
        payload = await asyncio.wait_for(reader.readexactly(length), 10)
        return int(lines[0].split(" ")[1]), headers, payload
    finally:
        writer.close()


async def token_for(hs: EmbeddedHomeserver) -> str:
    _, password = await hs.add_user("uploader")
    body = json.dumps(
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "uploader"},
            "password": password,
        }
    ).encode()
    head = (
        b"POST /_matrix/client/v3/login HTTP/1.1\r\nHost: h\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    status, _, answer = await raw_request(hs, head, body)
    assert status == 200, answer
    return str(json.loads(answer)["access_token"])


def upload_head(token: str, content_type: bytes | None, query: str = "", length: int = 5) -> bytes:
    head = f"POST {UPLOAD}{query} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n"
    if content_type is not None:
        head += "Content-Type: " + content_type.decode("latin-1") + "\r\n"
    return head.encode("latin-1") + f"Content-Length: {length}\r\n\r\n".encode()


def download_head(media_id: str, name: str = "") -> bytes:
    suffix = "/" + urllib.parse.quote(name, safe="") if name else ""
    target = f"/_matrix/media/v3/download/cis.local/{media_id}{suffix}"
    return f"GET {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode()


SPLITTING_TYPES = {
    "folded line": b"text/html\r\n Content-Disposition: inline",
    "bare CR": b"text/html\rContent-Disposition: inline",
    "control character": b"text/html\x01",
    "bell and escape": b"text/plain\x07\x1b[31m",
    "DEL": b"text/plain\x7f",
    "not type/subtype": b"evil",
    "html after a parameter": b"text/plain; x=<script>alert(1)</script>",
    "non-ASCII": "text/plain; charset=\u00e9".encode("latin-1"),
    "overlong": b"a/" + b"b" * 300,
}


@pytest.mark.parametrize("case", sorted(SPLITTING_TYPES))
async def test_upload_with_a_bad_content_type_is_refused(
    server: EmbeddedHomeserver, case: str
) -> None:
    token = await token_for(server)
    status, _, body = await raw_request(server, upload_head(token, SPLITTING_TYPES[case]), b"hello")
    assert status == 400, body
    answer = json.loads(body)
    # The HTTP layer refuses what HTTP itself forbids (a bare control character in a header,
    # M_UNKNOWN); the upload servlet refuses what is not a media type.
    assert answer["errcode"] in ("M_INVALID_PARAM", "M_UNKNOWN"), answer
    assert server.hs is not None
    assert server.hs.store.conn.execute("SELECT COUNT(*) FROM media").fetchone()[0] == 0


async def test_a_bare_lf_ends_the_header_it_is_in(server: EmbeddedHomeserver) -> None:
    """h11 reads a bare LF as a line end: the rest is another request header, never part of
    the stored type."""
    token = await token_for(server)
    head = upload_head(token, b"text/html\nX-Evil: 1")
    status, _, body = await raw_request(server, head, b"hello")
    assert status == 200, body
    media_id = json.loads(body)["content_uri"].rsplit("/", 1)[1]
    status, headers, _ = await raw_request(server, download_head(media_id))
    assert status == 200 and "x-evil" not in headers
    assert headers["content-type"] == ["text/html"]
    assert headers["content-disposition"] == ["attachment"]


async def test_download_headers_carry_only_checked_values(server: EmbeddedHomeserver) -> None:
    token = await token_for(server)
    evil_name = 'a"\r\nX-Evil: 1\r\n\r\n<script>é.txt'
    status, _, body = await raw_request(
        server,
        upload_head(
            token,
            b"text/plain; charset=utf-8",
            "?filename=" + urllib.parse.quote(evil_name, safe=""),
        ),
        b"hello",
    )
    assert status == 200, body
    media_id = json.loads(body)["content_uri"].rsplit("/", 1)[1]
    for name in ("", "other\r\nX-Evil: 2.txt"):
        status, headers, payload = await raw_request(server, download_head(media_id, name))
        assert status == 200 and payload == b"hello"
        assert "x-evil" not in headers
        assert headers["content-type"] == ["text/plain; charset=utf-8"]
        (disposition,) = headers["content-disposition"]
        expected = urllib.parse.quote(name or evil_name, safe="")
        assert disposition == f"inline; filename*=utf-8''{expected}"
        assert headers["content-security-policy"][0].startswith("sandbox;")


async def test_a_stored_bad_type_is_served_as_octet_stream(server: EmbeddedHomeserver) -> None:
    """A row written before uploads were checked (or by hand) is never echoed as it is."""
    hs = server.hs
    assert hs is not None
    path = _media_path(hs.media_dir, "legacymediaid")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"<html>")
    hs.store.add_media("legacymediaid", "@x:cis.local", "text/html\r\nX-Evil: 1", "x.html", 6)
    status, headers, payload = await raw_request(server, download_head("legacymediaid"))
    assert status == 200 and payload == b"<html>"
    assert headers["content-type"] == ["application/octet-stream"]
    assert headers["content-disposition"] == ["attachment; filename=x.html"]
    assert "x-evil" not in headers

"""Media repository: upload, download (the legacy ``/_matrix/media/v3`` paths and the
authenticated ``/_matrix/client/v1/media`` ones), config. Files live under
``<state_dir>/media``; there is no thumbnailing (a thumbnail request gets the original for
images, as a server without a thumbnailer may)."""

from __future__ import annotations

import asyncio
import secrets
import string
import urllib.parse
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import TOO_LARGE, MatrixError, not_found
from cis_bot.homeserver.http.server import Response
from cis_bot.homeserver.rest.base import CORS_HEADERS

if TYPE_CHECKING:
    from pathlib import Path

    from cis_bot.homeserver.rest.base import RestRequest, Router

MEDIA_PREFIX = r"^/_matrix/media/(?:r0|v3|v1)"
AUTH_MEDIA_PREFIX = r"^/_matrix/client/v1/media"
_ID_ALPHABET = string.ascii_letters


def _media_path(root: Path, media_id: str) -> Path:
    return root / media_id[:2] / media_id[2:4] / media_id


async def upload(request: RestRequest) -> tuple[int, Any]:
    requester = request.auth()
    hs = request.hs
    limit = hs.max_upload_size
    try:
        data = await request.read_body(limit)
    except MatrixError as err:
        if err.errcode == TOO_LARGE:
            raise MatrixError(413, TOO_LARGE, "Upload request body is too large") from None
        raise
    content_type = request.header("Content-Type") or "application/octet-stream"
    filename = request.string("filename")
    media_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))
    path = _media_path(hs.media_dir, media_id)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)

    await asyncio.to_thread(write)
    hs.store.add_media(media_id, requester.user_id, content_type, filename, len(data))
    return 200, {"content_uri": f"mxc://{hs.server_name}/{media_id}"}


async def _download(
    request: RestRequest, server_name: str, media_id: str, file_name: str | None
) -> Response:
    hs = request.hs
    if server_name != hs.server_name:
        raise not_found("Not found")  # no federation: remote media is unknown
    row = hs.store.get_media(media_id)
    if row is None:
        raise not_found("Not found")
    path = _media_path(hs.media_dir, media_id)
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except OSError:
        raise not_found("Not found") from None
    name = file_name or row.upload_name
    inline_types = ("image/", "video/", "audio/", "text/plain")
    disposition = "inline" if row.content_type.startswith(inline_types) else "attachment"
    if name:
        disposition += f"; filename*=utf-8''{urllib.parse.quote(name)}"
    headers = [
        ("Content-Disposition", disposition),
        (
            "Content-Security-Policy",
            "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
            "style-src 'unsafe-inline'; media-src 'self'; object-src 'self';",
        ),
        ("Cross-Origin-Resource-Policy", "cross-origin"),
        *CORS_HEADERS.items(),
    ]
    return Response(200, data, headers, content_type=row.content_type)


async def download(
    request: RestRequest, server_name: str, media_id: str, file_name: str | None = None
) -> Response:
    return await _download(request, server_name, media_id, file_name)


async def download_authenticated(
    request: RestRequest, server_name: str, media_id: str, file_name: str | None = None
) -> Response:
    request.auth()
    return await _download(request, server_name, media_id, file_name)


async def thumbnail(request: RestRequest, server_name: str, media_id: str) -> Response:
    return await _download(request, server_name, media_id, None)


async def thumbnail_authenticated(
    request: RestRequest, server_name: str, media_id: str
) -> Response:
    request.auth()
    return await _download(request, server_name, media_id, None)


async def config(request: RestRequest) -> tuple[int, Any]:
    request.auth()
    return 200, {"m.upload.size": request.hs.max_upload_size}


def register_routes(router: Router) -> None:
    router.add("POST", MEDIA_PREFIX + "/upload", upload)
    media = "/download/(?P<server_name>[^/]*)/(?P<media_id>[^/]*)"
    router.add("GET", MEDIA_PREFIX + media, download)
    router.add("GET", MEDIA_PREFIX + media + "/(?P<file_name>[^/]*)", download)
    router.add("GET", AUTH_MEDIA_PREFIX + media, download_authenticated)
    router.add("GET", AUTH_MEDIA_PREFIX + media + "/(?P<file_name>[^/]*)", download_authenticated)
    thumb = "/thumbnail/(?P<server_name>[^/]*)/(?P<media_id>[^/]*)"
    router.add("GET", MEDIA_PREFIX + thumb, thumbnail)
    router.add("GET", AUTH_MEDIA_PREFIX + thumb, thumbnail_authenticated)
    router.add("GET", MEDIA_PREFIX + "/config", config)
    router.add("GET", AUTH_MEDIA_PREFIX + "/config", config)

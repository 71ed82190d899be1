"""Media repository: upload, download (the legacy ``/_matrix/media/v3`` paths and the
authenticated ``/_matrix/client/v1/media`` ones), config. Files live under
``<state_dir>/media``; there is no thumbnailing (a thumbnail request gets the original for
images, as a server without a thumbnailer may).

A download echoes what the uploader said (content type, file name) in its headers, so both are
checked: an upload's Content-Type must be a media type (``type/subtype`` with parameters, ASCII,
no control characters) or it is refused, a stored type that is not one is served as
``application/octet-stream``, and the file name goes out RFC 6266-encoded.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import string
import urllib.parse
from typing import TYPE_CHECKING, Any

from cis_bot import private
from cis_bot.homeserver.errors import INVALID_PARAM, TOO_LARGE, MatrixError, bad_request, not_found
from cis_bot.homeserver.http.server import Response
from cis_bot.homeserver.rest.base import CORS_HEADERS

if TYPE_CHECKING:
    from pathlib import Path

    from cis_bot.homeserver.rest.base import RestRequest, Router

MEDIA_PREFIX = r"^/_matrix/media/(?:r0|v3|v1)"
AUTH_MEDIA_PREFIX = r"^/_matrix/client/v1/media"
_ID_ALPHABET = string.ascii_letters
DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_CONTENT_TYPE_LENGTH = 255

# RFC 9110 media-type: token "/" token *( OWS ";" OWS [ token "=" ( token / quoted-string ) ] ),
# restricted to ASCII (no obs-text).
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED_STRING = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED_STRING}))?)*"
)
# Synapse's INLINE_CONTENT_TYPES: what a browser may render in place (SVG deliberately not).
_INLINE_CONTENT_TYPES = frozenset(
    (
        "text/css",
        "text/plain",
        "text/csv",
        "application/json",
        "application/ld+json",
        "image/jpeg",
        "image/gif",
        "image/png",
        "image/apng",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "video/ogg",
        "video/quicktime",
        "audio/mp4",
        "audio/webm",
        "audio/aac",
        "audio/mpeg",
        "audio/ogg",
        "audio/wave",
        "audio/wav",
        "audio/x-wav",
        "audio/x-pn-wav",
        "audio/flac",
        "audio/x-flac",
    )
)
# RFC 2616 separators: a file name without them (nor CTLs, space or non-ASCII) is a token.
_FILENAME_SEPARATORS = frozenset('()<>@,;:\\"/[]?={}')


def is_media_type(value: str) -> bool:
    return len(value) <= MAX_CONTENT_TYPE_LENGTH and _MEDIA_TYPE.fullmatch(value) is not None


def content_disposition(content_type: str, file_name: str | None) -> str:
    """Synapse's add_file_headers: inline only for types a browser renders safely; the name as
    a token when it is one, else as an RFC 5987 ``filename*`` (percent-encoded UTF-8)."""
    essence = content_type.split(";", 1)[0].strip().lower()
    disposition = "inline" if essence in _INLINE_CONTENT_TYPES else "attachment"
    if not file_name:
        return disposition
    if all(32 < ord(c) < 127 and c not in _FILENAME_SEPARATORS for c in file_name):
        return f"{disposition}; filename={file_name}"
    encoded = urllib.parse.quote(file_name.encode("utf-8", "replace"), safe="")
    return f"{disposition}; filename*=utf-8''{encoded}"


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
    content_type = request.header("Content-Type") or DEFAULT_CONTENT_TYPE
    if not is_media_type(content_type):
        raise bad_request(f"Invalid Content-Type {content_type!r}", INVALID_PARAM)
    filename = request.string("filename")
    media_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))
    path = _media_path(hs.media_dir, media_id)

    def write() -> None:
        private.make_dirs(path.parent)
        private.write_file(path, data)

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
    # Stored before uploads were checked, a value may not be a media type: never echo it.
    content_type = row.content_type if is_media_type(row.content_type) else DEFAULT_CONTENT_TYPE
    headers = [
        ("Content-Disposition", content_disposition(content_type, file_name or row.upload_name)),
        (
            "Content-Security-Policy",
            "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
            "style-src 'unsafe-inline'; media-src 'self'; object-src 'self';",
        ),
        ("Cross-Origin-Resource-Policy", "cross-origin"),
        *CORS_HEADERS.items(),
    ]
    return Response(200, data, headers, content_type=content_type)


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

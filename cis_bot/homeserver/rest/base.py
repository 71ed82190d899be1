"""HTTP plumbing shared by every servlet: routing on the raw path (so ``%2F`` inside a room id or
event type stays one segment, as in Synapse), body limits, JSON parsing, authentication and the
mapping of errors to Matrix error responses. The router is a list of regexes like Synapse's
``client_patterns``; ``cis_bot.homeserver.http.server`` speaks HTTP.
"""

from __future__ import annotations

import errno
import json
import math
import re
import sqlite3
import urllib.parse
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from cis_bot.homeserver.errors import (
    BAD_JSON,
    NOT_JSON,
    TOO_LARGE,
    UNRECOGNIZED,
    MatrixError,
    bad_request,
)
from cis_bot.homeserver.http.server import Request, Response, parse_query

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.server import Homeserver

log = structlog.get_logger(__name__)

CLIENT_PREFIX = r"^/_matrix/client/(?:api/v1|r0|v3|unstable)"
CLIENT_V3_ONLY = r"^/_matrix/client/(?:r0|v3|unstable)"
MAX_JSON_BODY = 1024 * 1024
# Deeper JSON is refused when parsed, so the recursive code behind (canonical JSON checks,
# pruning, filters, serialising) never meets a depth near Python's recursion limit.
MAX_JSON_DEPTH = 128
# Integers that reach SQLite must fit its 64-bit INTEGER.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "X-Requested-With, Content-Type, Authorization, Date",
    "Access-Control-Expose-Headers": "Synapse-Trace-Id, Server",
}


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is out of range")  # 1e400: no JSON encoder can write it back
    return number


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(text: str) -> Any:
    """JSON from a client (a body, a ``filter`` parameter): 400 M_NOT_JSON for anything that
    is not JSON or that the server could not store and send back: NaN and infinities, numbers
    beyond a double, lone UTF-16 surrogates (``"\\ud800"``: UTF-8 cannot encode them), and
    nesting deeper than MAX_JSON_DEPTH."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise MatrixError(400, NOT_JSON, "Content not JSON.") from None
    # Both checks walk the parsed value; the text says cheaply when neither can fail.
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    if deep or _SURROGATE_ESCAPE.search(text):
        _check_parsed(value)
    return value


def _check_parsed(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise MatrixError(400, NOT_JSON, "Content not JSON: a lone surrogate in a string.")
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise MatrixError(
                    400, NOT_JSON, f"Content not JSON: nested deeper than {MAX_JSON_DEPTH}."
                )
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def json_bytes(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


_CORS_LIST = list(CORS_HEADERS.items())


def json_response(status: int, body: Any) -> Response:
    return Response(status, json_bytes(body), list(_CORS_LIST))


def error_response(error: MatrixError) -> Response:
    return json_response(error.status, error.to_json())


class Query:
    """Query parameters: ``get`` (first value), ``getall``, ``in``."""

    def __init__(self, raw: str) -> None:
        self._values = parse_query(raw) if raw else {}

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._values.get(name)
        return values[0] if values else default

    def getall(self, name: str) -> list[str]:
        return self._values.get(name, [])

    def __contains__(self, name: object) -> bool:
        return name in self._values


@attrs.define
class RestRequest:
    hs: Homeserver
    raw: Request
    path: str
    query: Query
    requester: Requester | None = None

    @property
    def method(self) -> str:
        return self.raw.method

    def header(self, name: str) -> str | None:
        return self.raw.header(name)

    async def read_body(self, limit: int = MAX_JSON_BODY) -> bytes:
        # The HTTP layer has read the body already (bounded by the largest limit, uploads).
        if len(self.raw.body) > limit:
            raise MatrixError(413, TOO_LARGE, "Request body too large")
        return self.raw.body

    async def json(self, *, allow_empty: bool = False) -> dict[str, Any]:
        """Synapse's parse_json_object_from_request."""
        raw = await self.read_body()
        if not raw.strip() and allow_empty:
            return {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MatrixError(400, NOT_JSON, "Content not JSON.") from None
        value = parse_json(text)
        if not isinstance(value, dict):
            raise MatrixError(400, BAD_JSON, "Content must be a JSON object.")
        return value

    # --- query parameters (Synapse's parse_string / parse_integer / parse_boolean) -------

    def string(
        self, name: str, default: str | None = None, *, allowed: tuple[str, ...] | None = None
    ) -> str | None:
        value = self.query.get(name)
        if value is None:
            return default
        if allowed is not None and value not in allowed:
            raise bad_request(
                f"Query parameter {name!r} must be one of [{', '.join(repr(a) for a in allowed)}]",
                "M_INVALID_PARAM",
            )
        return value

    def integer(
        self, name: str, default: int | None = None, *, negative: bool = False
    ) -> int | None:
        value = self.query.get(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise bad_request(
                f"Query parameter {name!r} must be an integer.", "M_INVALID_PARAM"
            ) from None
        if number < 0 and not negative:
            raise bad_request(
                f"Query parameter {name!r} must be a non-negative integer.", "M_INVALID_PARAM"
            )
        if not INT64_MIN <= number <= INT64_MAX:
            raise bad_request(f"Query parameter {name!r} is out of range.", "M_INVALID_PARAM")
        return number

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.query.get(name)
        if value is None:
            return default
        if value == "true":
            return True
        if value == "false":
            return False
        raise bad_request(
            f"Boolean query parameter {name!r} must be one of ['true', 'false']",
            "M_INVALID_PARAM",
        )

    # --- auth -----------------------------------------------------------------------------

    def has_token(self) -> bool:
        return bool(self.raw.header_all("authorization")) or "access_token" in self.query

    def token(self) -> str:
        return self.hs.auth.token_from(
            self.raw.header_all("authorization"), self.query.getall("access_token")
        )

    def auth(self) -> Requester:
        if self.requester is None:
            self.requester = self.hs.auth.authenticate(self.token(), self.query.get("user_id"))
        return self.requester


RouteHandler = Any  # async (RestRequest, **path params) -> Response | (status, body)


@attrs.frozen
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: RouteHandler


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: RouteHandler) -> None:
        self.routes.append(Route(method, re.compile(pattern + "$"), handler))

    def client(self, method: str, path: str, handler: RouteHandler, *, v1: bool = True) -> None:
        self.add(method, (CLIENT_PREFIX if v1 else CLIENT_V3_ONLY) + path, handler)

    def match(self, method: str, path: str) -> tuple[RouteHandler, dict[str, str]] | None:
        """The handler and its (url-decoded) path parameters; raises 405 for a known path with
        another method, returns None for an unknown path."""
        path_known = False
        for route in self.routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            path_known = True
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                params = {k: urllib.parse.unquote(v) for k, v in found.groupdict().items()}
                return route.handler, params
        if path_known:
            raise MatrixError(405, UNRECOGNIZED, "Unrecognized request")
        return None


def _disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space (SQLite's "database or disk is full", ENOSPC),
    itself or as the cause of what was raised."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, sqlite3.OperationalError) and "full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class HttpFrontend:
    """The HTTP server's handler: route, run, render."""

    def __init__(self, hs: Homeserver, router: Router) -> None:
        self.hs = hs
        self.router = router

    async def __call__(self, raw: Request) -> Response:
        path = raw.path
        if raw.method == "OPTIONS":
            return json_response(200, {})
        try:
            found = self.router.match(raw.method, path)
            if found is None:
                raise MatrixError(404, UNRECOGNIZED, "Unrecognized request")
            handler, params = found
            request = RestRequest(self.hs, raw, path, Query(raw.query_string))
            result = await handler(request, **params)
        except MatrixError as error:
            return error_response(error)
        except Exception as exc:
            if _disk_full(exc):
                # Not a bug: said in one line, and the client may retry once there is room.
                log.error("http.disk_full", method=raw.method, path=path, error=str(exc))
                return json_response(
                    500, {"errcode": "M_UNKNOWN", "error": "The homeserver's disk is full"}
                )
            log.exception("http.unhandled_error", method=raw.method, path=path)
            return json_response(500, {"errcode": "M_UNKNOWN", "error": "Internal server error"})
        if isinstance(result, Response):
            return result
        status, body = result
        return json_response(status, body)

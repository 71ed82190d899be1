"""Matrix error responses: every refusal is a ``MatrixError`` carrying the HTTP status, the spec's
``errcode`` and a human message, rendered as ``{"errcode": ..., "error": ...}`` like Synapse."""

from __future__ import annotations

from typing import Any

# errcodes from the spec (and the few Synapse-specific ones clients rely on)
FORBIDDEN = "M_FORBIDDEN"
UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
MISSING_TOKEN = "M_MISSING_TOKEN"
BAD_JSON = "M_BAD_JSON"
NOT_JSON = "M_NOT_JSON"
NOT_FOUND = "M_NOT_FOUND"
UNRECOGNIZED = "M_UNRECOGNIZED"
UNKNOWN = "M_UNKNOWN"
USER_IN_USE = "M_USER_IN_USE"
INVALID_USERNAME = "M_INVALID_USERNAME"
ROOM_IN_USE = "M_ROOM_IN_USE"
INVALID_ROOM_STATE = "M_INVALID_ROOM_STATE"
EXCLUSIVE = "M_EXCLUSIVE"
MISSING_PARAM = "M_MISSING_PARAM"
INVALID_PARAM = "M_INVALID_PARAM"
TOO_LARGE = "M_TOO_LARGE"
UNSUPPORTED_ROOM_VERSION = "M_UNSUPPORTED_ROOM_VERSION"
GUEST_ACCESS_FORBIDDEN = "M_GUEST_ACCESS_FORBIDDEN"
USER_DEACTIVATED = "M_USER_DEACTIVATED"
AS_PING_URL_NOT_SET = "M_URL_NOT_SET"
AS_PING_BAD_STATUS = "M_BAD_STATUS"
AS_PING_CONNECTION_FAILED = "M_CONNECTION_FAILED"
AS_PING_CONNECTION_TIMEOUT = "M_CONNECTION_TIMEOUT"


class MatrixError(Exception):
    """A request the server refuses. ``extra`` keys are merged into the JSON body."""

    def __init__(self, status: int, errcode: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errcode": self.errcode, "error": self.message}
        body.update(self.extra)
        return body

    def __repr__(self) -> str:
        return f"MatrixError({self.status}, {self.errcode!r}, {self.message!r})"


def forbidden(message: str) -> MatrixError:
    return MatrixError(403, FORBIDDEN, message)


def bad_request(message: str, errcode: str = UNKNOWN) -> MatrixError:
    return MatrixError(400, errcode, message)


def not_found(message: str) -> MatrixError:
    return MatrixError(404, NOT_FOUND, message)


def unknown_token(message: str = "Invalid access token passed.") -> MatrixError:
    return MatrixError(401, UNKNOWN_TOKEN, message, soft_logout=False)


def missing_token(message: str = "Missing access token") -> MatrixError:
    return MatrixError(401, MISSING_TOKEN, message)

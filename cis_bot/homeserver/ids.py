"""Identifiers and canonical JSON: user/room/event ids, localpart rules, reference hashes."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import string
from typing import Any

from cis_bot.homeserver.errors import INVALID_USERNAME, MatrixError, bad_request

# Synapse's rule for new localparts (historical ids may be looser; we only mint new ones).
_LOCALPART_CHARS = frozenset(string.ascii_lowercase + string.digits + "._=-/+")
MAX_USERID_LENGTH = 255
CANONICALJSON_MAX_INT = 2**53 - 1
CANONICALJSON_MIN_INT = -CANONICALJSON_MAX_INT


def canonical_json(value: Any) -> bytes:
    """The spec's canonical JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
    ).encode("utf-8")


def unpadded_b64(data: bytes, *, urlsafe: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.rstrip(b"=").decode("ascii")


def random_string(length: int, alphabet: str = string.ascii_letters) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def check_new_localpart(localpart: str, server_name: str) -> str:
    """Validate a localpart for a new account the way Synapse's check_username does."""
    if not all(ch in _LOCALPART_CHARS for ch in localpart):
        raise MatrixError(
            400, INVALID_USERNAME, "User ID can only contain characters a-z, 0-9, or '=_-./+'"
        )
    if not localpart:
        raise MatrixError(400, INVALID_USERNAME, "User ID cannot be empty")
    if localpart.startswith("_"):
        raise MatrixError(400, INVALID_USERNAME, "User ID may not begin with _")
    user_id = f"@{localpart}:{server_name}"
    if len(user_id) > MAX_USERID_LENGTH:
        raise MatrixError(
            400,
            INVALID_USERNAME,
            f"User ID may not be longer than {MAX_USERID_LENGTH} characters",
        )
    return user_id


def split_id(identifier: str, sigil: str) -> tuple[str, str]:
    """``@local:server`` -> (local, server). Raises ValueError when malformed."""
    if not isinstance(identifier, str) or len(identifier) < 2 or identifier[0] != sigil:
        raise ValueError(f"{identifier!r} does not start with {sigil!r}")
    local, sep, server = identifier[1:].partition(":")
    if not sep or not server:
        raise ValueError(f"{identifier!r} has no server part")
    return local, server


def parse_user_id(user_id: object) -> tuple[str, str]:
    """Validate a user id from a request; a 400 with Synapse's wording when it is not one."""
    if not isinstance(user_id, str):
        raise bad_request(f"Invalid user_id: {user_id}", "M_INVALID_PARAM")
    try:
        return split_id(user_id, "@")
    except ValueError:
        raise bad_request(f"Invalid user_id: {user_id}", "M_INVALID_PARAM") from None


def is_valid_user_id(user_id: object) -> bool:
    try:
        split_id(user_id, "@")  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


_DOMAINLESS_ROOM_ID = re.compile(r"^[A-Za-z0-9_-]{43}$")


def is_valid_room_id(room_id: object) -> bool:
    """``!local:server``, or a v12 ``!`` + 43 url-safe base64 characters (MSC4291)."""
    if not isinstance(room_id, str) or not room_id.startswith("!"):
        return False
    if ":" in room_id:
        try:
            split_id(room_id, "!")
        except ValueError:
            return False
        return True
    return bool(_DOMAINLESS_ROOM_ID.match(room_id[1:]))


def new_room_id(server_name: str) -> str:
    return f"!{random_string(18)}:{server_name}"


def check_canonical_json_values(value: Any) -> None:
    """Room versions >= 6 reject floats and integers outside the canonical JSON range."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if not CANONICALJSON_MIN_INT <= value <= CANONICALJSON_MAX_INT:
            raise bad_request("JSON integer out of range", "M_BAD_JSON")
        return
    if isinstance(value, float):
        raise bad_request("Bad JSON value: float", "M_BAD_JSON")
    if isinstance(value, dict):
        for item in value.values():
            check_canonical_json_values(item)
        return
    if isinstance(value, list):
        for item in value:
            check_canonical_json_values(item)
        return
    raise bad_request("Unknown JSON value", "M_BAD_JSON")


def content_hash(pdu: dict[str, Any]) -> str:
    """sha256 content hash of a PDU (spec: strip unsigned, signatures, hashes)."""
    stripped = {k: v for k, v in pdu.items() if k not in ("unsigned", "signatures", "hashes")}
    return unpadded_b64(hashlib.sha256(canonical_json(stripped)).digest())


def reference_event_id(redacted_pdu: dict[str, Any]) -> str:
    """Room v4+ event id: ``$`` + url-safe unpadded base64 of the reference hash of the
    redacted PDU without signatures/unsigned."""
    stripped = {k: v for k, v in redacted_pdu.items() if k not in ("unsigned", "signatures")}
    return "$" + unpadded_b64(hashlib.sha256(canonical_json(stripped)).digest(), urlsafe=True)

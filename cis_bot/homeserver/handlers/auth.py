"""Who is asking: access tokens, appservice tokens with ``?user_id=`` masquerading, passwords,
logins and registrations.

Passwords are hashed with PBKDF2-HMAC-SHA256 (600 000 iterations, 16-byte salt, from the
stdlib). scrypt would be the stronger KDF, but at sensible cost it allocates 16 MiB per hash and
the whole server must stay under ~40 MiB; PBKDF2 at OWASP's 2023 iteration count costs CPU only
and runs in a worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

import attrs

from cis_bot.homeserver.errors import (
    EXCLUSIVE,
    FORBIDDEN,
    USER_IN_USE,
    MatrixError,
    forbidden,
    missing_token,
    unknown_token,
)
from cis_bot.homeserver.ids import random_string
from cis_bot.homeserver.storage.registration import UserExistsError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from cis_bot.homeserver.appservice.registration import Appservice
    from cis_bot.homeserver.storage.store import Store

PBKDF2_ITERATIONS = 600_000
_HASH_SCHEME = "pbkdf2_sha256"


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "$".join(
        (
            _HASH_SCHEME,
            str(iterations),
            base64.b64encode(salt).decode("ascii"),
            base64.b64encode(digest).decode("ascii"),
        )
    )


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != _HASH_SCHEME:
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac(
            "sha256", password.encode("utf-8"), base64.b64decode(salt), int(iterations)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, actual)


def generate_access_token(user_id: str) -> str:
    """Synapse-shaped (``syt_<b64 localpart>_<random>``) so logs look familiar; only the random
    part (160 bits from ``secrets``) matters."""
    localpart = user_id[1:].split(":", 1)[0]
    b64 = base64.urlsafe_b64encode(localpart.encode()).rstrip(b"=").decode()
    return f"syt_{b64}_{secrets.token_urlsafe(20)}"


def generate_device_id() -> str:
    return random_string(10, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@attrs.frozen
class Requester:
    user_id: str
    device_id: str | None
    access_token: str
    appservice: Appservice | None = None

    @property
    def txn_scope(self) -> str:
        """Transaction ids are scoped to the device (or, for appservices, to the appservice and
        the user it acts as)."""
        if self.appservice is not None:
            return f"{self.user_id}|as:{self.appservice.id}"
        return f"{self.user_id}|{self.device_id}"


class AuthHandler:
    def __init__(self, store: Store, server_name: str, appservices: Sequence[Appservice]) -> None:
        self.store = store
        self.server_name = server_name
        self.appservices = list(appservices)
        self._by_as_token = {service.as_token: service for service in appservices}
        self._token_cache: dict[str, tuple[str, str]] = {}
        # Called with (user_id, device_id) when a login makes a new device.
        self.device_listeners: list[Callable[[str, str], None]] = []

    # --- requests -------------------------------------------------------------------------

    @staticmethod
    def token_from(authorization: Sequence[str], query_tokens: Sequence[str]) -> str:
        """Synapse's get_access_token_from_request."""
        if authorization:
            if query_tokens:
                raise missing_token(
                    "Mixing Authorization headers and access_token query parameters."
                )
            if len(authorization) > 1:
                raise missing_token("Too many Authorization headers.")
            parts = authorization[0].split(" ")
            if parts[0] == "Bearer" and len(parts) == 2:
                return parts[1]
            raise missing_token("Invalid Authorization header.")
        if not query_tokens:
            raise missing_token()
        return query_tokens[0]

    def appservice_for_token(self, token: str) -> Appservice | None:
        return self._by_as_token.get(token)

    def authenticate(self, token: str, masquerade_user: str | None) -> Requester:
        service = self._by_as_token.get(token)
        if service is not None:
            user_id = service.sender
            if masquerade_user is not None:
                user_id = masquerade_user
                self._check_appservice_can_control(service, user_id)
            return Requester(user_id, None, token, service)
        found = self._token_cache.get(token)
        if found is None:
            found = self.store.get_access_token(token)
            if found is None:
                raise unknown_token()
            self._token_cache[token] = found
        user_id, device_id = found
        return Requester(user_id, device_id, token)

    def _check_appservice_can_control(self, service: Appservice, user_id: str) -> None:
        if user_id == service.sender:
            return
        if not service.is_interested_in_user(user_id):
            raise forbidden(f"Application service cannot masquerade as this user ({user_id}).")
        if self.store.get_user(user_id) is None:
            raise forbidden(f"Application service has not registered this user ({user_id})")

    def forget_tokens(self, tokens: Sequence[str]) -> None:
        for token in tokens:
            self._token_cache.pop(token, None)

    def is_admin(self, user_id: str) -> bool:
        user = self.store.get_user(user_id)
        return bool(user and user.admin)

    # --- accounts -------------------------------------------------------------------------

    def register_appservice_user(self, service: Appservice, localpart: str) -> str:
        """Synapse's appservice_register: no localpart syntax check (bridges need odd ids), the
        id must be in the appservice's namespace and not exclusive to another appservice."""
        user_id = f"@{localpart}:{self.server_name}"
        if not service.is_interested_in_user(user_id):
            raise MatrixError(
                400, EXCLUSIVE, "Invalid user localpart for this application service."
            )
        for other in self.appservices:
            if other is not service and other.is_exclusive_user(user_id):
                raise MatrixError(
                    400, EXCLUSIVE, "This user ID is reserved by an application service."
                )
        try:
            self.store.create_user(
                user_id,
                password_hash=None,
                appservice_id=service.id if service.is_exclusive_user(user_id) else None,
                displayname=localpart,
            )
        except UserExistsError:
            raise MatrixError(400, USER_IN_USE, "User ID already taken.") from None
        return user_id

    def new_session(
        self,
        user_id: str,
        device_id: str | None,
        display_name: str | None = None,
        ip: str | None = None,
    ) -> tuple[str, str]:
        """Create an access token for a (possibly new) device: (device_id, token)."""
        device = device_id or generate_device_id()
        token = generate_access_token(user_id)
        is_new = device_id is None or all(
            row[0] != device for row in self.store.get_devices(user_id)
        )
        self.store.add_access_token(token, user_id, device, ip)
        if display_name is not None:
            self.store.set_device_display_name(user_id, device, display_name)
        if is_new:
            for listener in self.device_listeners:
                listener(user_id, device)
        return device, token

    def qualify(self, user: str) -> str:
        if user.startswith("@"):
            return user
        return f"@{user.lower()}:{self.server_name}"

    async def check_password(self, user: str, password: str) -> str:
        """Return the canonical user id, or raise Synapse's 403 'Invalid username or password'."""
        user_id = self.qualify(user)
        row = self.store.get_user(user_id)
        if row is None:
            matches = self.store.get_user_case_insensitive(user_id)
            if len(matches) == 1:
                row = self.store.get_user(matches[0])
        invalid = MatrixError(403, FORBIDDEN, "Invalid username or password")
        if row is None or not row.password_hash:
            raise invalid
        ok = await asyncio.to_thread(verify_password, password, row.password_hash)
        if not ok:
            raise invalid
        if row.deactivated:
            raise MatrixError(403, "M_USER_DEACTIVATED", "This account has been deactivated")
        return row.user_id

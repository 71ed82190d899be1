"""User-interactive authentication (Synapse's AuthHandler.validate_user_via_ui_auth) for the
operations that need the password again: deleting devices, replacing cross-signing keys.

The one flow is ``m.login.password``. A session binds the first request's method and path; it
lives in memory (a restart asks again) and ends when it succeeds.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import FORBIDDEN, MatrixError, bad_request, forbidden

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.auth import AuthHandler, Requester

PASSWORD = "m.login.password"
FLOWS = [{"stages": [PASSWORD]}]
MAX_SESSIONS = 1000


class AuthIncomplete(MatrixError):
    """401 with the flows to follow (and, after a failed attempt, why it failed)."""

    def __init__(self, session: str, error: MatrixError | None = None) -> None:
        super().__init__(401, error.errcode if error else "", error.message if error else "")
        self.session = session
        self.error = error

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"session": self.session, "flows": FLOWS, "params": {}}
        if self.error is not None:
            body["completed"] = []
            body.update(self.error.to_json())
        return body


class UserInteractiveAuth:
    def __init__(self, auth: AuthHandler) -> None:
        self.auth = auth
        self._sessions: dict[str, tuple[str, str]] = {}

    async def validate_user(self, requester: Requester, method: str, path: str, body: Any) -> None:
        """Return when ``body["auth"]`` proves ``requester`` knows their password; raise
        AuthIncomplete (401) to ask for it."""
        if requester.appservice is not None:
            return  # appservices act for their users without passwords, as in Synapse
        auth = body.get("auth") if isinstance(body, dict) else None
        if auth is not None and not isinstance(auth, dict):
            raise bad_request("auth must be an object")
        session = auth.get("session") if auth else None
        if session is None:
            session = self._new_session(method, path)
        elif not isinstance(session, str) or session not in self._sessions:
            raise bad_request(f"Unknown session ID: {session}")
        elif self._sessions[session] != (method, path):
            raise forbidden("Requested operation has changed during the UI authentication session.")
        if not auth or "type" not in auth:
            raise AuthIncomplete(session)
        try:
            user_id = await self._check_password(auth)
        except MatrixError as error:
            raise AuthIncomplete(session, error) from None
        if user_id != requester.user_id:
            raise forbidden("Invalid auth")
        del self._sessions[session]

    def _new_session(self, method: str, path: str) -> str:
        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        session = secrets.token_urlsafe(18)
        self._sessions[session] = (method, path)
        return session

    async def _check_password(self, auth: dict[str, Any]) -> str:
        if auth.get("type") != PASSWORD:
            raise MatrixError(400, "M_UNRECOGNIZED", "Unrecognised login type")
        identifier = auth.get("identifier")
        user = auth.get("user")
        if isinstance(identifier, dict) and identifier.get("type") == "m.id.user":
            user = identifier.get("user")
        password = auth.get("password")
        if not isinstance(user, str) or not isinstance(password, str):
            raise MatrixError(403, FORBIDDEN, "Invalid username or password")
        return await self.auth.check_password(user, password)

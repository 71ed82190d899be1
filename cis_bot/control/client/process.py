"""The CLI's side of a process's control API (``server.py``), over its unix socket."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self

import aiohttp

from cis_bot.control.registry import ProcessEntry
from cis_bot.errors import UserError

#: Connecting to a live process's socket takes microseconds; longer means it is not answering.
CONNECT_TIMEOUT = 3.0


class ControlError(UserError):
    """An operation that could not be done: the process is gone or does not answer, the node
    refused, the session has ended. The CLI exits with 1 (2 is for bad input)."""

    exit_code = 1


def _refusal(status: int, message: str) -> UserError:
    """A process's "no": bad input (unknown task, bad request) exits 2, the rest 1."""
    return UserError(message) if status in (400, 404) else ControlError(message)


class ProcessClient:
    """Requests to one process; every failure is a ControlError that names the process."""

    def __init__(self, entry: ProcessEntry, *, timeout: float) -> None:
        self.entry = entry
        self.timeout = timeout
        self._http = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(entry.socket)),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()

    @staticmethod
    def session_path(session_id: str, action: str) -> str:
        return f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}/{action}"

    @staticmethod
    def run_path(run_id: str, action: str) -> str:
        return f"/v1/runs/{urllib.parse.quote(run_id, safe='')}/{action}"

    def _unreachable(self, exc: BaseException) -> ControlError:
        if isinstance(exc, TimeoutError):
            why = f"did not answer within {self.timeout:g}s"
        else:
            why = f"cannot be reached ({exc})"
        return ControlError(f"{self.entry.describe()} {why}")

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        limit = self.timeout if timeout is None else timeout
        try:
            async with self._http.request(
                method,
                f"http://cis{path}",
                json=body,
                params=params,
                timeout=aiohttp.ClientTimeout(total=limit, sock_connect=CONNECT_TIMEOUT),
            ) as response:
                try:
                    data = await response.json(content_type=None)
                except ValueError:
                    data = None
                if response.status >= 400:
                    message = data.get("error") if isinstance(data, dict) else None
                    raise _refusal(response.status, message or f"HTTP {response.status}")
                return data
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    async def sessions(self, *, include_ended: bool) -> list[dict[str, Any]]:
        data = await self.request(
            "GET", "/v1/sessions", params={"all": "1"} if include_ended else {}
        )
        sessions = data.get("sessions") if isinstance(data, dict) else None
        return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []

    async def logs(
        self, session_id: str, *, tail: int | None, follow: bool
    ) -> AsyncIterator[bytes]:
        """The raw transcript (``tail``: its last lines), then with ``follow`` the live output
        until the session ends."""
        params = {"follow": "1" if follow else "0"}
        if tail is not None:
            params["tail"] = str(tail)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=None if follow else self.timeout
        )
        try:
            async with self._http.get(
                f"http://cis{self.session_path(session_id, 'logs')}",
                params=params,
                timeout=timeout,
            ) as response:
                if response.status >= 400:
                    data = await response.json(content_type=None)
                    message = data.get("error") if isinstance(data, dict) else None
                    raise _refusal(response.status, message or f"HTTP {response.status}")
                async for chunk in response.content.iter_any():
                    yield chunk
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise self._unreachable(exc) from None

    async def attach(
        self, session_id: str, *, readonly: bool, size: tuple[int, int] | None
    ) -> aiohttp.ClientWebSocketResponse:
        params = {"readonly": "1" if readonly else "0"}
        if size is not None:
            params["rows"], params["cols"] = str(size[0]), str(size[1])
        try:
            return await self._http.ws_connect(
                f"http://cis{self.session_path(session_id, 'attach')}",
                params=params,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                max_msg_size=16 * 1024 * 1024,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise ControlError(exc.message or f"cannot attach to {session_id}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

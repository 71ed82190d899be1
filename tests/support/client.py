"""A thin async Matrix client for the differential tests: raw status + JSON for every call, so a
test can assert exactly what the server answered, plus a few helpers that assert success."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import attrs

CS = "/_matrix/client/v3"


def unique(prefix: str) -> str:
    """A name no other test in the session uses (servers live for the whole session)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def q(value: str) -> str:
    """Percent-encode one path segment (room ids, user ids, event types, state keys)."""
    return quote(value, safe="")


@attrs.frozen
class Response:
    status: int
    body: Any
    headers: Mapping[str, str]
    raw: bytes

    @property
    def errcode(self) -> str | None:
        return self.body.get("errcode") if isinstance(self.body, dict) else None

    def expect(self, status: int, errcode: str | None = None) -> Response:
        assert self.status == status, f"expected {status}, got {self.status}: {self.body!r}"
        if errcode is not None:
            assert self.errcode == errcode, f"expected {errcode}, got {self.body!r}"
            assert isinstance(self.body.get("error"), str), self.body
        return self


class MatrixClient:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        *,
        user_id: str | None = None,
        token: str | None = None,
    ) -> None:
        self.http = http
        self.base_url = base_url
        self.user_id = user_id
        self.token = token
        self._txn = 0

    @property
    def localpart(self) -> str:
        assert self.user_id is not None
        return self.user_id[1:].split(":", 1)[0]

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        token: str | bool | None = True,
    ) -> Response:
        """``token=True`` sends this client's token, a string sends that one, None/False none."""
        all_headers = dict(headers or {})
        bearer = self.token if token is True else token or None
        if bearer:
            all_headers["Authorization"] = f"Bearer {bearer}"
        if body is not None:
            data = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        async with self.http.request(
            method, self.base_url + path, data=data, params=params, headers=all_headers
        ) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            return Response(resp.status, parsed, dict(resp.headers), raw)

    async def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        response = await self.request(method, path, body, **kwargs)
        assert response.status == 200, f"{method} {path}: {response.status} {response.body!r}"
        return response.body

    # --- helpers that must succeed ----------------------------------------------------------

    def next_txn(self) -> str:
        self._txn += 1
        return f"t{time.time_ns()}_{self._txn}"

    async def create_room(self, **body: Any) -> str:
        answer = await self.ok("POST", f"{CS}/createRoom", body)
        return str(answer["room_id"])

    async def send(
        self,
        room_id: str,
        content: dict[str, Any] | None = None,
        event_type: str = "m.room.message",
        txn_id: str | None = None,
    ) -> str:
        content = content if content is not None else {"msgtype": "m.text", "body": "hello"}
        txn_id = txn_id or self.next_txn()
        path = f"{CS}/rooms/{q(room_id)}/send/{q(event_type)}/{q(txn_id)}"
        answer = await self.ok("PUT", path, content)
        return str(answer["event_id"])

    async def send_text(self, room_id: str, body: str) -> str:
        return await self.send(room_id, {"msgtype": "m.text", "body": body})

    async def put_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> str:
        path = f"{CS}/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}"
        answer = await self.ok("PUT", path, content)
        return str(answer["event_id"])

    async def get_state(self, room_id: str, event_type: str, state_key: str = "") -> Any:
        return await self.ok("GET", f"{CS}/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}")

    async def join(self, room_id_or_alias: str) -> str:
        answer = await self.ok("POST", f"{CS}/join/{q(room_id_or_alias)}", {})
        return str(answer["room_id"])

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.ok("POST", f"{CS}/rooms/{q(room_id)}/invite", {"user_id": user_id})

    async def sync(self, **params: str) -> Any:
        return await self.ok("GET", f"{CS}/sync", params=params)

    async def sync_until(
        self,
        predicate: Callable[[Any], bool],
        *,
        since: str | None = None,
        timeout: float = 30.0,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """Long-poll /sync from ``since`` until one response satisfies ``predicate``; returns
        that response. Fails with the last response when the deadline passes."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            query = {"timeout": "1000", **(params or {})}
            if since is not None:
                query["since"] = since
            last = await self.sync(**query)
            if predicate(last):
                return last
            since = last["next_batch"]
        raise AssertionError(f"sync condition not met in {timeout}s; last response: {last!r}")

    async def messages(self, room_id: str, **params: str) -> Any:
        return await self.ok("GET", f"{CS}/rooms/{q(room_id)}/messages", params=params)


def timeline_events(sync_body: Any, room_id: str) -> list[dict[str, Any]]:
    room = sync_body.get("rooms", {}).get("join", {}).get(room_id, {})
    events: list[dict[str, Any]] = room.get("timeline", {}).get("events", [])
    return events


def has_event(event_id: str, room_id: str) -> Callable[[Any], bool]:
    return lambda body: any(e.get("event_id") == event_id for e in timeline_events(body, room_id))


async def gather_limited(coros: list[Any], limit: int = 8) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def run(coro: Any) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))

"""Small HTTP helpers for the homeserver unit tests."""

from __future__ import annotations

from typing import Any

import aiohttp


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def login(http: aiohttp.ClientSession, base: str, user: str, password: str) -> str:
    status, body = await call(
        http,
        "POST",
        f"{base}/_matrix/client/v3/login",
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        },
    )
    assert status == 200, body
    return str(body["access_token"])

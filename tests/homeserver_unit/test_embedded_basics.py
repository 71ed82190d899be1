"""The embedded homeserver in-process over real HTTP: the public API (start, base_url, add_user,
stop), the core client flow, long-poll wake-up and persistence across a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.homeserver.server import EmbeddedHomeserver
from tests.homeserver_unit.helpers import call, login


async def test_public_api_and_first_slice(
    server: EmbeddedHomeserver, http: aiohttp.ClientSession
) -> None:
    base = server.base_url
    assert base.startswith("http://127.0.0.1:") and not base.endswith(":0")
    status, versions = await call(http, "GET", f"{base}/_matrix/client/versions")
    assert status == 200 and "v1.1" in versions["versions"]

    user_id, password = await server.add_user("alice")
    assert user_id == "@alice:cis.local" and len(password) >= 16
    with pytest.raises(ValueError, match="already exists"):
        await server.add_user("alice", "x")
    with pytest.raises(ValueError, match="invalid user name"):
        await server.add_user("Not Valid")

    token = await login(http, base, "alice", password)
    status, whoami = await call(
        http, "GET", f"{base}/_matrix/client/v3/account/whoami", token=token
    )
    assert status == 200 and whoami["user_id"] == user_id and whoami["is_guest"] is False

    status, created = await call(
        http, "POST", f"{base}/_matrix/client/v3/createRoom", {"name": "first"}, token
    )
    assert status == 200
    room_id = created["room_id"]
    send = f"{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/txn1"
    status, sent = await call(http, "PUT", send, {"msgtype": "m.text", "body": "hi"}, token)
    assert status == 200 and sent["event_id"].startswith("$")
    status, again = await call(http, "PUT", send, {"msgtype": "m.text", "body": "hi"}, token)
    assert again["event_id"] == sent["event_id"], "same txn id must give the same event"

    status, create = await call(
        http,
        "GET",
        f"{base}/_matrix/client/v3/rooms/{room_id}/state/m.room.create?format=event",
        token=token,
    )
    assert status == 200 and create["type"] == "m.room.create" and create["sender"] == user_id

    status, synced = await call(http, "GET", f"{base}/_matrix/client/v3/sync", token=token)
    timeline = synced["rooms"]["join"][room_id]["timeline"]["events"]
    assert timeline[-1]["event_id"] == sent["event_id"]
    assert timeline[-1]["unsigned"]["transaction_id"] == "txn1"


async def test_long_poll_wakes_on_new_event(
    server: EmbeddedHomeserver, http: aiohttp.ClientSession
) -> None:
    base = server.base_url
    _, password = await server.add_user("bob")
    token = await login(http, base, "bob", password)
    _, created = await call(http, "POST", f"{base}/_matrix/client/v3/createRoom", {}, token)
    room_id = created["room_id"]
    _, first = await call(http, "GET", f"{base}/_matrix/client/v3/sync", token=token)

    async def long_poll() -> tuple[float, Any]:
        started = time.monotonic()
        url = f"{base}/_matrix/client/v3/sync?since={first['next_batch']}&timeout=30000"
        _, body = await call(http, "GET", url, token=token)
        return time.monotonic() - started, body

    poll = asyncio.create_task(long_poll())
    assert server.hs is not None
    notifier = server.hs.notifier
    deadline = time.monotonic() + 10
    while not notifier.is_waiting("@bob:cis.local"):  # the poll is parked before we send
        assert time.monotonic() < deadline, "the long poll never reached the server"
        await asyncio.sleep(0.01)
    _, sent = await call(
        http,
        "PUT",
        f"{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/t",
        {"msgtype": "m.text", "body": "wake up"},
        token,
    )
    elapsed, body = await asyncio.wait_for(poll, 20)
    assert elapsed < 10, "the long poll must return when the event arrives, not at its timeout"
    events = body["rooms"]["join"][room_id]["timeline"]["events"]
    assert [e["event_id"] for e in events] == [sent["event_id"]]


async def test_everything_survives_a_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    state = tmp_path / "state"
    hs = EmbeddedHomeserver(state_dir=state)
    await hs.start()
    try:
        _, password = await hs.add_user("carol", "secret-pw")
        token = await login(http, hs.base_url, "carol", password)
        _, created = await call(
            http, "POST", f"{hs.base_url}/_matrix/client/v3/createRoom", {"name": "kept"}, token
        )
        room_id = created["room_id"]
    finally:
        await hs.stop()

    hs = EmbeddedHomeserver(state_dir=state)
    await hs.start()
    try:
        base = hs.base_url
        status, name = await call(
            http, "GET", f"{base}/_matrix/client/v3/rooms/{room_id}/state/m.room.name", token=token
        )
        assert status == 200 and name == {"name": "kept"}, "tokens and rooms persist"
        status, _ = await call(
            http,
            "PUT",
            f"{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/t2",
            {"body": "after restart", "msgtype": "m.text"},
            token,
        )
        assert status == 200
    finally:
        await hs.stop()


async def test_port_in_use_is_an_os_error(tmp_path: Path, server: EmbeddedHomeserver) -> None:
    other = EmbeddedHomeserver(state_dir=tmp_path / "other", port=server.port)
    with pytest.raises(OSError):
        await other.start()

"""History visibility and unread counts, in-process over HTTP: a member who joins a room with
``joined`` visibility sees nothing from before their join; unread counts follow receipts."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import aiohttp

from cis_bot.homeserver.server import EmbeddedHomeserver
from tests.homeserver_unit.helpers import call, login

CS = "/_matrix/client/v3"


async def test_joined_visibility_hides_earlier_history(
    server: EmbeddedHomeserver,
    http: aiohttp.ClientSession,
) -> None:
    base = server.base_url
    _, pw_a = await server.add_user("alice")
    _, pw_b = await server.add_user("bob")
    alice = await login(http, base, "alice", pw_a)
    bob = await login(http, base, "bob", pw_b)
    _, created = await call(
        http,
        "POST",
        f"{base}{CS}/createRoom",
        {
            "preset": "public_chat",
            "initial_state": [
                {"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}
            ],
        },
        alice,
    )
    room = quote(created["room_id"], safe="")
    send = f"{base}{CS}/rooms/{room}/send/m.room.message"
    await call(http, "PUT", f"{send}/1", {"msgtype": "m.text", "body": "secret"}, alice)
    await call(http, "POST", f"{base}{CS}/rooms/{room}/join", {}, bob)
    await call(http, "PUT", f"{send}/2", {"msgtype": "m.text", "body": "public"}, alice)

    _, page = await call(http, "GET", f"{base}{CS}/rooms/{room}/messages?dir=b&limit=50", token=bob)
    bodies = [e["content"].get("body") for e in page["chunk"] if e["type"] == "m.room.message"]
    assert bodies == ["public"]
    flt = quote(json.dumps({"room": {"timeline": {"limit": 50}}}))
    _, synced = await call(http, "GET", f"{base}{CS}/sync?filter={flt}", token=bob)
    timeline = synced["rooms"]["join"][created["room_id"]]["timeline"]["events"]
    assert "secret" not in json.dumps(timeline) and "public" in json.dumps(timeline)
    counts = synced["rooms"]["join"][created["room_id"]]["unread_notifications"]
    assert counts == {"notification_count": 1, "highlight_count": 0}

    _, alice_view = await call(http, "GET", f"{base}{CS}/sync?filter={flt}", token=alice)
    own = alice_view["rooms"]["join"][created["room_id"]]
    assert own["unread_notifications"]["notification_count"] == 0, "own messages never count"


async def test_receipt_resets_counts(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    hs = EmbeddedHomeserver(state_dir=tmp_path / "state")
    await hs.start()
    try:
        base = hs.base_url
        _, pw_a = await hs.add_user("carol")
        _, pw_b = await hs.add_user("dan")
        carol = await login(http, base, "carol", pw_a)
        dan = await login(http, base, "dan", pw_b)
        _, created = await call(
            http, "POST", f"{base}{CS}/createRoom", {"preset": "public_chat"}, carol
        )
        room_id = created["room_id"]
        room = quote(room_id, safe="")
        await call(http, "POST", f"{base}{CS}/rooms/{room}/join", {}, dan)
        last = ""
        for n, body in enumerate(["one", "hey dan", "three"]):
            _, sent = await call(
                http,
                "PUT",
                f"{base}{CS}/rooms/{room}/send/m.room.message/{n}",
                {"msgtype": "m.text", "body": body},
                carol,
            )
            last = sent["event_id"]
        _, first = await call(http, "GET", f"{base}{CS}/sync", token=dan)
        assert first["rooms"]["join"][room_id]["unread_notifications"] == {
            "notification_count": 3,
            "highlight_count": 1,
        }
        await call(
            http, "POST", f"{base}{CS}/rooms/{room}/receipt/m.read/{quote(last, safe='')}", {}, dan
        )
        _, after = await call(
            http, "GET", f"{base}{CS}/sync?since={first['next_batch']}", token=dan
        )
        assert after["rooms"]["join"][room_id]["unread_notifications"] == {
            "notification_count": 0,
            "highlight_count": 0,
        }
    finally:
        await hs.stop()

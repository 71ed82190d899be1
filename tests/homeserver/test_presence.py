"""Presence (the spec's "Presence" module) on servers that track it (the shared test servers do
not, as the differential suite's Synapse is configured): set and read a status, see others'
changes in /sync, not see a stranger's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.client import CS, MatrixClient, q, unique
from tests.support.fixtures import Factory, make_homeserver, start_or_fail
from tests.support.shape import assert_same_shape

pytestmark = pytest.mark.slow


PRESENCE_ON = {"presence": {"enabled": True}}  # the same setting for both servers


def presence_of(body: Any, user_id: str) -> list[dict[str, Any]]:
    return [
        e["content"] for e in body.get("presence", {}).get("events", []) if e["sender"] == user_id
    ]


async def test_presence(homeserver_factory: Factory, http: aiohttp.ClientSession) -> None:
    server = homeserver_factory(extra_config=PRESENCE_ON)
    clients = []
    for prefix in ("alice", "bob", "carol"):
        user_id, token = await server.create_user(unique(prefix))
        clients.append(MatrixClient(http, server.base_url, user_id=user_id, token=token))
    alice, bob, carol = clients
    assert alice.user_id is not None
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    position = (await bob.sync(timeout="0"))["next_batch"]

    status = f"{CS}/presence/{q(alice.user_id)}/status"
    assert await alice.ok("PUT", status, {"presence": "online", "status_msg": "running DAGs"}) == {}
    seen = await bob.ok("GET", status)
    assert seen["presence"] == "online" and seen["status_msg"] == "running DAGs"
    assert seen["currently_active"] is True and isinstance(seen["last_active_ago"], int)
    body = await bob.sync_until(
        lambda b: any(p.get("status_msg") == "running DAGs" for p in presence_of(b, alice.user_id)),
        since=position,
    )

    await alice.ok("PUT", status, {"presence": "unavailable"})
    await bob.sync_until(
        lambda b: any(p["presence"] == "unavailable" for p in presence_of(b, alice.user_id)),
        since=body["next_batch"],
    )
    (await carol.request("GET", status)).expect(403, "M_FORBIDDEN")
    (await bob.request("PUT", status, {"presence": "online"})).expect(403, "M_FORBIDDEN")
    (await alice.request("PUT", status, {"presence": "sleepy"})).expect(400)
    (await alice.request("PUT", status, {"presence": "online", "extra": 1})).expect(400)


async def test_presence_shapes_match(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    servers = {
        kind: make_homeserver(kind, tmp_path / kind, extra_config=PRESENCE_ON)
        for kind in ("synapse", "embedded")
    }
    try:
        answers = {}
        for kind, server in servers.items():
            start_or_fail(server)
            alice_id, alice_token = await server.create_user(unique("alice"))
            bob_id, bob_token = await server.create_user(unique("bob"))
            alice = MatrixClient(http, server.base_url, user_id=alice_id, token=alice_token)
            bob = MatrixClient(http, server.base_url, user_id=bob_id, token=bob_token)
            room_id = await alice.create_room(preset="public_chat")
            await bob.join(room_id)
            status = f"{CS}/presence/{q(alice_id)}/status"
            await alice.ok("PUT", status, {"presence": "online", "status_msg": "here"})
            initial = await bob.sync_until(lambda b, a=alice_id: bool(presence_of(b, a)))
            answers[kind] = {
                "get": await bob.ok("GET", status),
                "in_sync": presence_of(initial, alice_id)[-1],
            }
        assert_same_shape(answers["synapse"], answers["embedded"])
    finally:
        for server in servers.values():
            server.stop()

"""The smaller endpoints web clients call at start-up, in their settings screens and room
directory (what Hydrogen and Element ask before showing anything): 3PIDs, TURN, third-party
protocols, pushers, tags, the user directory, the public room directory and a room's listing,
joined rooms and members, /notifications, and the spec's 404 M_UNRECOGNIZED for what this
server does not do."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.homeserver.conftest import Pair
from tests.support.client import CS, MatrixClient, q, unique
from tests.support.fixtures import Users
from tests.support.process import HomeserverUnderTest
from tests.support.shape import assert_same_shape


async def start_up_answers(alice: MatrixClient, bob: MatrixClient) -> dict[str, Any]:
    """What a client asks on start-up and around a room, every answer kept."""
    assert alice.user_id is not None and bob.user_id is not None
    name = unique("directory room ")
    room_id = await alice.create_room(name=name, preset="public_chat", visibility="public")
    await bob.join(room_id)
    await bob.send_text(room_id, f"hello {alice.localpart}")  # contains the user name: highlights
    await bob.send_text(room_id, "just a message")
    tag_path = f"{CS}/user/{q(alice.user_id)}/rooms/{q(room_id)}/tags"
    seen: dict[str, Any] = {
        "room_id": room_id,
        "threepids": await alice.ok("GET", f"{CS}/account/3pid"),
        "turn": await alice.ok("GET", f"{CS}/voip/turnServer"),
        "protocols": await alice.ok("GET", f"{CS}/thirdparty/protocols"),
        "pushers": await alice.ok("GET", f"{CS}/pushers"),
        "put_tag": await alice.ok("PUT", f"{tag_path}/u.work", {"order": 0.5}),
        "tags": await alice.ok("GET", tag_path),
        "delete_tag": await alice.ok("DELETE", f"{tag_path}/u.work"),
        "tags_after": await alice.ok("GET", tag_path),
        "user_directory": await alice.ok(
            "POST", f"{CS}/user_directory/search", {"search_term": bob.localpart}
        ),
        "visibility": await alice.ok("GET", f"{CS}/directory/list/room/{q(room_id)}"),
        "joined_rooms": await bob.ok("GET", f"{CS}/joined_rooms"),
        "joined_members": await bob.ok("GET", f"{CS}/rooms/{q(room_id)}/joined_members"),
        "notifications": await alice.ok("GET", f"{CS}/notifications"),
        "highlights": await alice.ok("GET", f"{CS}/notifications", params={"only": "highlight"}),
    }
    public = await alice.ok("POST", f"{CS}/publicRooms", {"filter": {"generic_search_term": name}})
    seen["public_rooms"] = public
    return seen


async def test_start_up_endpoints(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    seen = await start_up_answers(alice, bob)
    assert seen["threepids"] == {"threepids": []}
    assert seen["turn"] == {}
    assert seen["protocols"] == {}
    assert seen["pushers"] == {"pushers": []}
    assert seen["tags"] == {"tags": {"u.work": {"order": 0.5}}}
    assert seen["tags_after"] == {"tags": {}}
    assert [r["user_id"] for r in seen["user_directory"]["results"]] == [bob.user_id]
    assert seen["visibility"] == {"visibility": "public"}
    room_id = seen["room_id"]
    assert [r["room_id"] for r in seen["public_rooms"]["chunk"]] == [room_id]
    assert room_id in seen["joined_rooms"]["joined_rooms"]
    assert set(seen["joined_members"]["joined"]) == {alice.user_id, bob.user_id}
    notified = seen["notifications"]["notifications"]
    assert [n["event"]["content"]["body"] for n in notified] == [
        "just a message",
        f"hello {alice.localpart}",
    ]
    assert all(n["room_id"] == room_id and n["read"] is False for n in notified)
    assert [n["event"]["content"]["body"] for n in seen["highlights"]["notifications"]] == [
        f"hello {alice.localpart}"
    ]
    assert "highlight" in str(seen["highlights"]["notifications"][0]["actions"])
    # Paging: "from" is the token of the last one seen.
    page = await alice.ok(
        "GET",
        f"{CS}/notifications",
        params={"limit": "1", "from": seen["notifications"]["next_token"]},
    )
    assert page["notifications"] == []
    (await alice.request("GET", f"{CS}/notifications", params={"from": "x"})).expect(400)


async def test_start_up_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice, bob = await users.many("alice", "bob")
        answers[name] = await start_up_answers(alice, bob)
    assert_same_shape(
        answers["synapse"],
        answers["embedded"],
        ignore=["$.public_rooms.total_room_count_estimate", "$.public_rooms.chunk"],
    )


async def test_what_is_not_here_is_unrecognized(
    embedded: HomeserverUnderTest, http: aiohttp.ClientSession
) -> None:
    """Endpoints a web client may call that this server does not have (Synapse has some of
    them, so this is not differential): the spec's 404 M_UNRECOGNIZED, at once."""
    alice = await Users(embedded, http).new("alice")
    for method, path in (
        ("GET", "/_matrix/client/unstable/org.matrix.msc2697.v2/dehydrated_device"),
        ("GET", "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"),
        ("GET", "/_matrix/client/v3/no/such/endpoint"),
        ("POST", "/_matrix/client/v3/pushers/set"),
    ):
        response = await alice.request(method, path, {} if method == "POST" else None)
        response.expect(404, "M_UNRECOGNIZED")

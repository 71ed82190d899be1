"""Profiles (Complement: apidoc_profile_displayname_test, apidoc_profile_avatar_url_test)."""

from __future__ import annotations

from tests.homeserver.conftest import Pair
from tests.support.client import CS, q, timeline_events, unique
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape


async def test_displayname_and_avatar(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    me = f"{CS}/profile/{q(str(alice.user_id))}"
    assert await alice.ok("PUT", f"{me}/displayname", {"displayname": "Alice A."}) == {}
    assert await bob.ok("GET", f"{me}/displayname") == {"displayname": "Alice A."}
    avatar = f"mxc://{users.server.server_name}/avatar1"
    assert await alice.ok("PUT", f"{me}/avatar_url", {"avatar_url": avatar}) == {}
    assert await bob.ok("GET", f"{me}/avatar_url") == {"avatar_url": avatar}
    assert await bob.ok("GET", me) == {"displayname": "Alice A.", "avatar_url": avatar}


async def test_displayname_reaches_rooms(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    await alice.ok(
        "PUT", f"{CS}/profile/{q(str(alice.user_id))}/displayname", {"displayname": "Renamed"}
    )
    # Synapse updates the member events in the background: wait for the new one.
    await alice.sync_until(
        lambda body: any(
            e["type"] == "m.room.member"
            and e["state_key"] == alice.user_id
            and e["content"].get("displayname") == "Renamed"
            for e in timeline_events(body, room_id)
        )
    )
    member = await alice.get_state(room_id, "m.room.member", str(alice.user_id))
    assert member["displayname"] == "Renamed"
    joined = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/joined_members")
    assert joined["joined"][alice.user_id]["display_name"] == "Renamed"


async def test_profile_errors(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    theirs = f"{CS}/profile/{q(str(bob.user_id))}/displayname"
    # Synapse answers 400 (not 403) with M_FORBIDDEN here.
    (await alice.request("PUT", theirs, {"displayname": "hijack"})).expect(400, "M_FORBIDDEN")
    nobody = f"@{unique('nobody')}:{users.server.server_name}"
    # 404; Synapse's errcode here is M_UNKNOWN ("No row found"), so only the status is held.
    (await alice.request("GET", f"{CS}/profile/{q(nobody)}")).expect(404)
    mine = f"{CS}/profile/{q(str(alice.user_id))}/displayname"
    (await alice.request("PUT", mine, {"displayname": 5})).expect(400)
    (await alice.request("PUT", mine, {"displayname": "x" * 300})).expect(400)


async def test_profile_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        me = f"{CS}/profile/{q(str(alice.user_id))}"
        answers[name] = {
            "initial": (await alice.request("GET", me)).body,
            "set": (await alice.request("PUT", f"{me}/displayname", {"displayname": "A"})).body,
            "get": (await alice.request("GET", f"{me}/displayname")).body,
        }
    assert_same_shape(answers["synapse"], answers["embedded"])

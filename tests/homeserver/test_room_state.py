"""Reading and writing one room's state (Complement: apidoc_room_state_test,
apidoc_room_members_test)."""

from __future__ import annotations

from tests.homeserver.conftest import Pair
from tests.support.client import CS, q
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape

EVENT_NOISE = ["*.unsigned.age", "*.age"]


async def test_get_state_event(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room(name="first")
    assert await alice.get_state(room_id, "m.room.name") == {"name": "first"}
    member = await alice.get_state(room_id, "m.room.member", str(alice.user_id))
    assert member["membership"] == "join"

    event = await alice.ok(
        "GET", f"{CS}/rooms/{q(room_id)}/state/m.room.name/", params={"format": "event"}
    )
    assert event["type"] == "m.room.name"
    assert event["state_key"] == ""
    assert event["content"] == {"name": "first"}
    assert event["room_id"] == room_id
    assert event["sender"] == alice.user_id
    assert event["event_id"].startswith("$")

    (await alice.request("GET", f"{CS}/rooms/{q(room_id)}/state/m.room.avatar")).expect(
        404, "M_NOT_FOUND"
    )
    (await alice.request("GET", f"{CS}/rooms/{q(room_id)}/state/m.room.name/other")).expect(
        404, "M_NOT_FOUND"
    )


async def test_put_state_event(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    first = await alice.put_state(room_id, "m.room.topic", {"topic": "one"})
    assert first.startswith("$")
    assert await alice.get_state(room_id, "m.room.topic") == {"topic": "one"}
    second = await alice.put_state(room_id, "m.room.topic", {"topic": "two"})
    assert second != first
    assert await alice.get_state(room_id, "m.room.topic") == {"topic": "two"}
    # Re-sending identical state is deduplicated to the current event.
    assert await alice.put_state(room_id, "m.room.topic", {"topic": "two"}) == second

    keyed = await alice.put_state(room_id, "cis.test.keyed", {"n": 1}, state_key="alpha/beta")
    assert keyed.startswith("$")
    assert await alice.get_state(room_id, "cis.test.keyed", "alpha/beta") == {"n": 1}
    # PUT without a state key segment means the empty key.
    answer = await alice.ok("PUT", f"{CS}/rooms/{q(room_id)}/state/cis.test.empty", {"x": True})
    assert answer["event_id"].startswith("$")
    assert await alice.get_state(room_id, "cis.test.empty", "") == {"x": True}


async def test_state_needs_membership(users: Users) -> None:
    alice, mallory = await users.many("alice", "mallory")
    room_id = await alice.create_room(name="private")
    for path in (
        f"{CS}/rooms/{q(room_id)}/state/m.room.name",
        f"{CS}/rooms/{q(room_id)}/state",
        f"{CS}/rooms/{q(room_id)}/members",
        f"{CS}/rooms/{q(room_id)}/joined_members",
    ):
        (await mallory.request("GET", path)).expect(403, "M_FORBIDDEN")
    (
        await mallory.request("PUT", f"{CS}/rooms/{q(room_id)}/state/m.room.name", {"name": "x"})
    ).expect(403, "M_FORBIDDEN")


async def test_members_and_joined_members(users: Users) -> None:
    alice, bob, carol = await users.many("alice", "bob", "carol")
    room_id = await alice.create_room(preset="public_chat", invite=[carol.user_id])
    await bob.join(room_id)

    joined = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/joined_members")
    assert set(joined["joined"]) == {alice.user_id, bob.user_id}
    for profile in joined["joined"].values():
        assert set(profile) <= {"display_name", "avatar_url"}

    members = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/members")
    by_user = {e["state_key"]: e["content"]["membership"] for e in members["chunk"]}
    assert by_user == {alice.user_id: "join", bob.user_id: "join", carol.user_id: "invite"}
    only_joined = await alice.ok(
        "GET", f"{CS}/rooms/{q(room_id)}/members", params={"membership": "join"}
    )
    assert {e["state_key"] for e in only_joined["chunk"]} == {alice.user_id, bob.user_id}
    not_joined = await alice.ok(
        "GET", f"{CS}/rooms/{q(room_id)}/members", params={"not_membership": "join"}
    )
    assert {e["state_key"] for e in not_joined["chunk"]} == {carol.user_id}

    assert room_id in (await bob.ok("GET", f"{CS}/joined_rooms"))["joined_rooms"]
    assert room_id not in (await carol.ok("GET", f"{CS}/joined_rooms"))["joined_rooms"]


async def test_room_state_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        room_id = await alice.create_room(name="n")
        await alice.put_state(room_id, "cis.test.keyed", {"n": 1}, state_key="k")
        base = f"{CS}/rooms/{q(room_id)}"
        answers[name] = {
            "content": (await alice.request("GET", f"{base}/state/m.room.name")).body,
            "event": (
                await alice.request("GET", f"{base}/state/m.room.name", params={"format": "event"})
            ).body,
            "put": (await alice.request("PUT", f"{base}/state/m.room.topic", {"topic": "t"})).body,
            "missing": (await alice.request("GET", f"{base}/state/m.room.avatar")).body,
            "members": (await alice.request("GET", f"{base}/members")).body,
            "joined_members": (await alice.request("GET", f"{base}/joined_members")).body,
        }
    assert_same_shape(answers["synapse"], answers["embedded"], ignore=EVENT_NOISE)

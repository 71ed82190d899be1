"""Invites, joins, leaves and kicks (Complement: rooms_invite_test, room_kick_test,
room_leave_test, rooms_members_local_test)."""

from __future__ import annotations

from tests.homeserver.conftest import Pair
from tests.support.client import CS, q
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape


async def test_invite_then_join(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(preset="private_chat")
    (await bob.request("POST", f"{CS}/join/{q(room_id)}", {})).expect(403, "M_FORBIDDEN")
    assert await alice.ok("POST", f"{CS}/rooms/{q(room_id)}/invite", {"user_id": bob.user_id}) == {}
    member = await alice.get_state(room_id, "m.room.member", str(bob.user_id))
    assert member["membership"] == "invite"
    answer = await bob.ok("POST", f"{CS}/rooms/{q(room_id)}/join", {})
    assert answer == {"room_id": room_id}
    assert (await alice.get_state(room_id, "m.room.member", str(bob.user_id)))[
        "membership"
    ] == "join"


async def test_invite_errors(users: Users) -> None:
    alice, bob, mallory = (
        await users.new("alice"),
        await users.new("bob"),
        await users.new("mallory"),
    )
    room_id = await alice.create_room(preset="private_chat")
    invite = f"{CS}/rooms/{q(room_id)}/invite"
    # Not in the room.
    (await mallory.request("POST", invite, {"user_id": bob.user_id})).expect(403, "M_FORBIDDEN")
    (await alice.request("POST", invite, {})).expect(400, "M_MISSING_PARAM")
    (await alice.request("POST", invite, {"user_id": "not-a-user-id"})).expect(400)
    await alice.invite(room_id, str(bob.user_id))
    await bob.join(room_id)
    # Already joined.
    (await alice.request("POST", invite, {"user_id": bob.user_id})).expect(403, "M_FORBIDDEN")


async def test_reject_invite(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(preset="private_chat", invite=[bob.user_id])
    assert await bob.ok("POST", f"{CS}/rooms/{q(room_id)}/leave", {}) == {}
    member = await alice.get_state(room_id, "m.room.member", str(bob.user_id))
    assert member["membership"] == "leave"
    (await bob.request("POST", f"{CS}/rooms/{q(room_id)}/join", {})).expect(403, "M_FORBIDDEN")


async def test_invite_with_reason(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room()
    await alice.ok(
        "POST", f"{CS}/rooms/{q(room_id)}/invite", {"user_id": bob.user_id, "reason": "come in"}
    )
    member = await alice.get_state(room_id, "m.room.member", str(bob.user_id))
    assert member["membership"] == "invite"
    assert member["reason"] == "come in"


async def test_kick_and_leave(users: Users) -> None:
    alice, bob, carol = await users.many("alice", "bob", "carol")
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    await carol.join(room_id)
    # A plain member cannot kick.
    (await bob.request("POST", f"{CS}/rooms/{q(room_id)}/kick", {"user_id": carol.user_id})).expect(
        403, "M_FORBIDDEN"
    )
    assert (
        await alice.ok(
            "POST", f"{CS}/rooms/{q(room_id)}/kick", {"user_id": bob.user_id, "reason": "bye"}
        )
        == {}
    )
    kicked = await alice.get_state(room_id, "m.room.member", str(bob.user_id))
    assert kicked["membership"] == "leave"
    assert kicked["reason"] == "bye"
    (
        await bob.request(
            "PUT",
            f"{CS}/rooms/{q(room_id)}/send/m.room.message/k1",
            {"msgtype": "m.text", "body": "x"},
        )
    ).expect(403, "M_FORBIDDEN")
    # Kicked from a public room: may join again.
    await bob.join(room_id)

    await carol.ok("POST", f"{CS}/rooms/{q(room_id)}/leave", {})
    assert room_id not in (await carol.ok("GET", f"{CS}/joined_rooms"))["joined_rooms"]
    (await alice.request("POST", f"{CS}/rooms/{q(room_id)}/kick", {})).expect(
        400, "M_MISSING_PARAM"
    )


async def test_join_unknown_room(users: Users) -> None:
    bob = await users.new("bob")
    unknown_alias = f"#nothing-{bob.localpart}:{users.server.server_name}"
    (await bob.request("POST", f"{CS}/join/{q(unknown_alias)}", {})).expect(404, "M_NOT_FOUND")


async def test_rooms_invite_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice, bob = await users.many("alice", "bob")
        room_id = await alice.create_room(preset="private_chat")
        base = f"{CS}/rooms/{q(room_id)}"
        answers[name] = {
            "join_uninvited": (await bob.request("POST", f"{base}/join", {})).body,
            "invite": (
                await alice.request("POST", f"{base}/invite", {"user_id": bob.user_id})
            ).body,
            "join": (await bob.request("POST", f"{base}/join", {})).body,
            "leave": (await bob.request("POST", f"{base}/leave", {})).body,
            "missing": (await alice.request("POST", f"{base}/invite", {})).body,
        }
    assert_same_shape(answers["synapse"], answers["embedded"])

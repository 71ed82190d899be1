"""Power levels enforced for state and message events (Complement: power_levels_test,
apidoc_room_levels_test)."""

from __future__ import annotations

from tests.homeserver.conftest import Pair
from tests.support.client import CS, q
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape


def privileged_creators(room_version: str) -> bool:
    return room_version.isdigit() and int(room_version) >= 12


async def test_power_levels_can_be_fetched(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    content = await alice.get_state(room_id, "m.room.power_levels")
    for key in (
        "ban",
        "kick",
        "redact",
        "state_default",
        "events_default",
        "users_default",
        "invite",
    ):
        assert isinstance(content[key], int), key
    assert all(isinstance(v, int) for v in content["events"].values())
    assert all(isinstance(v, int) for v in content["users"].values())
    version = (await alice.get_state(room_id, "m.room.create"))["room_version"]
    if privileged_creators(version):
        assert alice.user_id not in content["users"]
    else:
        assert content["users"][alice.user_id] > content["users_default"]


async def test_power_levels_can_be_set(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    current = await alice.get_state(room_id, "m.room.power_levels")
    wanted = {**current, "invite": 100, "users": {**current["users"], "@other:elsewhere.test": 20}}
    event_id = await alice.put_state(room_id, "m.room.power_levels", wanted)
    event = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/event/{q(event_id)}")
    assert event["content"] == wanted
    assert await bob.get_state(room_id, "m.room.power_levels") == wanted


async def test_power_levels_enforced(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(
        preset="public_chat",
        power_level_content_override={"events": {"cis.test.guarded": 60, "m.room.name": 50}},
    )
    await bob.join(room_id)
    base = f"{CS}/rooms/{q(room_id)}"
    (await bob.request("PUT", f"{base}/state/m.room.name", {"name": "no"})).expect(
        403, "M_FORBIDDEN"
    )
    (await bob.request("PUT", f"{base}/send/cis.test.guarded/g1", {})).expect(403, "M_FORBIDDEN")
    (await bob.request("PUT", f"{base}/state/cis.test.anystate/", {})).expect(403, "M_FORBIDDEN")
    (await bob.request("PUT", f"{base}/send/cis.test.free/f1", {"ok": True})).expect(200)
    (
        await bob.request("PUT", f"{base}/state/m.room.power_levels", {"users": {bob.user_id: 100}})
    ).expect(403, "M_FORBIDDEN")

    power = await alice.get_state(room_id, "m.room.power_levels")
    power["users"][bob.user_id] = 60
    await alice.put_state(room_id, "m.room.power_levels", power)
    (await bob.request("PUT", f"{base}/state/m.room.name", {"name": "yes"})).expect(200)
    (await bob.request("PUT", f"{base}/send/cis.test.guarded/g2", {})).expect(200)
    # Nobody may raise someone above their own level.
    power["users"][bob.user_id] = 100
    (await bob.request("PUT", f"{base}/state/m.room.power_levels", power)).expect(
        403, "M_FORBIDDEN"
    )


async def test_demoting_users_via_users_default(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    override = {
        "users_default": 100,
        "users": {bob.user_id: 100},
        "events": {},
        "notifications": {},
    }
    room_id = await alice.create_room(preset="public_chat", power_level_content_override=override)
    await bob.join(room_id)
    current = await alice.get_state(room_id, "m.room.power_levels")
    lowered = {**current, "users_default": 40}
    event_id = await bob.put_state(room_id, "m.room.power_levels", lowered)
    assert event_id.startswith("$")
    assert (await alice.get_state(room_id, "m.room.power_levels"))["users_default"] == 40


async def test_power_levels_bad_content(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    current = await alice.get_state(room_id, "m.room.power_levels")
    path = f"{CS}/rooms/{q(room_id)}/state/m.room.power_levels"
    (await alice.request("PUT", path, {**current, "ban": "fifty"})).expect(400, "M_BAD_JSON")
    (await alice.request("PUT", path, {**current, "users": {"not-a-user": 5}})).expect(400)
    assert await alice.get_state(room_id, "m.room.power_levels") == current


async def test_power_levels_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice, bob = await users.many("alice", "bob")
        room_id = await alice.create_room(preset="public_chat")
        await bob.join(room_id)
        base = f"{CS}/rooms/{q(room_id)}"
        answers[name] = {
            "levels": await alice.get_state(room_id, "m.room.power_levels"),
            "denied": (await bob.request("PUT", f"{base}/state/m.room.name", {"name": "x"})).body,
        }
    assert_same_shape(answers["synapse"], answers["embedded"])
    # Same defaults, not just the same keys.
    for key in (
        "ban",
        "kick",
        "redact",
        "state_default",
        "events_default",
        "users_default",
        "invite",
        "events",
    ):
        assert answers["embedded"]["levels"][key] == answers["synapse"]["levels"][key], key

"""createRoom (Complement: apidoc_room_create_test, apidoc_room_alias_test)."""

from __future__ import annotations

from typing import Any

from tests.homeserver.conftest import Pair
from tests.support.client import CS, MatrixClient, q, unique
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape

# Values that differ between servers by nature; their presence and type are still compared.
EVENT_NOISE = ["*.unsigned.age", "*.age"]


async def initial_events(client: MatrixClient, room_id: str) -> list[dict[str, Any]]:
    """The room's events from the start, oldest first."""
    answer = await client.messages(room_id, dir="f", limit="100")
    events: list[dict[str, Any]] = answer["chunk"]
    return events


def normalised(events: list[dict[str, Any]], names: dict[str, str]) -> list[tuple[str, str]]:
    return [
        (e["type"], names.get(e.get("state_key", "-"), e.get("state_key", "-"))) for e in events
    ]


async def default_room_version(client: MatrixClient) -> str:
    capabilities = await client.ok("GET", f"{CS}/capabilities")
    return str(capabilities["capabilities"]["m.room_versions"]["default"])


def privileged_creators(room_version: str) -> bool:
    """Room versions where creators have unlimited power and are not listed in ``users``."""
    return room_version.isdigit() and int(room_version) >= 12


async def test_create_room_minimal(users: Users) -> None:
    alice = await users.new("alice")
    answer = await alice.ok("POST", f"{CS}/createRoom", {})
    room_id = answer["room_id"]
    assert isinstance(room_id, str) and room_id.startswith("!")
    assert list(answer) == ["room_id"]

    events = await initial_events(alice, room_id)
    create, member = events[0], events[1]
    assert create["type"] == "m.room.create" and create["state_key"] == ""
    assert create["content"]["room_version"] == await default_room_version(alice)
    assert create["sender"] == alice.user_id
    assert member["type"] == "m.room.member" and member["state_key"] == alice.user_id
    assert member["content"]["membership"] == "join"
    assert room_id in (await alice.ok("GET", f"{CS}/joined_rooms"))["joined_rooms"]
    for event in events:
        assert event["room_id"] == room_id
        assert event["event_id"].startswith("$")
        assert isinstance(event["origin_server_ts"], int)


async def test_create_room_with_everything(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    alias_local = unique("room")
    room_id = await alice.create_room(
        preset="private_chat",
        name="The room",
        topic="What it is for",
        invite=[bob.user_id],
        room_alias_name=alias_local,
        initial_state=[{"type": "cis.test.state", "state_key": "k", "content": {"v": 1}}],
        power_level_content_override={"events_default": 10, "events": {"cis.test.custom": 60}},
    )
    events = await initial_events(alice, room_id)
    by_type = {(e["type"], e.get("state_key")): e for e in events}
    assert [e["type"] for e in events[:3]] == [
        "m.room.create",
        "m.room.member",
        "m.room.power_levels",
    ]
    assert by_type[("m.room.name", "")]["content"] == {"name": "The room"}
    assert by_type[("m.room.topic", "")]["content"]["topic"] == "What it is for"
    assert by_type[("m.room.join_rules", "")]["content"] == {"join_rule": "invite"}
    assert by_type[("m.room.history_visibility", "")]["content"] == {"history_visibility": "shared"}
    assert by_type[("cis.test.state", "k")]["content"] == {"v": 1}
    alias = f"#{alias_local}:{users.server.server_name}"
    assert by_type[("m.room.canonical_alias", "")]["content"]["alias"] == alias
    invite = by_type[("m.room.member", bob.user_id)]
    assert invite["content"]["membership"] == "invite"
    assert events[-1] is invite  # invites come after all the initial state
    power = by_type[("m.room.power_levels", "")]["content"]
    assert power["events_default"] == 10
    assert power["events"]["cis.test.custom"] == 60

    state = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/state")
    assert {(e["type"], e["state_key"]) for e in state} == set(by_type)


async def test_create_room_presets(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    public = await alice.create_room(preset="public_chat")
    assert (await alice.get_state(public, "m.room.join_rules")) == {"join_rule": "public"}
    assert (await alice.get_state(public, "m.room.history_visibility")) == {
        "history_visibility": "shared"
    }
    (await alice.request("GET", f"{CS}/rooms/{q(public)}/state/m.room.guest_access")).expect(
        404, "M_NOT_FOUND"
    )

    private = await alice.create_room(preset="private_chat")
    assert (await alice.get_state(private, "m.room.guest_access")) == {"guest_access": "can_join"}

    trusted = await alice.create_room(preset="trusted_private_chat", invite=[bob.user_id])
    power = await alice.get_state(trusted, "m.room.power_levels")
    create = await alice.get_state(trusted, "m.room.create")
    if privileged_creators(create["room_version"]):
        # MSC4289 (room v12): invitees become creators instead of getting PL 100.
        assert create["additional_creators"] == [bob.user_id]
        assert bob.user_id not in power["users"]
    else:
        assert power["users"][bob.user_id] == 100

    # Without a preset, visibility decides: public -> public_chat.
    visible = await alice.create_room(visibility="public")
    assert (await alice.get_state(visible, "m.room.join_rules")) == {"join_rule": "public"}


async def test_room_alias(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    alias_local = unique("alias")
    alias = f"#{alias_local}:{users.server.server_name}"
    room_id = await alice.create_room(preset="public_chat", room_alias_name=alias_local)
    resolved = await bob.ok("GET", f"{CS}/directory/room/{q(alias)}")
    assert resolved["room_id"] == room_id
    assert resolved["servers"] == [users.server.server_name]

    taken = await bob.request("POST", f"{CS}/createRoom", {"room_alias_name": alias_local})
    taken.expect(400, "M_ROOM_IN_USE")
    missing = await bob.request(
        "GET", f"{CS}/directory/room/{q('#' + unique('no') + ':' + users.server.server_name)}"
    )
    missing.expect(404, "M_NOT_FOUND")

    # Join by alias, and a second alias put by hand.
    assert await bob.join(alias) == room_id
    second = f"#{unique('second')}:{users.server.server_name}"
    assert await alice.ok("PUT", f"{CS}/directory/room/{q(second)}", {"room_id": room_id}) == {}
    assert (await bob.ok("GET", f"{CS}/directory/room/{q(second)}"))["room_id"] == room_id
    (await alice.request("PUT", f"{CS}/directory/room/{q(second)}", {"room_id": room_id})).expect(
        409, "M_UNKNOWN"
    )
    assert await alice.ok("DELETE", f"{CS}/directory/room/{q(second)}") == {}
    (await bob.request("GET", f"{CS}/directory/room/{q(second)}")).expect(404, "M_NOT_FOUND")


async def test_create_room_bad_input(users: Users) -> None:
    alice = await users.new("alice")
    create = f"{CS}/createRoom"
    (await alice.request("POST", create, {"preset": "nope"})).expect(400, "M_BAD_JSON")
    (await alice.request("POST", create, {"room_version": "999"})).expect(
        400, "M_UNSUPPORTED_ROOM_VERSION"
    )
    (await alice.request("POST", create, [1])).expect(400, "M_BAD_JSON")
    (
        await alice.request(
            "POST", create, data=b"{not json", headers={"Content-Type": "application/json"}
        )
    ).expect(400, "M_NOT_JSON")
    (await alice.request("POST", create, {"invite": "@bob:cis.local"})).expect(400)
    (await alice.request("POST", create, {"invite": ["not a user id"]})).expect(400)
    (await alice.request("POST", create, {"room_alias_name": "has:colon"})).expect(400)
    (await alice.request("POST", create, {}, token=None)).expect(401, "M_MISSING_TOKEN")


async def test_create_room_shapes_match(pair: Pair) -> None:
    sequences: dict[str, list[tuple[str, str]]] = {}
    answers: dict[str, Any] = {}
    for name, users in pair.each():
        alice, bob = await users.many("alice", "bob")
        room_id = await alice.create_room(
            preset="private_chat",
            name="n",
            topic="t",
            invite=[bob.user_id],
            room_alias_name=unique("shape"),
            initial_state=[{"type": "cis.test.state", "state_key": "", "content": {"v": 1}}],
        )
        events = await initial_events(alice, room_id)
        sequences[name] = normalised(
            events, {str(alice.user_id): "@creator", str(bob.user_id): "@invitee"}
        )
        answers[name] = {
            "events": events,
            "state": await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/state"),
            "joined_members": await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/joined_members"),
        }
    assert sequences["embedded"] == sequences["synapse"]
    assert_same_shape(answers["synapse"], answers["embedded"], ignore=EVENT_NOISE)

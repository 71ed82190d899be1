"""Filters: create, get, and applied to /sync (Complement: sync_filter_test)."""

from __future__ import annotations

import json

from tests.homeserver.conftest import Pair
from tests.support.client import CS, has_event, q, timeline_events
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape


async def test_filter_create_and_get(users: Users) -> None:
    alice = await users.new("alice")
    definition = {
        "room": {"timeline": {"limit": 10, "types": ["m.room.message"]}},
        "presence": {"not_types": ["*"]},
        "event_fields": ["type", "content", "sender"],
    }
    answer = await alice.ok("POST", f"{CS}/user/{q(str(alice.user_id))}/filter", definition)
    filter_id = answer["filter_id"]
    assert isinstance(filter_id, str) and filter_id
    assert list(answer) == ["filter_id"]
    stored = await alice.ok("GET", f"{CS}/user/{q(str(alice.user_id))}/filter/{q(filter_id)}")
    assert stored == definition


async def test_filter_errors(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    mine = f"{CS}/user/{q(str(alice.user_id))}/filter"
    filter_id = (await alice.ok("POST", mine, {}))["filter_id"]
    (await bob.request("POST", mine, {})).expect(403, "M_FORBIDDEN")
    (await bob.request("GET", f"{mine}/{q(filter_id)}")).expect(403, "M_FORBIDDEN")
    (await alice.request("GET", f"{mine}/987654")).expect(404, "M_NOT_FOUND")
    (await alice.request("POST", mine, [1])).expect(400)
    (await alice.request("POST", mine, {}, token=None)).expect(401, "M_MISSING_TOKEN")


async def test_sync_with_filter_id(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    await alice.send(room_id, {"n": 1}, event_type="cis.test.noise")
    event_id = await alice.send_text(room_id, "kept")
    filter_id = (
        await alice.ok(
            "POST",
            f"{CS}/user/{q(str(alice.user_id))}/filter",
            {"room": {"timeline": {"limit": 1, "types": ["m.room.message"]}}},
        )
    )["filter_id"]
    body = await alice.sync_until(has_event(event_id, room_id), params={"filter": filter_id})
    events = timeline_events(body, room_id)
    assert [e["event_id"] for e in events] == [event_id]


async def test_sync_with_inline_filter(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    other = await alice.create_room()
    event_id = await alice.send_text(room_id, "here")
    await alice.send_text(other, "not here")
    flt = json.dumps({"room": {"rooms": [room_id], "timeline": {"limit": 5}}})
    body = await alice.sync_until(has_event(event_id, room_id), params={"filter": flt})
    assert set(body["rooms"]["join"]) == {room_id}
    assert len(timeline_events(body, room_id)) <= 5


async def test_sync_filter_not_types_and_state(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room(name="filtered")
    event_id = await alice.send_text(room_id, "hello")
    flt = json.dumps(
        {
            "room": {
                "timeline": {"not_types": ["m.room.message"]},
                "state": {"types": ["m.room.name"]},
            }
        }
    )
    marker = await alice.send(room_id, {}, event_type="cis.test.marker")
    body = await alice.sync_until(has_event(marker, room_id), params={"filter": flt})
    room = body["rooms"]["join"][room_id]
    assert all(e["event_id"] != event_id for e in room["timeline"]["events"])
    assert all(e["type"] == "m.room.name" for e in room["state"]["events"]), (
        "state filter types ignored"
    )


async def test_sync_filter_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        path = f"{CS}/user/{q(str(alice.user_id))}/filter"
        created = (await alice.request("POST", path, {"room": {"timeline": {"limit": 2}}})).body
        answers[name] = {
            "created": created,
            "got": (await alice.request("GET", f"{path}/{q(created['filter_id'])}")).body,
            "missing": (await alice.request("GET", f"{path}/987654")).body,
        }
    assert_same_shape(answers["synapse"], answers["embedded"])

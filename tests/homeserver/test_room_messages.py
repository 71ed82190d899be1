"""Sending, fetching and paginating messages (Complement: room_messages_test,
rooms_messages_test, room_messages_pagination_test, redact_test)."""

from __future__ import annotations

import json

from tests.homeserver.conftest import Pair
from tests.support.client import CS, MatrixClient, q
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape

EVENT_NOISE = ["*.unsigned.age", "*.age"]


async def send_numbered(client: MatrixClient, room_id: str, count: int) -> list[str]:
    return [await client.send_text(room_id, f"message {i}") for i in range(count)]


def bodies(chunk: list[dict[str, object]]) -> list[object]:
    return [e["content"].get("body") for e in chunk if e["type"] == "m.room.message"]  # type: ignore[union-attr]


async def test_messages_backwards_pagination(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    await send_numbered(alice, room_id, 7)

    page = await alice.messages(room_id, dir="b", limit="3")
    assert bodies(page["chunk"]) == ["message 6", "message 5", "message 4"]
    assert isinstance(page["start"], str) and isinstance(page["end"], str)

    page2 = await alice.messages(room_id, dir="b", limit="3", **{"from": page["end"]})
    assert bodies(page2["chunk"]) == ["message 3", "message 2", "message 1"]

    # Walk to the start of the room: the last page has no "end".
    seen = bodies(page["chunk"]) + bodies(page2["chunk"])
    token = page2["end"]
    for _ in range(20):
        more = await alice.messages(room_id, dir="b", limit="5", **{"from": token})
        seen += bodies(more["chunk"])
        if "end" not in more:
            break
        token = more["end"]
    else:
        raise AssertionError("backwards pagination never reached the start of the room")
    assert seen == [f"message {i}" for i in range(6, -1, -1)]
    assert more["chunk"] == [] or more["chunk"][-1]["type"] == "m.room.create"


async def test_messages_forwards_from_start(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    await send_numbered(alice, room_id, 3)
    forward = await alice.messages(room_id, dir="f", limit="50")
    assert forward["chunk"][0]["type"] == "m.room.create"
    assert bodies(forward["chunk"]) == ["message 0", "message 1", "message 2"]
    # Paginating backwards from where a forward page ended returns the same events, reversed.
    back = await alice.messages(room_id, dir="b", limit="50", **{"from": forward["end"]})
    assert [e["event_id"] for e in back["chunk"]] == [
        e["event_id"] for e in reversed(forward["chunk"])
    ]


async def test_messages_filter(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    await alice.send(room_id, {"n": 1}, event_type="cis.test.one")
    await alice.send_text(room_id, "text")
    await alice.send(room_id, {"n": 2}, event_type="cis.test.one")
    only = await alice.messages(
        room_id, dir="b", limit="10", filter=json.dumps({"types": ["cis.test.one"]})
    )
    assert [e["content"] for e in only["chunk"]] == [{"n": 2}, {"n": 1}]
    not_state = await alice.messages(
        room_id, dir="b", limit="50", filter=json.dumps({"not_types": ["cis.test.one"]})
    )
    assert all(e["type"] != "cis.test.one" for e in not_state["chunk"])
    assert bodies(not_state["chunk"]) == ["text"]


async def test_messages_bad_input(users: Users) -> None:
    alice, mallory = await users.many("alice", "mallory")
    room_id = await alice.create_room()
    path = f"{CS}/rooms/{q(room_id)}/messages"
    (await alice.request("GET", path, params={"dir": "sideways"})).expect(400, "M_INVALID_PARAM")
    (await alice.request("GET", path, params={"dir": "b", "limit": "many"})).expect(
        400, "M_INVALID_PARAM"
    )
    (await alice.request("GET", path, params={"dir": "b", "from": "garbage"})).expect(400)
    (await alice.request("GET", path, params={"dir": "b", "filter": "{not json"})).expect(400)
    (await mallory.request("GET", path, params={"dir": "b"})).expect(403, "M_FORBIDDEN")


async def test_get_single_event(users: Users) -> None:
    alice, mallory = await users.many("alice", "mallory")
    room_id = await alice.create_room()
    event_id = await alice.send_text(room_id, "one")
    event = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/event/{q(event_id)}")
    assert event["event_id"] == event_id
    assert event["content"] == {"msgtype": "m.text", "body": "one"}
    assert event["sender"] == alice.user_id
    assert event["room_id"] == room_id
    (await alice.request("GET", f"{CS}/rooms/{q(room_id)}/event/$nope")).expect(404, "M_NOT_FOUND")
    (await mallory.request("GET", f"{CS}/rooms/{q(room_id)}/event/{q(event_id)}")).expect(
        404, "M_NOT_FOUND"
    )


async def test_send_needs_membership(users: Users) -> None:
    alice, mallory = await users.many("alice", "mallory")
    room_id = await alice.create_room(preset="public_chat")
    path = f"{CS}/rooms/{q(room_id)}/send/m.room.message/t1"
    body = {"msgtype": "m.text", "body": "hi"}
    (await mallory.request("PUT", path, body)).expect(403, "M_FORBIDDEN")
    (
        await mallory.request(
            "PUT",
            f"{CS}/rooms/{q('!unknown:' + users.server.server_name)}/send/m.room.message/t1",
            body,
        )
    ).expect(403, "M_FORBIDDEN")
    await mallory.join(room_id)
    (await mallory.request("PUT", path, body)).expect(200)
    await mallory.ok("POST", f"{CS}/rooms/{q(room_id)}/leave", {})
    (await mallory.request("PUT", f"{path}x", body)).expect(403, "M_FORBIDDEN")


async def test_redaction(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    event_id = await alice.send_text(room_id, "secret")
    answer = await alice.ok(
        "PUT", f"{CS}/rooms/{q(room_id)}/redact/{q(event_id)}/r1", {"reason": "oops"}
    )
    redaction_id = answer["event_id"]
    assert redaction_id.startswith("$")
    redacted = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/event/{q(event_id)}")
    assert redacted["content"] == {}
    assert redacted["unsigned"]["redacted_because"]["event_id"] == redaction_id
    page = await alice.messages(room_id, dir="b", limit="2")
    assert page["chunk"][0]["type"] == "m.room.redaction"
    assert page["chunk"][0]["redacts"] == event_id or (
        page["chunk"][0]["content"].get("redacts") == event_id
    )


async def test_room_messages_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        room_id = await alice.create_room()
        await send_numbered(alice, room_id, 3)
        back = await alice.messages(room_id, dir="b", limit="2")
        answers[name] = {
            "back": back,
            "more": await alice.messages(room_id, dir="b", limit="2", **{"from": back["end"]}),
            "forward": await alice.messages(room_id, dir="f", limit="50"),
        }
    assert_same_shape(answers["synapse"], answers["embedded"], ignore=EVENT_NOISE)

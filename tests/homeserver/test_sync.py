"""/sync (Complement: sync_test, sync_timeline_test, sync_archive_test)."""

from __future__ import annotations

import asyncio
import json
import time

from tests.homeserver.conftest import Pair
from tests.support.client import CS, has_event, q, timeline_events
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape

EVENT_NOISE = ["*.unsigned.age", "*.age"]


async def test_initial_sync(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room(name="synced")
    event_id = await alice.send_text(room_id, "hello")
    body = await alice.sync_until(has_event(event_id, room_id))
    assert isinstance(body["next_batch"], str)
    room = body["rooms"]["join"][room_id]
    timeline = room["timeline"]
    assert isinstance(timeline["limited"], bool)
    assert isinstance(timeline["prev_batch"], str)
    types = [e["type"] for e in timeline["events"]] + [e["type"] for e in room["state"]["events"]]
    assert "m.room.create" in types and "m.room.name" in types
    for event in timeline["events"]:
        assert event["event_id"].startswith("$")
        assert isinstance(event["sender"], str) and isinstance(event["origin_server_ts"], int)


async def test_incremental_sync_has_only_new_events(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    first_id = await alice.send_text(room_id, "first")
    first = await alice.sync_until(has_event(first_id, room_id))
    second_id = await alice.send_text(room_id, "second")
    later = await alice.sync_until(has_event(second_id, room_id), since=first["next_batch"])
    ids = [e["event_id"] for e in timeline_events(later, room_id)]
    assert ids == [second_id]
    assert later["rooms"]["join"][room_id]["timeline"]["limited"] is False

    # Nothing new: an empty answer after the timeout, with a usable next_batch.
    started = time.monotonic()
    quiet = await alice.sync(since=later["next_batch"], timeout="600")
    assert time.monotonic() - started >= 0.4
    assert room_id not in quiet.get("rooms", {}).get("join", {})
    assert isinstance(quiet["next_batch"], str)


async def test_sync_long_poll_wakes_on_new_event(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    position = (await bob.sync())["next_batch"]

    started = time.monotonic()
    poll = asyncio.create_task(bob.sync(since=position, timeout="20000"))
    event_id = await alice.send_text(room_id, "wake up")
    body = await asyncio.wait_for(poll, 30)
    assert time.monotonic() - started < 10
    if not has_event(event_id, room_id)(body):  # woke for an earlier event of the join
        body = await bob.sync_until(has_event(event_id, room_id), since=body["next_batch"])
    assert has_event(event_id, room_id)(body)


async def test_sync_invite_and_leave(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(name="invited", preset="private_chat")
    position = (await bob.sync())["next_batch"]
    await alice.invite(room_id, str(bob.user_id))

    invited = await bob.sync_until(
        lambda body: room_id in body.get("rooms", {}).get("invite", {}), since=position
    )
    stripped = invited["rooms"]["invite"][room_id]["invite_state"]["events"]
    by_type = {(e["type"], e["state_key"]): e for e in stripped}
    assert by_type[("m.room.member", bob.user_id)]["content"]["membership"] == "invite"
    assert by_type[("m.room.name", "")]["content"] == {"name": "invited"}
    assert ("m.room.create", "") in by_type
    for event in stripped:
        assert set(event) >= {"type", "state_key", "content", "sender"}

    await bob.join(room_id)
    joined = await bob.sync_until(
        lambda body: room_id in body.get("rooms", {}).get("join", {}), since=invited["next_batch"]
    )
    await bob.ok("POST", f"{CS}/rooms/{q(room_id)}/leave", {})
    left = await bob.sync_until(
        lambda body: room_id in body.get("rooms", {}).get("leave", {}), since=joined["next_batch"]
    )
    leave_events = left["rooms"]["leave"][room_id]["timeline"]["events"]
    assert any(
        e["type"] == "m.room.member"
        and e["state_key"] == bob.user_id
        and e["content"]["membership"] == "leave"
        for e in leave_events
    )


async def test_sync_limited_timeline_and_prev_batch(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    marker = await alice.send_text(room_id, "before")
    position = (await alice.sync_until(has_event(marker, room_id)))["next_batch"]
    sent = [await alice.send_text(room_id, f"m{i}") for i in range(8)]

    flt = json.dumps({"room": {"timeline": {"limit": 3}}})
    body = await alice.sync_until(
        has_event(sent[-1], room_id), since=position, params={"filter": flt}
    )
    timeline = body["rooms"]["join"][room_id]["timeline"]
    assert [e["event_id"] for e in timeline["events"]] == sent[-3:]
    assert timeline["limited"] is True
    earlier = await alice.messages(room_id, dir="b", limit="5", **{"from": timeline["prev_batch"]})
    assert [e["event_id"] for e in earlier["chunk"]] == list(reversed(sent[:5]))


async def test_sync_full_state(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room(name="full")
    event_id = await alice.send_text(room_id, "x")
    position = (await alice.sync_until(has_event(event_id, room_id)))["next_batch"]
    newer = await alice.send_text(room_id, "y")
    body = await alice.sync_until(
        has_event(newer, room_id), since=position, params={"full_state": "true"}
    )
    state_types = {e["type"] for e in body["rooms"]["join"][room_id]["state"]["events"]}
    assert {"m.room.create", "m.room.name", "m.room.power_levels", "m.room.member"} <= state_types


async def test_sync_bad_input(users: Users) -> None:
    alice = await users.new("alice")
    (await alice.request("GET", f"{CS}/sync", params={"since": "garbage"})).expect(400)
    (await alice.request("GET", f"{CS}/sync", params={"timeout": "soon"})).expect(
        400, "M_INVALID_PARAM"
    )
    (await alice.request("GET", f"{CS}/sync", params={"filter": "999999"})).expect(400)
    (await alice.request("GET", f"{CS}/sync", token=None)).expect(401, "M_MISSING_TOKEN")


async def test_sync_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice, bob = await users.many("alice", "bob")
        room_id = await alice.create_room(name="n", preset="private_chat")
        event_id = await alice.send_text(room_id, "hello")
        initial = await alice.sync_until(has_event(event_id, room_id))
        other = await alice.create_room(invite=[bob.user_id])
        invited = await bob.sync_until(lambda b, r=other: r in b.get("rooms", {}).get("invite", {}))
        second = await alice.send_text(room_id, "again")
        incremental = await alice.sync_until(
            has_event(second, room_id), since=initial["next_batch"]
        )
        answers[name] = {
            "initial_room": initial["rooms"]["join"][room_id],
            "invite": invited["rooms"]["invite"][other],
            "incremental_room": incremental["rooms"]["join"][room_id],
            "top_level_keys": sorted(k for k in initial if k != "rooms"),
        }
    assert_same_shape(answers["synapse"], answers["embedded"], ignore=EVENT_NOISE)
    assert answers["synapse"]["top_level_keys"] == answers["embedded"]["top_level_keys"]

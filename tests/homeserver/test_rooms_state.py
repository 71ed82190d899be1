"""State across members and over time (Complement: rooms_state_test, apidoc_room_state_test)."""

from __future__ import annotations

import asyncio

from tests.support.client import CS, q, timeline_events
from tests.support.fixtures import Users


async def test_parallel_state_changes_all_land(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    keys = [f"k{i}" for i in range(10)]
    event_ids = await asyncio.gather(
        *(alice.put_state(room_id, "cis.test.parallel", {"key": key}, key) for key in keys)
    )
    assert len(set(event_ids)) == len(keys)
    state = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/state")
    found = {e["state_key"]: e["content"] for e in state if e["type"] == "cis.test.parallel"}
    assert found == {key: {"key": key} for key in keys}


async def test_state_change_reaches_other_members_by_sync(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    first = await bob.sync_until(lambda body: room_id in body["rooms"].get("join", {}))
    # The initial sync carries the room's current state (name not yet set).
    names = [
        e
        for e in first["rooms"]["join"][room_id]["state"]["events"]
        + timeline_events(first, room_id)
        if e["type"] == "m.room.name"
    ]
    assert names == []

    event_id = await alice.put_state(room_id, "m.room.name", {"name": "renamed"})
    later = await bob.sync_until(
        lambda body: any(e["event_id"] == event_id for e in timeline_events(body, room_id)),
        since=first["next_batch"],
    )
    event = next(e for e in timeline_events(later, room_id) if e["event_id"] == event_id)
    assert event["state_key"] == ""
    assert event["content"] == {"name": "renamed"}
    assert event["sender"] == alice.user_id
    assert await bob.get_state(room_id, "m.room.name") == {"name": "renamed"}


async def test_state_event_must_be_an_object(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    path = f"{CS}/rooms/{q(room_id)}/state/cis.test.bad/"
    (await alice.request("PUT", path, [1, 2])).expect(400, "M_BAD_JSON")
    (await alice.request("PUT", path, "text")).expect(400, "M_BAD_JSON")
    (
        await alice.request("PUT", path, data=b"{", headers={"Content-Type": "application/json"})
    ).expect(400, "M_NOT_JSON")


async def test_oversized_state_event_is_refused(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    big = {"blob": "x" * 70_000}  # events are capped at 65536 bytes
    (await alice.request("PUT", f"{CS}/rooms/{q(room_id)}/state/cis.test.big/", big)).expect(
        413, "M_TOO_LARGE"
    )
    (await alice.request("GET", f"{CS}/rooms/{q(room_id)}/state/cis.test.big/")).expect(
        404, "M_NOT_FOUND"
    )

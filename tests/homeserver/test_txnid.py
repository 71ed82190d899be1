"""Transaction-id idempotency of sends (Complement: txnid_test)."""

from __future__ import annotations

from typing import Any

from tests.support.client import CS, has_event, q, timeline_events
from tests.support.fixtures import Users

MESSAGE = {"msgtype": "m.text", "body": "first"}


def sync_event(body: Any, room_id: str, event_id: str) -> dict[str, Any]:
    return next(e for e in timeline_events(body, room_id) if e["event_id"] == event_id)


async def test_txn_idempotency(users: Users) -> None:
    alice = await users.new("alice")
    room1, room2 = await alice.create_room(), await alice.create_room()
    first = await alice.send(room1, MESSAGE, txn_id="abc")
    assert await alice.send(room1, MESSAGE, txn_id="abc") == first
    # Same transaction id, different content: still the first event.
    assert await alice.send(room1, {"msgtype": "m.text", "body": "second"}, txn_id="abc") == first
    # Another room is another transaction.
    assert await alice.send(room2, MESSAGE, txn_id="abc") != first
    page = await alice.messages(room1, dir="b", limit="10")
    assert [e["event_id"] for e in page["chunk"] if e["type"] == "m.room.message"] == [first]


async def test_txn_in_event_and_local_echo(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    event_id = await alice.send(room_id, MESSAGE, txn_id="abcdefg")
    event = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/event/{q(event_id)}")
    assert event["unsigned"]["transaction_id"] == "abcdefg"
    mine = await alice.sync_until(has_event(event_id, room_id))
    assert sync_event(mine, room_id, event_id)["unsigned"]["transaction_id"] == "abcdefg"

    # Another session of the same user does not see the transaction id.
    user_id, token = users.server.login_sync(alice.localpart)
    other = users.client(user_id=user_id, token=token)
    theirs = await other.sync_until(has_event(event_id, room_id))
    assert "transaction_id" not in sync_event(theirs, room_id, event_id).get("unsigned", {})


async def test_txn_scoped_to_device(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    first = await alice.send(room_id, MESSAGE, txn_id="shared")
    # Spec v1.7 (MSC3970): the scope is the device, so a second login that reuses the device
    # id gets the same event back, while another device sends a new one.
    device = (await alice.ok("GET", f"{CS}/account/whoami"))["device_id"]
    user_id, token = users.server.login_sync(alice.localpart, device_id=device)
    same_device = users.client(user_id=user_id, token=token)
    assert await same_device.send(room_id, MESSAGE, txn_id="shared") == first
    user_id, token = users.server.login_sync(alice.localpart, device_id="OTHERDEVICE")
    other_device = users.client(user_id=user_id, token=token)
    assert await other_device.send(room_id, MESSAGE, txn_id="shared") != first

"""Read receipts and typing are accepted and reach the other members' /sync (Complement:
apidoc_room_receipts_test, room_typing_test)."""

from __future__ import annotations

from typing import Any

from tests.support.client import CS, q
from tests.support.fixtures import Users


def ephemeral(body: Any, room_id: str) -> list[dict[str, Any]]:
    room = body.get("rooms", {}).get("join", {}).get(room_id, {})
    events: list[dict[str, Any]] = room.get("ephemeral", {}).get("events", [])
    return events


async def test_read_receipt(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    event_id = await alice.send_text(room_id, "read me")
    position = (await alice.sync())["next_batch"]
    answer = await bob.ok("POST", f"{CS}/rooms/{q(room_id)}/receipt/m.read/{q(event_id)}", {})
    assert answer == {}

    def has_receipt(body: Any) -> bool:
        return any(
            e["type"] == "m.receipt"
            and str(bob.user_id) in e["content"].get(event_id, {}).get("m.read", {})
            for e in ephemeral(body, room_id)
        )

    body = await alice.sync_until(has_receipt, since=position)
    receipt = next(e for e in ephemeral(body, room_id) if e["type"] == "m.receipt")
    assert isinstance(receipt["content"][event_id]["m.read"][bob.user_id]["ts"], int)

    (
        await bob.request("POST", f"{CS}/rooms/{q(room_id)}/receipt/m.bogus/{q(event_id)}", {})
    ).expect(400)
    assert (
        await bob.ok("POST", f"{CS}/rooms/{q(room_id)}/read_markers", {"m.fully_read": event_id})
        == {}
    )


async def test_typing(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    position = (await alice.sync())["next_batch"]
    path = f"{CS}/rooms/{q(room_id)}/typing/{q(str(bob.user_id))}"
    assert await bob.ok("PUT", path, {"typing": True, "timeout": 30000}) == {}
    body = await alice.sync_until(
        lambda b: any(
            e["type"] == "m.typing" and bob.user_id in e["content"]["user_ids"]
            for e in ephemeral(b, room_id)
        ),
        since=position,
    )
    assert await bob.ok("PUT", path, {"typing": False}) == {}
    await alice.sync_until(
        lambda b: any(
            e["type"] == "m.typing" and bob.user_id not in e["content"]["user_ids"]
            for e in ephemeral(b, room_id)
        ),
        since=body["next_batch"],
    )
    # Typing for someone else is refused.
    other = f"{CS}/rooms/{q(room_id)}/typing/{q(str(alice.user_id))}"
    # Synapse answers 400 (not 403) with M_FORBIDDEN here.
    (await bob.request("PUT", other, {"typing": True, "timeout": 1000})).expect(400, "M_FORBIDDEN")

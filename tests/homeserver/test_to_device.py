"""To-device messages (the spec's "Send-to-Device messaging"; Complement: to_device tests):
relayed untouched, delivered to the addressed device (or all of a user's, "*") in /sync until
that device syncs past them, idempotent per transaction id."""

from __future__ import annotations

from typing import Any

from tests.homeserver.conftest import Pair
from tests.support.client import CS, MatrixClient, q
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape


def to_device(body: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = body.get("to_device", {}).get("events", [])
    return events


async def device_of(client: MatrixClient) -> str:
    return str((await client.ok("GET", f"{CS}/account/whoami"))["device_id"])


async def test_send_to_device_is_delivered_once(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    bob_device = await device_of(bob)
    position = (await bob.sync(timeout="0"))["next_batch"]
    content = {"algorithm": "m.olm.v1.curve25519-aes-sha2", "ciphertext": {"k": {"body": "x"}}}
    path = f"{CS}/sendToDevice/m.room.encrypted/{q('txn-1')}"
    message = {"messages": {bob.user_id: {bob_device: content}}}
    assert await alice.ok("PUT", path, message) == {}
    assert await alice.ok("PUT", path, message) == {}  # the same transaction: not sent twice

    body = await bob.sync_until(lambda b: bool(to_device(b)), since=position)
    assert to_device(body) == [
        {"sender": alice.user_id, "type": "m.room.encrypted", "content": content}
    ]
    # Syncing past it acknowledges it: the next response does not repeat it.
    after = await bob.sync(since=body["next_batch"], timeout="0")
    assert to_device(after) == []


async def test_send_to_all_devices_and_refusals(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    position = (await bob.sync(timeout="0"))["next_batch"]
    await alice.ok(
        "PUT",
        f"{CS}/sendToDevice/m.custom/star",
        {"messages": {bob.user_id: {"*": {"hello": "every device"}}}},
    )
    body = await bob.sync_until(lambda b: bool(to_device(b)), since=position)
    assert to_device(body)[0]["content"] == {"hello": "every device"}
    (await alice.request("PUT", f"{CS}/sendToDevice/m.custom/nomessages", {})).expect(
        400, "M_MISSING_PARAM"
    )
    too_big = {"messages": {bob.user_id: {"*": {"x": "y" * 70_000}}}}
    (await alice.request("PUT", f"{CS}/sendToDevice/m.custom/big", too_big)).expect(
        413, "M_TOO_LARGE"
    )


async def test_to_device_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice, bob = await users.many("alice", "bob")
        position = (await bob.sync(timeout="0"))["next_batch"]
        await alice.ok(
            "PUT",
            f"{CS}/sendToDevice/m.custom/shape",
            {"messages": {bob.user_id: {await device_of(bob): {"n": 1}}}},
        )
        body = await bob.sync_until(lambda b: bool(to_device(b)), since=position)
        answers[name] = body["to_device"]
    assert_same_shape(answers["synapse"], answers["embedded"])

"""Devices (the spec's "Device management"): list, read, rename, delete behind
user-interactive auth; logging in with a new device and deleting one reach other members'
clients as device-list changes."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.homeserver.conftest import Pair
from tests.support.client import CS, MatrixClient
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape


async def login(users: Users, localpart: str, device_id: str | None = None) -> tuple[str, str]:
    """Another login of an existing account (a new device, or the named one)."""
    return await asyncio.to_thread(users.server.login_sync, localpart, device_id)


def password_auth(users: Users, client: MatrixClient, session: str) -> dict[str, Any]:
    return {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": client.localpart},
        "password": users.server.password(client.localpart),
        "session": session,
    }


async def test_device_crud_with_ui_auth(users: Users) -> None:
    alice = await users.new("alice")
    _, token = await login(users, alice.localpart, device_id="SECOND")
    second = users.client(user_id=alice.user_id, token=token)
    listed = await alice.ok("GET", f"{CS}/devices")
    assert "SECOND" in {d["device_id"] for d in listed["devices"]}
    assert await alice.ok("PUT", f"{CS}/devices/SECOND", {"display_name": "phone"}) == {}
    device = await alice.ok("GET", f"{CS}/devices/SECOND")
    assert device["display_name"] == "phone" and device["user_id"] == alice.user_id
    (await alice.request("GET", f"{CS}/devices/NOSUCH")).expect(404, "M_NOT_FOUND")

    asked = (await alice.request("DELETE", f"{CS}/devices/SECOND", {})).expect(401)
    assert asked.body["flows"] == [{"stages": ["m.login.password"]}]
    auth = password_auth(users, alice, asked.body["session"])
    assert await alice.ok("DELETE", f"{CS}/devices/SECOND", {"auth": auth}) == {}
    (await second.request("GET", f"{CS}/account/whoami")).expect(401, "M_UNKNOWN_TOKEN")
    (await alice.request("DELETE", f"{CS}/devices/SECOND", {})).expect(401)  # password first

    # /delete_devices: the same, for several.
    for name in ("THIRD", "FOURTH"):
        await login(users, alice.localpart, device_id=name)
    asked = (
        await alice.request("POST", f"{CS}/delete_devices", {"devices": ["THIRD", "FOURTH"]})
    ).expect(401)
    auth = password_auth(users, alice, asked.body["session"])
    body = {"devices": ["THIRD", "FOURTH"], "auth": auth}
    assert await alice.ok("POST", f"{CS}/delete_devices", body) == {}
    left = {d["device_id"] for d in (await alice.ok("GET", f"{CS}/devices"))["devices"]}
    assert not left & {"THIRD", "FOURTH"}
    (await alice.request("POST", f"{CS}/delete_devices", {"devices": "x"})).expect(400)


async def test_new_device_is_a_device_list_change(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    position = (await alice.sync(timeout="0"))["next_batch"]
    await login(users, bob.localpart)
    await alice.sync_until(
        lambda b: bob.user_id in b.get("device_lists", {}).get("changed", []), since=position
    )


async def test_device_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        await login(users, alice.localpart, device_id="SHAPE")
        asked = (await alice.request("DELETE", f"{CS}/devices/SHAPE", {})).expect(401)
        wrong = {**password_auth(users, alice, asked.body["session"]), "password": "nope"}
        refused = (await alice.request("DELETE", f"{CS}/devices/SHAPE", {"auth": wrong})).expect(
            401
        )
        answers[name] = {
            "device": await alice.ok("GET", f"{CS}/devices/SHAPE"),
            "asked": asked.body,
            "refused": refused.body,
        }
    # Synapse records where a device was last seen a few seconds late (null at first).
    assert_same_shape(answers["synapse"], answers["embedded"], ignore=["$.device.last_seen_*"])

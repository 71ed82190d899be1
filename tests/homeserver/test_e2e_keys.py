"""End-to-end encryption plumbing, stored and relayed (Complement: e2e tests; the spec's
"End-to-end encryption" module): /keys/upload, /keys/query, /keys/claim, /keys/changes,
cross-signing uploads, and what /sync says about keys. Keys here are well-formed but not real
(neither server checks device-key signatures); real ones go through matrix-js-sdk in
test_clients.py."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.homeserver.conftest import Pair
from tests.support.client import CS, MatrixClient
from tests.support.fixtures import Users
from tests.support.process import HomeserverUnderTest
from tests.support.shape import assert_same_shape

KEYS = f"{CS}/keys"


async def device_id(client: MatrixClient) -> str:
    return str((await client.ok("GET", f"{CS}/account/whoami"))["device_id"])


def device_keys(user_id: str, device: str) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {f"curve25519:{device}": "C" * 43, f"ed25519:{device}": "E" * 43},
        "signatures": {user_id: {f"ed25519:{device}": "S" * 86}},
    }


def one_time_keys(user_id: str, device: str, count: int, start: int = 0) -> dict[str, Any]:
    return {
        f"signed_curve25519:AAAA{n}": {
            "key": f"otk{n}".ljust(43, "k"),
            "signatures": {user_id: {f"ed25519:{device}": "S" * 86}},
        }
        for n in range(start, start + count)
    }


def master_key(user_id: str, public: str = "M" * 43) -> dict[str, Any]:
    return {"user_id": user_id, "usage": ["master"], "keys": {f"ed25519:{public}": public}}


async def test_upload_query_claim(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    alice_device = await device_id(alice)
    assert alice.user_id is not None and bob.user_id is not None
    uploaded = await alice.ok(
        "POST",
        f"{KEYS}/upload",
        {
            "device_keys": device_keys(alice.user_id, alice_device),
            "one_time_keys": one_time_keys(alice.user_id, alice_device, 3),
            "fallback_keys": {
                "signed_curve25519:FALLBACK": {
                    "key": "F" * 43,
                    "fallback": True,
                    "signatures": {alice.user_id: {f"ed25519:{alice_device}": "S" * 86}},
                }
            },
        },
    )
    assert uploaded == {"one_time_key_counts": {"signed_curve25519": 3}}
    # The same keys again are fine; a different key under a used id is not.
    again = await alice.ok(
        "POST", f"{KEYS}/upload", {"one_time_keys": one_time_keys(alice.user_id, alice_device, 1)}
    )
    assert again["one_time_key_counts"] == {"signed_curve25519": 3}
    clash = one_time_keys(alice.user_id, alice_device, 1)
    clash["signed_curve25519:AAAA0"]["key"] = "different".ljust(43, "x")
    (await alice.request("POST", f"{KEYS}/upload", {"one_time_keys": clash})).expect(
        400, "M_UNKNOWN"
    )

    found = await bob.ok("POST", f"{KEYS}/query", {"device_keys": {alice.user_id: []}})
    device = found["device_keys"][alice.user_id][alice_device]
    assert device["keys"] == device_keys(alice.user_id, alice_device)["keys"]
    assert "device_display_name" not in device["unsigned"] or isinstance(
        device["unsigned"]["device_display_name"], str
    )
    assert found["failures"] == {}
    unknown = await bob.ok(
        "POST", f"{KEYS}/query", {"device_keys": {alice.user_id: ["NOSUCHDEVICE"]}}
    )
    assert unknown["device_keys"] == {alice.user_id: {}}

    claim = {"one_time_keys": {alice.user_id: {alice_device: "signed_curve25519"}}}
    taken = []
    for _ in range(4):
        answer = await bob.ok("POST", f"{KEYS}/claim", claim)
        (key_id,) = answer["one_time_keys"][alice.user_id][alice_device]
        taken.append(key_id)
    # Oldest first, then the fallback key (which is handed out again and again).
    assert taken == [
        "signed_curve25519:AAAA0",
        "signed_curve25519:AAAA1",
        "signed_curve25519:AAAA2",
        "signed_curve25519:FALLBACK",
    ]
    body = await alice.sync(timeout="0")
    assert body["device_one_time_keys_count"] == {"signed_curve25519": 0}
    assert body["device_unused_fallback_key_types"] == []


async def test_upload_refusals(users: Users) -> None:
    alice = await users.new("alice")
    assert alice.user_id is not None
    mine = await device_id(alice)
    keys = device_keys(alice.user_id, mine)
    for body, errcode in (
        ({"device_keys": {**keys, "user_id": "@someone:else"}}, "M_BAD_JSON"),
        ({"device_keys": {**keys, "device_id": "OTHER"}}, "M_BAD_JSON"),
        ({"device_keys": {k: v for k, v in keys.items() if k != "algorithms"}}, "M_MISSING_PARAM"),
        ({"device_keys": {**keys, "keys": "nope"}}, "M_BAD_JSON"),
        ({"one_time_keys": {"no-colon": "x"}}, "M_BAD_JSON"),
        ({"fallback_keys": {"a:b:c": "x"}}, "M_BAD_JSON"),
    ):
        (await alice.request("POST", f"{KEYS}/upload", body)).expect(400, errcode)
    (await alice.request("POST", f"{KEYS}/query", {"device_keys": []})).expect(400)
    (await alice.request("POST", f"{KEYS}/query", {"device_keys": {alice.user_id: "x"}})).expect(
        400
    )
    (await users.anonymous().request("POST", f"{KEYS}/upload", {})).expect(401, "M_MISSING_TOKEN")


async def test_device_lists_in_sync_and_changes(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    assert alice.user_id is not None and bob.user_id is not None
    room_id = await alice.create_room(preset="public_chat")
    await bob.join(room_id)
    position = (await alice.sync(timeout="0"))["next_batch"]
    bob_device = await device_id(bob)
    await bob.ok("POST", f"{KEYS}/upload", {"device_keys": device_keys(bob.user_id, bob_device)})

    def bob_changed(body: Any) -> bool:
        return bob.user_id in body.get("device_lists", {}).get("changed", [])

    await alice.sync_until(bob_changed, since=position)
    changes = await alice.ok("GET", f"{KEYS}/changes", params={"from": position})
    assert bob.user_id in changes["changed"]
    assert changes["left"] == []
    (await alice.request("GET", f"{KEYS}/changes")).expect(400, "M_MISSING_PARAM")

    # Bob leaves: Alice no longer shares a room with him.
    position = (await alice.sync(timeout="0"))["next_batch"]
    await bob.ok("POST", f"{CS}/rooms/{room_id}/leave", {})
    await alice.sync_until(
        lambda body: bob.user_id in body.get("device_lists", {}).get("left", []), since=position
    )


async def test_cross_signing_master_key_and_ui_auth(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    assert alice.user_id is not None
    upload = f"{KEYS}/device_signing/upload"
    (
        await alice.request(
            "POST", upload, {"master_key": {**master_key(alice.user_id), "usage": ["self"]}}
        )
    ).expect(400, "M_INVALID_PARAM")
    assert await alice.ok("POST", upload, {}) == {}  # nothing to change: nothing asked
    assert await alice.ok("POST", upload, {"master_key": master_key(alice.user_id)}) == {}
    # The same key again needs no password; another one does.
    assert await alice.ok("POST", upload, {"master_key": master_key(alice.user_id)}) == {}
    replace = {"master_key": master_key(alice.user_id, "N" * 43)}
    asked = (await alice.request("POST", upload, replace)).expect(401)
    assert asked.body["flows"] == [{"stages": ["m.login.password"]}]
    session = asked.body["session"]
    password = users.server.password(alice.localpart)
    identifier = {"type": "m.id.user", "user": alice.localpart}
    wrong = {"type": "m.login.password", "identifier": identifier, "password": "wrong"}
    refused = (
        await alice.request("POST", upload, {**replace, "auth": {**wrong, "session": session}})
    ).expect(401)
    assert refused.body["errcode"] == "M_FORBIDDEN"
    right = {**wrong, "password": password, "session": session}
    assert await alice.ok("POST", upload, {**replace, "auth": right}) == {}

    found = await bob.ok("POST", f"{KEYS}/query", {"device_keys": {alice.user_id: []}})
    assert found["master_keys"][alice.user_id]["keys"] == {f"ed25519:{'N' * 43}": "N" * 43}
    assert found["self_signing_keys"] == {}
    assert found["user_signing_keys"] == {}

    # Signatures need a self-signing key Alice has not uploaded: every one fails, by name.
    mine = await device_id(alice)
    await alice.ok("POST", f"{KEYS}/upload", {"device_keys": device_keys(alice.user_id, mine)})
    signed = await alice.ok(
        "POST",
        f"{KEYS}/signatures/upload",
        {alice.user_id: {mine: device_keys(alice.user_id, mine)}},
    )
    failure = signed["failures"][alice.user_id][mine]
    assert failure["status"] == 404 and failure["errcode"] == "M_NOT_FOUND"


async def test_key_shapes_match(pair: Pair) -> None:
    answers: dict[str, dict[str, Any]] = {}
    for name, users in pair.each():
        first, bob = await users.many("alice", "bob")
        # The same device id on both servers, so that the answers line up key for key.
        mine = "SHAPEDEVICE"
        user_id, token = users.server.login_sync(first.localpart, device_id=mine)
        alice = users.client(user_id=user_id, token=token)
        await alice.ok("PUT", f"{CS}/devices/{mine}", {"display_name": "alice's laptop"})
        room_id = await alice.create_room(preset="public_chat")
        await bob.join(room_id)
        since = (await bob.sync(timeout="0"))["next_batch"]
        answers[name] = {
            "upload": await alice.ok(
                "POST",
                f"{KEYS}/upload",
                {
                    "device_keys": device_keys(alice.user_id, mine),
                    "one_time_keys": one_time_keys(alice.user_id, mine, 2),
                },
            ),
            "master": await alice.ok(
                "POST", f"{KEYS}/device_signing/upload", {"master_key": master_key(alice.user_id)}
            ),
            "query": await bob.ok("POST", f"{KEYS}/query", {"device_keys": {alice.user_id: []}}),
            "claim": await bob.ok(
                "POST",
                f"{KEYS}/claim",
                {"one_time_keys": {alice.user_id: {mine: "signed_curve25519"}}},
            ),
            "changes": await bob.ok("GET", f"{KEYS}/changes", params={"from": since}),
        }
    assert_same_shape(answers["synapse"], answers["embedded"])


async def test_other_servers_users_are_failures(
    embedded: HomeserverUnderTest, http: aiohttp.ClientSession
) -> None:
    """No federation here: another server's users are reported as that server's failure (what
    Synapse says of a server it cannot reach), and the local answer still comes."""
    alice = await Users(embedded, http).new("alice")
    assert alice.user_id is not None
    remote = "@someone:elsewhere.example"
    found = await alice.ok(
        "POST", f"{KEYS}/query", {"device_keys": {remote: [], alice.user_id: []}}
    )
    assert found["failures"] == {
        "elsewhere.example": {"status": 503, "message": "Not ready for retry"}
    }
    assert found["device_keys"] == {alice.user_id: {}}
    claimed = await alice.ok(
        "POST", f"{KEYS}/claim", {"one_time_keys": {remote: {"DEV": "signed_curve25519"}}}
    )
    assert claimed == {
        "one_time_keys": {},
        "failures": {"elsewhere.example": found["failures"]["elsewhere.example"]},
    }

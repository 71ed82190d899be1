"""Server-side key backup (the spec's "Server-side key backups"): 404 M_NOT_FOUND until a backup
exists, then versions and opaque encrypted keys stored, merged and counted as Synapse does."""

from __future__ import annotations

from typing import Any

from tests.homeserver.conftest import Pair
from tests.support.client import CS, MatrixClient, q
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape

VERSION = f"{CS}/room_keys/version"
KEYS = f"{CS}/room_keys/keys"
ALGORITHM = "m.megolm_backup.v1.curve25519-aes-sha2"


def key(index: int, verified: bool = False) -> dict[str, Any]:
    return {
        "first_message_index": index,
        "forwarded_count": 0,
        "is_verified": verified,
        "session_data": {"ciphertext": f"c{index}", "ephemeral": "e", "mac": "m"},
    }


async def backup_story(client: MatrixClient) -> dict[str, Any]:
    """One user's backup life; every answer kept for comparison."""
    seen: dict[str, Any] = {}
    seen["none"] = (await client.request("GET", VERSION)).expect(404, "M_NOT_FOUND").body
    seen["create"] = await client.ok(
        "POST", VERSION, {"algorithm": ALGORITHM, "auth_data": {"public_key": "pk"}}
    )
    version = seen["create"]["version"]
    room = "!room:cis.local"
    params = {"version": version}
    seen["put_all"] = await client.ok(
        "PUT", KEYS, {"rooms": {room: {"sessions": {"s1": key(5)}}}}, params=params
    )
    seen["put_one"] = await client.ok("PUT", f"{KEYS}/{q(room)}/s2", key(1), params=params)
    # A worse copy does not replace the stored one (and changes no etag); a better one does.
    seen["worse"] = await client.ok("PUT", f"{KEYS}/{q(room)}/s1", key(9), params=params)
    seen["better"] = await client.ok(
        "PUT", f"{KEYS}/{q(room)}/s1", key(2, verified=True), params=params
    )
    seen["get_all"] = await client.ok("GET", KEYS, params=params)
    seen["get_room"] = await client.ok("GET", f"{KEYS}/{q(room)}", params=params)
    seen["get_one"] = await client.ok("GET", f"{KEYS}/{q(room)}/s1", params=params)
    seen["missing_one"] = (
        (await client.request("GET", f"{KEYS}/{q(room)}/nope", params=params))
        .expect(404, "M_NOT_FOUND")
        .body
    )
    seen["info"] = await client.ok("GET", VERSION)
    seen["info_by_number"] = await client.ok("GET", f"{VERSION}/{version}")
    seen["update"] = await client.ok(
        "PUT", f"{VERSION}/{version}", {"algorithm": ALGORITHM, "auth_data": {"public_key": "p2"}}
    )
    seen["update_mismatch"] = (
        (
            await client.request(
                "PUT",
                f"{VERSION}/{version}",
                {"algorithm": ALGORITHM, "auth_data": {}, "version": "999"},
            )
        )
        .expect(400, "M_INVALID_PARAM")
        .body
    )
    newer = await client.ok("POST", VERSION, {"algorithm": ALGORITHM, "auth_data": {}})
    seen["wrong_version"] = (
        (await client.request("PUT", KEYS, {"rooms": {}}, params=params))
        .expect(403, "M_WRONG_ROOM_KEYS_VERSION")
        .body
    )
    seen["delete_keys"] = await client.ok("DELETE", f"{KEYS}/{q(room)}", params=params)
    seen["delete_version"] = await client.ok("DELETE", f"{VERSION}/{newer['version']}")
    seen["unknown_version"] = (
        (await client.request("GET", f"{VERSION}/12345")).expect(404, "M_NOT_FOUND").body
    )
    seen["no_version_param"] = (await client.request("GET", KEYS)).expect(400).body
    return seen


async def test_backup_story(users: Users) -> None:
    seen = await backup_story(await users.new("backup"))
    assert seen["put_all"] == {"etag": "1", "count": 1}
    assert seen["put_one"] == {"etag": "2", "count": 2}
    assert seen["worse"] == {"etag": "2", "count": 2}
    assert seen["better"] == {"etag": "3", "count": 2}
    assert seen["get_one"]["first_message_index"] == 2
    assert seen["get_one"]["is_verified"] is True
    assert seen["info"]["count"] == 2 and seen["info"]["etag"] == "3"
    # Synapse names the version the request gave, not the newest, as "current_version".
    assert seen["wrong_version"]["current_version"] == seen["create"]["version"]


async def test_backup_shapes_match(pair: Pair) -> None:
    answers = {name: await backup_story(await users.new("backup")) for name, users in pair.each()}
    assert_same_shape(answers["synapse"], answers["embedded"])

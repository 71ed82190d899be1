"""/versions, /capabilities and the r0 paths older clients still call (Complement:
apidoc_version_test, apidoc_server_capabilities_test)."""

from __future__ import annotations

from tests.homeserver.conftest import Pair
from tests.support.client import q
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape


async def test_versions(users: Users) -> None:
    answer = await users.anonymous().ok("GET", "/_matrix/client/versions")
    versions = answer["versions"]
    assert all(isinstance(v, str) for v in versions)
    for needed in ("r0.6.1", "v1.1", "v1.11"):  # v1.11: clients switch to authenticated media
        assert needed in versions
    assert isinstance(answer.get("unstable_features", {}), dict)


async def test_capabilities(users: Users) -> None:
    alice = await users.new("alice")
    capabilities = (await alice.ok("GET", "/_matrix/client/v3/capabilities"))["capabilities"]
    room_versions = capabilities["m.room_versions"]
    assert room_versions["default"] in room_versions["available"]
    assert room_versions["available"][room_versions["default"]] == "stable"
    (await users.anonymous().request("GET", "/_matrix/client/v3/capabilities")).expect(
        401, "M_MISSING_TOKEN"
    )


async def test_r0_paths(users: Users) -> None:
    alice = await users.new("alice")
    r0 = "/_matrix/client/r0"
    assert (await alice.ok("GET", f"{r0}/account/whoami"))["user_id"] == alice.user_id
    room_id = (await alice.ok("POST", f"{r0}/createRoom", {"name": "old paths"}))["room_id"]
    sent = await alice.ok(
        "PUT",
        f"{r0}/rooms/{q(room_id)}/send/m.room.message/r0txn",
        {"msgtype": "m.text", "body": "r0"},
    )
    name = await alice.ok("GET", f"{r0}/rooms/{q(room_id)}/state/m.room.name")
    assert name == {"name": "old paths"}
    page = await alice.ok("GET", f"{r0}/rooms/{q(room_id)}/messages", params={"dir": "b"})
    assert page["chunk"][0]["event_id"] == sent["event_id"]
    body = await alice.ok("GET", f"{r0}/sync", params={"timeout": "0"})
    assert room_id in body["rooms"]["join"]
    assert room_id in (await alice.ok("GET", f"{r0}/joined_rooms"))["joined_rooms"]


async def test_versions_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        capabilities = (await alice.ok("GET", "/_matrix/client/v3/capabilities"))["capabilities"]
        answers[name] = {
            "m.room_versions": capabilities["m.room_versions"],
            "m.change_password": capabilities.get("m.change_password"),
        }
    assert_same_shape(
        answers["synapse"], answers["embedded"], ignore=["$.m.room_versions.available"]
    )
    assert (
        answers["embedded"]["m.room_versions"]["default"]
        == answers["synapse"]["m.room_versions"]["default"]
    )

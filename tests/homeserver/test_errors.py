"""Error codes for bad input (Complement: invalid_test, apidoc_request_encoding_test): every
mistake gets a 4xx with a Matrix error body, never a 500."""

from __future__ import annotations

from tests.homeserver.conftest import Pair
from tests.support.client import CS, q
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape


async def test_bad_json(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    send = f"{CS}/rooms/{q(room_id)}/send/m.room.message/bad1"
    json_header = {"Content-Type": "application/json"}
    for raw in (b"{", b"not json at all", b'{"body": "x"', b"\xff\xfe"):
        (await alice.request("PUT", send, data=raw, headers=json_header)).expect(400, "M_NOT_JSON")
    for value in ([1, 2], "a string", 42, None):
        data = b"null" if value is None else None
        response = await alice.request("PUT", send, value, data=data, headers=json_header)
        response.expect(400, "M_BAD_JSON")


async def test_missing_fields(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    (await alice.request("POST", f"{CS}/rooms/{q(room_id)}/invite", {})).expect(
        400, "M_MISSING_PARAM"
    )
    (await alice.request("POST", f"{CS}/rooms/{q(room_id)}/kick", {})).expect(
        400, "M_MISSING_PARAM"
    )
    (await alice.request("POST", f"{CS}/login", {"password": "x"}, token=None)).expect(400)
    (
        await alice.request(
            "PUT",
            f"{CS}/directory/room/{q('#x' + alice.localpart + ':' + users.server.server_name)}",
            {},
        )
    ).expect(400)


async def test_unknown_endpoints(users: Users) -> None:
    alice = await users.new("alice")
    for path in (f"{CS}/nonexistent", "/_matrix/client/v3/rooms", "/_matrix/unknown/v1/thing"):
        (await alice.request("GET", path)).expect(404, "M_UNRECOGNIZED")
    (await alice.request("DELETE", f"{CS}/createRoom")).expect(405, "M_UNRECOGNIZED")


async def test_tokens(users: Users) -> None:
    alice = await users.new("alice")
    anonymous = users.anonymous()
    for method, path in (
        ("GET", f"{CS}/account/whoami"),
        ("GET", f"{CS}/sync"),
        ("POST", f"{CS}/createRoom"),
        ("GET", f"{CS}/joined_rooms"),
    ):
        body = {} if method == "POST" else None
        (await anonymous.request(method, path, body)).expect(401, "M_MISSING_TOKEN")
        bad = await anonymous.request(method, path, body, token="syt_not_a_real_token")
        bad.expect(401, "M_UNKNOWN_TOKEN")
        assert bad.body["soft_logout"] is False
    await alice.ok("GET", f"{CS}/joined_rooms")


async def test_not_joined(users: Users) -> None:
    alice, mallory = await users.many("alice", "mallory")
    room_id = await alice.create_room()
    base = f"{CS}/rooms/{q(room_id)}"
    for method, path, body in (
        ("PUT", f"{base}/send/m.room.message/nj1", {"msgtype": "m.text", "body": "x"}),
        ("GET", f"{base}/messages", None),
        ("GET", f"{base}/state", None),
        ("POST", f"{base}/invite", {"user_id": alice.user_id}),
        ("PUT", f"{base}/typing/{q(str(mallory.user_id))}", {"typing": True, "timeout": 1000}),
    ):
        (await mallory.request(method, path, body)).expect(403, "M_FORBIDDEN")


async def test_oversized_event(users: Users) -> None:
    alice = await users.new("alice")
    room_id = await alice.create_room()
    response = await alice.request(
        "PUT", f"{CS}/rooms/{q(room_id)}/send/cis.test.big/big1", {"blob": "x" * 70_000}
    )
    response.expect(413, "M_TOO_LARGE")


async def test_errors_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        anonymous = users.anonymous()
        room_id = await alice.create_room()
        send = f"{CS}/rooms/{q(room_id)}/send/m.room.message/e1"
        answers[name] = {
            "not_json": (await alice.request("PUT", send, data=b"{")).body,
            "unknown": (await alice.request("GET", f"{CS}/nonexistent")).body,
            "no_token": (await anonymous.request("GET", f"{CS}/sync")).body,
            "bad_token": (await anonymous.request("GET", f"{CS}/sync", token="nope")).body,
        }
    assert_same_shape(answers["synapse"], answers["embedded"])


async def test_json_nested_too_deep(users: Users) -> None:
    """100,000 levels of nesting is not JSON a server can take: Synapse and ours say
    M_NOT_JSON, /login included."""
    alice = await users.new("alice")
    room_id = await alice.create_room()
    json_header = {"Content-Type": "application/json"}
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        for method, path in (
            ("PUT", f"{CS}/rooms/{q(room_id)}/send/m.room.message/deep"),
            ("POST", f"{CS}/createRoom"),
            ("POST", f"{CS}/login"),
            ("PUT", f"{CS}/user/{q(str(alice.user_id))}/account_data/org.example.deep"),
        ):
            response = await alice.request(method, path, data=raw, headers=json_header)
            response.expect(400, "M_NOT_JSON")


async def test_unreadable_stream_tokens(users: Users) -> None:
    alice = await users.new("alice")
    for token in ("garbage", "s", "sx_1"):
        response = await alice.request("GET", f"{CS}/sync", params={"since": token, "timeout": "0"})
        response.expect(400)

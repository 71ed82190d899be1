"""Login, logout, whoami (Complement: apidoc_login_test, apidoc_logout_test)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp
import pytest

from tests.homeserver.conftest import AppserviceRig, Pair
from tests.support.client import CS, MatrixClient, Response, unique
from tests.support.fixtures import Factory, Users
from tests.support.shape import assert_same_shape


def password_login(user: str, password: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
        **extra,
    }


async def test_login_flows(users: Users) -> None:
    answer = await users.anonymous().ok("GET", f"{CS}/login")
    types = [flow["type"] for flow in answer["flows"]]
    assert "m.login.password" in types
    assert "m.login.application_service" in types
    # r0 is still called by older clients.
    legacy = await users.anonymous().ok("GET", "/_matrix/client/r0/login")
    assert legacy == answer


async def test_password_login(users: Users, http: aiohttp.ClientSession) -> None:
    alice = await users.new("alice")
    password = users.server.password(alice.localpart)
    anonymous = users.anonymous()
    by_localpart = await anonymous.ok(
        "POST", f"{CS}/login", password_login(alice.localpart, password)
    )
    assert by_localpart["user_id"] == alice.user_id
    assert isinstance(by_localpart["access_token"], str)
    assert isinstance(by_localpart["device_id"], str)
    assert by_localpart["access_token"] != alice.token

    by_user_id = await anonymous.ok(
        "POST", f"{CS}/login", password_login(str(alice.user_id), password, device_id="MYDEVICE")
    )
    assert by_user_id["device_id"] == "MYDEVICE"
    session = MatrixClient(http, users.server.base_url, token=by_user_id["access_token"])
    whoami = await session.ok("GET", f"{CS}/account/whoami")
    assert whoami["user_id"] == alice.user_id
    assert whoami["device_id"] == "MYDEVICE"
    assert whoami["is_guest"] is False

    # The deprecated top-level "user" field still works.
    legacy = await anonymous.ok(
        "POST",
        f"{CS}/login",
        {"type": "m.login.password", "user": alice.localpart, "password": password},
    )
    assert legacy["user_id"] == alice.user_id


async def test_login_failures(users: Users) -> None:
    alice = await users.new("alice")
    anonymous = users.anonymous()
    (
        await anonymous.request("POST", f"{CS}/login", password_login(alice.localpart, "wrong"))
    ).expect(403, "M_FORBIDDEN")
    (await anonymous.request("POST", f"{CS}/login", password_login(unique("ghost"), "x"))).expect(
        403, "M_FORBIDDEN"
    )
    (await anonymous.request("POST", f"{CS}/login", {"type": "m.login.bogus"})).expect(
        400, "M_INVALID_PARAM"
    )
    (
        await anonymous.request(
            "POST", f"{CS}/login", {"type": "m.login.password", "password": "x"}
        )
    ).expect(400, "M_INVALID_PARAM")
    (await anonymous.request("POST", f"{CS}/login", {"password": "x"})).expect(400)


async def test_logout_invalidates_token(users: Users) -> None:
    alice = await users.new("alice")
    await alice.ok("GET", f"{CS}/account/whoami")
    assert await alice.ok("POST", f"{CS}/logout", {}) == {}
    (await alice.request("GET", f"{CS}/account/whoami")).expect(401, "M_UNKNOWN_TOKEN")


async def test_logout_all(users: Users, http: aiohttp.ClientSession) -> None:
    alice = await users.new("alice")
    _, second_token = await users.server.create_user(unique("unused"))  # another account stays
    other_session = users.client(token=second_token)
    user_id, token = users.server.login_sync(alice.localpart)
    again = MatrixClient(http, users.server.base_url, user_id=user_id, token=token)
    assert await alice.ok("POST", f"{CS}/logout/all", {}) == {}
    (await alice.request("GET", f"{CS}/account/whoami")).expect(401, "M_UNKNOWN_TOKEN")
    (await again.request("GET", f"{CS}/account/whoami")).expect(401, "M_UNKNOWN_TOKEN")
    await other_session.ok("GET", f"{CS}/account/whoami")


async def test_whoami_needs_a_token(users: Users) -> None:
    anonymous = users.anonymous()
    (await anonymous.request("GET", f"{CS}/account/whoami")).expect(401, "M_MISSING_TOKEN")
    (await anonymous.request("GET", f"{CS}/account/whoami", token="nonsense")).expect(
        401, "M_UNKNOWN_TOKEN"
    )
    # A token in the query string is still accepted (deprecated, but clients send it).
    alice = await users.new("alice")
    answer = await anonymous.ok(
        "GET", f"{CS}/account/whoami", params={"access_token": str(alice.token)}
    )
    assert answer["user_id"] == alice.user_id


async def test_appservice_login_and_whoami(rig: AppserviceRig, http: aiohttp.ClientSession) -> None:
    appservice = rig.as_client(http, rig.a)
    localpart = rig.a_localpart()
    await appservice.ok(
        "POST",
        f"{CS}/register",
        {"type": "m.login.application_service", "username": localpart, "inhibit_login": True},
    )
    user_id = f"@{localpart}:{rig.server.server_name}"
    answer = await appservice.ok(
        "POST",
        f"{CS}/login",
        {
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": user_id},
        },
    )
    assert answer["user_id"] == user_id
    # The as_token alone is the sender; ?user_id= masquerades as a namespaced user.
    whoami = await appservice.ok("GET", f"{CS}/account/whoami")
    assert whoami["user_id"] == rig.a.sender(rig.server.server_name)
    masked = await appservice.ok("GET", f"{CS}/account/whoami", params={"user_id": user_id})
    assert masked["user_id"] == user_id
    # Without the as_token, application_service login is refused.
    refused = await rig.client(http, token="").request(
        "POST",
        f"{CS}/login",
        {
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": user_id},
        },
        token=None,
    )
    refused.expect(401, "M_MISSING_TOKEN")


async def test_login_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        password = users.server.password(alice.localpart)
        anonymous = users.anonymous()
        answers[name] = {
            "flows": (await anonymous.request("GET", f"{CS}/login")).body,
            "login": (
                await anonymous.request(
                    "POST", f"{CS}/login", password_login(alice.localpart, password)
                )
            ).body,
            "whoami": (await alice.request("GET", f"{CS}/account/whoami")).body,
            "bad_token": (await anonymous.request("GET", f"{CS}/account/whoami", token="x")).body,
        }
    # well_known is optional in the spec; Synapse sends it because public_baseurl is set.
    assert_same_shape(answers["synapse"], answers["embedded"], ignore=["$.login.well_known"])


@pytest.mark.slow
async def test_failed_logins_are_rate_limited(
    homeserver_factory: Factory, http: aiohttp.ClientSession
) -> None:
    """Synapse's rc_login.failed_attempts, here one a second after a burst of 5: 40 wrong
    passwords in a row end in 429 M_LIMIT_EXCEEDED with retry_after_ms, and after that wait the
    right password works."""
    wide = {"per_second": 100000, "burst_count": 100000}
    server = homeserver_factory(
        extra_config={
            "rc_login": {
                "address": wide,
                "account": wide,
                "failed_attempts": {"per_second": 1, "burst_count": 5},
            }
        }
    )
    users = Users(server, http)
    alice = await users.new("alice")
    anonymous = users.anonymous()
    statuses = []
    limited: list[Response] = []
    started = time.monotonic()
    for _ in range(40):
        response = await anonymous.request(
            "POST", f"{CS}/login", password_login(alice.localpart, "wrong")
        )
        statuses.append(response.status)
        if response.status == 429:
            limited.append(response)
    elapsed = time.monotonic() - started
    assert set(statuses) <= {403, 429}, statuses
    assert statuses[:5] == [403] * 5, statuses
    # The burst, plus one more failure for each second the attempts took.
    assert statuses.count(403) <= 5 + math.ceil(elapsed) + 1, (elapsed, statuses)
    for response in limited:
        response.expect(429, "M_LIMIT_EXCEEDED")
        assert isinstance(response.body["retry_after_ms"], int)
        assert 0 <= response.body["retry_after_ms"] <= 1000

    right = password_login(alice.localpart, server.password(alice.localpart))
    # Waiting as told lets the right password in. Synapse rounds retry_after_ms down, so a
    # client that waits exactly that long may be told once more to wait a few milliseconds:
    # honour it as a client would, within one window of the limit.
    wait_ms = limited[-1].body["retry_after_ms"]
    waited_ms = 0
    while True:
        await asyncio.sleep(wait_ms / 1000)  # the window under test
        waited_ms += wait_ms
        response = await anonymous.request("POST", f"{CS}/login", right)
        if response.status != 429:
            break
        wait_ms = response.body["retry_after_ms"]
        assert waited_ms + wait_ms <= 2000, (waited_ms, wait_ms)
    response.expect(200)
    assert response.body["user_id"] == alice.user_id

"""Registration (Complement: apidoc_register_test, registration_test). No open registration:
local accounts come from the admin side; appservices register users in their namespaces."""

from __future__ import annotations

import subprocess
import sys

import aiohttp

from tests.homeserver.conftest import AppserviceRig
from tests.support.client import CS, MatrixClient, unique
from tests.support.embedded import EmbeddedServer
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape

AS_LOGIN = "m.login.application_service"


async def test_open_registration_is_disabled(users: Users) -> None:
    anonymous = users.anonymous()
    for body in (
        {"username": unique("x"), "password": "p4ssw0rd!", "auth": {"type": "m.login.dummy"}},
        {},
    ):
        (await anonymous.request("POST", f"{CS}/register", body)).expect(403, "M_FORBIDDEN")


async def test_appservice_registers_user_in_its_namespace(
    rig: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    appservice = rig.as_client(http, rig.a)
    localpart = rig.a_localpart()
    answer = (
        await appservice.request(
            "POST", f"{CS}/register", {"type": AS_LOGIN, "username": localpart}
        )
    ).expect(200)
    assert answer.body["user_id"] == f"@{localpart}:{rig.server.server_name}"
    assert isinstance(answer.body["access_token"], str) and answer.body["access_token"]
    assert isinstance(answer.body["device_id"], str)

    user = MatrixClient(http, rig.server.base_url, token=answer.body["access_token"])
    whoami = await user.ok("GET", f"{CS}/account/whoami")
    assert whoami["user_id"] == answer.body["user_id"]
    assert whoami["device_id"] == answer.body["device_id"]

    again = await appservice.request(
        "POST", f"{CS}/register", {"type": AS_LOGIN, "username": localpart}
    )
    again.expect(400, "M_USER_IN_USE")


async def test_appservice_register_inhibit_login(
    rig: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    appservice = rig.as_client(http, rig.a)
    localpart = rig.a_localpart()
    answer = (
        await appservice.request(
            "POST",
            f"{CS}/register",
            {"type": AS_LOGIN, "username": localpart, "inhibit_login": True},
        )
    ).expect(200)
    assert answer.body["user_id"] == f"@{localpart}:{rig.server.server_name}"
    assert "access_token" not in answer.body
    assert "device_id" not in answer.body


async def test_appservice_cannot_register_outside_its_namespace(
    rig: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    appservice = rig.as_client(http, rig.a)
    outside = await appservice.request(
        "POST", f"{CS}/register", {"type": AS_LOGIN, "username": unique("plain")}
    )
    outside.expect(400, "M_EXCLUSIVE")
    # b's exclusive namespace is not a's to take.
    taken = await appservice.request(
        "POST", f"{CS}/register", {"type": AS_LOGIN, "username": unique("b_")}
    )
    taken.expect(400, "M_EXCLUSIVE")


async def test_appservice_register_needs_a_valid_as_token(
    rig: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    body = {"type": AS_LOGIN, "username": rig.a_localpart()}
    anonymous = rig.client(http, token="")
    # Synapse answers 400 M_UNKNOWN here (not the 401 of the auth layer).
    (await anonymous.request("POST", f"{CS}/register", body, token=None)).expect(400)
    (await anonymous.request("POST", f"{CS}/register", body, token="as_bogus")).expect(
        401, "M_UNKNOWN_TOKEN"
    )


async def test_appservice_register_rejects_bad_input(
    rig: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    appservice = rig.as_client(http, rig.a)
    (await appservice.request("POST", f"{CS}/register", {"type": AS_LOGIN})).expect(400)
    (await appservice.request("POST", f"{CS}/register", {"type": AS_LOGIN, "username": 7})).expect(
        400
    )
    (
        await appservice.request(
            "POST", f"{CS}/register", {"type": AS_LOGIN, "username": ["a_list"]}
        )
    ).expect(400)


async def test_register_shapes_match(
    rig_synapse: AppserviceRig, rig_embedded: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    answers = {}
    for name, rig in (("synapse", rig_synapse), ("embedded", rig_embedded)):
        appservice = rig.as_client(http, rig.a)
        answers[name] = (
            await appservice.request(
                "POST", f"{CS}/register", {"type": AS_LOGIN, "username": rig.a_localpart()}
            )
        ).body
    assert_same_shape(answers["synapse"], answers["embedded"])


def test_cis_homeserver_add_user_cli(embedded: EmbeddedServer) -> None:
    """Local accounts come from ``cis homeserver add-user`` (embedded only: Synapse has its
    own admin API); run here as the real subprocess, against the running server's database."""
    localpart = unique("cli")
    embedded.add_user_in_process = False
    try:
        user_id, token = embedded.create_user_sync(localpart, password="a-long-password")
    finally:
        embedded.add_user_in_process = True
    assert user_id == f"@{localpart}:{embedded.server_name}"
    assert token
    again = subprocess.run(
        [sys.executable, "-m", "cis_bot", "homeserver", "add-user"]
        + ["--state-dir", str(embedded.state_dir), localpart, "--password", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 2, again
    assert "Traceback" not in again.stderr
    assert again.stderr.startswith("cis: error:")

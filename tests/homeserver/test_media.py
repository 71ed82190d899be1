"""Media upload and download on the v3 paths and the authenticated v1 paths (Complement:
media_misc_test, apidoc_content_test)."""

from __future__ import annotations

import os

from tests.homeserver.conftest import Pair
from tests.support.client import MatrixClient
from tests.support.fixtures import Users
from tests.support.shape import assert_same_shape

UPLOAD = "/_matrix/media/v3/upload"
V1_DOWNLOAD = "/_matrix/client/v1/media/download"
V3_DOWNLOAD = "/_matrix/media/v3/download"


async def upload(client: MatrixClient, data: bytes, content_type: str, filename: str) -> str:
    answer = await client.ok(
        "POST",
        UPLOAD,
        data=data,
        headers={"Content-Type": content_type},
        params={"filename": filename},
    )
    uri = answer["content_uri"]
    assert uri.startswith("mxc://")
    return str(uri)


async def test_upload_and_download(users: Users) -> None:
    alice, bob = await users.many("alice", "bob")
    data = os.urandom(3000)
    uri = await upload(alice, data, "application/octet-stream", "blob.bin")
    server_name, media_id = uri[len("mxc://") :].split("/", 1)
    assert server_name == users.server.server_name

    for client in (alice, bob):  # any local user may fetch it
        v1 = await client.request("GET", f"{V1_DOWNLOAD}/{server_name}/{media_id}")
        assert v1.status == 200 and v1.raw == data
        assert v1.headers["Content-Type"].startswith("application/octet-stream")
    v3 = await users.anonymous().request("GET", f"{V3_DOWNLOAD}/{server_name}/{media_id}")
    assert v3.status == 200 and v3.raw == data

    named = await bob.request("GET", f"{V1_DOWNLOAD}/{server_name}/{media_id}/other.bin")
    assert named.status == 200 and named.raw == data
    assert "other.bin" in named.headers["Content-Disposition"]


async def test_text_upload_keeps_type_and_name(users: Users) -> None:
    alice = await users.new("alice")
    uri = await upload(alice, "héllo".encode(), "text/plain", "greeting.txt")
    download = await alice.request("GET", f"{V1_DOWNLOAD}/{uri[len('mxc://') :]}")
    assert download.status == 200
    assert download.raw == "héllo".encode()
    assert download.headers["Content-Type"].startswith("text/plain")
    assert "greeting.txt" in download.headers["Content-Disposition"]


async def test_media_errors(users: Users) -> None:
    alice = await users.new("alice")
    anonymous = users.anonymous()
    uri = await upload(alice, b"x", "text/plain", "x.txt")
    path = uri[len("mxc://") :]
    (await anonymous.request("GET", f"{V1_DOWNLOAD}/{path}")).expect(401, "M_MISSING_TOKEN")
    (await anonymous.request("POST", UPLOAD, data=b"x")).expect(401, "M_MISSING_TOKEN")
    missing = f"{users.server.server_name}/doesnotexist{alice.localpart}"
    (await alice.request("GET", f"{V1_DOWNLOAD}/{missing}")).expect(404, "M_NOT_FOUND")
    (await alice.request("GET", f"{V3_DOWNLOAD}/{missing}")).expect(404, "M_NOT_FOUND")


async def test_media_config_and_size_cap(users: Users) -> None:
    alice = await users.new("alice")
    v1 = await alice.ok("GET", "/_matrix/client/v1/media/config")
    v3 = await alice.ok("GET", "/_matrix/media/v3/config")
    assert v1 == v3
    cap = v1["m.upload.size"]
    assert isinstance(cap, int) and cap > 0
    too_big = await alice.request(
        "POST", UPLOAD, data=b"\0" * (cap + 1), headers={"Content-Type": "application/octet-stream"}
    )
    too_big.expect(413, "M_TOO_LARGE")


async def test_media_shapes_match(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        uploaded = await alice.request(
            "POST", UPLOAD, data=b"x", headers={"Content-Type": "text/plain"}
        )
        answers[name] = {
            "upload": uploaded.body,
            "config": (await alice.request("GET", "/_matrix/client/v1/media/config")).body,
            "missing": (
                await alice.request("GET", f"{V1_DOWNLOAD}/{users.server.server_name}/nothing")
            ).body,
        }
    assert_same_shape(answers["synapse"], answers["embedded"])

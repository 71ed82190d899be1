"""Real clients nobody here wrote: mautrix's ``Client`` and matrix-js-sdk (npm, run by Node)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
from mautrix.client import Client
from mautrix.types import (
    EventType,
    MessageEvent,
    PaginationDirection,
    RoomCreatePreset,
    TextMessageEventContent,
    UserID,
)

from tests.support.client import unique
from tests.support.process import HomeserverUnderTest

REPO_ROOT = Path(__file__).resolve().parents[2]
ROUNDTRIP = Path(__file__).parent / "js" / "roundtrip.mjs"


async def test_mautrix_client(homeserver: HomeserverUnderTest, http: aiohttp.ClientSession) -> None:
    names = [unique("maualice"), unique("maubob")]
    for name in names:
        await homeserver.create_user(name)
    alice = Client(mxid=UserID(homeserver.user_id(names[0])), base_url=homeserver.base_url)
    bob = Client(mxid=UserID(homeserver.user_id(names[1])), base_url=homeserver.base_url)
    try:
        for client, name in ((alice, names[0]), (bob, names[1])):
            await client.login(identifier=name, password=homeserver.password(name))
            assert (await client.whoami()).user_id == client.mxid

        room_id = await alice.create_room(
            name="mautrix room", preset=RoomCreatePreset.PRIVATE, invitees=[bob.mxid]
        )
        received: asyncio.Future[MessageEvent] = asyncio.get_running_loop().create_future()

        async def on_message(event: MessageEvent) -> None:
            if event.room_id == room_id and event.sender == bob.mxid and not received.done():
                received.set_result(event)

        alice.add_event_handler(EventType.ROOM_MESSAGE, on_message)
        alice.start(None)
        assert await bob.join_room(room_id) == room_id
        event_id = await bob.send_text(room_id, "hello from mautrix")
        event = await asyncio.wait_for(received, 30)
        assert event.event_id == event_id
        assert isinstance(event.content, TextMessageEventContent)
        assert event.content.body == "hello from mautrix"

        page = await alice.get_messages(room_id, PaginationDirection.BACKWARD, limit=5)
        assert page.events[0].event_id == event_id
        fetched = await alice.get_event(room_id, event_id)
        assert fetched.sender == bob.mxid
        name = await alice.get_state_event(room_id, EventType.ROOM_NAME)
        assert name.name == "mautrix room"
        assert set(await bob.get_joined_members(room_id)) == {alice.mxid, bob.mxid}

        uri = await bob.upload_media(b"mautrix media", mime_type="text/plain", filename="m.txt")
        assert await alice.download_media(uri) == b"mautrix media"
    finally:
        alice.stop()
        for client in (alice, bob):
            await client.api.session.close()


def test_matrix_js_sdk_roundtrip(homeserver: HomeserverUnderTest) -> None:
    node = shutil.which("node")
    assert node, "node is needed for the matrix-js-sdk test"
    assert (REPO_ROOT / "node_modules" / "matrix-js-sdk").is_dir(), "run npm ci first"
    name = unique("jsuser")
    homeserver.create_user_sync(name)
    result = subprocess.run(
        [node, str(ROUNDTRIP), homeserver.base_url, name, homeserver.password(name)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO_ROOT,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("ROUNDTRIP ")]
    assert result.returncode == 0 and lines, (
        f"matrix-js-sdk roundtrip failed ({result.returncode}):\n{result.stderr[-4000:]}\n"
        f"{result.stdout[-2000:]}"
    )
    seen: dict[str, Any] = json.loads(lines[-1].removeprefix("ROUNDTRIP "))
    assert seen["user_id"] == seen["whoami"] == homeserver.user_id(name)
    assert seen["room_name"] == "js-sdk room"
    assert seen["timeline_event_id"] == seen["event_id"]
    assert seen["read_back"] == seen["body"]
    assert seen["content_uri"].startswith(f"mxc://{homeserver.server_name}/")
    assert seen["media_status"] == 200
    assert seen["media_text"] == "js-sdk media"


CRYPTO = Path(__file__).parent / "js" / "crypto.mjs"


def test_matrix_js_sdk_rust_crypto(homeserver: HomeserverUnderTest) -> None:
    """Element's code path: initRustCrypto(), cross-signing, key backup lookup, and messages
    both ways in an encrypted and an unencrypted room."""
    node = shutil.which("node")
    assert node, "node is needed for the matrix-js-sdk test"
    names = [unique("cryptoalice"), unique("cryptobob")]
    for name in names:
        homeserver.create_user_sync(name)
    result = subprocess.run(
        [node, str(CRYPTO), homeserver.base_url]
        + [part for name in names for part in (name, homeserver.password(name))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("CRYPTO ")]
    assert result.returncode == 0 and lines, (
        f"matrix-js-sdk crypto failed ({result.returncode}):\n{result.stderr[-4000:]}\n"
        f"{result.stdout[-2000:]}"
    )
    seen: dict[str, Any] = json.loads(lines[-1].removeprefix("CRYPTO "))
    assert seen["alice_cross_signing_ready"] and seen["bob_cross_signing_ready"]
    assert seen["alice_backup"] is None  # no backup yet: GET /room_keys/version said 404
    assert seen["alice_knows_bob_device"] and seen["bob_device_cross_signed"]
    for kind, wire_type in (("encrypted", "m.room.encrypted"), ("plain", "m.room.message")):
        room = seen["rooms"][kind]
        assert room["room_encrypted"] is (kind == "encrypted")
        for side in ("alice", "bob"):
            assert room[f"{side}_got"], (kind, side, room)
            assert room[f"{side}_saw_wire_type"] == wire_type, (kind, side, room)
            assert room[f"{side}_decryption_failure"] is False

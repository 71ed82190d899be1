"""The fixture's own promises, which the node tests lean on: restart() comes back on the same
port with the same data; kill() is a real kill -9 and a start() after it recovers."""

from __future__ import annotations

import os

import aiohttp
import pytest

from tests.support.client import MatrixClient, unique
from tests.support.fixtures import Factory
from tests.support.process import read_rss_kib


@pytest.mark.slow
async def test_restart_and_kill_keep_port_and_data(
    homeserver_factory: Factory, http: aiohttp.ClientSession
) -> None:
    server = homeserver_factory()
    assert server.startup_seconds is not None and server.startup_seconds > 0
    current, peak = read_rss_kib(server.pid)
    assert 0 < current <= peak
    base_url = server.base_url
    localpart = unique("life")
    user_id, token = await server.create_user(localpart)
    alice = MatrixClient(http, base_url, user_id=user_id, token=token)
    room_id = await alice.create_room(name="lasting")
    before = await alice.send_text(room_id, "before restart")

    first_pid = server.pid
    await server.arestart()
    assert server.base_url == base_url and server.pid != first_pid
    assert (await alice.ok("GET", "/_matrix/client/v3/account/whoami"))["user_id"] == user_id
    after = await alice.send_text(room_id, "after restart")

    killed_pid = server.pid
    await server.akill()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(killed_pid, 0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await alice.request("GET", "/_matrix/client/versions")
    await server.astart()
    page = await alice.messages(room_id, dir="b", limit="10")
    ids = [e["event_id"] for e in page["chunk"]]
    assert ids.index(after) < ids.index(before)
    # Accounts made before the kill still log in.
    assert server.login_sync(localpart)[0] == user_id

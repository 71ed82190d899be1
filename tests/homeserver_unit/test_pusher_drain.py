"""Stopping with a drain: a run's own homeserver hands the run's node its last events before it
goes (``cis homeserver --for-run``), and does not wait on an appservice that fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import aiohttp

from cis_bot.homeserver.server import EmbeddedHomeserver
from cis_bot.homeserver.storage.database import DB_NAME
from cis_bot.homeserver.storage.store import Store
from tests.homeserver_unit.helpers import call
from tests.support.appservice import TransactionReceiver, prefixed_registration

SERVER = "cis.local"


async def started_with_receiver(
    tmp_path: Path, receiver: TransactionReceiver
) -> tuple[EmbeddedHomeserver, str]:
    """A homeserver pushing to ``receiver``, and the as_token of its appservice."""
    registration = prefixed_registration("a", receiver.url, SERVER, "a_")
    files = [registration.write(tmp_path / "appservices")]
    hs = EmbeddedHomeserver(
        state_dir=tmp_path / "state", appservice_files=files, retry_initial=0.05, retry_max=0.05
    )
    await hs.start()
    return hs, registration.as_token


async def send_one(http: aiohttp.ClientSession, hs: EmbeddedHomeserver, token: str) -> None:
    """The appservice's sender makes a room and speaks in it: both are pushed to it."""
    base = f"{hs.base_url}/_matrix/client/v3"
    status, room = await call(http, "POST", f"{base}/createRoom", {}, token)
    assert status == 200, room
    send = f"{base}/rooms/{room['room_id']}/send/m.room.message/t1"
    status, sent = await call(http, "PUT", send, {"msgtype": "m.text", "body": "last"}, token)
    assert status == 200, sent


def pending(tmp_path: Path) -> list[tuple[int, list[int]]]:
    store = Store(tmp_path / "state" / DB_NAME)
    try:
        return store.pending_appservice_txns("a")
    finally:
        store.close()


async def in_flight(tmp_path: Path, receiver: TransactionReceiver) -> EmbeddedHomeserver:
    """A homeserver whose first transaction to ``receiver`` is on its way, held there."""
    hs, token = await started_with_receiver(tmp_path, receiver)
    receiver.hold()
    async with aiohttp.ClientSession() as http:
        await send_one(http, hs, token)
    await receiver.until(lambda ds: len(ds) >= 1)
    return hs


async def test_a_drain_delivers_what_is_in_flight_before_stopping(tmp_path: Path) -> None:
    with TransactionReceiver(hs_token=None) as receiver:
        hs = await in_flight(tmp_path, receiver)
        threading.Timer(0.3, receiver.release).start()  # the appservice answers a bit later
        started = time.monotonic()
        await hs.stop(drain=10)
        assert 0.25 < time.monotonic() - started < 5
        # Everything, the message after the held transaction too.
        bodies = [e["content"].get("body") for d in receiver.snapshot() for e in d.events]
        assert "last" in bodies
    assert pending(tmp_path) == []


async def test_without_a_drain_the_transaction_waits_in_the_database(tmp_path: Path) -> None:
    with TransactionReceiver(hs_token=None) as receiver:
        hs = await in_flight(tmp_path, receiver)
        await hs.stop()
        receiver.release()
    assert pending(tmp_path), "the in-flight transaction is kept, to be sent again"


async def test_a_drain_does_not_wait_on_a_failing_appservice(tmp_path: Path) -> None:
    with TransactionReceiver(hs_token=None) as receiver:
        receiver.fail_next(10_000)
        hs, token = await started_with_receiver(tmp_path, receiver)
        async with aiohttp.ClientSession() as http:
            await send_one(http, hs, token)
        await receiver.until(lambda ds: any(d.status == 500 for d in ds))
        started = time.monotonic()
        await hs.stop(drain=10)
        assert time.monotonic() - started < 2
    assert pending(tmp_path), "what it did not take stays for later"

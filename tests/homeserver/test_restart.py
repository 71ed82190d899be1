"""kill -9 of the embedded homeserver mid-stream of appservice transactions: after a restart on
the same port and data, every event a client got an event id for reaches the appservice, each
transaction id always with the same content, and client retries stay idempotent.

Embedded only, as issue 3 asks: this is stricter than Synapse. Run against Synapse 1.163 the
same test fails about one run in three: the event acknowledged to the client in the last
instant before the kill is never pushed to the appservice (its stream position has moved past
an event that was not yet in a persisted transaction), and after a kill with a transaction in
flight it pushed nothing more within 90 s."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.support.appservice import TransactionReceiver, event_ids, prefixed_registration
from tests.support.client import CS, MatrixClient, q, unique
from tests.support.fixtures import Factory

EVENTS = 60
ACKED_BEFORE_OUTAGE = 10


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("homeserver_kind", ["embedded"])
async def test_kill_9_mid_stream_loses_no_appservice_event(
    homeserver_factory: Factory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    receiver = TransactionReceiver().start()
    try:
        registration = prefixed_registration("restart", receiver.url, "cis.local", "r_")
        receiver.hs_token = registration.hs_token
        server = homeserver_factory(appservice_files=(registration.write(tmp_path / "as"),))

        user_id, token = await server.create_user(unique("alice"))
        alice = MatrixClient(http, server.base_url, user_id=user_id, token=token)
        appservice = MatrixClient(http, server.base_url, token=registration.as_token)
        ghost = (
            await appservice.ok(
                "POST",
                f"{CS}/register",
                {"type": "m.login.application_service", "username": unique("r_")},
            )
        )["user_id"]
        room_id = await alice.create_room(preset="public_chat")
        await appservice.ok("POST", f"{CS}/join/{q(room_id)}", {}, params={"user_id": ghost})

        server_up = asyncio.Event()
        server_up.set()
        acknowledged: dict[int, str] = {}
        halfway = asyncio.Event()

        async def send_all() -> None:
            # Fixed transaction ids: a send cut by the kill is retried as the same transaction.
            for index in range(EVENTS):
                path = f"{CS}/rooms/{q(room_id)}/send/m.room.message/restart-{index}"
                for _attempt in range(50):
                    try:
                        answer = await alice.request(
                            "PUT", path, {"msgtype": "m.text", "body": f"event {index}"}
                        )
                    except (
                        TimeoutError,
                        aiohttp.ClientConnectionError,
                        aiohttp.ClientPayloadError,
                    ):
                        # The kill cut the connection, or the answer after its headers.
                        await server_up.wait()
                        continue
                    if answer.status == 200:
                        acknowledged[index] = answer.body["event_id"]
                        if len(acknowledged) >= EVENTS // 2:
                            halfway.set()
                        break
                    raise AssertionError(f"send {index}: {answer.status} {answer.body}")
                else:
                    raise AssertionError(f"send {index} never went through")

        sender = asyncio.create_task(send_all())
        # Some transactions go through, then the appservice starts refusing, so the server
        # holds unacknowledged transactions while events keep coming.
        await receiver.until(
            lambda ds: (
                sum(1 for d in ds if d.status == 200) >= 1
                and len(acknowledged) >= ACKED_BEFORE_OUTAGE
            ),
            timeout=60,
        )
        receiver.fail_next(10**9, status=500)
        await receiver.until(lambda ds: any(d.status == 500 for d in ds), timeout=60)
        await asyncio.wait_for(halfway.wait(), 60)

        server_up.clear()
        await server.akill()
        killed_with = dict(acknowledged)
        receiver.fail_next(0)
        await server.astart()
        server_up.set()
        await asyncio.wait_for(sender, 120)

        assert len(killed_with) >= EVENTS // 2
        wanted = set(acknowledged.values())
        try:
            await receiver.until(lambda ds: wanted <= set(event_ids(ds)), timeout=90)
        except AssertionError as err:
            got = set(event_ids(receiver.snapshot()))
            lost = sorted(i for i, e in acknowledged.items() if e not in got)
            raise AssertionError(f"events never pushed after the restart: {lost}") from err

        assert receiver.conflicting_txn_ids() == {}, "a transaction id came back with new content"
        # The client's retries across the kill were idempotent: one event per transaction.
        page = await alice.messages(room_id, dir="b", limit="200")
        bodies = [e["content"]["body"] for e in page["chunk"] if e["type"] == "m.room.message"]
        assert sorted(bodies) == sorted(f"event {i}" for i in range(EVENTS))
    finally:
        receiver.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("homeserver_kind", ["embedded"])
async def test_kill_9_with_transaction_in_flight(
    homeserver_factory: Factory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The appservice has received a transaction but not answered it when the server dies:
    after the restart the same transaction id comes again with the same events."""
    receiver = TransactionReceiver().start()
    try:
        registration = prefixed_registration("inflight", receiver.url, "cis.local", "f_")
        receiver.hs_token = registration.hs_token
        server = homeserver_factory(appservice_files=(registration.write(tmp_path / "as"),))
        user_id, token = await server.create_user(unique("alice"))
        alice = MatrixClient(http, server.base_url, user_id=user_id, token=token)
        appservice = MatrixClient(http, server.base_url, token=registration.as_token)
        ghost = (
            await appservice.ok(
                "POST",
                f"{CS}/register",
                {"type": "m.login.application_service", "username": unique("f_")},
            )
        )["user_id"]
        room_id = await alice.create_room(preset="public_chat")
        await appservice.ok("POST", f"{CS}/join/{q(room_id)}", {}, params={"user_id": ghost})
        await receiver.until(lambda ds: any(d.status == 200 for d in ds))

        receiver.hold()
        held_from = len(receiver.snapshot())
        sent = [await alice.send_text(room_id, f"held {i}") for i in range(5)]
        deliveries = await receiver.until(lambda ds: len(ds) > held_from)
        in_flight = deliveries[held_from]
        await server.akill()
        receiver.release()
        await server.astart()
        more = [await alice.send_text(room_id, f"after {i}") for i in range(5)]

        wanted = set(sent + more)
        final = await receiver.until(lambda ds: wanted <= set(event_ids(ds)), timeout=90)
        again = [d for d in final[held_from + 1 :] if d.txn_id == in_flight.txn_id]
        assert again, f"transaction {in_flight.txn_id} was not sent again after the restart"
        assert again[0].content == in_flight.content
        assert receiver.conflicting_txn_ids() == {}
    finally:
        receiver.stop()

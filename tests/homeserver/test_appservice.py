"""The Application Service API: transactions pushed in order and retried until a 2xx,
``?user_id=`` masquerading, exclusive namespaces, ping."""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp
import pytest

from tests.homeserver.conftest import AppserviceRig
from tests.support.appservice import Delivery, event_ids
from tests.support.client import CS, MatrixClient, q, unique

AS_LOGIN = "m.login.application_service"


async def namespaced_user(rig: AppserviceRig, http: aiohttp.ClientSession) -> str:
    """Registers a user in appservice a's namespace; returns its user id."""
    localpart = rig.a_localpart()
    answer = await rig.as_client(http, rig.a).ok(
        "POST", f"{CS}/register", {"type": AS_LOGIN, "username": localpart, "inhibit_login": True}
    )
    return str(answer["user_id"])


async def local_user(rig: AppserviceRig, http: aiohttp.ClientSession) -> MatrixClient:
    user_id, token = await rig.server.create_user(unique("alice"))
    return MatrixClient(http, rig.server.base_url, user_id=user_id, token=token)


def room_events(deliveries: list[Delivery], room_id: str) -> list[dict[str, Any]]:
    return [
        event
        for delivery in deliveries
        if delivery.status == 200
        for event in delivery.events
        if event.get("room_id") == room_id
    ]


async def test_transactions_in_order(rig: AppserviceRig, http: aiohttp.ClientSession) -> None:
    alice = await local_user(rig, http)
    ghost = await namespaced_user(rig, http)
    appservice = rig.as_client(http, rig.a)
    room_id = await alice.create_room(preset="public_chat")
    await appservice.ok("POST", f"{CS}/join/{q(room_id)}", {}, params={"user_id": ghost})
    sent = [await alice.send_text(room_id, f"n{i}") for i in range(20)]

    deliveries = await rig.receiver.until(lambda ds: set(sent) <= set(event_ids(ds)), timeout=30)
    got = [e["event_id"] for e in room_events(deliveries, room_id) if e["event_id"] in sent]
    assert got == sent, "events reached the appservice out of order or more than once"
    for delivery in deliveries:
        assert delivery.authorization == f"Bearer {rig.a.hs_token}"
    event = next(e for e in room_events(deliveries, room_id) if e["event_id"] == sent[0])
    assert event["type"] == "m.room.message"
    assert event["sender"] == alice.user_id
    assert event["content"] == {"msgtype": "m.text", "body": "n0"}
    assert isinstance(event["origin_server_ts"], int)
    # The ghost's own join reached the appservice too.
    joins = [
        e
        for e in room_events(deliveries, room_id)
        if e["type"] == "m.room.member" and e["state_key"] == ghost
    ]
    assert joins and joins[0]["content"]["membership"] == "join"
    assert rig.receiver.conflicting_txn_ids() == {}


async def test_room_of_no_interest_is_not_pushed(
    rig: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    alice = await local_user(rig, http)
    ghost = await namespaced_user(rig, http)
    appservice = rig.as_client(http, rig.a)
    private = await alice.create_room()
    watched = await alice.create_room(preset="public_chat")
    await appservice.ok("POST", f"{CS}/join/{q(watched)}", {}, params={"user_id": ghost})
    hidden = await alice.send_text(private, "not for the appservice")
    # Sent after the hidden one: once it arrives, the hidden one would have too.
    seen = await alice.send_text(watched, "for the appservice")
    deliveries = await rig.receiver.until(lambda ds: seen in event_ids(ds))
    assert hidden not in event_ids(deliveries, status=None)


@pytest.mark.slow
async def test_transaction_retried_after_error(
    rig: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    alice = await local_user(rig, http)
    ghost = await namespaced_user(rig, http)
    appservice = rig.as_client(http, rig.a)
    room_id = await alice.create_room(preset="public_chat")
    await appservice.ok("POST", f"{CS}/join/{q(room_id)}", {}, params={"user_id": ghost})
    # Wait for the join's transaction so the failure lands on the message's.
    await rig.receiver.until(
        lambda ds: any(
            e.get("state_key") == ghost and d.status == 200 for d in ds for e in d.events
        )
    )
    rig.receiver.fail_next(2, status=503)
    event_id = await alice.send_text(room_id, "retry me")

    deliveries = await rig.receiver.until(lambda ds: event_id in event_ids(ds), timeout=60)
    carrying = [d for d in deliveries if event_id in event_ids([d], status=None)]
    failed = [d for d in carrying if d.status != 200]
    assert failed, "the first delivery should have been refused"
    delivered = next(d for d in carrying if d.status == 200)
    # Retried as the same transaction: same id, same events (only their age moves on).
    assert delivered.txn_id == failed[0].txn_id
    assert delivered.content == failed[0].content
    assert rig.receiver.conflicting_txn_ids() == {}

    # Delivery goes on normally afterwards.
    after = await alice.send_text(room_id, "after the outage")
    await rig.receiver.until(lambda ds: after in event_ids(ds), timeout=60)


@pytest.mark.slow
async def test_a_ping_answered_delivers_what_waits_out_its_backoff_at_once(
    rig: AppserviceRig, http: aiohttp.ClientSession
) -> None:
    """An appservice back from an outage pings the homeserver, which then retries at once
    rather than at the end of its backoff (Synapse's force_retry; up to 8.5 minutes otherwise):
    how a node started after its rooms' events gets them now."""
    alice = await local_user(rig, http)
    ghost = await namespaced_user(rig, http)
    appservice = rig.as_client(http, rig.a)
    room_id = await alice.create_room(preset="public_chat")
    await appservice.ok("POST", f"{CS}/join/{q(room_id)}", {}, params={"user_id": ghost})
    await rig.receiver.until(
        lambda ds: any(
            e.get("state_key") == ghost and d.status == 200 for d in ds for e in d.events
        )
    )
    rig.receiver.fail_next(3, status=503)
    event_id = await alice.send_text(room_id, "waits for the appservice")

    def refused(ds: list[Delivery]) -> list[Delivery]:
        return [d for d in ds if d.status != 200 and event_id in event_ids([d], status=None)]

    await rig.receiver.until(lambda ds: len(refused(ds)) == 3, timeout=60)
    third = refused(rig.receiver.snapshot())[-1].received_at
    gaps = [
        b.received_at - a.received_at
        for a, b in itertools.pairwise(refused(rig.receiver.snapshot()))
    ]
    # The next retry would come after a longer wait than the last one.
    await appservice.ok("POST", f"/_matrix/client/v1/appservice/{rig.a.id}/ping", {})
    deliveries = await rig.receiver.until(lambda ds: event_id in event_ids(ds), timeout=60)
    delivered = next(d for d in deliveries if d.status == 200 and event_id in event_ids([d]))
    assert delivered.received_at - third < gaps[-1], (gaps, delivered.received_at - third)


async def test_masquerading(rig: AppserviceRig, http: aiohttp.ClientSession) -> None:
    alice = await local_user(rig, http)
    ghost = await namespaced_user(rig, http)
    appservice = rig.as_client(http, rig.a)
    room_id = await alice.create_room(preset="public_chat")
    await appservice.ok("POST", f"{CS}/join/{q(room_id)}", {}, params={"user_id": ghost})
    answer = await appservice.ok(
        "PUT",
        f"{CS}/rooms/{q(room_id)}/send/m.room.message/{unique('m')}",
        {"msgtype": "m.text", "body": "from the ghost"},
        params={"user_id": ghost},
    )
    event = await alice.ok("GET", f"{CS}/rooms/{q(room_id)}/event/{q(answer['event_id'])}")
    assert event["sender"] == ghost

    # Outside the namespace, or a local user: refused.
    outside = await appservice.request(
        "GET", f"{CS}/account/whoami", params={"user_id": str(alice.user_id)}
    )
    outside.expect(403, "M_FORBIDDEN")
    # A regular user's token cannot masquerade at all: user_id is ignored.
    whoami = await alice.ok("GET", f"{CS}/account/whoami", params={"user_id": ghost})
    assert whoami["user_id"] == alice.user_id


async def test_exclusive_namespaces(rig: AppserviceRig, http: aiohttp.ClientSession) -> None:
    alice = await local_user(rig, http)
    appservice = rig.as_client(http, rig.a)
    server_name = rig.server.server_name
    room_id = await alice.create_room(preset="public_chat")
    reserved = f"#{unique('a_')}:{server_name}"
    (await alice.request("PUT", f"{CS}/directory/room/{q(reserved)}", {"room_id": room_id})).expect(
        400, "M_EXCLUSIVE"
    )
    (await alice.request("POST", f"{CS}/createRoom", {"room_alias_name": unique("a_")})).expect(
        400, "M_EXCLUSIVE"
    )
    # The appservice itself may take an alias in its namespace.
    assert (
        await appservice.ok("PUT", f"{CS}/directory/room/{q(reserved)}", {"room_id": room_id}) == {}
    )
    assert (await alice.ok("GET", f"{CS}/directory/room/{q(reserved)}"))["room_id"] == room_id
    # ... but not one in b's namespace, nor anyone's user ids.
    (
        await appservice.request(
            "POST", f"{CS}/register", {"type": AS_LOGIN, "username": unique("b_")}
        )
    ).expect(400, "M_EXCLUSIVE")


async def test_ping(rig: AppserviceRig, http: aiohttp.ClientSession) -> None:
    appservice = rig.as_client(http, rig.a)
    txn = unique("ping")
    answer = await appservice.ok(
        "POST", f"/_matrix/client/v1/appservice/{rig.a.id}/ping", {"transaction_id": txn}
    )
    assert isinstance(answer["duration_ms"], int)
    assert {"transaction_id": txn} in rig.receiver.pings
    # Another appservice's id, or no as_token: refused.
    (await appservice.request("POST", f"/_matrix/client/v1/appservice/{rig.b.id}/ping", {})).expect(
        403, "M_FORBIDDEN"
    )
    alice = await local_user(rig, http)
    (await alice.request("POST", f"/_matrix/client/v1/appservice/{rig.a.id}/ping", {})).expect(
        403, "M_FORBIDDEN"
    )
    # b has no URL to ping.
    (
        await rig.as_client(http, rig.b).request(
            "POST", f"/_matrix/client/v1/appservice/{rig.b.id}/ping", {}
        )
    ).expect(400, "M_URL_NOT_SET")

"""The federation fixture's promises (tests/support/federation.py), which federation-mode tests
lean on: two real Synapses on loopback federate over TLS with self-signed certificates, a user
of one joins a room of the other, messages flow both ways, and each server's appservice gets
the other server's events pushed; and one of them inside a network namespace can be cut off and
catches up when the link comes back."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import attrs
import pytest

from tests.support.appservice import (
    AppserviceRegistration,
    TransactionReceiver,
    event_ids,
    prefixed_registration,
)
from tests.support.client import MatrixClient, has_event
from tests.support.federation import FederatingSynapse, SynapseFederation
from tests.support.netns import NetworkNamespace

MakeFederation = Callable[..., SynapseFederation]
MakeNetns = Callable[[], NetworkNamespace]


def appservice_for(
    server: FederatingSynapse, prefix: str, root: Path
) -> tuple[AppserviceRegistration, TransactionReceiver]:
    """A registration owning ``@{prefix}*`` on ``server`` (written and handed to it) and a
    receiver for its pushes, started."""
    registration = prefixed_registration(prefix, None, server.server_name, f"{prefix}_")
    receiver = TransactionReceiver(hs_token=registration.hs_token).start()
    registration = attrs.evolve(registration, url=receiver.url)
    server.appservice_files = (registration.write(root / server.workdir.name),)
    return registration, receiver


@pytest.mark.slow
@pytest.mark.synapse
async def test_two_synapses_federate(
    synapse_federation: MakeFederation, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    federation = synapse_federation()
    a, b = federation[0], federation[1]
    assert a.server_name == f"127.0.0.1:{a.federation_port}" != b.server_name
    reg_a, receiver_a = appservice_for(a, "asa", tmp_path / "appservices")
    reg_b, receiver_b = appservice_for(b, "asb", tmp_path / "appservices")
    try:
        await federation.astart()
        alice_id, alice_token = await a.create_user("alice")
        bob_id, bob_token = await b.create_user("bob")
        alice = MatrixClient(http, a.base_url, user_id=alice_id, token=alice_token)
        bob = MatrixClient(http, b.base_url, user_id=bob_id, token=bob_token)
        bot_a = MatrixClient(http, a.base_url, user_id=reg_a.sender(a.server_name))
        bot_a.token = reg_a.as_token
        bot_b = MatrixClient(http, b.base_url, user_id=reg_b.sender(b.server_name))
        bot_b.token = reg_b.as_token

        room_id = await alice.create_room(name="across")
        for invitee in (bob_id, bot_a.user_id, bot_b.user_id):
            assert invitee is not None
            await alice.invite(room_id, invitee)
        joining = time.monotonic()
        await bob.join(room_id)
        first_join = time.monotonic() - joining
        await bot_b.join(room_id)
        await bot_a.join(room_id)

        # A -> B: bob syncs it, B's appservice gets it pushed.
        sent = time.monotonic()
        from_a = await alice.send_text(room_id, "from A")
        await bob.sync_until(has_event(from_a, room_id), timeout=30)
        a_to_b = time.monotonic() - sent
        deliveries = await receiver_b.until(lambda d: from_a in event_ids(d), timeout=30)
        pushed = next(e for d in deliveries for e in d.events if e["event_id"] == from_a)
        assert pushed["sender"] == alice_id and pushed["room_id"] == room_id
        assert pushed["content"]["body"] == "from A"

        # B -> A: alice syncs it, A's appservice gets it pushed.
        sent = time.monotonic()
        from_b = await bob.send_text(room_id, "from B")
        await alice.sync_until(has_event(from_b, room_id), timeout=30)
        b_to_a = time.monotonic() - sent
        await receiver_a.until(lambda d: from_b in event_ids(d), timeout=30)

        # Both servers hold the same membership.
        members = {alice_id, bob_id, bot_a.user_id, bot_b.user_id}
        for client in (alice, bob):
            joined = await client.ok("GET", f"/_matrix/client/v3/rooms/{room_id}/joined_members")
            assert set(joined["joined"]) == members
        print(
            f"\nstart-up of both (parallel) {federation.startup_seconds:.2f}s "
            f"(A {a.startup_seconds:.2f}s, B {b.startup_seconds:.2f}s); "
            f"first federated join {first_join:.3f}s; A->B {a_to_b:.3f}s; B->A {b_to_a:.3f}s"
        )
    finally:
        receiver_a.stop()
        receiver_b.stop()


def reachable(url: str, timeout: float = 1.0) -> bool:
    """Whether GET url answers at all (any status), certificate unchecked."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, urllib.error.URLError):
        return False


_REACHABLE_INSIDE = """
import ssl, sys, urllib.request
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
try:
    urllib.request.urlopen(sys.argv[1], timeout=1, context=context)
except OSError as err:
    print("unreachable", err)
else:
    print("reachable")
"""


@pytest.mark.slow
@pytest.mark.synapse
async def test_a_homeserver_in_a_namespace_is_partitioned_and_catches_up(
    synapse_federation: MakeFederation, netns: MakeNetns, http: aiohttp.ClientSession
) -> None:
    """Homeserver B runs inside a network namespace, A on that namespace's host side: they
    federate across the veth pair; a cut separates them (each one's federation listener out of
    the other's reach) while A's own clients carry on; after restore, what A sent during the cut
    reaches B and B's messages reach A again."""
    ns = netns()
    federation = synapse_federation(hosts=[ns.host_address, None], namespaces=[None, ns])
    a, b = federation[0], federation[1]
    assert a.server_name.startswith(f"{ns.host_address}:")
    assert b.server_name.startswith(f"{ns.address}:")
    await federation.astart()
    alice_id, alice_token = await a.create_user("alice")
    bob_id, bob_token = await b.create_user("bob")
    alice = MatrixClient(http, a.base_url, user_id=alice_id, token=alice_token)
    bob = MatrixClient(http, b.base_url, user_id=bob_id, token=bob_token)
    room_id = await alice.create_room(name="across the veth")
    await alice.invite(room_id, bob_id)
    await bob.join(room_id)
    before = await alice.send_text(room_id, "before the cut")
    await bob.sync_until(has_event(before, room_id), timeout=30)

    with ns.partitioned():
        during = await alice.send_text(room_id, "during the cut")
        key_path = "/_matrix/key/v2/server"
        assert not await asyncio.to_thread(reachable, b.federation_url + key_path)
        inside = await asyncio.to_thread(
            ns.run,
            [sys.executable, "-c", _REACHABLE_INSIDE, a.federation_url + key_path],
            capture_output=True,
            text=True,
        )
        assert inside.stdout.startswith("unreachable"), inside
        assert await asyncio.to_thread(reachable, a.federation_url + key_path)
        restored_at = time.monotonic()

    await bob.sync_until(has_event(during, room_id), timeout=30)
    catch_up = time.monotonic() - restored_at
    from_b = await bob.send_text(room_id, "after the cut")
    await alice.sync_until(has_event(from_b, room_id), timeout=30)
    b_to_a = time.monotonic() - restored_at - catch_up
    print(
        f"\nstart-up {federation.startup_seconds:.2f}s; A's message of the cut reached B "
        f"{catch_up:.3f}s after restore; then B->A {b_to_a:.3f}s"
    )

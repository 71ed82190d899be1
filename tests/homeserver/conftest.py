"""The appservice rig for the differential suite: per server kind, one session-wide server started
with two registrations (Synapse reads them only at start-up) and a receiver for the first.

- appservice "a": owns ``@a_*`` and ``#a_*`` exclusively, pushes to ``rig.receiver``.
- appservice "b": owns ``@b_*`` exclusively, has no URL (never pushed to).

Tests share the receiver, so they look only at events of their own rooms.
"""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import attrs
import pytest

from tests.support.appservice import (
    AppserviceRegistration,
    TransactionReceiver,
    prefixed_registration,
)
from tests.support.client import MatrixClient, unique
from tests.support.fixtures import Users, make_homeserver, start_or_fail
from tests.support.process import HomeserverUnderTest

SERVER_NAME = "cis.local"


@attrs.frozen
class AppserviceRig:
    server: HomeserverUnderTest
    receiver: TransactionReceiver
    a: AppserviceRegistration
    b: AppserviceRegistration

    def client(self, http: aiohttp.ClientSession, token: str) -> MatrixClient:
        return MatrixClient(http, self.server.base_url, token=token)

    def as_client(
        self, http: aiohttp.ClientSession, registration: AppserviceRegistration
    ) -> MatrixClient:
        return MatrixClient(
            http,
            self.server.base_url,
            user_id=registration.sender(self.server.server_name),
            token=registration.as_token,
        )

    def a_localpart(self) -> str:
        return unique("a_")


def _rig(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppserviceRig]:
    root = tmp_path_factory.mktemp(f"rig-{kind}")
    a = prefixed_registration("a", None, SERVER_NAME, "a_")
    receiver = TransactionReceiver(hs_token=a.hs_token).start()
    a = attrs.evolve(a, url=receiver.url)
    b = prefixed_registration("b", None, SERVER_NAME, "b_")
    files = (a.write(root / "appservices"), b.write(root / "appservices"))
    server = make_homeserver(kind, root / "server", appservice_files=files, server_name=SERVER_NAME)
    try:
        start_or_fail(server)
        yield AppserviceRig(server=server, receiver=receiver, a=a, b=b)
    finally:
        server.stop()
        receiver.stop()


@pytest.fixture(scope="session")
def rig_synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppserviceRig]:
    yield from _rig("synapse", tmp_path_factory)


@pytest.fixture(scope="session")
def rig_embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppserviceRig]:
    yield from _rig("embedded", tmp_path_factory)


@pytest.fixture
def rig(request: pytest.FixtureRequest, homeserver_kind: str) -> AppserviceRig:
    found: AppserviceRig = request.getfixturevalue(f"rig_{homeserver_kind}")
    if not found.server.running:
        start_or_fail(found.server)
    return found


@attrs.frozen
class Pair:
    """The same scenario on both servers, to compare answers by shape."""

    synapse: Users
    embedded: Users

    def each(self) -> list[tuple[str, Users]]:
        return [("synapse", self.synapse), ("embedded", self.embedded)]


@pytest.fixture
def pair(
    synapse: HomeserverUnderTest, embedded: HomeserverUnderTest, http: aiohttp.ClientSession
) -> Pair:
    return Pair(synapse=Users(synapse, http), embedded=Users(embedded, http))

"""pytest fixtures over both homeservers; ``tests/conftest.py`` imports them.

- ``homeserver``: parametrised over ["embedded", "synapse"]; one session-wide instance of each,
  without appservices. Tests use unique user and room names (``client.unique``).
- ``homeserver_factory(appservice_files=..., server_name=...)``: a fresh server of the same kind
  (Synapse reads appservice registrations only at start-up), stopped after the test.
- ``synapse`` / ``synapse_factory``: the same for tests that want Synapse alone (the node tests).
- ``users``: makes logged-in ``MatrixClient``s on ``homeserver``.
- ``synapse_federation(count=2, **options)``: an unstarted ``SynapseFederation`` (federation.py)
  of Synapses that federate over TLS on loopback; stopped after the test.
- ``netns()``: a new ``NetworkNamespace`` (netns.py) per call, deleted after the test.

A server that cannot start fails the test with its log tail. Only ``netns`` skips: without root
or iproute2, on a developer's machine; under CI (``CI`` set) it fails instead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.client import MatrixClient, unique
from tests.support.embedded import EmbeddedServer
from tests.support.federation import SynapseFederation
from tests.support.netns import NetworkNamespace, reap_stale, unavailable_reason
from tests.support.process import HomeserverStartError, HomeserverUnderTest
from tests.support.synapse import SynapseServer

KINDS = ("embedded", "synapse")


def make_homeserver(
    kind: str,
    workdir: Path,
    *,
    appservice_files: tuple[Path, ...] = (),
    server_name: str = "cis.local",
    port: int | None = None,
    **options: Any,
) -> HomeserverUnderTest:
    """An unstarted server of ``kind``."""
    if kind == "synapse":
        return SynapseServer(
            workdir=workdir,
            server_name=server_name,
            appservice_files=appservice_files,
            port=port,
            **options,
        )
    if kind == "embedded":
        return EmbeddedServer(
            workdir=workdir,
            server_name=server_name,
            appservice_files=appservice_files,
            port=port,
            **options,
        )
    raise ValueError(f"unknown homeserver kind {kind!r}")


def start_or_fail(server: HomeserverUnderTest) -> HomeserverUnderTest:
    try:
        server.start()
    except HomeserverStartError as err:
        failure = str(err)
    else:
        return server
    pytest.fail(f"could not start the {server.kind} homeserver: {failure}", pytrace=False)


Factory = Callable[..., HomeserverUnderTest]


class _Factory:
    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.started: list[HomeserverUnderTest] = []

    def __call__(self, **options: Any) -> HomeserverUnderTest:
        workdir = self.root / f"{self.kind}-{len(self.started)}"
        server = make_homeserver(self.kind, workdir, **options)
        self.started.append(server)
        return start_or_fail(server)

    def close(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeserverUnderTest]:
    server = SynapseServer(workdir=tmp_path_factory.mktemp("synapse"))
    try:
        yield start_or_fail(server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeserverUnderTest]:
    server = EmbeddedServer(workdir=tmp_path_factory.mktemp("embedded"))
    try:
        yield start_or_fail(server)
    finally:
        server.stop()


@pytest.fixture(
    params=[pytest.param("embedded"), pytest.param("synapse", marks=pytest.mark.synapse)]
)
def homeserver_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def homeserver(request: pytest.FixtureRequest, homeserver_kind: str) -> HomeserverUnderTest:
    server: HomeserverUnderTest = request.getfixturevalue(homeserver_kind)
    if not server.running:  # a test that killed the shared one must not take the rest down
        start_or_fail(server)
    return server


@pytest.fixture
def homeserver_factory(homeserver_kind: str, tmp_path: Path) -> Iterator[Factory]:
    factory = _Factory(homeserver_kind, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def synapse_factory(tmp_path: Path) -> Iterator[Factory]:
    factory = _Factory("synapse", tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


class Users:
    """Logged-in clients on one server, each with a fresh unique account."""

    def __init__(self, server: HomeserverUnderTest, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http

    async def new(self, prefix: str = "u", admin: bool = False) -> MatrixClient:
        user_id, token = await self.server.create_user(unique(prefix), admin=admin)
        return self.client(user_id=user_id, token=token)

    async def many(self, *prefixes: str) -> list[MatrixClient]:
        """Several fresh accounts, created concurrently (account creation is the slow part of
        most tests: Synapse hashes passwords, the embedded server runs ``cis homeserver
        add-user``)."""
        return list(await asyncio.gather(*(self.new(prefix) for prefix in prefixes)))

    def client(self, *, user_id: str | None = None, token: str | None = None) -> MatrixClient:
        return MatrixClient(self.http, self.server.base_url, user_id=user_id, token=token)

    def anonymous(self) -> MatrixClient:
        return self.client()


@pytest.fixture
def users(homeserver: HomeserverUnderTest, http: aiohttp.ClientSession) -> Users:
    return Users(homeserver, http)


@pytest.fixture
def synapse_federation(tmp_path: Path) -> Iterator[Callable[..., SynapseFederation]]:
    made: list[SynapseFederation] = []

    def make(count: int = 2, **options: Any) -> SynapseFederation:
        federation = SynapseFederation(tmp_path / f"federation-{len(made)}", count, **options)
        made.append(federation)
        return federation

    try:
        yield make
    finally:
        for federation in made:
            federation.stop()


@pytest.fixture(scope="session")
def _netns_available() -> None:
    reason = unavailable_reason()
    if reason is None:
        reap_stale()  # namespaces of earlier runs that were killed before their clean-up
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the network namespace tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def netns(_netns_available: None) -> Iterator[Callable[[], NetworkNamespace]]:
    made: list[NetworkNamespace] = []

    def make() -> NetworkNamespace:
        namespace = NetworkNamespace.create()
        made.append(namespace)
        return namespace

    try:
        yield make
    finally:
        for namespace in made:
            namespace.delete()

"""The dev cluster's homeserver, either kind, as a child process: its config before it starts,
its command line, and the person's account once it answers.

- ``embedded``: ``cis homeserver`` on ``<cluster>/embedded`` (the nodes' registrations given
  with ``--appservice``); the account is added to its database as ``cis homeserver add-user``
  does (safe while it runs: SQLite WAL).
- ``synapse``: Synapse from PyPI on ``<cluster>/synapse`` (``synapse.py``); the account comes
  from its shared-secret registration.
"""

from __future__ import annotations

import abc
import os
import sys
from pathlib import Path

import aiohttp

from cis_bot import private
from cis_bot.app.devcluster.errors import ClusterError
from cis_bot.app.devcluster.layout import ClusterDir
from cis_bot.app.devcluster.room import PersonClient
from cis_bot.app.devcluster.synapse import SynapseDir, register_with_shared_secret, synapse_env
from cis_bot.app.devcluster.topology import PERSON, Topology


class Homeserver(abc.ABC):
    """One kind of homeserver for the cluster (``kind``: "embedded" or "synapse")."""

    kind: str

    def __init__(self, directory: ClusterDir, topology: Topology, port: int) -> None:
        self.directory = directory
        self.topology = topology
        self.port = port
        self.registrations: list[Path] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self, registrations: list[Path]) -> None:
        """Everything it needs on disk before it starts (it loads the registrations then)."""
        self.registrations = registrations

    @abc.abstractmethod
    def command(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def log_files(self) -> list[Path]:
        return [self.directory.log("homeserver")]

    @abc.abstractmethod
    async def create_person(self, http: aiohttp.ClientSession, password: str) -> None:
        """The person's account, made now that the server answers."""

    async def person_token(self, http: aiohttp.ClientSession, password: str, token: str) -> str:
        """An access token for the person: ``token`` while it is still good, else a login,
        with the account made first when there is none (a new or reset homeserver)."""
        client = PersonClient(http, self.base_url, token)
        if await client.valid():
            return token
        if await client.log_in(PERSON, password) is None:
            await self.create_person(http, password)
            if await client.log_in(PERSON, password) is None:
                raise ClusterError(
                    f"{self.topology.person_id} exists on the homeserver with another password "
                    f"than the one in {self.directory.state_file}"
                )
        return client.token


class EmbeddedHomeserver(Homeserver):
    kind = "embedded"

    def prepare(self, registrations: list[Path]) -> None:
        super().prepare(registrations)
        private.make_dirs(self.directory.embedded_state)

    def command(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "cis_bot",
            "homeserver",
            "--state-dir",
            str(self.directory.embedded_state),
            "--port",
            str(self.port),
            "--server-name",
            self.topology.server_name,
        ]
        for path in self.registrations:
            argv += ["--appservice", str(path)]
        return argv

    async def create_person(self, http: aiohttp.ClientSession, password: str) -> None:
        from cis_bot.homeserver.server import new_account, store_account
        from cis_bot.homeserver.storage.database import DB_NAME
        from cis_bot.homeserver.storage.store import Store

        store = Store(self.directory.embedded_state / "homeserver" / DB_NAME)
        try:
            user_id, _, password_hash = new_account(self.topology.server_name, PERSON, password)
            store_account(store, user_id, password_hash, admin=False)
        except ValueError as exc:
            raise ClusterError(f"cannot make the account {PERSON}: {exc}") from None
        finally:
            store.close()


class SynapseHomeserver(Homeserver):
    kind = "synapse"

    def __init__(self, directory: ClusterDir, topology: Topology, port: int) -> None:
        super().__init__(directory, topology, port)
        self.synapse = SynapseDir(directory.synapse_dir)
        # Found now: without a Synapse, nothing starts and the error says how to get one.
        self._command = self.synapse.command()
        self._secret = ""

    def prepare(self, registrations: list[Path]) -> None:
        super().prepare(registrations)
        self._secret = self.synapse.write_config(
            server_name=self.topology.server_name, port=self.port, registrations=registrations
        )

    def command(self) -> list[str]:
        return self._command

    def env(self) -> dict[str, str]:
        return {**synapse_env(), "PYTHONUNBUFFERED": "1"}

    def log_files(self) -> list[Path]:
        return [*super().log_files(), self.synapse.log]

    async def create_person(self, http: aiohttp.ClientSession, password: str) -> None:
        await register_with_shared_secret(http, self.base_url, self._secret, PERSON, password)


def homeserver_of(kind: str, directory: ClusterDir, topology: Topology, port: int) -> Homeserver:
    if kind == "synapse":
        return SynapseHomeserver(directory, topology, port)
    return EmbeddedHomeserver(directory, topology, port)

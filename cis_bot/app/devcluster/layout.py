"""A dev cluster's directory (``--dir``), owner-only like every state directory, and what a second
``up`` on it reuses: the nodes' tokens (in their configs), their appservice ports, the person's
account and password, the room.

::

    cluster.json            which homeserver, its port, the workers, the person, the room
    dags/hello.toml         the coordinator's [chat] dags_dir: `!cis run hello`
    nodes/<id>/config.toml  each node's config (tokens included) and registration.yaml;
    nodes/<id>/state/       its state directory; the tasks it runs start in nodes/<id>/
    embedded/               the embedded homeserver's state directory (its database, media)
    synapse/                Synapse's config, signing key, SQLite database and log
    logs/<process>.log      each process's output (supervisor.log: a detached supervisor's)
    run/                    while it runs: lock (held by the supervisor), processes.json
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import attrs

from cis_bot import private
from cis_bot.app.devcluster.topology import FIRST_DAG, NodeSpec, Topology, first_dag
from cis_bot.app.registration import generate_registration, saved_tokens
from cis_bot.app.registration import write_config_keeping_tokens as write_node_config
from cis_bot.config import load_config
from cis_bot.errors import UserError

HOMESERVERS = ("embedded", "synapse")
DEFAULT_PORT = 8008


@attrs.define
class ClusterState:
    """``cluster.json``: what the cluster is, kept between runs."""

    homeserver: str
    port: int
    workers: int
    password: str
    access_token: str = ""
    room_id: str = ""

    @classmethod
    def from_json(cls, data: Any, path: Path) -> ClusterState:
        try:
            state = cls(
                homeserver=str(data["homeserver"]),
                port=int(data["port"]),
                workers=int(data["workers"]),
                password=str(data["password"]),
                access_token=str(data.get("access_token") or ""),
                room_id=str(data.get("room_id") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: not a dev cluster's state ({exc!r}); remove it") from None
        if state.homeserver not in HOMESERVERS:
            raise UserError(f"{path}: unknown homeserver {state.homeserver!r}; remove it")
        return state


@attrs.frozen
class ClusterDir:
    path: Path

    @property
    def state_file(self) -> Path:
        return self.path / "cluster.json"

    @property
    def dags(self) -> Path:
        return self.path / "dags"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def run(self) -> Path:
        return self.path / "run"

    @property
    def processes_file(self) -> Path:
        return self.run / "processes.json"

    @property
    def embedded_state(self) -> Path:
        return self.path / "embedded"

    @property
    def synapse_dir(self) -> Path:
        return self.path / "synapse"

    def node_dir(self, node: NodeSpec) -> Path:
        return self.path / "nodes" / node.node_id

    def node_config(self, node: NodeSpec) -> Path:
        return self.node_dir(node) / "config.toml"

    def registration(self, node: NodeSpec) -> Path:
        return self.node_dir(node) / "registration.yaml"

    def node_state(self, node: NodeSpec) -> Path:
        return self.node_dir(node) / "state"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    # --- state ---------------------------------------------------------------------------

    def load(self) -> ClusterState | None:
        try:
            text = self.state_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{self.state_file}: not JSON ({exc}); remove it") from None
        return ClusterState.from_json(data, self.state_file)

    def save(self, state: ClusterState) -> None:
        private.write_file(self.state_file, json.dumps(attrs.asdict(state), indent=2) + "\n")

    def ensure(self) -> None:
        for directory in (self.path, self.dags, self.logs, self.run):
            try:
                private.make_dirs(directory)
            except OSError as exc:
                raise UserError(f"cannot use {directory}: {exc.strerror or exc}") from None

    # --- the nodes -----------------------------------------------------------------------

    def write_dags(self) -> None:
        """The first DAG, unless the person changed it."""
        target = self.dags / f"{FIRST_DAG}.toml"
        if not target.exists():
            private.write_file(target, first_dag())

    def write_nodes(self, topology: Topology, homeserver: str) -> list[Path]:
        """Every node's config (rendered afresh, keeping its tokens and, while it is free, its
        appservice port) and its registration; the registrations' paths."""
        registrations = []
        for node in topology.nodes:
            private.make_dirs(self.node_state(node))
            config = self.node_config(node)
            port = _saved_port(config)
            if port is None or not port_free(port):
                port = free_port()
            text = topology.node_config(
                node,
                homeserver=homeserver,
                listen_host="127.0.0.1",
                listen_port=port,
                dags_dir="../../dags",
            )
            write_node_config(config, text)
            generate_registration(config, self.registration(node))
            registrations.append(self.registration(node))
        return registrations

    def tokens(self, node: NodeSpec) -> dict[str, str]:
        return saved_tokens(self.node_config(node))


def _saved_port(config: Path) -> int | None:
    if not config.exists():
        return None
    return load_config(config).node.listen_port or None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Could a server listen on ``port`` now (as servers do: with SO_REUSEADDR)?"""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])

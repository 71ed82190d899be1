"""The dev cluster's shape, the same with Docker or without: one coordinator that answers chat
commands and hands tasks to N workers, a person who drives it from a Matrix client, and one
room (``#cis-dev:<server>``) where they all meet.

The node configs are rendered here for both ways of running it: ``cis dev-cluster`` writes them
for local processes, and ``synapse-dev/nodes/*.toml`` are this module's output for the compose
network (a test keeps the two equal). Tokens are not part of them: ``cis registration
generate`` adds those (``registration.py``).
"""

from __future__ import annotations

import json
import string
from importlib import resources

import attrs

SERVER_NAME = "cis.local"
PERSON = "dev"
ROOM_ALIAS_LOCALPART = "cis-dev"
ROOM_NAME = "cis dev cluster"
COORDINATOR_ID = "coordinator"
#: Worker ids are worker-a ... worker-z.
MAX_WORKERS = len(string.ascii_lowercase)
DEFAULT_WORKERS = 2
#: What the workers run for the coordinator: the shell (the first DAG is shell commands; every
#: DAG in the cluster is its owner's) and the built-in agents.
WORKER_AGENTS = ("shell", "claude", "claude-interactive", "aider", "codex", "opencode")
#: Beats often enough that `status` shows a live cluster as live within seconds.
HEARTBEAT_SECS = 5.0
#: The DAG to try first: ``!cis run hello``.
FIRST_DAG = "hello"


def worker_ids(count: int) -> list[str]:
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"a dev cluster has 1 to {MAX_WORKERS} workers, not {count}")
    return [f"worker-{letter}" for letter in string.ascii_lowercase[:count]]


def first_dag() -> str:
    """The text of ``hello.toml``, the DAG ``up`` suggests trying first."""
    return resources.files(__package__).joinpath(f"{FIRST_DAG}.toml").read_text(encoding="utf-8")


@attrs.frozen
class NodeSpec:
    node_id: str
    server_name: str

    @property
    def localpart(self) -> str:
        return f"cis_{self.node_id}"

    @property
    def user_id(self) -> str:
        return f"@{self.localpart}:{self.server_name}"

    @property
    def is_coordinator(self) -> bool:
        return self.node_id == COORDINATOR_ID


@attrs.frozen
class Topology:
    workers: int = DEFAULT_WORKERS
    server_name: str = SERVER_NAME

    @property
    def coordinator(self) -> NodeSpec:
        return NodeSpec(COORDINATOR_ID, self.server_name)

    @property
    def worker_nodes(self) -> list[NodeSpec]:
        return [NodeSpec(node_id, self.server_name) for node_id in worker_ids(self.workers)]

    @property
    def nodes(self) -> list[NodeSpec]:
        """The coordinator first, then the workers."""
        return [self.coordinator, *self.worker_nodes]

    @property
    def person_id(self) -> str:
        return f"@{PERSON}:{self.server_name}"

    @property
    def room_alias(self) -> str:
        return f"#{ROOM_ALIAS_LOCALPART}:{self.server_name}"

    def node_config(
        self,
        node: NodeSpec,
        *,
        homeserver: str,
        listen_host: str,
        listen_port: int,
        dags_dir: str,
        heartbeat_secs: float = HEARTBEAT_SECS,
    ) -> str:
        """``node``'s config.toml, without tokens. Trust both ways, as docs/matrix.md asks: the
        coordinator lists its workers (``[node] workers``); the workers take orders from the
        person and, through the room's power levels, from the coordinator, and read its runs
        (``[node] coordinators``)."""

        def toml(value: object) -> str:
            return json.dumps(value)

        if node.is_coordinator:
            role = (
                "# cis dev cluster: the coordinator. It answers `!cis` commands in its rooms and\n"
                "# hands the tasks of the runs they start to the workers; it runs none itself.\n"
            )
            dag = '\n[dag]\nexecution_mode = "matrix"\n'
            trust = (
                f"workers = {toml([w.user_id for w in self.worker_nodes])}\naccept_agents = []\n"
            )
            chat = f"\n[chat]\nenabled = true\ndags_dir = {toml(dags_dir)}\n"
        else:
            role = (
                f"# cis dev cluster: {node.node_id}, a worker: it runs the tasks the coordinator\n"
                "# gives it.\n"
            )
            dag = ""
            trust = (
                f"coordinators = {toml([self.coordinator.user_id])}\n"
                f"accept_agents = {toml(list(WORKER_AGENTS))}\n"
            )
            chat = ""
        return (
            f"{role}"
            "# Rendered by cis_bot/app/devcluster/topology.py. `cis registration generate` adds\n"
            "# the tokens (as_token, hs_token) the first time and keeps them after.\n"
            f"{dag}"
            f"\n[dag.matrix]\nhome_server = {toml(self.server_name)}\n"
            f"\n[node]\nid = {toml(node.node_id)}\n"
            f"homeserver = {toml(homeserver)}\n"
            f"listen_host = {toml(listen_host)}\n"
            f"listen_port = {listen_port}\n"
            f"allowed_users = {toml([self.person_id])}\n"
            f"{trust}"
            f"heartbeat_secs = {heartbeat_secs}\n"
            f"{chat}"
        )


#: In the compose network: Synapse's service, every node's appservice port (each node has its
#: own container, named as the node), the DAGs mounted from synapse-dev/dags.
COMPOSE_HOMESERVER = "http://synapse:8008"
COMPOSE_APPSERVICE_PORT = 29333
COMPOSE_DAGS_DIR = "/dags"


def compose_node_configs(workers: int = DEFAULT_WORKERS) -> dict[str, str]:
    """``synapse-dev/nodes/<id>.toml`` for a compose cluster of ``workers`` workers."""
    topology = Topology(workers=workers)
    return {
        node.node_id: topology.node_config(
            node,
            homeserver=COMPOSE_HOMESERVER,
            listen_host="0.0.0.0",
            listen_port=COMPOSE_APPSERVICE_PORT,
            dags_dir=COMPOSE_DAGS_DIR,
        )
        for node in topology.nodes
    }

"""cis_bot nodes as real processes on a test homeserver: registrations, configs, a run room.

Registrations must exist before the homeserver starts (Synapse reads them only then), so a test
first calls ``plan_nodes`` (tokens, appservice ports), starts the homeserver with
``registration_files``, then ``write_configs`` once the homeserver's URL is known.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import yaml

from cis_bot.matrix.batch import BATCH_TYPE, unpack
from cis_bot.matrix.events import CATALOGUE
from cis_bot.matrix.identity import NodeIdentity
from cis_bot.matrix.powers import RoomPowers
from tests.support.client import MatrixClient
from tests.support.netns import NetworkNamespace
from tests.support.process import free_port

REPO = Path(__file__).resolve().parents[2]


@attrs.define
class NodePlan:
    identity: NodeIdentity
    workdir: Path

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    @property
    def config(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def registration(self) -> Path:
        return self.workdir / "registration.yaml"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"


def plan_nodes(
    root: Path, server_name: str, *node_ids: str, namespace: NetworkNamespace | None = None
) -> list[NodePlan]:
    """Identities and registrations for ``node_ids``. With a ``namespace`` the nodes are to run
    inside it (``NodeProcess(plan, namespace=...)``): their appservices listen on its address,
    where the homeserver pushes through the veth pair."""
    if namespace is None:
        listen_host, ports = "127.0.0.1", [free_port() for _ in node_ids]
    else:
        listen_host, ports = namespace.address, namespace.free_ports(len(node_ids))
    plans = []
    for node_id, port in zip(node_ids, ports, strict=True):
        identity = NodeIdentity(
            node_id=node_id,
            homeserver="",
            server_name=server_name,
            localpart=f"cis_{node_id}",
            as_token=secrets.token_urlsafe(24),
            hs_token=secrets.token_urlsafe(24),
            listen_host=listen_host,
            listen_port=port,
        )
        plan = NodePlan(identity, root / node_id)
        plan.workdir.mkdir(parents=True, exist_ok=True)
        plan.registration.write_text(yaml.safe_dump(identity.registration()))
        plans.append(plan)
    return plans


def registration_files(plans: list[NodePlan]) -> tuple[Path, ...]:
    return tuple(p.registration for p in plans)


def write_configs(
    plans: list[NodePlan],
    homeserver_url: str,
    *,
    allowed_users: list[str],
    accept_agents: list[str] | None = None,
    heartbeat_secs: float = 1.0,
    lease_secs: float | None = None,
    idle_heartbeat_secs: float | None = None,
    coordinators: list[str] | None = None,
    extra: str = "",
    matrix_extra: str = "",
) -> None:
    """Each node's config.toml; ``extra`` goes into its ``[node]`` table (and may open tables
    after it), ``matrix_extra`` into ``[dag.matrix]``. ``lease_secs`` defaults to the config's
    default (5) or twice ``heartbeat_secs`` if that is longer; ``idle_heartbeat_secs`` to
    ``heartbeat_secs`` (tests want a stopped node's heartbeat to lapse soon; the config's
    default is 10)."""
    lease = lease_secs if lease_secs is not None else max(5.0, 2 * heartbeat_secs)
    idle = idle_heartbeat_secs if idle_heartbeat_secs is not None else heartbeat_secs
    for plan in plans:
        i = plan.identity
        accept = f"accept_agents = {json.dumps(accept_agents)}\n" if accept_agents else ""
        if coordinators:
            accept += f"coordinators = {json.dumps(coordinators)}\n"
        plan.config.write_text(
            f"""
[dag.matrix]
home_server = "{i.server_name}"
broadcast_interval_ms = 100
flush_timeout_secs = 60
no_worker_timeout_secs = 3
{matrix_extra}
[node]
id = "{i.node_id}"
homeserver = "{homeserver_url}"
listen_host = "{i.listen_host}"
listen_port = {i.listen_port}
as_token = "{i.as_token}"
hs_token = "{i.hs_token}"
allowed_users = {json.dumps(allowed_users)}
heartbeat_secs = {heartbeat_secs}
lease_secs = {lease}
idle_heartbeat_secs = {idle}
{accept}{extra}
"""
        )


def cis_env() -> dict[str, str]:
    return {**os.environ, "CIS_CONFIG": os.devnull, "PYTHONUNBUFFERED": "1"}


def cis_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cis_bot", *args]


class NodeProcess:
    """``cis node`` in the background; its log in the node's workdir. With a ``namespace`` it
    runs inside that network namespace (plan it with ``plan_nodes(..., namespace=...)``)."""

    def __init__(
        self, plan: NodePlan, *extra: str, namespace: NetworkNamespace | None = None
    ) -> None:
        self.plan = plan
        self.extra = extra
        self.namespace = namespace
        self.process: subprocess.Popen[bytes] | None = None
        self.log = plan.workdir / "node.log"

    def start(self) -> NodeProcess:
        argv = cis_command(
            "node", "--config", str(self.plan.config), "--state-dir", str(self.plan.state_dir)
        )
        with self.log.open("ab") as log:
            options: dict[str, Any] = {
                "stdout": log,
                "stderr": subprocess.STDOUT,
                "cwd": self.plan.workdir,
                "env": cis_env(),
                "start_new_session": True,
            }
            argv += self.extra
            if self.namespace is None:
                self.process = subprocess.Popen(argv, **options)
            else:
                self.process = self.namespace.popen(argv, **options)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def wait_for(
    check: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition"
) -> Any:
    """Poll an async ``check`` until it returns something truthy."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def run_room(
    admin: MatrixClient, invite: list[str], *, trusted: list[str] | None = None
) -> str:
    """A room as docs/matrix.md tells an operator to make one for runs: the given bots invited,
    the ``trusted`` ones (default: all) at power level 50 (nodes take tasks and orders from
    each other), heartbeats open to members, every other ``cis.dag.*`` type closed to them."""
    levels = {
        event_type: 0 if event_type == "cis.node.heartbeat" or ".control." in event_type else 50
        for event_type in CATALOGUE
    }
    return await admin.create_room(
        name="runs",
        invite=invite,
        power_level_content_override={
            "users": {user: 50 for user in trusted or invite},
            "events": levels,
        },
    )


async def joined_members(admin: MatrixClient, room_id: str) -> set[str]:
    body = await admin.ok("GET", f"/_matrix/client/v3/rooms/{room_id}/joined_members")
    return set(body.get("joined", {}))


async def heartbeats(admin: MatrixClient, room_id: str) -> dict[str, dict[str, Any]]:
    """The room's heartbeats by state key (a worker's user id)."""
    state = await admin.ok("GET", f"/_matrix/client/v3/rooms/{room_id}/state")
    return {e["state_key"]: e["content"] for e in state if e.get("type") == "cis.node.heartbeat"}


async def room_events(
    admin: MatrixClient, room_id: str, *, raw: bool = False
) -> list[dict[str, Any]]:
    """Every event of the room, oldest first; as cis_bot's nodes read them (``unbatched``)
    unless ``raw``."""
    events: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        params = {"dir": "b", "limit": "500", **({"from": token} if token else {})}
        body = await admin.ok("GET", f"/_matrix/client/v3/rooms/{room_id}/messages", params=params)
        events.extend(body.get("chunk", []))
        token = body.get("end")
        if not body.get("chunk") or not token:
            break
    events.reverse()
    return events if raw else unbatched(events)


def unbatched(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A room's events (oldest first) with each ``cis.dag.batch`` unpacked as ``Node.history``
    does: what its sender could post by the power levels of the time."""
    powers = RoomPowers()
    out: list[dict[str, Any]] = []
    for event in events:
        powers.follow(event)
        if event.get("type") == BATCH_TYPE:
            out.extend(unpack(event, powers.may_post(str(event.get("sender")))))
        else:
            out.append(event)
    return out

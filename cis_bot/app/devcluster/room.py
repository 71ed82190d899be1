"""The person's side of the dev cluster, over the client-server API: signing in, the room
``#cis-dev:<server>`` (made once, as docs/matrix.md asks an operator to make a room for runs),
and reading the nodes' heartbeats there.

The room: the person made it (a creator of a room version 12 room outranks every level), the
nodes are at power level 50 (the coordinator trusts its workers, the workers take the
coordinator's assignments: the trust model), heartbeats and control requests are open to
members, the rest of the run log is not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from cis_bot.app.devcluster.errors import ClusterError
from cis_bot.app.devcluster.topology import ROOM_ALIAS_LOCALPART, ROOM_NAME, Topology

CS = "/_matrix/client/v3"
NODE_POWER_LEVEL = 50
HEARTBEAT = "cis.node.heartbeat"

#: Synapse's defaults for the room's own state, which an override of "events" would drop.
_ROOM_STATE_LEVELS = {
    "m.room.name": 50,
    "m.room.topic": 50,
    "m.room.avatar": 50,
    "m.room.canonical_alias": 50,
    "m.room.power_levels": 100,
    "m.room.history_visibility": 100,
    "m.room.encryption": 100,
    "m.room.server_acl": 100,
    "m.room.tombstone": 150,
}


def _q(value: str) -> str:
    return quote(value, safe="")


class PersonClient:
    """A plain Matrix client for the person (and for ``status``)."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, token: str = "") -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.token = token

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            async with self.http.request(
                method,
                f"{self.base_url}{path}",
                json=body,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ClusterError(
                f"the homeserver at {self.base_url}: {method} {path}: {exc}"
            ) from None

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, answer = await self.call(method, path, body, **kw)
        if status != 200:
            raise ClusterError(f"the homeserver refused {method} {path}: {status} {answer}")
        return answer

    async def valid(self) -> bool:
        """Is the token still good (a homeserver reset forgets it)?"""
        if not self.token:
            return False
        status, _ = await self.call("GET", f"{CS}/account/whoami")
        return status == 200

    async def log_in(self, localpart: str, password: str) -> str | None:
        """Log in (the token is kept); None when the account does not exist or the password
        is wrong."""
        status, answer = await self.call(
            "POST",
            f"{CS}/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": password,
                "initial_device_display_name": "cis dev-cluster",
            },
        )
        if status == 403:
            return None
        if status != 200 or not isinstance(answer, dict):
            raise ClusterError(f"logging in as {localpart}: {status} {answer}")
        self.token = str(answer["access_token"])
        return self.token

    async def state(self, room_id: str) -> list[dict[str, Any]]:
        answer = await self.ok("GET", f"{CS}/rooms/{_q(room_id)}/state")
        return [event for event in answer if isinstance(event, dict)]


def room_levels(topology: Topology, run_log_levels: Mapping[str, int]) -> dict[str, Any]:
    """The room's ``m.room.power_levels`` content (its creator, the person, outranks it)."""
    return {
        "users": {node.user_id: NODE_POWER_LEVEL for node in topology.nodes},
        "events": {**_ROOM_STATE_LEVELS, **run_log_levels},
        "invite": NODE_POWER_LEVEL,
    }


async def ensure_room(
    client: PersonClient,
    topology: Topology,
    run_log_levels: Mapping[str, int],
    *,
    person_id: str,
) -> str:
    """The room's id: made the first time (the nodes invited), found by its alias after; a node
    added since, or that left, is invited and given its power level. Call it once the nodes are
    connected, so that they see their invitations."""
    status, found = await client.call("GET", f"{CS}/directory/room/{_q(topology.room_alias)}")
    if status == 404:
        answer = await client.ok(
            "POST",
            f"{CS}/createRoom",
            {
                "preset": "private_chat",
                "room_version": "12",
                "name": ROOM_NAME,
                "topic": "A cis_bot dev cluster: `!cis help` lists the commands; "
                "`!cis run hello` runs a first DAG on the workers.",
                "room_alias_name": ROOM_ALIAS_LOCALPART,
                "invite": [node.user_id for node in topology.nodes],
                "power_level_content_override": room_levels(topology, run_log_levels),
            },
        )
        return str(answer["room_id"])
    if status != 200 or not isinstance(found, dict):
        raise ClusterError(f"looking up {topology.room_alias}: {status} {found}")
    room_id = str(found["room_id"])
    members = await _members(client, room_id)
    if members.get(person_id) != "join":
        await client.ok("POST", f"{CS}/join/{_q(room_id)}", {})
    levels_path = f"{CS}/rooms/{_q(room_id)}/state/m.room.power_levels/"
    levels = await client.ok("GET", levels_path)
    users = levels.setdefault("users", {})
    if any(users.get(node.user_id) != NODE_POWER_LEVEL for node in topology.nodes):
        users.update({node.user_id: NODE_POWER_LEVEL for node in topology.nodes})
        await client.ok("PUT", levels_path, levels)
    for node in topology.nodes:
        membership = members.get(node.user_id)
        if membership == "join":
            continue
        if membership == "invite":
            # An invitation from an earlier start that the node never saw (it was not running
            # then): withdrawn and sent again, now that the node listens.
            await client.ok(
                "POST",
                f"{CS}/rooms/{_q(room_id)}/kick",
                {"user_id": node.user_id, "reason": "invited again"},
            )
        await client.ok("POST", f"{CS}/rooms/{_q(room_id)}/invite", {"user_id": node.user_id})
    return room_id


async def _members(client: PersonClient, room_id: str) -> dict[str, str]:
    """Membership by user id, from the room's state."""
    return {
        str(event.get("state_key")): str((event.get("content") or {}).get("membership"))
        for event in await client.state(room_id)
        if event.get("type") == "m.room.member"
    }


def heartbeats_in(state: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The heartbeats in a room's state, by the worker's user id (their state key: the auth
    rules let only that user set it)."""
    return {
        str(event["state_key"]): event["content"]
        for event in state
        if event.get("type") == HEARTBEAT and isinstance(event.get("content"), dict)
    }


async def wait_for_nodes(
    client: PersonClient,
    room_id: str,
    topology: Topology,
    *,
    since_ms: int,
    timeout: float,
    check_alive: Callable[[], None],
) -> None:
    """Until every node is in the room and has beaten there since ``since_ms`` (it runs and
    sees the room). ``check_alive`` raises when a process died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        check_alive()
        state = await client.state(room_id)
        members = {
            str(e.get("state_key"))
            for e in state
            if e.get("type") == "m.room.member"
            and (e.get("content") or {}).get("membership") == "join"
        }
        beats = heartbeats_in(state)
        waiting = [
            node.node_id
            for node in topology.nodes
            if node.user_id not in members
            or int(beats.get(node.user_id, {}).get("timestamp") or 0) < since_ms
        ]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{', '.join(waiting)} did not join {topology.room_alias} and beat there "
                f"within {timeout:.0f}s; see their logs"
            )
        await asyncio.sleep(0.05)  # a poll of the room; the processes are the ones working

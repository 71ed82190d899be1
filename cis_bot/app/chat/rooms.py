"""What the chat needs to know of a room, read once and kept current from the pushed events: its
state (members, power levels, its creation, the nodes' heartbeats), and of the homeserver,
whether it still wants reply fallbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from mautrix.api import Method, Path

from cis_bot.chat.compose import supports_no_fallback
from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Node

log = structlog.get_logger(__name__)

StateKey = tuple[str, str]


class RoomFacts:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._state: dict[str, dict[StateKey, dict[str, Any]]] = {}
        #: Rooms whose state changed while it was being read (read it again).
        self._stale: set[str] = set()
        self._loading: set[str] = set()
        self._fallback: bool | None = None

    def observe(self, room_id: str, raw: Mapping[str, Any]) -> None:
        """Keep a room's state current with a pushed event."""
        event_type, state_key = raw.get("type"), raw.get("state_key")
        if not isinstance(event_type, str) or not isinstance(state_key, str):
            return
        if room_id in self._loading:
            self._stale.add(room_id)
        state = self._state.get(room_id)
        if state is not None:
            state[(event_type, state_key)] = dict(raw)

    def forget(self, room_id: str) -> None:
        self._state.pop(room_id, None)

    async def state(self, room_id: str) -> Mapping[StateKey, Mapping[str, Any]]:
        state = self._state.get(room_id)
        if state is not None and room_id not in self._stale:
            return state
        self._loading.add(room_id)
        self._stale.discard(room_id)
        try:
            events = await self.node.room_state(room_id)
        finally:
            self._loading.discard(room_id)
        loaded = {
            (str(e["type"]), str(e["state_key"])): e
            for e in events
            if isinstance(e.get("type"), str) and isinstance(e.get("state_key"), str)
        }
        self._state[room_id] = loaded
        return loaded

    async def joined(self, room_id: str) -> list[str]:
        return [
            key
            for (kind, key), e in (await self.state(room_id)).items()
            if kind == "m.room.member" and _content(e).get("membership") == "join"
        ]

    async def creators(self, room_id: str) -> set[str]:
        """Who created the room (with room version 12, also its ``additional_creators``)."""
        create = (await self.state(room_id)).get(("m.room.create", ""))
        if create is None:
            return set()
        found = {str(create.get("sender"))}
        extra = _content(create).get("additional_creators")
        if isinstance(extra, list):
            found.update(u for u in extra if isinstance(u, str))
        return found

    async def is_direct(self, room_id: str) -> bool:
        """A direct chat: the bot and one person, in a room the bot did not create (a run room
        the bot made for one watcher is not a conversation with it)."""
        joined = await self.joined(room_id)
        if len(joined) != 2 or self.node.user_id not in joined:
            return False
        return self.node.user_id not in await self.creators(room_id)

    async def heartbeats(self, room_id: str) -> list[tuple[str, ev.NodeHeartbeatContent]]:
        """(sender, heartbeat) of every node that heartbeats in the room (valid ones)."""
        found = []
        for (kind, _), raw in (await self.state(room_id)).items():
            if kind != ev.NodeHeartbeatContent.TYPE or not isinstance(raw.get("sender"), str):
                continue
            try:
                beat = ev.decode(kind, raw.get("content"))
            except ev.InvalidEvent:
                continue
            assert isinstance(beat, ev.NodeHeartbeatContent)
            found.append((str(raw["sender"]), beat))
        return found

    async def answerers(self, room_id: str) -> set[str]:
        """The users of the live nodes whose heartbeat says they answer chat commands here."""
        now = ev.now_ms()
        return {
            sender
            for sender, beat in await self.heartbeats(room_id)
            if beat.chat and beat.alive_at(now)
        }

    async def power_levels(self, room_id: str) -> tuple[dict[str, int], int]:
        """(explicit user levels, users_default)."""
        levels = _content((await self.state(room_id)).get(("m.room.power_levels", ""), {}))
        users = levels.get("users")
        explicit = {
            u: v
            for u, v in (users.items() if isinstance(users, Mapping) else [])
            if isinstance(u, str) and isinstance(v, int) and not isinstance(v, bool)
        }
        default = levels.get("users_default", 0)
        return explicit, default if isinstance(default, int) else 0

    async def people_who_may_act(
        self, room_id: str, *, level: int, allowed: tuple[str, ...]
    ) -> list[str]:
        """The room's members who may give acting commands, nodes left out (to mention them
        when something waits for a person)."""
        joined = set(await self.joined(room_id))
        nodes = {sender for sender, _ in await self.heartbeats(room_id)} | {self.node.user_id}
        explicit, default = await self.power_levels(room_id)
        creators = await self.creators(room_id)
        found = {
            user
            for user in joined
            if user in allowed or user in creators or explicit.get(user, default) >= level
        }
        return sorted(found - nodes)

    async def wants_fallback(self) -> bool:
        """Whether the homeserver predates Matrix 1.13 (rich replies then carry a fallback)."""
        if self._fallback is None:
            try:
                body = await self.node.intent.api.request(Method.GET, Path.versions)
                versions = body.get("versions") if isinstance(body, dict) else None
                found = (
                    [v for v in versions if isinstance(v, str)]
                    if isinstance(versions, list)
                    else []
                )
                self._fallback = not supports_no_fallback(found)
            except Exception as exc:  # an old or odd server: fallbacks do no harm
                log.warning("chat.versions_unknown", error=str(exc))
                self._fallback = True
        return self._fallback


def _content(event: Mapping[str, Any]) -> Mapping[str, Any]:
    content = event.get("content")
    return content if isinstance(content, Mapping) else {}

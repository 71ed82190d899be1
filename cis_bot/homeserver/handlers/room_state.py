"""The current state of each room, kept in memory, and the access checks made against it
(Synapse's state handler with ``Auth.check_user_in_room`` and
``check_user_in_room_or_world_readable``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from cis_bot.homeserver import events as ev
from cis_bot.homeserver import room_versions
from cis_bot.homeserver.errors import forbidden

if TYPE_CHECKING:
    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.room_versions import RoomVersion
    from cis_bot.homeserver.storage.store import Store


@attrs.define
class RoomState:
    room_id: str
    version: RoomVersion
    state: dict[tuple[str, str], Event]
    last_event_id: str | None
    depth: int
    last_stream: int
    joined: set[str] = attrs.field(factory=set)

    def member_ids(self, membership: str) -> list[str]:
        return [
            key
            for (etype, key), event in self.state.items()
            if etype == ev.MEMBER and event.membership == membership
        ]

    def membership(self, user_id: str) -> str | None:
        event = self.state.get((ev.MEMBER, user_id))
        return None if event is None else event.membership

    def apply(self, event: Event) -> None:
        self.last_event_id = event.event_id
        self.depth = event.depth
        self.last_stream = event.stream
        key = event.state_key
        if key is None:
            return
        self.state[(event.type, key)] = event
        if event.type == ev.MEMBER:
            if event.membership == "join":
                self.joined.add(key)
            else:
                self.joined.discard(key)


class RoomStateHandler:
    """Rooms' current state, loaded from the store on first use and kept up to date by the
    event creation handler (the only writer of room events)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._rooms: dict[str, RoomState] = {}

    def get(self, room_id: str) -> RoomState | None:
        room = self._rooms.get(room_id)
        if room is not None:
            return room
        row = self.store.get_room(room_id)
        if row is None:
            return None
        ids = self.store.current_state_ids(room_id)
        found = self.store.get_events(ids.values())
        state = {key: found[event_id] for key, event_id in ids.items() if event_id in found}
        last = self.store.room_last_event(room_id)
        room = RoomState(
            room_id=room_id,
            version=room_versions.get(row.room_version),
            state=state,
            last_event_id=last.event_id if last else None,
            depth=last.depth if last else 0,
            last_stream=last.stream if last else 0,
        )
        room.joined = set(room.member_ids("join"))
        self._rooms[room_id] = room
        return room

    def add(self, room: RoomState) -> None:
        """A room just created: its state is known, nothing to load."""
        self._rooms[room.room_id] = room

    def joined_rooms(self, user_id: str) -> list[str]:
        return [
            row.room_id
            for row in self.store.memberships_for_user(user_id)
            if row.membership == "join"
        ]

    def check_user_in_room(self, room_id: str, user_id: str) -> RoomState:
        """Synapse's check_user_in_room: 403 unless joined."""
        room = self.get(room_id)
        if room is None or room.membership(user_id) != "join":
            raise forbidden(f"User {user_id} not in room {room_id}")
        return room

    def check_can_read(self, room_id: str, user_id: str) -> tuple[RoomState, int | None]:
        """Joined (visible up to now), or departed (visible up to the leave): returns the room
        and the stream position the user may see up to (None = everything)."""
        room = self.get(room_id)
        if room is not None:
            membership = room.membership(user_id)
            if membership == "join":
                return room, None
            if membership in ("leave", "ban"):
                member_event = room.state[(ev.MEMBER, user_id)]
                return room, member_event.stream
            visibility = room.state.get((ev.HISTORY_VISIBILITY, ""))
            if visibility and visibility.content.get("history_visibility") == "world_readable":
                return room, None
        raise forbidden(
            f"User @{user_id[1:]} not in room {room_id}, and room previews are disabled"
        )

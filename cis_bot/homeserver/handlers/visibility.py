"""History visibility (synapse/visibility.py, filter_events_for_client): which events of a room
a user may see, from the room's ``m.room.history_visibility`` and the user's membership at each
event (the state after it, as Synapse stores "the state at an event")."""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from cis_bot.homeserver import events as ev

if TYPE_CHECKING:
    from collections.abc import Iterable

    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.handlers.room_state import RoomState
    from cis_bot.homeserver.storage.store import Store

VISIBILITY_PRIORITY = ("world_readable", "shared", "invited", "joined")
MEMBERSHIP_PRIORITY = ("join", "invite", "knock", "leave", "ban")
_OPEN = ("world_readable", "shared")


def _normalise(value: object) -> str:
    return value if isinstance(value, str) and value in VISIBILITY_PRIORITY else "shared"


class Visibility:
    def __init__(self, store: Store) -> None:
        self.store = store
        # room_id -> ([stream], [visibility after that event]) of every visibility change
        self._history: dict[str, tuple[list[int], list[str]]] = {}

    def on_event(self, room: RoomState, event: Event) -> None:
        if event.type == ev.HISTORY_VISIBILITY and event.state_key == "":
            history = self._history.get(room.room_id)
            if history is not None:
                history[0].append(event.stream)
                history[1].append(_normalise(event.content.get("history_visibility")))

    def _changes(self, room_id: str) -> tuple[list[int], list[str]]:
        found = self._history.get(room_id)
        if found is None:
            events = self.store.room_events(
                room_id, limit=100_000, backwards=False, types=[ev.HISTORY_VISIBILITY]
            )
            found = (
                [e.stream for e in events if e.state_key == ""],
                [
                    _normalise(e.content.get("history_visibility"))
                    for e in events
                    if e.state_key == ""
                ],
            )
            self._history[room_id] = found
        return found

    def filter(self, user_id: str, room: RoomState, events: Iterable[Event]) -> list[Event]:
        events = list(events)
        streams, values = self._changes(room.room_id)
        if all(value in _OPEN for value in values):
            return events  # the common case: shared history, nothing to hide from members
        history = self.store.membership_history(user_id, room.room_id)
        member_streams = [stream for stream, _ in history]
        visible = []
        for event in events:
            index = bisect.bisect_right(streams, event.stream) - 1
            visibility = values[index] if index >= 0 else "shared"
            if event.type == ev.HISTORY_VISIBILITY and event.state_key == "" and index >= 0:
                # A change of visibility is seen under the more open of old and new (no old
                # one counts as "shared").
                previous = values[index - 1] if index >= 1 else "shared"
                if VISIBILITY_PRIORITY.index(previous) < VISIBILITY_PRIORITY.index(visibility):
                    visibility = previous
            if visibility in _OPEN:
                visible.append(event)
                continue
            position = bisect.bisect_right(member_streams, event.stream) - 1
            membership = history[position][1] if position >= 0 else None
            if event.type == ev.MEMBER and event.state_key == user_id:
                before = history[position - 1][1] if position >= 1 else "leave"
                if membership == "leave" and before in ("join", "invite"):
                    visible.append(event)
                    continue
                current = membership if membership in MEMBERSHIP_PRIORITY else "leave"
                if MEMBERSHIP_PRIORITY.index(before) < MEMBERSHIP_PRIORITY.index(current):
                    membership = before
            if membership == "join" or (visibility == "invited" and membership == "invite"):
                visible.append(event)
        return visible

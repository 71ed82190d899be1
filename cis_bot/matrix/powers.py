"""A room's power levels, as far as a node needs them: who may give it orders (a user's level),
and who may post what (an event type's level, for the events a batch carries).

mautrix's ``PowerLevelStateEventContent`` reads users' levels (room version 12 creators outrank
every level), but its lookup of an event type's level misses custom types (it keys them by
``EventType`` objects of another class), so event levels are read from the content as sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import structlog
from mautrix.types import JSON, PowerLevelStateEventContent, StateEvent, UserID

log = structlog.get_logger(__name__)

POWER_LEVELS = "m.room.power_levels"
CREATE = "m.room.create"


@attrs.define
class RoomPowers:
    levels: PowerLevelStateEventContent = attrs.Factory(PowerLevelStateEventContent)
    create: StateEvent | None = None
    #: Event types' levels, and the level of a message type not listed.
    event_levels: dict[str, int] = attrs.Factory(dict)
    events_default: int = 0
    #: Whether the room's power levels event was seen (else these are the defaults).
    known: bool = False

    @classmethod
    def of_state(cls, state: Iterable[Mapping[str, Any]]) -> RoomPowers:
        """From a room's current state (``GET /rooms/{id}/state``)."""
        powers = cls()
        for event in state:
            powers.follow(event)
        return powers

    def follow(self, event: Mapping[str, Any]) -> None:
        """Take a room event into account: a change of power levels takes effect at once."""
        if event.get("state_key") != "":
            return
        if event.get("type") == POWER_LEVELS:
            content = event.get("content")
            content = content if isinstance(content, dict) else {}
            self.levels = _power_levels(content)
            events = content.get("events")
            self.event_levels = {
                str(event_type): level
                for event_type, value in (events.items() if isinstance(events, dict) else ())
                if (level := _level(value)) is not None
            }
            self.events_default = _level(content.get("events_default")) or 0
            self.known = True
        elif event.get("type") == CREATE:
            try:
                self.create = StateEvent.deserialize(JSON(dict(event)))
            except Exception:
                log.warning("room.create_event_invalid", event_id=event.get("event_id"))

    def user_level(self, user_id: str) -> int:
        return int(self.levels.get_user_level(UserID(user_id), self.create))

    def event_level(self, event_type: str) -> int:
        """The level needed to post a message event of ``event_type``."""
        return self.event_levels.get(event_type, self.events_default)

    def may_post(self, user_id: str) -> Callable[[str], bool]:
        """Whether ``user_id`` may post a message event of a type, as the auth rules say."""
        level = self.user_level(user_id)
        return lambda event_type: level >= self.event_level(event_type)


def _level(value: object) -> int | None:
    """A power level as the auth rules read it (older room versions allow numeric strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _power_levels(content: dict[str, Any]) -> PowerLevelStateEventContent:
    try:
        return PowerLevelStateEventContent.deserialize(JSON(content))
    except Exception:  # malformed levels: nobody gets more than the defaults
        log.warning("room.power_levels_invalid")
        return PowerLevelStateEventContent()

"""Sync/messages filters (synapse/api/filtering.py): validation and matching."""

from __future__ import annotations

from typing import Any

import attrs

from cis_bot.homeserver.errors import bad_request
from cis_bot.homeserver.ids import is_valid_room_id, is_valid_user_id

FILTER_TIMELINE_LIMIT = 100  # Synapse's filter_timeline_limit default

_EVENT_FILTER_LISTS = ("types", "not_types")
_ID_LISTS = {"senders": "@", "not_senders": "@", "rooms": "!", "not_rooms": "!"}
_ROOM_EVENT_BOOLS = (
    "contains_url",
    "lazy_load_members",
    "include_redundant_members",
    "unread_thread_notifications",
)


def _fail(message: str) -> Exception:
    return bad_request(message)


def _check_string_list(value: Any, where: str, sigil: str | None = None) -> None:
    if not isinstance(value, list):
        raise _fail(f"{value!r} is not of type 'array' ({where})")
    for item in value:
        if not isinstance(item, str):
            raise _fail(f"{item!r} is not of type 'string' ({where})")
        if sigil == "@" and not is_valid_user_id(item):
            raise _fail(f"{item!r} is not a 'matrix_user_id' ({where})")
        if sigil == "!" and not is_valid_room_id(item):
            raise _fail(f"{item!r} is not a 'matrix_room_id' ({where})")


def _check_event_filter(value: Any, where: str, room_event: bool) -> None:
    if not isinstance(value, dict):
        raise _fail(f"{value!r} is not of type 'object' ({where})")
    if "limit" in value and (
        isinstance(value["limit"], bool) or not isinstance(value["limit"], int | float)
    ):
        raise _fail(f"{value['limit']!r} is not of type 'number' ({where}.limit)")
    for key in _EVENT_FILTER_LISTS:
        if key in value:
            _check_string_list(value[key], f"{where}.{key}")
    for key, sigil in _ID_LISTS.items():
        if key in value and (room_event or key.endswith("senders")):
            _check_string_list(value[key], f"{where}.{key}", sigil)
    if room_event:
        for key in _ROOM_EVENT_BOOLS:
            if key in value and not isinstance(value[key], bool):
                raise _fail(f"{value[key]!r} is not of type 'boolean' ({where}.{key})")


def validate_filter(filter_json: Any) -> None:
    """Synapse's USER_FILTER_SCHEMA check; a 400 naming the offending value."""
    if not isinstance(filter_json, dict):
        raise _fail(f"{filter_json!r} is not of type 'object'")
    for key in ("presence", "account_data"):
        if key in filter_json:
            _check_event_filter(filter_json[key], key, room_event=False)
    if "room" in filter_json:
        room = filter_json["room"]
        if not isinstance(room, dict):
            raise _fail(f"{room!r} is not of type 'object' (room)")
        for key in ("rooms", "not_rooms"):
            if key in room:
                _check_string_list(room[key], f"room.{key}", "!")
        if "include_leave" in room and not isinstance(room["include_leave"], bool):
            raise _fail(f"{room['include_leave']!r} is not of type 'boolean' (room.include_leave)")
        for key in ("ephemeral", "state", "timeline", "account_data"):
            if key in room:
                _check_event_filter(room[key], f"room.{key}", room_event=True)
    if "event_format" in filter_json and filter_json["event_format"] not in (
        "client",
        "federation",
    ):
        raise _fail(f"{filter_json['event_format']!r} is not one of ['client', 'federation']")
    if "event_fields" in filter_json:
        _check_string_list(filter_json["event_fields"], "event_fields")


def cap_timeline_limit(filter_json: dict[str, Any]) -> None:
    """Synapse's set_timeline_upper_limit (applied before storing or using a filter)."""
    room = filter_json.get("room")
    if not isinstance(room, dict):
        return
    timeline = room.get("timeline")
    if isinstance(timeline, dict) and isinstance(timeline.get("limit"), int | float):
        timeline["limit"] = min(timeline["limit"], FILTER_TIMELINE_LIMIT)


def _matches_type(event_type: str, pattern: str) -> bool:
    if pattern.endswith("*"):
        return event_type.startswith(pattern[:-1])
    return event_type == pattern


@attrs.frozen
class EventFilter:
    limit: int = 10
    types: tuple[str, ...] | None = None
    not_types: tuple[str, ...] = ()
    senders: tuple[str, ...] | None = None
    not_senders: tuple[str, ...] = ()
    rooms: tuple[str, ...] | None = None
    not_rooms: tuple[str, ...] = ()
    contains_url: bool | None = None
    lazy_load_members: bool = False
    include_redundant_members: bool = False

    @classmethod
    def from_json(cls, raw: Any) -> EventFilter:
        if not isinstance(raw, dict):
            return cls()

        def opt(key: str) -> tuple[str, ...] | None:
            value = raw.get(key)
            return None if value is None else tuple(value)

        limit = raw.get("limit", 10)
        return cls(
            limit=int(limit)
            if isinstance(limit, int | float) and not isinstance(limit, bool)
            else 10,
            types=opt("types"),
            not_types=tuple(raw.get("not_types", ())),
            senders=opt("senders"),
            not_senders=tuple(raw.get("not_senders", ())),
            rooms=opt("rooms"),
            not_rooms=tuple(raw.get("not_rooms", ())),
            contains_url=raw.get("contains_url"),
            lazy_load_members=bool(raw.get("lazy_load_members", False)),
            include_redundant_members=bool(raw.get("include_redundant_members", False)),
        )

    def matches(
        self, *, event_type: str, sender: str | None, room_id: str | None, content: Any
    ) -> bool:
        if any(_matches_type(event_type, p) for p in self.not_types):
            return False
        if self.types is not None and not any(_matches_type(event_type, p) for p in self.types):
            return False
        if sender is not None:
            if sender in self.not_senders:
                return False
            if self.senders is not None and sender not in self.senders:
                return False
        if room_id is not None:
            if room_id in self.not_rooms:
                return False
            if self.rooms is not None and room_id not in self.rooms:
                return False
        if self.contains_url is not None:
            has_url = isinstance(content, dict) and isinstance(content.get("url"), str)
            if has_url != self.contains_url:
                return False
        return True

    def allows_room(self, room_id: str) -> bool:
        if room_id in self.not_rooms or "*" in self.not_rooms:
            return False
        return self.rooms is None or room_id in self.rooms

    @property
    def blocks_all(self) -> bool:
        return (
            self.types == ()
            or "*" in self.not_types
            or self.senders == ()
            or "*" in self.not_senders
            or self.rooms == ()
            or "*" in self.not_rooms
        )


@attrs.frozen
class FilterCollection:
    raw: dict[str, Any]
    rooms: EventFilter
    timeline: EventFilter
    state: EventFilter
    ephemeral: EventFilter
    room_account_data: EventFilter
    account_data: EventFilter
    presence: EventFilter
    include_leave: bool
    event_fields: tuple[str, ...]
    event_format: str

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FilterCollection:
        room = raw.get("room") if isinstance(raw.get("room"), dict) else {}
        assert isinstance(room, dict)
        return cls(
            raw=raw,
            rooms=EventFilter.from_json(
                {k: v for k, v in room.items() if k in ("rooms", "not_rooms")}
            ),
            timeline=EventFilter.from_json(room.get("timeline", {})),
            state=EventFilter.from_json(room.get("state", {})),
            ephemeral=EventFilter.from_json(room.get("ephemeral", {})),
            room_account_data=EventFilter.from_json(room.get("account_data", {})),
            account_data=EventFilter.from_json(raw.get("account_data", {})),
            presence=EventFilter.from_json(raw.get("presence", {})),
            include_leave=bool(room.get("include_leave", False)),
            event_fields=tuple(raw.get("event_fields", ())),
            event_format=str(raw.get("event_format", "client")),
        )


DEFAULT_FILTER = FilterCollection.from_json({})


def only_fields(event: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """``event_fields``: keep only the named (dot-separated, ``\\.``-escaped) fields."""
    if not fields:
        return event
    out: dict[str, Any] = {}
    for field in fields:
        parts = []
        current = ""
        escaped = False
        for ch in field:
            if escaped:
                current += ch
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == ".":
                parts.append(current)
                current = ""
            else:
                current += ch
        parts.append(current)
        source: Any = event
        for part in parts[:-1]:
            if not isinstance(source, dict) or part not in source:
                source = None
                break
            source = source[part]
        if not isinstance(source, dict) or parts[-1] not in source:
            continue
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = source[parts[-1]]
    return out

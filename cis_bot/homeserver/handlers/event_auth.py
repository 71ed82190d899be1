"""Authorization rules for events created on this server (synapse/event_auth.py, room v10-v12).

There is no federation here, so no event is ever "rejected" after the fact: a failed check is
an error to the client and the event is never stored. Messages and status codes follow
Synapse's so clients and tests see the same thing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import BAD_JSON, MatrixError, bad_request, forbidden
from cis_bot.homeserver.events import CREATE, JOIN_RULES, MEMBER, POWER_LEVELS
from cis_bot.homeserver.ids import (
    CANONICALJSON_MAX_INT,
    CANONICALJSON_MIN_INT,
    is_valid_user_id,
)
from cis_bot.homeserver.room_versions import CREATOR_POWER_LEVEL

if TYPE_CHECKING:
    from collections.abc import Mapping

    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.room_versions import RoomVersion

    StateMap = Mapping[tuple[str, str], Event]

MEMBERSHIPS = ("invite", "join", "leave", "ban", "knock")
_INT_LEVELS = (
    "users_default",
    "events_default",
    "state_default",
    "ban",
    "redact",
    "kick",
    "invite",
)


def _int(value: object, default: int = 0) -> int:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return default


def creators(state: StateMap, version: RoomVersion) -> set[str]:
    create = state.get((CREATE, ""))
    if create is None:
        return set()
    if version.creator_power:
        extra = create.content.get("additional_creators") or []
        return {create.sender, *[c for c in extra if isinstance(c, str)]}
    if version.implicit_room_creator:
        return {create.sender}
    creator = create.content.get("creator")
    return {creator} if isinstance(creator, str) else set()


def user_power_level(user_id: str, state: StateMap, version: RoomVersion) -> int:
    if version.creator_power and user_id in creators(state, version):
        return CREATOR_POWER_LEVEL
    pl = state.get((POWER_LEVELS, ""))
    if pl is not None:
        users = pl.content.get("users") or {}
        level = users.get(user_id)
        if level is None:
            level = pl.content.get("users_default", 0)
        return _int(level)
    return 100 if user_id in creators(state, version) else 0


def named_level(state: StateMap, name: str, default: int) -> int:
    pl = state.get((POWER_LEVELS, ""))
    if pl is None:
        return default
    value = pl.content.get(name)
    return default if value is None else _int(value, default)


def send_level(event_type: str, state_key: str | None, state: StateMap) -> int:
    pl = state.get((POWER_LEVELS, ""))
    content: dict[str, Any] = pl.content if pl is not None else {}
    level = (content.get("events") or {}).get(event_type)
    if level is None:
        level = (
            content.get("state_default", 50)
            if state_key is not None
            else content.get("events_default", 0)
        )
    return _int(level)


def membership_of(user_id: str, state: StateMap) -> str | None:
    event = state.get((MEMBER, user_id))
    return None if event is None else event.membership


def check_event(
    *,
    event_type: str,
    state_key: str | None,
    sender: str,
    content: dict[str, Any],
    state: StateMap,
    version: RoomVersion,
    room_id: str,
) -> None:
    """Raise a MatrixError unless ``sender`` may send this event given the room state."""
    if event_type == CREATE:
        raise forbidden("Create event has prev events")
    if event_type == MEMBER:
        if state_key is None:
            raise forbidden("Member event requires a state_key")
        membership = content.get("membership")
        if membership not in MEMBERSHIPS:
            raise bad_request("Invalid membership key")
        _check_membership(
            target=state_key,
            sender=sender,
            membership=membership,
            state=state,
            version=version,
            room_id=room_id,
        )
        return

    member = state.get((MEMBER, sender))
    if member is None or member.membership != "join":
        raise forbidden(f"User {sender} not in room {room_id} ({_repr(member)})")

    needed = send_level(event_type, state_key, state)
    have = user_power_level(sender, state, version)
    if have < needed:
        raise forbidden(
            "You don't have permission to post that to the room. "
            f"user_level ({have}) < send_level ({needed})"
        )
    if state_key is not None and state_key.startswith("@") and state_key != sender:
        raise forbidden("You are not allowed to set others state")
    if event_type == POWER_LEVELS:
        check_power_levels(sender=sender, content=content, state=state, version=version)


def _repr(member: Event | None) -> str:
    if member is None:
        return "None"
    return (
        f"<FrozenEvent event_id={member.event_id}, type={member.type}, "
        f"state_key={member.state_key}>"
    )


def _check_membership(
    *,
    target: str,
    sender: str,
    membership: str,
    state: StateMap,
    version: RoomVersion,
    room_id: str,
) -> None:
    caller = membership_of(sender, state)
    caller_in_room = caller == "join"
    caller_invited = caller == "invite"
    caller_knocked = caller == "knock"
    target_membership = membership_of(target, state)
    target_in_room = target_membership == "join"
    target_banned = target_membership == "ban"

    join_rule_event = state.get((JOIN_RULES, ""))
    join_rule = join_rule_event.content.get("join_rule", "invite") if join_rule_event else "invite"

    user_level = user_power_level(sender, state, version)
    target_level = user_power_level(target, state, version)
    invite_level = named_level(state, "invite", 0)
    ban_level = named_level(state, "ban", 50)

    if membership not in ("join", "knock"):
        if (caller_invited or caller_knocked) and membership == "leave" and target == sender:
            return
        if not caller_in_room:
            raise forbidden(f"{sender} not in room {room_id}.")

    if membership == "invite":
        if target_banned:
            raise forbidden(f"{target} is banned from the room")
        if target_in_room:
            raise forbidden(f"{target} is already in the room.")
        if user_level < invite_level:
            raise forbidden("You don't have permission to invite users")
    elif membership == "join":
        if sender != target:
            raise forbidden("Cannot force another user to join.")
        if target_banned:
            raise forbidden("You are banned from this room")
        if join_rule == "public":
            return
        if join_rule in ("invite", "knock", "knock_restricted", "restricted"):
            if not (caller_in_room or caller_invited):
                raise forbidden("You are not invited to this room.")
            return
        raise forbidden("You are not allowed to join this room")
    elif membership == "leave":
        if target_banned and user_level < ban_level:
            raise forbidden(f"You cannot unban user {target}.")
        if target != sender:
            kick_level = named_level(state, "kick", 50)
            if user_level < kick_level or user_level <= target_level:
                raise forbidden(f"You cannot kick user {target}.")
    elif membership == "ban":
        if user_level < ban_level:
            raise forbidden("You don't have permission to ban")
        if user_level <= target_level:
            raise forbidden("You don't have permission to ban this user")
    elif membership == "knock":
        if join_rule not in ("knock", "knock_restricted"):
            raise forbidden("You don't have permission to knock")
        if target != sender:
            raise forbidden("You cannot knock for other users")
        if target_in_room:
            raise forbidden("You cannot knock on a room you are already in")
        if caller_invited:
            raise forbidden("You are already invited to this room")
        if target_banned:
            raise forbidden("You are banned from this room")


_PL_INTS = ("ban", "events_default", "invite", "kick", "redact", "state_default", "users_default")
_PL_MAPS = ("events", "notifications", "users")


def _schema_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MatrixError(400, BAD_JSON, f"\"{name}\": {value!r} is not of type 'integer'")
    if value > CANONICALJSON_MAX_INT:
        raise MatrixError(
            400,
            BAD_JSON,
            f'"{name}": {value} is greater than the maximum of {CANONICALJSON_MAX_INT}',
        )
    if value < CANONICALJSON_MIN_INT:
        raise MatrixError(
            400, BAD_JSON, f'"{name}": {value} is less than the minimum of {CANONICALJSON_MIN_INT}'
        )


def check_power_levels_schema(content: dict[str, Any]) -> None:
    """Synapse's EventValidator POWER_LEVELS_SCHEMA check (before any auth rule): 400
    M_BAD_JSON naming the offending key."""
    for key in _PL_INTS:
        if key in content:
            _schema_int(content[key], key)
    for key in _PL_MAPS:
        if key not in content:
            continue
        mapping = content[key]
        if not isinstance(mapping, dict):
            raise MatrixError(400, BAD_JSON, f"\"{key}\": {mapping!r} is not of type 'object'")
        for name, value in mapping.items():
            _schema_int(value, name)


def validate_power_levels_content(
    content: dict[str, Any], state: StateMap, version: RoomVersion
) -> None:
    """The state-independent part of Synapse's _check_power_levels (400s)."""
    users = content.get("users", {})
    if not isinstance(users, dict):
        raise bad_request(f"{users!r} must be a dict wherein all the values are integers.")
    for user, level in users.items():
        if not is_valid_user_id(user):
            raise bad_request(f"Not a valid user_id: {user}")
        if _int(level, default=-(2**63)) == -(2**63):
            raise bad_request(f"Not a valid power level: {level}")
    if version.creator_power:
        create = state.get((CREATE, ""))
        if create is not None:
            if create.sender in users:
                raise bad_request(f"Creator user {create.sender} must not appear in content.users")
            extra = create.content.get("additional_creators") or []
            if set(extra) & set(users):
                raise bad_request("Additional creators users must not appear in content.users")
    for key, value in content.items():
        if key in _INT_LEVELS and type(value) is not int:
            raise bad_request(f"{value!r} must be an integer.")
        if key in ("events", "notifications", "users") and (
            not isinstance(value, dict) or not all(type(v) is int for v in value.values())
        ):
            raise bad_request(f"{value!r} must be a dict wherein all the values are integers.")


def check_power_levels(
    *, sender: str, content: dict[str, Any], state: StateMap, version: RoomVersion
) -> None:
    validate_power_levels_content(content, state, version)
    current = state.get((POWER_LEVELS, ""))
    if current is None:
        return
    old = current.content
    user_level = user_power_level(sender, state, version)
    checks: list[tuple[str, str | None]] = [(key, None) for key in _INT_LEVELS]
    for group in ("users", "events", "notifications"):
        old_map = old.get(group) or {}
        new_map = content.get(group) or {}
        checks.extend((name, group) for name in set(old_map) | set(new_map))
    for name, section in checks:
        old_loc: dict[str, Any] = (old.get(section) or {}) if section else old
        new_loc: dict[str, Any] = (content.get(section) or {}) if section else content
        old_level = _int(old_loc[name]) if name in old_loc else None
        new_level = _int(new_loc[name]) if name in new_loc else None
        if new_level is not None and old_level is not None and new_level == old_level:
            continue
        if section == "users" and name != sender and old_level == user_level:
            raise forbidden("You don't have permission to remove ops level equal to your own")
        if (old_level is not None and old_level > user_level) or (
            new_level is not None and new_level > user_level
        ):
            raise forbidden("You don't have permission to add ops level greater than your own")


def can_redact_others(sender: str, state: StateMap, version: RoomVersion) -> bool:
    return user_power_level(sender, state, version) >= named_level(state, "redact", 50)

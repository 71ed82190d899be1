"""Room creation (Synapse's RoomCreationHandler): ``/createRoom``'s body is validated into a
``RoomCreationConfig``, then the room's events are built in Synapse's order: the create event
(which fixes the room id), the creator's join, power levels, the preset's state, the initial
state, name and topic, and the invites.

Unlike Synapse, creation is atomic: the events are built and authorised against the room held
in memory, then the room, its alias and its events are stored in one transaction. A request
that fails half-way (an event too large, an invite the rules refuse) leaves nothing behind.
"""

from __future__ import annotations

import string
import time
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from cis_bot.homeserver import events as ev
from cis_bot.homeserver import room_versions
from cis_bot.homeserver.errors import (
    BAD_JSON,
    ROOM_IN_USE,
    TOO_LARGE,
    UNSUPPORTED_ROOM_VERSION,
    MatrixError,
    bad_request,
)
from cis_bot.homeserver.events import Event, prune_pdu
from cis_bot.homeserver.handlers.message import MAX_PDU_SIZE
from cis_bot.homeserver.handlers.room_state import RoomState
from cis_bot.homeserver.ids import (
    canonical_json,
    check_canonical_json_values,
    content_hash,
    is_valid_user_id,
    new_room_id,
    parse_user_id,
    reference_event_id,
)

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.directory import DirectoryHandler
    from cis_bot.homeserver.handlers.message import EventCreationHandler
    from cis_bot.homeserver.handlers.room_member import RoomMemberHandler
    from cis_bot.homeserver.handlers.room_state import RoomStateHandler
    from cis_bot.homeserver.room_versions import RoomVersion
    from cis_bot.homeserver.storage.store import Store

log = structlog.get_logger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "private_chat": {
        "join_rules": "invite",
        "history_visibility": "shared",
        "original_invitees_have_ops": False,
        "guest_can_join": True,
        "power_level_content_override": {"invite": 0},
    },
    "trusted_private_chat": {
        "join_rules": "invite",
        "history_visibility": "shared",
        "original_invitees_have_ops": True,
        "guest_can_join": True,
        "power_level_content_override": {"invite": 0},
    },
    "public_chat": {
        "join_rules": "public",
        "history_visibility": "shared",
        "original_invitees_have_ops": False,
        "guest_can_join": False,
        "power_level_content_override": {"events": {"m.call.invite": 50}},
    },
}


def default_power_levels(creator: str, version: RoomVersion) -> dict[str, Any]:
    return {
        "users": {} if version.creator_power else {creator: 100},
        "users_default": 0,
        "events": {
            ev.NAME: 50,
            ev.POWER_LEVELS: 100,
            ev.HISTORY_VISIBILITY: 100,
            ev.CANONICAL_ALIAS: 50,
            ev.AVATAR: 50,
            ev.TOMBSTONE: 150 if version.creator_power else 100,
            ev.SERVER_ACL: 100,
            ev.ENCRYPTION: 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 50,
        "historical": 100,
    }


def _deepmerge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deepmerge(merged[key], value)
        else:
            merged[key] = value
    return merged


@attrs.frozen
class RoomCreationConfig:
    """A validated ``/createRoom`` body."""

    version: RoomVersion
    preset_name: str
    preset: dict[str, Any]
    public: bool
    alias: str | None
    invite_list: list[str]
    power_level_override: dict[str, Any] | None
    initial_state: dict[tuple[str, str], dict[str, Any]]
    create_content: dict[str, Any]
    name: str | None
    topic: str | None
    is_direct: Any


class RoomCreationHandler:
    def __init__(
        self,
        *,
        store: Store,
        rooms: RoomStateHandler,
        events: EventCreationHandler,
        members: RoomMemberHandler,
        directory: DirectoryHandler,
        server_name: str,
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.events = events
        self.members = members
        self.directory = directory
        self.server_name = server_name

    def create_room(self, requester: Requester, config: dict[str, Any]) -> str:
        user_id = requester.user_id
        spec = self.parse_config(requester, config)
        room, events = self._create_event(user_id, spec)
        events += self._events_for_new_room(room, user_id, spec)
        events += self._invites(room, user_id, spec)
        with self.store.transaction():
            self.store.create_room(room.room_id, spec.version.identifier, user_id, spec.public)
            if spec.alias is not None and not self.store.create_alias(
                spec.alias, room.room_id, user_id
            ):
                raise MatrixError(400, ROOM_IN_USE, "Room alias already taken")
            self.store.persist_events(events, update_state=True)
        self.rooms.add(room)
        self.events.announce(room, events)
        log.info("room.created", room_id=room.room_id, creator=user_id, preset=spec.preset_name)
        return room.room_id

    # --- validating the request -----------------------------------------------------------

    def parse_config(self, requester: Requester, config: dict[str, Any]) -> RoomCreationConfig:
        """Every check Synapse makes before it creates anything, in Synapse's order."""
        user_id = requester.user_id
        invite_list = config.get("invite", [])
        if not isinstance(invite_list, list):
            raise bad_request("invite must be a list", BAD_JSON)
        if config.get("invite_3pid", []):
            raise MatrixError(
                400, "M_MISSING_PARAM", "3pid invites are not supported by this server"
            )
        version = _room_version(config)
        alias = self._room_alias(requester, config)
        for invitee in invite_list:
            try:
                parse_user_id(invitee)
            except MatrixError:
                raise bad_request(f"Invalid user_id: {invitee}") from None
        override = _power_level_override(config, version, user_id)
        visibility = config.get("visibility", "private")
        preset_name = config.get(
            "preset", "private_chat" if visibility == "private" else "public_chat"
        )
        preset = PRESETS.get(preset_name) if isinstance(preset_name, str) else None
        if preset is None:
            raise bad_request(f"'{preset_name}' is not a valid preset", BAD_JSON)
        initial_state = _initial_state(config)
        creation_content = config.get("creation_content", {})
        if not isinstance(creation_content, dict):
            raise bad_request("creation_content must be an object", BAD_JSON)
        for key in ("name", "topic"):
            if key in config and not isinstance(config[key], str):
                raise bad_request(f"{key} must be a string", BAD_JSON)
        for content in (creation_content, *initial_state.values()):
            check_canonical_json_values(content)
        if override:
            check_canonical_json_values(override)
        return RoomCreationConfig(
            version=version,
            preset_name=preset_name,
            preset=preset,
            public=visibility == "public",
            alias=alias,
            invite_list=invite_list,
            power_level_override=override,
            initial_state=initial_state,
            create_content=_create_content(
                creation_content, version, preset_name, invite_list, user_id
            ),
            name=config.get("name"),
            topic=config.get("topic"),
            is_direct=config.get("is_direct"),
        )

    def _room_alias(self, requester: Requester, config: dict[str, Any]) -> str | None:
        if "room_alias_name" not in config:
            return None
        alias_name = config["room_alias_name"]
        if not isinstance(alias_name, str):
            raise bad_request("room_alias_name must be a string", BAD_JSON)
        if any(ch in alias_name for ch in string.whitespace):
            raise bad_request("Invalid characters in room alias")
        if ":" in alias_name:
            raise bad_request(
                "':' is not permitted in the room alias name. Please note this expects a "
                "local part — 'wombat', not '#wombat:example.com'."
            )
        alias = f"#{alias_name}:{self.server_name}"
        if self.store.get_alias(alias) is not None:
            raise MatrixError(400, ROOM_IN_USE, "Room alias already taken")
        if requester.appservice is not None:
            if not requester.appservice.is_alias_in_namespace(alias):
                raise MatrixError(
                    400,
                    "M_EXCLUSIVE",
                    "This application service has not reserved this kind of alias.",
                )
        elif self.directory.alias_exclusive_to_other(alias, requester.user_id):
            raise MatrixError(
                400, "M_EXCLUSIVE", "This alias is reserved by an application service."
            )
        return alias

    # --- making the room ------------------------------------------------------------------

    def _create_event(
        self, creator: str, spec: RoomCreationConfig
    ) -> tuple[RoomState, list[Event]]:
        """The room, in memory, with its create event (Synapse's _generate_and_create_room_id
        and, for v12, _generate_create_event_for_room_id: the room id is the create event's
        hash)."""
        version = spec.version
        create_content = spec.create_content
        check_canonical_json_values(create_content)
        while True:
            pdu: dict[str, Any] = {
                "auth_events": [],
                "content": create_content,
                "depth": 1,
                "origin_server_ts": int(time.time() * 1000),
                "prev_events": [],
                "sender": creator,
                "state_key": "",
                "type": ev.CREATE,
            }
            if not version.room_id_from_create:
                pdu["room_id"] = new_room_id(self.server_name)
            pdu["hashes"] = {"sha256": content_hash(pdu)}
            if len(canonical_json(pdu)) > MAX_PDU_SIZE:
                raise MatrixError(413, TOO_LARGE, "event too large")
            event_id = reference_event_id(prune_pdu(pdu, version))
            room_id = pdu.get("room_id") or "!" + event_id[1:]
            if self.store.get_room(room_id) is None:
                break
            time.sleep(0.001)  # same create content in the same millisecond: take the next one
        room = RoomState(
            room_id=room_id,
            version=version,
            state={},
            last_event_id=None,
            depth=0,
            last_stream=0,
        )
        event = Event(event_id=event_id, pdu=pdu)
        self.events.append_to_new_room(room, event)
        return room, [event]

    def _events_for_new_room(
        self, room: RoomState, creator: str, spec: RoomCreationConfig
    ) -> list[Event]:
        """The creator's join, then the initial state, authorised as the room's creation
        (Synapse's _send_events_for_new_room)."""
        events: list[Event] = []

        def send(etype: str, content: dict[str, Any], state_key: str = "") -> None:
            event = self.events.build(
                room,
                sender=creator,
                event_type=etype,
                content=content,
                state_key=state_key,
                skip_auth=True,
            )
            self.events.append_to_new_room(room, event)
            events.append(event)

        initial_state = dict(spec.initial_state)
        preset = spec.preset
        send(ev.MEMBER, self.members.member_content("join", creator), creator)
        pl_content = initial_state.pop((ev.POWER_LEVELS, ""), None)
        if pl_content is None:
            pl_content = _power_levels(creator, spec)
        send(ev.POWER_LEVELS, pl_content)
        if spec.alias is not None and (ev.CANONICAL_ALIAS, "") not in initial_state:
            send(ev.CANONICAL_ALIAS, {"alias": spec.alias})
        if (ev.JOIN_RULES, "") not in initial_state:
            send(ev.JOIN_RULES, {"join_rule": preset["join_rules"]})
        if (ev.HISTORY_VISIBILITY, "") not in initial_state:
            send(ev.HISTORY_VISIBILITY, {"history_visibility": preset["history_visibility"]})
        if preset["guest_can_join"] and (ev.GUEST_ACCESS, "") not in initial_state:
            send(ev.GUEST_ACCESS, {"guest_access": "can_join"})
        for (etype, state_key), content in initial_state.items():
            send(etype, content, state_key)
        if spec.name is not None:
            send(ev.NAME, {"name": spec.name})
        if spec.topic is not None:
            topic = spec.topic
            send(ev.TOPIC, {"topic": topic, "m.topic": {"m.text": [{"body": topic}]}})
        return events

    def _invites(self, room: RoomState, creator: str, spec: RoomCreationConfig) -> list[Event]:
        extra: dict[str, Any] = {}
        if spec.is_direct:
            extra["is_direct"] = spec.is_direct
        events = []
        for invitee in spec.invite_list:
            event = self.events.build(
                room,
                sender=creator,
                event_type=ev.MEMBER,
                content=self.members.member_content("invite", invitee, extra),
                state_key=invitee,
            )
            self.events.append_to_new_room(room, event)
            events.append(event)
        return events


def _room_version(config: dict[str, Any]) -> RoomVersion:
    version_id = config.get("room_version", room_versions.DEFAULT_ROOM_VERSION)
    if not isinstance(version_id, str):
        raise bad_request("room_version must be a string", BAD_JSON)
    if version_id not in room_versions.ROOM_VERSIONS:
        raise MatrixError(
            400,
            UNSUPPORTED_ROOM_VERSION,
            "Your homeserver does not support this room version",
        )
    return room_versions.ROOM_VERSIONS[version_id]


def _power_level_override(
    config: dict[str, Any], version: RoomVersion, user_id: str
) -> dict[str, Any] | None:
    override = config.get("power_level_content_override")
    if override is not None and not isinstance(override, dict):
        raise bad_request("power_level_content_override must be an object", BAD_JSON)
    if (
        override
        and not version.creator_power
        and "users" in override
        and user_id not in (override.get("users") or {})
    ):
        raise bad_request(
            f"Not a valid power_level_content_override: 'users' did not contain {user_id}"
        )
    return override


def _initial_state(config: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    raw_initial_state = config.get("initial_state", [])
    if not isinstance(raw_initial_state, list):
        raise bad_request("initial_state must be a list", BAD_JSON)
    initial_state: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in raw_initial_state:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("type"), str)
            or not isinstance(entry.get("content"), dict)
            or not isinstance(entry.get("state_key", ""), str)
        ):
            raise bad_request("initial_state entries need a type and a content", BAD_JSON)
        initial_state[(entry["type"], entry.get("state_key", ""))] = entry["content"]
    return initial_state


def _create_content(
    creation_content: dict[str, Any],
    version: RoomVersion,
    preset_name: str,
    invite_list: list[str],
    creator: str,
) -> dict[str, Any]:
    """The create event's content: ``creation_content`` plus the room version, the creator
    (before v11) and, in v12 trusted private chats, the invitees as additional creators."""
    if version.creator_power and preset_name == "trusted_private_chat" and invite_list:
        existing = creation_content.get("additional_creators", [])
        if not isinstance(existing, list) or not all(isinstance(c, str) for c in existing):
            raise bad_request("additional_creators must be an array of user ids")
        creation_content = {
            **creation_content,
            "additional_creators": sorted(set(existing) | set(invite_list)),
        }
    if "additional_creators" in creation_content and version.creator_power:
        extra_creators = creation_content["additional_creators"]
        if not isinstance(extra_creators, list) or not all(
            isinstance(c, str) and is_valid_user_id(c) for c in extra_creators
        ):
            raise bad_request("additional_creators must be an array of user ids")
    create_content = dict(creation_content)
    if not version.implicit_room_creator:
        create_content["creator"] = creator
    create_content["room_version"] = version.identifier
    return create_content


def _power_levels(creator: str, spec: RoomCreationConfig) -> dict[str, Any]:
    """The preset's power levels, with the request's override on top."""
    version = spec.version
    pl_content = default_power_levels(creator, version)
    if spec.preset["original_invitees_have_ops"] and not version.creator_power:
        for invitee in spec.invite_list:
            pl_content["users"][invitee] = 100
    pl_content = _deepmerge(pl_content, spec.preset["power_level_content_override"])
    if spec.power_level_override:
        pl_content.update(spec.power_level_override)
    return pl_content

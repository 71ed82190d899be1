"""Rooms: the in-memory current state of each room, and every way an event gets into one
(create room, send, set state, membership changes, redactions), following Synapse's
RoomCreationHandler / EventCreationHandler / RoomMemberHandler.

Event creation is synchronous from auth check to commit, so two requests for the same room can
never interleave between choosing ``prev_events`` and persisting: the event loop is the lock.
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
    INVALID_PARAM,
    NOT_FOUND,
    ROOM_IN_USE,
    TOO_LARGE,
    UNSUPPORTED_ROOM_VERSION,
    MatrixError,
    bad_request,
    forbidden,
    not_found,
)
from cis_bot.homeserver.events import Event, prune_pdu
from cis_bot.homeserver.handlers import event_auth
from cis_bot.homeserver.ids import (
    canonical_json,
    check_canonical_json_values,
    content_hash,
    is_valid_user_id,
    new_room_id,
    parse_user_id,
    reference_event_id,
    split_id,
)
from cis_bot.homeserver.room_versions import RoomVersion

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from cis_bot.homeserver.appservice.registration import Appservice
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.storage.store import Store

log = structlog.get_logger(__name__)

MAX_PDU_SIZE = 65536

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


def _ensure_strings(content: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in content:
            raise bad_request(f"'{key}' not in content")
        if not isinstance(content[key], str):
            raise bad_request(f"'{key}' not a string type")


def validate_builder(
    room: RoomState, event_type: str, state_key: str | None, content: dict[str, Any]
) -> None:
    """Synapse's EventValidator.validate_builder: shape checks on well-known event types."""
    if event_type == ev.MESSAGE:
        _ensure_strings(content, ("body", "msgtype"))
        return
    if event_type in (ev.TOPIC, ev.NAME):
        _ensure_strings(content, ("topic",) if event_type == ev.TOPIC else ("name",))
    elif event_type == ev.MEMBER:
        if "membership" not in content:
            raise bad_request("Content has not membership key")
        if content["membership"] not in event_auth.MEMBERSHIPS:
            raise bad_request("Invalid membership key")
    elif event_type == ev.TOMBSTONE:
        if "replacement_room" not in content:
            raise bad_request("Content has no replacement_room key")
        if content["replacement_room"] == room.room_id:
            raise bad_request("Tombstone cannot reference the room it was sent in")
    else:
        return
    if state_key is None:
        raise bad_request(f"'{event_type}' must be state events")


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


class RoomHandler:
    def __init__(
        self,
        *,
        store: Store,
        notifier: Notifier,
        server_name: str,
        appservices: Sequence[Appservice] = (),
    ) -> None:
        self.store = store
        self.appservices = list(appservices)
        # Called with (room, event) after each event is persisted (notification counts).
        self.event_listeners: list[Callable[[RoomState, Event], None]] = []
        self.notifier = notifier
        self.server_name = server_name
        self._rooms: dict[str, RoomState] = {}

    # --- room state -----------------------------------------------------------------------

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

    # --- event creation -------------------------------------------------------------------

    def profile_of(self, user_id: str) -> tuple[str | None, str | None]:
        user = self.store.get_user(user_id)
        if user is None:
            return None, None
        return user.displayname, user.avatar_url

    def send(
        self,
        requester: Requester,
        room_id: str,
        event_type: str,
        content: dict[str, Any],
        *,
        state_key: str | None = None,
        txn_id: str | None = None,
        ts: int | None = None,
        redacts: str | None = None,
    ) -> Event:
        """Create, authorise and persist one event from a client (non-membership or state)."""
        if txn_id is not None:
            existing = self.store.event_for_txn(room_id, requester.txn_scope, txn_id)
            if existing is not None:
                return existing
        room = self.get(room_id)
        if room is None:
            raise forbidden(f"User {requester.user_id} not in room {room_id}")
        if event_type == ev.CREATE and state_key == "":
            raise forbidden("Changing the room create event is forbidden")
        if event_type == ev.CANONICAL_ALIAS and state_key == "":
            self._validate_canonical_alias(room_id, content)
        if state_key is not None:
            current = room.state.get((event_type, state_key))
            if (
                current is not None
                and current.sender == requester.user_id
                and canonical_json(current.content) == canonical_json(content)
            ):
                return current  # Synapse's deduplicate_state_event
        if event_type == ev.REDACTION:
            if room.version.updated_redaction_rules:
                if "redacts" in content and redacts is not None and content["redacts"] != redacts:
                    raise bad_request(
                        "Cannot provide a redacts value incoherent with the event_id of the URL "
                        "parameter",
                        INVALID_PARAM,
                    )
                if redacts is not None:
                    content = {**content, "redacts": redacts}
                    redacts = None
                target = content.get("redacts")
            else:
                target = redacts
            if isinstance(target, str):
                self._check_redaction(requester.user_id, room, target)
        return self._create(
            room,
            sender=requester.user_id,
            event_type=event_type,
            content=content,
            state_key=state_key,
            txn_id=txn_id,
            txn_scope=requester.txn_scope if txn_id is not None else None,
            ts=ts,
            redacts=redacts,
        )

    def _validate_canonical_alias(self, room_id: str, content: dict[str, Any]) -> None:
        aliases = []
        alias = content.get("alias")
        if alias is not None:
            aliases.append(alias)
        alt = content.get("alt_aliases")
        if alt is not None:
            if not isinstance(alt, list) or not all(isinstance(a, str) for a in alt):
                raise bad_request("alt_aliases must be a list of strings", BAD_JSON)
            aliases.extend(alt)
        for alias in aliases:
            try:
                split_id(alias, "#")
            except (ValueError, TypeError):
                raise bad_request(f"Invalid alias: {alias}", INVALID_PARAM) from None
            mapping = self.store.get_alias(alias)
            if mapping is None:
                raise MatrixError(404, NOT_FOUND, f"Room alias {alias} not found")
            if mapping[0] != room_id:
                raise MatrixError(
                    400, "M_BAD_ALIAS", f"Room alias {alias} does not point to the room"
                )

    def _check_redaction(self, sender: str, room: RoomState, redacts: str) -> None:
        original = self.store.get_event(redacts)
        if original is not None:
            if original.type == ev.CREATE:
                raise forbidden("Redacting create events is not permitted")
            if original.room_id != room.room_id:
                raise bad_request("Cannot redact event from a different room")
            if original.type == ev.SERVER_ACL:
                raise forbidden("Redacting server ACL events is not permitted")
        if event_auth.can_redact_others(sender, room.state, room.version):
            return
        if original is None:
            raise not_found(f"Could not find event {redacts}")
        if original.sender != sender:
            raise forbidden("You don't have permission to redact events")

    def _create(
        self,
        room: RoomState,
        *,
        sender: str,
        event_type: str,
        content: dict[str, Any],
        state_key: str | None = None,
        txn_id: str | None = None,
        txn_scope: str | None = None,
        ts: int | None = None,
        redacts: str | None = None,
        skip_auth: bool = False,
    ) -> Event:
        pdu = self._build(
            room,
            sender=sender,
            event_type=event_type,
            content=content,
            state_key=state_key,
            ts=ts,
            redacts=redacts,
            skip_auth=skip_auth,
        )
        event = Event(
            event_id=reference_event_id(prune_pdu(pdu, room.version)),
            pdu=pdu,
            txn_id=txn_id,
            txn_scope=txn_scope,
        )
        return self._persist(room, event)

    def _build(
        self,
        room: RoomState,
        *,
        sender: str,
        event_type: str,
        content: dict[str, Any],
        state_key: str | None,
        ts: int | None,
        redacts: str | None,
        skip_auth: bool,
    ) -> dict[str, Any]:
        validate_builder(room, event_type, state_key, content)
        for name, value in (("type", event_type), ("state_key", state_key)):
            if value is not None and len(value.encode("utf-8")) > 255:
                raise MatrixError(413, TOO_LARGE, f"'{name}' too large")
        check_canonical_json_values(content)
        if event_type == ev.POWER_LEVELS:
            event_auth.check_power_levels_schema(content)
        if not skip_auth:
            event_auth.check_event(
                event_type=event_type,
                state_key=state_key,
                sender=sender,
                content=content,
                state=room.state,
                version=room.version,
                room_id=room.room_id,
            )
        elif event_type == ev.POWER_LEVELS:
            event_auth.validate_power_levels_content(content, room.state, room.version)
        pdu: dict[str, Any] = {
            "auth_events": self._auth_event_ids(room, event_type, state_key, sender, content),
            "content": content,
            "depth": room.depth + 1,
            "origin_server_ts": ts if ts is not None else int(time.time() * 1000),
            "prev_events": [room.last_event_id] if room.last_event_id else [],
            "room_id": room.room_id,
            "sender": sender,
            "type": event_type,
        }
        if state_key is not None:
            pdu["state_key"] = state_key
        if redacts is not None:
            pdu["redacts"] = redacts
        pdu["hashes"] = {"sha256": content_hash(pdu)}
        if len(canonical_json(pdu)) > MAX_PDU_SIZE:
            raise MatrixError(413, TOO_LARGE, "event too large")
        return pdu

    def _persist(self, room: RoomState, event: Event) -> Event:
        state_key = event.state_key
        if state_key is not None:
            replaced = room.state.get((event.type, state_key))
            event.prev_state = replaced.event_id if replaced is not None else None
        event.stream = self.store.next_stream()
        self.store.persist_event(event, update_state=True)
        room.apply(event)
        if event.type == ev.REDACTION and event.redacts is not None:
            self.store.mark_redacted(event.redacts, event.event_id)
        self._notify(room, event)
        return event

    @staticmethod
    def _auth_event_ids(
        room: RoomState,
        event_type: str,
        state_key: str | None,
        sender: str,
        content: dict[str, Any],
    ) -> list[str]:
        if event_type == ev.CREATE:
            return []
        keys = [(ev.POWER_LEVELS, ""), (ev.MEMBER, sender)]
        if not room.version.room_id_from_create:
            keys.insert(0, (ev.CREATE, ""))
        if event_type == ev.MEMBER and state_key is not None:
            keys.append((ev.MEMBER, state_key))
            if content.get("membership") in ("join", "invite", "knock"):
                keys.append((ev.JOIN_RULES, ""))
        ids = []
        for key in keys:
            found = room.state.get(key)
            if found is not None and found.event_id not in ids:
                ids.append(found.event_id)
        return ids

    def _notify(self, room: RoomState, event: Event) -> None:
        for listener in self.event_listeners:
            listener(room, event)
        users = set(room.joined)
        if event.type == ev.MEMBER and event.state_key is not None:
            users.add(event.state_key)
        self.notifier.notify_users(users)
        self.notifier.notify_stream()

    # --- rooms ----------------------------------------------------------------------------

    def create_room(self, requester: Requester, config: dict[str, Any]) -> str:
        user_id = requester.user_id
        invite_list = config.get("invite", [])
        if not isinstance(invite_list, list):
            raise bad_request("invite must be a list", BAD_JSON)
        invite_3pid = config.get("invite_3pid", [])
        if invite_3pid:
            raise MatrixError(
                400, "M_MISSING_PARAM", "3pid invites are not supported by this server"
            )
        version_id = config.get("room_version", room_versions.DEFAULT_ROOM_VERSION)
        if not isinstance(version_id, str):
            raise bad_request("room_version must be a string", BAD_JSON)
        if version_id not in room_versions.ROOM_VERSIONS:
            raise MatrixError(
                400,
                UNSUPPORTED_ROOM_VERSION,
                "Your homeserver does not support this room version",
            )
        version = room_versions.ROOM_VERSIONS[version_id]
        alias: str | None = None
        if "room_alias_name" in config:
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
            elif self.alias_exclusive_to_other(alias, user_id):
                raise MatrixError(
                    400, "M_EXCLUSIVE", "This alias is reserved by an application service."
                )
        for invitee in invite_list:
            try:
                parse_user_id(invitee)
            except MatrixError:
                raise bad_request(f"Invalid user_id: {invitee}") from None
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
        visibility = config.get("visibility", "private")
        preset_name = config.get(
            "preset", "private_chat" if visibility == "private" else "public_chat"
        )
        preset = PRESETS.get(preset_name) if isinstance(preset_name, str) else None
        if preset is None:
            raise bad_request(f"'{preset_name}' is not a valid preset", BAD_JSON)
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

        if version.creator_power and preset_name == "trusted_private_chat" and invite_list:
            existing = creation_content.get("additional_creators", [])
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
            create_content["creator"] = user_id
        create_content["room_version"] = version.identifier
        room = self._new_room(user_id, version, create_content, visibility == "public")
        room_id = room.room_id
        if alias is not None:
            self.store.create_alias(alias, room_id, user_id)

        def send(etype: str, content: dict[str, Any], state_key: str = "") -> Event:
            return self._create(
                room,
                sender=user_id,
                event_type=etype,
                content=content,
                state_key=state_key,
                skip_auth=True,
            )

        send(ev.MEMBER, self._member_content("join", user_id), user_id)

        pl_content = initial_state.pop((ev.POWER_LEVELS, ""), None)
        if pl_content is None:
            pl_content = default_power_levels(user_id, version)
            if preset["original_invitees_have_ops"] and not version.creator_power:
                for invitee in invite_list:
                    pl_content["users"][invitee] = 100
            pl_content = _deepmerge(pl_content, preset["power_level_content_override"])
            if override:
                pl_content.update(override)
        send(ev.POWER_LEVELS, pl_content)
        if alias is not None and (ev.CANONICAL_ALIAS, "") not in initial_state:
            send(ev.CANONICAL_ALIAS, {"alias": alias})
        if (ev.JOIN_RULES, "") not in initial_state:
            send(ev.JOIN_RULES, {"join_rule": preset["join_rules"]})
        if (ev.HISTORY_VISIBILITY, "") not in initial_state:
            send(ev.HISTORY_VISIBILITY, {"history_visibility": preset["history_visibility"]})
        if preset["guest_can_join"] and (ev.GUEST_ACCESS, "") not in initial_state:
            send(ev.GUEST_ACCESS, {"guest_access": "can_join"})
        for (etype, state_key), content in initial_state.items():
            send(etype, content, state_key)
        if "name" in config:
            send(ev.NAME, {"name": config["name"]})
        if "topic" in config:
            topic = config["topic"]
            send(ev.TOPIC, {"topic": topic, "m.topic": {"m.text": [{"body": topic}]}})

        extra: dict[str, Any] = {}
        if config.get("is_direct"):
            extra["is_direct"] = config["is_direct"]
        for invitee in invite_list:
            self._create(
                room,
                sender=user_id,
                event_type=ev.MEMBER,
                content=self._member_content("invite", invitee, extra),
                state_key=invitee,
            )
        log.info("room.created", room_id=room_id, creator=user_id, preset=preset_name)
        return room_id

    def _new_room(
        self, creator: str, version: RoomVersion, create_content: dict[str, Any], public: bool
    ) -> RoomState:
        """Store the room and its create event. v12 room ids are the create event's hash."""
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
            event_id = reference_event_id(prune_pdu(pdu, version))
            room_id = pdu.get("room_id") or "!" + event_id[1:]
            if self.store.get_room(room_id) is None:
                break
            time.sleep(0.001)  # same create content in the same millisecond: take the next one
        self.store.create_room(room_id, version.identifier, creator, public)
        room = RoomState(
            room_id=room_id,
            version=version,
            state={},
            last_event_id=None,
            depth=0,
            last_stream=0,
        )
        self._rooms[room_id] = room
        self._persist(room, Event(event_id=event_id, pdu=pdu))
        return room

    def _member_content(
        self, membership: str, target: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        content: dict[str, Any] = dict(extra or {})
        content["membership"] = membership
        if membership in ("join", "invite", "knock"):
            displayname, avatar_url = self.profile_of(target)
            if "displayname" not in content and displayname is not None:
                content["displayname"] = displayname
            if "avatar_url" not in content and avatar_url is not None:
                content["avatar_url"] = avatar_url
        return content

    # --- membership -----------------------------------------------------------------------

    def update_membership(
        self,
        requester: Requester,
        room_id: str,
        target: str,
        action: str,
        *,
        content: dict[str, Any] | None = None,
        txn_id: str | None = None,
    ) -> Event:
        """join/invite/leave/ban/unban/kick, or a raw PUT of an m.room.member state event."""
        if txn_id is not None:
            existing = self.store.event_for_txn(room_id, requester.txn_scope, txn_id)
            if existing is not None:
                return existing
        parse_user_id(target)
        effective = {"kick": "leave", "unban": "leave"}.get(action, action)
        if effective not in event_auth.MEMBERSHIPS:
            raise bad_request("Invalid membership key")
        room = self.get(room_id)
        if room is None:
            if effective == "join":
                raise MatrixError(404, "M_UNKNOWN", "No known servers")
            raise forbidden("Unknown room")
        current = room.state.get((ev.MEMBER, target))
        current_membership = current.membership if current is not None else None
        if current is not None:
            if action == "unban" and current_membership != "ban":
                raise MatrixError(
                    403,
                    "M_BAD_STATE",
                    f"Cannot unban user who was not banned (membership={current_membership})",
                )
            if current_membership == "ban" and action not in ("ban", "unban", "leave"):
                raise MatrixError(403, "M_BAD_STATE", f"Cannot {action} user who was banned")
            if current_membership in ("ban", "leave") and action == "kick":
                raise forbidden("The target user is not in the room")
        elif action == "kick":
            raise forbidden("The target user is not in the room")
        body = self._member_content(effective, target, content)
        if (
            current is not None
            and current.membership == effective
            and current.sender == requester.user_id
            and current.content == body
        ):
            return current  # Synapse drops no-op membership changes
        return self._create(
            room,
            sender=requester.user_id,
            event_type=ev.MEMBER,
            content=body,
            state_key=target,
            txn_id=txn_id,
            txn_scope=requester.txn_scope if txn_id is not None else None,
        )

    def propagate_profile(self, requester: Requester, field: str, value: str | None) -> None:
        """A profile change re-sends the user's join event in every joined room (Synapse)."""
        user_id = requester.user_id
        for room_id in self.joined_rooms(user_id):
            room = self.get(room_id)
            current = room.state.get((ev.MEMBER, user_id)) if room is not None else None
            if room is None or current is None:
                continue
            content = dict(current.content)
            if value is None:
                content.pop(field, None)
            else:
                content[field] = value
            if content == current.content:
                continue
            try:
                self._create(
                    room, sender=user_id, event_type=ev.MEMBER, content=content, state_key=user_id
                )
            except MatrixError as err:
                log.warning("profile.propagate_failed", room_id=room_id, error=err.message)

    # --- aliases --------------------------------------------------------------------------

    def resolve_room(self, room_or_alias: str) -> str:
        if room_or_alias.startswith("!"):
            return room_or_alias
        if room_or_alias.startswith("#"):
            try:
                split_id(room_or_alias, "#")
            except ValueError:
                raise bad_request(f"Invalid room alias {room_or_alias}", INVALID_PARAM) from None
            mapping = self.store.get_alias(room_or_alias)
            if mapping is None:
                raise MatrixError(404, NOT_FOUND, f"Room alias {room_or_alias} not found")
            return mapping[0]
        raise bad_request(f"{room_or_alias} was not legal room ID or room alias", INVALID_PARAM)

    def alias_exclusive_to_other(self, alias: str, user_id: str) -> bool:
        """Synapse's can_modify_alias, negated: an appservice other than the user holds an
        exclusive claim on the alias."""
        for service in self.appservices:
            if not service.is_alias_in_namespace(alias):
                continue
            if service.sender == user_id:
                return False
            if service.is_exclusive_alias(alias):
                return True
        return False

    def check_alias_syntax(self, alias: str) -> tuple[str, str]:
        try:
            localpart, server = split_id(alias, "#")
        except ValueError:
            raise bad_request("Room alias invalid", INVALID_PARAM) from None
        return localpart, server

    def create_alias(
        self,
        requester: Requester,
        alias: str,
        room_id: str,
        *,
        is_admin: bool,
        check_membership: bool = True,
    ) -> None:
        """Synapse's DirectoryHandler.create_association."""
        localpart, server = self.check_alias_syntax(alias)
        if len(alias) > 255:
            raise bad_request("Can't create aliases longer than 255 characters", INVALID_PARAM)
        service = requester.appservice
        if service is not None:
            if not service.is_alias_in_namespace(alias):
                raise MatrixError(
                    400,
                    "M_EXCLUSIVE",
                    "This application service has not reserved this kind of alias.",
                )
        else:
            if check_membership and not is_admin:
                room = self.get(room_id)
                if room is None or room.membership(requester.user_id) != "join":
                    raise forbidden("You must be in the room to create an alias for it")
            if self.alias_exclusive_to_other(alias, requester.user_id):
                raise MatrixError(
                    400, "M_EXCLUSIVE", "This alias is reserved by an application service."
                )
        if any(ch in localpart for ch in string.whitespace):
            raise bad_request("Invalid characters in room alias")
        if server != self.server_name:
            raise bad_request("Room alias must be local")
        if not self.store.create_alias(alias, room_id, requester.user_id):
            raise MatrixError(409, "M_UNKNOWN", f"Room alias {alias} already exists")

    def delete_alias(self, requester: Requester, alias: str, is_admin: bool) -> None:
        self.check_alias_syntax(alias)
        service = requester.appservice
        if service is not None:
            if not service.is_alias_in_namespace(alias):
                raise MatrixError(
                    400,
                    "M_EXCLUSIVE",
                    "This application service has not reserved this kind of alias",
                )
            if self.store.get_alias(alias) is None:
                raise MatrixError(404, NOT_FOUND, "Unknown room alias")
            self.store.delete_alias(alias)
            return
        mapping = self.store.get_alias(alias)
        if mapping is None:
            raise MatrixError(404, NOT_FOUND, "Unknown room alias")
        room_id, creator = mapping
        allowed = is_admin or creator == requester.user_id
        if not allowed:
            room = self.get(room_id)
            if room is not None and room.membership(requester.user_id) == "join":
                level = event_auth.user_power_level(requester.user_id, room.state, room.version)
                allowed = level >= event_auth.send_level(ev.CANONICAL_ALIAS, "", room.state)
        if not allowed:
            raise forbidden("You don't have permission to delete the alias.")
        if self.alias_exclusive_to_other(alias, requester.user_id):
            raise MatrixError(
                400, "M_EXCLUSIVE", "This alias is reserved by an application service."
            )
        self.store.delete_alias(alias)

"""Event creation: every event a client sends (messages, state, redactions) is validated,
authorised, built into a PDU, persisted and announced here (Synapse's EventCreationHandler,
with the EventValidator's shape checks). Room creation and membership changes build their events
through it too.

Event creation is synchronous from auth check to commit, so two requests for the same room can
never interleave between choosing ``prev_events`` and persisting: the event loop is the lock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.errors import (
    BAD_JSON,
    INVALID_PARAM,
    NOT_FOUND,
    TOO_LARGE,
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
    reference_event_id,
    split_id,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.handlers.room_state import RoomState, RoomStateHandler
    from cis_bot.homeserver.storage.store import Store

log = structlog.get_logger(__name__)

MAX_PDU_SIZE = 65536


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


class EventCreationHandler:
    def __init__(self, *, store: Store, rooms: RoomStateHandler, notifier: Notifier) -> None:
        self.store = store
        self.rooms = rooms
        self.notifier = notifier
        # Called with (room, event) after each event is persisted (notification counts).
        self.event_listeners: list[Callable[[RoomState, Event], None]] = []

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
        room = self.rooms.get(room_id)
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
        return self.create(
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

    def create(
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
        """Build, authorise and persist one event in ``room``; raises MatrixError for anything
        the rules refuse."""
        event = self.build(
            room,
            sender=sender,
            event_type=event_type,
            content=content,
            state_key=state_key,
            txn_id=txn_id,
            txn_scope=txn_scope,
            ts=ts,
            redacts=redacts,
            skip_auth=skip_auth,
        )
        return self.persist(room, event)

    def build(
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
        """Validate, authorise (unless ``skip_auth``: room creation's initial state) and build
        one event against ``room``'s current state, storing nothing."""
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
        return Event(
            event_id=reference_event_id(prune_pdu(pdu, room.version)),
            pdu=pdu,
            txn_id=txn_id,
            txn_scope=txn_scope,
        )

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

    def persist(self, room: RoomState, event: Event) -> Event:
        """Store an already-built event, apply it to the room's state and wake its readers."""
        self._place(room, event)
        self.store.persist_event(event, update_state=True)
        room.apply(event)
        if event.type == ev.REDACTION and event.redacts is not None:
            self.store.mark_redacted(event.redacts, event.event_id)
        self.announce(room, [event])
        return event

    def append_to_new_room(self, room: RoomState, event: Event) -> None:
        """Room creation: add a built event to a room that exists only in memory until its
        creation commits (the room's events are stored together, then announced)."""
        self._place(room, event)
        room.apply(event)

    def _place(self, room: RoomState, event: Event) -> None:
        """The event's position in the stream and the state event it replaces."""
        state_key = event.state_key
        if state_key is not None:
            replaced = room.state.get((event.type, state_key))
            event.prev_state = replaced.event_id if replaced is not None else None
        event.stream = self.store.next_stream()

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

    def announce(self, room: RoomState, events: Sequence[Event]) -> None:
        """Events just stored: tell the listeners, wake the room's members and the targets of
        membership changes."""
        users = set(room.joined)
        for event in events:
            for listener in self.event_listeners:
                listener(room, event)
            if event.type == ev.MEMBER and event.state_key is not None:
                users.add(event.state_key)
        self.notifier.notify_users(users)
        self.notifier.notify_stream()

"""Unread notification counts for ``/sync`` (``unread_notifications``): how many events since
the user's read receipt the push rules say notify, and how many of those highlight.

Only the server-default rules are evaluated (plus the user's master switch), the way Synapse
evaluates them for a fresh account: no push gateways exist here, the counts are for the
clients' unread badges. Counts live in memory, are updated as events arrive and recomputed
from the database after a receipt or a restart.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.handlers import event_auth
from cis_bot.homeserver.pushrules_defaults import DEFAULT_RULES

if TYPE_CHECKING:
    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.handlers.room_state import RoomState, RoomStateHandler
    from cis_bot.homeserver.storage.store import Store

MAX_SCAN = 5000  # events looked at when recounting one room from the database


def _word_match(text: Any, word: str) -> bool:
    if not isinstance(text, str) or not word:
        return False
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text, re.IGNORECASE) is not None


# Rules that notify, and whether they highlight (the rest of the defaults notify nobody).
_HIGHLIGHTS = {
    ".m.rule.is_user_mention": True,
    ".m.rule.contains_display_name": True,
    ".m.rule.is_room_mention": True,
    ".m.rule.roomnotif": True,
    ".m.rule.tombstone": True,
    ".m.rule.contains_user_name": True,
    ".m.rule.call": False,
    ".m.rule.encrypted_room_one_to_one": False,
    ".m.rule.room_one_to_one": False,
    ".m.rule.message": False,
    ".m.rule.encrypted": False,
    ".im.vector.jitsi": False,
}


def matching_rule(event: Event, user_id: str, room: RoomState) -> str | None:
    """The id of the first default push rule that matches ``event`` for ``user_id``."""
    if event.sender == user_id:
        return None
    content = event.content
    event_type = event.type
    if event_type == ev.MEMBER:
        return ".m.rule.member_event"  # (invites count in the invited room)
    if content.get("msgtype") == "m.notice":
        return ".m.rule.suppress_notices"
    mentions = content.get("m.mentions")
    if isinstance(mentions, dict):
        user_ids = mentions.get("user_ids")
        if isinstance(user_ids, list) and user_id in user_ids:
            return ".m.rule.is_user_mention"
    body = content.get("body")
    member = room.state.get((ev.MEMBER, user_id))
    displayname = member.content.get("displayname") if member is not None else None
    if isinstance(displayname, str) and _word_match(body, displayname):
        return ".m.rule.contains_display_name"
    sender_level = event_auth.user_power_level(event.sender, room.state, room.version)
    pl = room.state.get((ev.POWER_LEVELS, ""))
    notifications = (pl.content.get("notifications") if pl is not None else None) or {}
    room_level = notifications.get("room", 50) if isinstance(notifications, dict) else 50
    may_notify_room = isinstance(room_level, int) and sender_level >= room_level
    if may_notify_room and isinstance(mentions, dict) and mentions.get("room") is True:
        return ".m.rule.is_room_mention"
    if may_notify_room and isinstance(body, str) and "@room" in body:
        return ".m.rule.roomnotif"
    if event_type == ev.TOMBSTONE and event.state_key == "":
        return ".m.rule.tombstone"
    if event_type == "m.reaction":
        return ".m.rule.reaction"
    if event_type == ev.SERVER_ACL:
        return ".m.rule.room.server_acl"
    relates = content.get("m.relates_to")
    if isinstance(relates, dict) and relates.get("rel_type") == "m.replace":
        return ".m.rule.suppress_edits"
    if _word_match(body, user_id[1:].split(":", 1)[0]):
        return ".m.rule.contains_user_name"
    if event_type == "m.call.invite":
        return ".m.rule.call"
    if event_type in (ev.MESSAGE, "m.room.encrypted"):
        one_to_one = len(room.joined) == 2
        if event_type == ev.MESSAGE:
            return ".m.rule.room_one_to_one" if one_to_one else ".m.rule.message"
        return ".m.rule.encrypted_room_one_to_one" if one_to_one else ".m.rule.encrypted"
    if (
        event_type == "im.vector.modular.widgets"
        and content.get("type") == "jitsi"
        and event.state_key is not None
    ):
        return ".im.vector.jitsi"
    return None


def push_actions(event: Event, user_id: str, room: RoomState) -> tuple[bool, bool]:
    """(notify, highlight) of the default push rules for ``user_id`` and ``event``."""
    rule = matching_rule(event, user_id, room)
    if rule not in _HIGHLIGHTS:
        return False, False
    return True, _HIGHLIGHTS[rule]


def rule_actions(rule_id: str) -> list[Any]:
    """The actions of a default rule, as ``GET /pushrules/`` shows them."""
    for rules in DEFAULT_RULES.values():
        for rule in rules:
            if rule["rule_id"] == rule_id:
                return list(rule["actions"])
    return []


class NotificationCounts:
    def __init__(self, store: Store, rooms: RoomStateHandler) -> None:
        self.store = store
        self.rooms = rooms
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._muted: dict[str, bool] = {}

    def counts(self, user_id: str, room: RoomState) -> dict[str, int]:
        key = (user_id, room.room_id)
        found = self._counts.get(key)
        if found is None:
            found = self._recount(user_id, room)
            self._counts[key] = found
        return {"notification_count": found[0], "highlight_count": found[1]}

    def on_event(self, room: RoomState, event: Event) -> None:
        """A new event: bump the counts of the members already being tracked."""
        if not self._counts:
            return
        for user_id in room.joined:
            found = self._counts.get((user_id, room.room_id))
            if found is None or self._is_muted(user_id):
                continue
            notify, highlight = push_actions(event, user_id, room)
            if notify:
                found[0] += 1
                if highlight:
                    found[1] += 1

    def on_read(self, user_id: str, room_id: str) -> None:
        self._counts.pop((user_id, room_id), None)

    def on_rules_changed(self, user_id: str) -> None:
        self._muted.pop(user_id, None)
        for key in [k for k in self._counts if k[0] == user_id]:
            del self._counts[key]

    def _is_muted(self, user_id: str) -> bool:
        muted = self._muted.get(user_id)
        if muted is None:
            muted = any(
                kind == "override" and rule_id == ".m.rule.master" and enabled is True
                for kind, rule_id, _, enabled, _ in self.store.push_rule_overrides(user_id)
            )
            self._muted[user_id] = muted
        return muted

    def _recount(self, user_id: str, room: RoomState) -> list[int]:
        if self._is_muted(user_id):
            return [0, 0]
        since = self.store.read_position(room.room_id, user_id)
        if since is None:
            member = room.state.get((ev.MEMBER, user_id))
            since = member.stream if member is not None else self.store.current_stream
        notify = highlight = 0
        for event in self.store.room_events(
            room.room_id, after=since, limit=MAX_SCAN, backwards=False
        ):
            wants, loud = push_actions(event, user_id, room)
            notify += wants
            highlight += wants and loud
        return [notify, highlight]

    def notifications(
        self, user_id: str, before: int | None, limit: int, only_highlight: bool
    ) -> list[tuple[RoomState, Event, list[Any], bool]]:
        """``GET /notifications``: (room, event, actions, read) of the events that notified
        ``user_id`` in the rooms they are in, newest first, before stream position ``before``.
        Synapse records push actions as events arrive; the same default rules are evaluated
        here from the rooms' history (since each join, up to MAX_SCAN events per room)."""
        if self._is_muted(user_id):
            return []
        found: list[tuple[int, RoomState, Event, list[Any]]] = []
        for room_id in self.rooms.joined_rooms(user_id):
            room = self.rooms.get(room_id)
            member = room.state.get((ev.MEMBER, user_id)) if room is not None else None
            if room is None or member is None:
                continue
            for event in self.store.room_events(
                room_id,
                after=member.stream,
                upto=None if before is None else before - 1,
                limit=MAX_SCAN,
                backwards=True,
            ):
                rule = matching_rule(event, user_id, room)
                if rule not in _HIGHLIGHTS or (only_highlight and not _HIGHLIGHTS[rule]):
                    continue
                found.append((event.stream, room, event, rule_actions(rule)))
        found.sort(key=lambda item: item[0], reverse=True)
        read_upto: dict[str, int | None] = {}
        listed = []
        for _, room, event, actions in found[:limit]:
            if room.room_id not in read_upto:
                read_upto[room.room_id] = self.store.read_position(room.room_id, user_id)
            position = read_upto[room.room_id]
            listed.append((room, event, actions, position is not None and position >= event.stream))
        return listed

"""Events as stored (the PDU JSON) and as clients see them.

A single-server room is a straight line: every event has the previous one as its only
``prev_events`` and ``depth`` = previous + 1, so the stream ordering is also the topological one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from cis_bot.homeserver.room_versions import RoomVersion

MEMBER = "m.room.member"
MESSAGE = "m.room.message"
CREATE = "m.room.create"
POWER_LEVELS = "m.room.power_levels"
JOIN_RULES = "m.room.join_rules"
HISTORY_VISIBILITY = "m.room.history_visibility"
GUEST_ACCESS = "m.room.guest_access"
NAME = "m.room.name"
TOPIC = "m.room.topic"
AVATAR = "m.room.avatar"
CANONICAL_ALIAS = "m.room.canonical_alias"
ENCRYPTION = "m.room.encryption"
REDACTION = "m.room.redaction"
TOMBSTONE = "m.room.tombstone"
SERVER_ACL = "m.room.server_acl"

# The redaction algorithm: which top-level and content keys survive (v10, and v11+).
_KEPT_TOP_LEVEL_V11 = frozenset(
    {
        "event_id",
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "hashes",
        "signatures",
        "depth",
        "prev_events",
        "auth_events",
        "origin_server_ts",
    }
)
_KEPT_TOP_LEVEL_V10 = _KEPT_TOP_LEVEL_V11 | {"prev_state", "origin", "membership"}
_PL_KEYS = ("ban", "events", "events_default", "kick", "redact", "state_default", "users")
_KEPT_CONTENT_V10: dict[str, tuple[str, ...]] = {
    MEMBER: ("membership", "join_authorised_via_users_server"),
    CREATE: ("creator",),
    JOIN_RULES: ("join_rule", "allow"),
    POWER_LEVELS: (*_PL_KEYS, "users_default"),
    HISTORY_VISIBILITY: ("history_visibility",),
}
_KEPT_CONTENT_V11: dict[str, tuple[str, ...]] = {
    **_KEPT_CONTENT_V10,
    POWER_LEVELS: (*_PL_KEYS, "users_default", "invite"),
    "m.room.redaction": ("redacts",),
}

# Stripped state a user sees for a room they are invited to (Synapse's room_prejoin_state).
PREJOIN_STATE_TYPES = (CREATE, JOIN_RULES, CANONICAL_ALIAS, AVATAR, ENCRYPTION, NAME, TOPIC)


def prune_pdu(pdu: dict[str, Any], version: RoomVersion) -> dict[str, Any]:
    """The redaction algorithm of the room version, applied to a PDU."""
    v11 = version.updated_redaction_rules
    top = _KEPT_TOP_LEVEL_V11 if v11 else _KEPT_TOP_LEVEL_V10
    pruned = {k: v for k, v in pdu.items() if k in top}
    event_type = str(pdu.get("type"))
    content = pdu.get("content") or {}
    if v11 and event_type == CREATE:
        pruned["content"] = dict(content)
        return pruned
    kept = (_KEPT_CONTENT_V11 if v11 else _KEPT_CONTENT_V10).get(event_type, ())
    pruned["content"] = {k: content[k] for k in kept if k in content}
    if v11 and event_type == MEMBER:
        signed = (content.get("third_party_invite") or {}).get("signed")
        if isinstance(signed, dict):
            pruned["content"]["third_party_invite"] = {"signed": signed}
    return pruned


@attrs.define(slots=True, eq=False)
class Event:
    """A persisted (or about to be persisted) event.

    ``pdu`` is the full event JSON without ``event_id`` (v4+ ids are derived from the content);
    ``stream`` is the global stream ordering (0 until persisted). ``prev_state`` names the state
    event this one replaced, for ``unsigned.replaces_state``/``prev_content``.
    """

    event_id: str
    pdu: dict[str, Any]
    stream: int = 0
    txn_id: str | None = None
    txn_scope: str | None = None
    prev_state: str | None = None
    redacted_by: str | None = None

    @property
    def type(self) -> str:
        return str(self.pdu["type"])

    @property
    def room_id(self) -> str:
        # A v12 create event has no room_id: the room id is derived from its event id.
        room_id = self.pdu.get("room_id")
        return str(room_id) if room_id is not None else "!" + self.event_id[1:]

    @property
    def sender(self) -> str:
        return str(self.pdu["sender"])

    @property
    def state_key(self) -> str | None:
        key = self.pdu.get("state_key")
        return None if key is None else str(key)

    @property
    def is_state(self) -> bool:
        return "state_key" in self.pdu

    @property
    def content(self) -> dict[str, Any]:
        content: dict[str, Any] = self.pdu["content"]
        return content

    @property
    def depth(self) -> int:
        return int(self.pdu["depth"])

    @property
    def origin_server_ts(self) -> int:
        return int(self.pdu["origin_server_ts"])

    @property
    def membership(self) -> str | None:
        if self.type != MEMBER:
            return None
        value = self.content.get("membership")
        return value if isinstance(value, str) else None

    @property
    def redacts(self) -> str | None:
        value = self.pdu.get("redacts") or self.content.get("redacts")
        return value if isinstance(value, str) else None

    def visible_content(self, version: RoomVersion) -> dict[str, Any]:
        """Content as clients see it: pruned once redacted."""
        if self.redacted_by is None:
            return self.content
        pruned: dict[str, Any] = prune_pdu(self.pdu, version)["content"]
        return pruned

    def stripped(self, version: RoomVersion) -> dict[str, Any]:
        """Stripped state event (invite_state)."""
        return {
            "type": self.type,
            "state_key": self.state_key,
            "content": self.visible_content(version),
            "sender": self.sender,
        }

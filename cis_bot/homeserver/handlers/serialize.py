"""Client formats of an event (synapse/events/utils.py):

- ``v1`` (the default for /messages, /state, /event, appservice transactions): v2 plus a
  top-level ``user_id`` and copies of ``age``/``prev_content``/``replaces_state`` from unsigned;
- ``v2`` (``/state/{type}/{key}?format=event``): federation keys stripped;
- ``sync``: v2 without ``room_id``.
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver import room_versions
from cis_bot.homeserver.events import CREATE, REDACTION

if TYPE_CHECKING:
    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.room_versions import RoomVersion
    from cis_bot.homeserver.storage.store import Store

_V1_COPIED = ("age", "redacted_because", "replaces_state", "prev_content")


class Serializer:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._versions: dict[str, RoomVersion] = {}

    def version_of(self, room_id: str) -> RoomVersion:
        version = self._versions.get(room_id)
        if version is None:
            row = self.store.get_room(room_id)
            version = room_versions.get(row.room_version if row else "10")
            self._versions[room_id] = version
        return version

    def client_event(
        self,
        event: Event,
        fmt: str = "v1",
        *,
        txn_scope: str | None = None,
        now_ms: int | None = None,
        membership: str | None = None,
    ) -> dict[str, Any]:
        """``membership``: the requesting user's membership at this event (MSC4115, which
        Synapse puts in ``unsigned.membership`` for timelines)."""
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        version = self.version_of(event.room_id)
        unsigned: dict[str, Any] = {"age": max(0, now - event.origin_server_ts)}
        d: dict[str, Any] = {
            "content": event.visible_content(version),
            "event_id": event.event_id,
            "origin_server_ts": event.origin_server_ts,
            "room_id": event.room_id,
            "sender": event.sender,
            "type": event.type,
            "unsigned": unsigned,
        }
        if event.is_state:
            d["state_key"] = event.state_key
        if event.prev_state is not None:
            previous = self.store.get_event(event.prev_state)
            if previous is not None:
                unsigned["replaces_state"] = previous.event_id
                unsigned["prev_content"] = previous.visible_content(version)
                unsigned["prev_sender"] = previous.sender
        if event.redacted_by is not None:
            redaction = self.store.get_event(event.redacted_by)
            unsigned["redacted_by"] = event.redacted_by
            if redaction is not None:
                unsigned["redacted_because"] = self.client_event(
                    redaction, fmt, txn_scope=txn_scope, now_ms=now
                )
        if txn_scope is not None and event.txn_id is not None and event.txn_scope == txn_scope:
            unsigned["transaction_id"] = event.txn_id
        if membership is not None:
            unsigned["membership"] = membership
        if event.type == REDACTION and event.redacts is not None:
            # Both places, whatever the room version (Synapse does the same for compatibility).
            d["redacts"] = event.redacts
            if "redacts" not in d["content"]:
                d["content"] = {**d["content"], "redacts": event.redacts}
        if fmt == "sync" and not (event.type == CREATE and "room_id" not in event.pdu):
            # (Synapse leaves room_id on v12 create events, whose PDU has none to strip.)
            del d["room_id"]
        elif fmt == "v1":
            d["user_id"] = event.sender
            for key in _V1_COPIED:
                if key in unsigned:
                    d[key] = unsigned[key]
        return d

    def memberships_at(self, user_id: str, room_id: str, events: list[Event]) -> list[str]:
        """The user's membership right after each event ("leave" when none yet)."""
        history = self.store.membership_history(user_id, room_id)
        streams = [stream for stream, _ in history]
        result = []
        for event in events:
            index = bisect.bisect_right(streams, event.stream) - 1
            result.append(history[index][1] if index >= 0 else "leave")
        return result

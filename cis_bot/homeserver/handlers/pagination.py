"""``/rooms/{roomId}/messages`` (synapse/handlers/pagination.py).

Tokens are ``s{N}``: a position between events. Going backwards from ``s{N}`` returns events at
or before N, newest first; going forwards returns events after N.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.handlers.tokens import parse_pagination_token

if TYPE_CHECKING:
    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.filtering import EventFilter
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.room_state import RoomStateHandler
    from cis_bot.homeserver.handlers.serialize import Serializer
    from cis_bot.homeserver.handlers.visibility import Visibility
    from cis_bot.homeserver.storage.store import Store

MAX_LIMIT = 1000
_SCAN = 200


class PaginationHandler:
    def __init__(
        self, store: Store, rooms: RoomStateHandler, serializer: Serializer, visibility: Visibility
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.serializer = serializer
        self.visibility = visibility

    def messages(
        self,
        requester: Requester,
        room_id: str,
        *,
        from_token: str | None,
        to_token: str | None,
        direction: str,
        limit: int,
        event_filter: EventFilter,
    ) -> dict[str, Any]:
        room, visible_upto = self.rooms.check_can_read(room_id, requester.user_id)
        limit = min(max(limit, 0), MAX_LIMIT)
        backwards = direction == "b"
        if from_token is not None:
            position = parse_pagination_token(from_token)
        else:
            position = self.store.current_stream if backwards else 0
        start = from_token if from_token is not None else f"s{position}"
        stop = parse_pagination_token(to_token) if to_token is not None else None

        chunk: list[Event] = []
        cursor = position
        while len(chunk) < limit:
            upto: int | None
            if backwards:
                upto = cursor if visible_upto is None else min(cursor, visible_upto)
                batch = self.store.room_events(
                    room_id, after=stop, upto=upto, limit=_SCAN, backwards=True
                )
            else:
                upto = stop if stop is not None else visible_upto
                if visible_upto is not None and upto is not None:
                    upto = min(upto, visible_upto)
                batch = self.store.room_events(
                    room_id, after=cursor, upto=upto, limit=_SCAN, backwards=False
                )
            if not batch:
                break
            allowed = {e.event_id for e in self.visibility.filter(requester.user_id, room, batch)}
            for event in batch:
                cursor = event.stream - 1 if backwards else event.stream
                if event.event_id in allowed and event_filter.matches(
                    event_type=event.type,
                    sender=event.sender,
                    room_id=room_id,
                    content=event.content,
                ):
                    chunk.append(event)
                    if len(chunk) >= limit:
                        break
            if len(batch) < _SCAN:
                break
        scope = requester.txn_scope
        memberships = self.serializer.memberships_at(requester.user_id, room_id, chunk)
        result: dict[str, Any] = {
            "chunk": [
                self.serializer.client_event(e, txn_scope=scope, membership=m)
                for e, m in zip(chunk, memberships, strict=True)
            ],
            "start": start,
        }
        if chunk:
            last = chunk[-1]
            result["end"] = f"s{last.stream - 1}" if backwards else f"s{last.stream}"
        if event_filter.lazy_load_members and chunk:
            senders = {e.sender for e in chunk}
            anchor = chunk[0].stream if backwards else chunk[-1].stream
            ids = self.store.state_ids_at(room_id, anchor)
            wanted = [ids[(ev.MEMBER, s)] for s in sorted(senders) if (ev.MEMBER, s) in ids]
            found = self.store.get_events(wanted)
            result["state"] = [self.serializer.client_event(found[i]) for i in wanted if i in found]
        return result

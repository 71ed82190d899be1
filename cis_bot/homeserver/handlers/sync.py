"""``/sync`` (synapse/handlers/sync.py + rest/client/sync.py), as a long poll.

Its tokens are in ``tokens.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.filtering import EventFilter, FilterCollection
from cis_bot.homeserver.handlers.tokens import SyncToken

if TYPE_CHECKING:
    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.devicemessage import DeviceMessageHandler
    from cis_bot.homeserver.handlers.devices import DeviceHandler
    from cis_bot.homeserver.handlers.e2e_keys import E2EKeysHandler
    from cis_bot.homeserver.handlers.ephemeral import ReceiptHandler, TypingHandler
    from cis_bot.homeserver.handlers.notifications import NotificationCounts
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.handlers.presence import PresenceHandler
    from cis_bot.homeserver.handlers.pushrules import PushRulesHandler
    from cis_bot.homeserver.handlers.room_state import RoomState, RoomStateHandler
    from cis_bot.homeserver.handlers.serialize import Serializer
    from cis_bot.homeserver.handlers.visibility import Visibility
    from cis_bot.homeserver.storage.store import Store

_SCAN_BATCH = 200


def stripped_state(room: RoomState) -> list[dict[str, Any]]:
    """The stripped state shown with an invite (Synapse's room_prejoin_state)."""
    return [
        room.state[(event_type, "")].stripped(room.version)
        for event_type in ev.PREJOIN_STATE_TYPES
        if (event_type, "") in room.state
    ]


class SyncHandler:
    def __init__(
        self,
        *,
        store: Store,
        rooms: RoomStateHandler,
        notifier: Notifier,
        serializer: Serializer,
        typing: TypingHandler,
        receipts: ReceiptHandler,
        push_rules: PushRulesHandler,
        counts: NotificationCounts,
        visibility: Visibility,
        devices: DeviceHandler,
        device_messages: DeviceMessageHandler,
        e2e_keys: E2EKeysHandler,
        presence: PresenceHandler,
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.notifier = notifier
        self.serializer = serializer
        self.typing = typing
        self.receipts = receipts
        self.push_rules = push_rules
        self.counts = counts
        self.visibility = visibility
        self.devices = devices
        self.device_messages = device_messages
        self.e2e_keys = e2e_keys
        self.presence = presence

    async def sync(
        self,
        requester: Requester,
        *,
        since: SyncToken | None,
        timeout_ms: int,
        filters: FilterCollection,
        full_state: bool,
    ) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + max(0, timeout_ms) / 1000
        while True:
            generation = self.notifier.user_generation(requester.user_id)
            result, has_data = self._compute(requester, since, filters, full_state)
            if has_data or since is None or full_state:
                return result
            woke = await self.notifier.wait_for_user(requester.user_id, generation, deadline)
            if not woke:
                result, _ = self._compute(requester, since, filters, full_state)
                return result

    # --- the computation ------------------------------------------------------------------

    def _compute(
        self,
        requester: Requester,
        since: SyncToken | None,
        filters: FilterCollection,
        full_state: bool,
    ) -> tuple[dict[str, Any], bool]:
        user_id = requester.user_id
        now = SyncToken(self.store.current_stream, self.typing.serial)
        now_ms = int(time.time() * 1000)

        joined: dict[str, Any] = {}
        invited: dict[str, Any] = {}
        left: dict[str, Any] = {}

        changed_rooms: dict[str, list[int]] = {}
        if since is not None:
            for change in self.store.membership_changes(user_id, since.stream, now.stream):
                changed_rooms.setdefault(change.room_id, []).append(change.stream)

        for membership in self.store.memberships_for_user(user_id):
            room_id = membership.room_id
            if membership.stream > now.stream or not filters.rooms.allows_room(room_id):
                continue
            room = self.rooms.get(room_id)
            if room is None:
                continue
            if membership.membership == "join":
                newly_joined = (
                    since is not None
                    and room_id in changed_rooms
                    and (self._membership_at(user_id, room_id, since.stream) != "join")
                )
                entry = self._room_entry(
                    requester,
                    room,
                    since=None if (since is None or newly_joined) else since,
                    upto=now.stream,
                    filters=filters,
                    full_state=full_state or newly_joined,
                    joined=True,
                    now_ms=now_ms,
                )
                if entry is not None:
                    joined[room_id] = entry
            elif membership.membership == "invite":
                if since is None or room_id in changed_rooms:
                    invited[room_id] = self._invite_entry(
                        requester, room, membership.event_id, now_ms
                    )
            elif membership.membership in ("leave", "ban"):
                recent = since is not None and room_id in changed_rooms
                if not recent and not (filters.include_leave and (since is None or full_state)):
                    continue
                before = self._membership_at(user_id, room_id, membership.stream - 1)
                entry = self._room_entry(
                    requester,
                    room,
                    since=since if recent else None,
                    upto=membership.stream,
                    filters=filters,
                    full_state=full_state,
                    joined=False,
                    now_ms=now_ms,
                    only_own_membership=before in (None, "invite", "knock"),
                )
                if entry is not None:
                    left[room_id] = entry

        response: dict[str, Any] = {"next_batch": str(now)}
        account_data = self._global_account_data(user_id, since, now, filters)
        if account_data:
            response["account_data"] = {"events": account_data}
        presence: list[dict[str, Any]] = []
        newly_shared: list[str] = []
        device_lists: dict[str, list[str]] = {}
        if since is not None:
            newly_shared, gone = self._device_list_changes(user_id, since.stream, now.stream)
            changed = self._with_device_changes(user_id, newly_shared, since.stream, now.stream)
            if changed:
                device_lists["changed"] = changed
            if gone:
                device_lists["left"] = gone
        if not filters.presence.blocks_all:
            presence = [
                event
                for event in self.presence.sync_events(
                    user_id,
                    since.stream if since is not None and not full_state else None,
                    now.stream,
                    set(newly_shared),
                )
                if filters.presence.matches(
                    event_type=event["type"],
                    sender=event["sender"],
                    room_id=None,
                    content=event["content"],
                )
            ]
        if presence:
            response["presence"] = {"events": presence}
        device_id = requester.device_id
        to_device = self.device_messages.for_sync(
            user_id, device_id, since.stream if since is not None else None, now.stream
        )
        if to_device:
            response["to_device"] = {"events": to_device}
        if device_lists:
            response["device_lists"] = device_lists
        if device_id is not None:
            response["device_one_time_keys_count"] = self.e2e_keys.one_time_key_counts(
                user_id, device_id
            )
            response["device_unused_fallback_key_types"] = self.e2e_keys.unused_fallback_key_types(
                user_id, device_id
            )
        else:
            response["device_one_time_keys_count"] = {"signed_curve25519": 0}
            response["device_unused_fallback_key_types"] = []
        rooms: dict[str, Any] = {}
        if joined:
            rooms["join"] = joined
        if invited:
            rooms["invite"] = invited
        if left:
            rooms["leave"] = left
        if rooms:
            response["rooms"] = rooms
        has_data = bool(rooms or account_data or device_lists or presence or to_device)
        return response, has_data

    def device_list_updates(self, user_id: str, since: int) -> tuple[list[str], list[str]]:
        """``/keys/changes``: (changed, left) from ``since`` until now."""
        upto = self.store.current_stream
        newly_shared, left = self._device_list_changes(user_id, since, upto)
        return self._with_device_changes(user_id, newly_shared, since, upto), left

    def _with_device_changes(
        self, user_id: str, newly_shared: list[str], after: int, upto: int
    ) -> list[str]:
        """The users to fetch keys of again: the newly shared ones, and those whose devices or
        keys changed in (after, upto]."""
        changed = list(newly_shared)
        for other in self.devices.changed_since(user_id, after, upto):
            if other not in changed:
                changed.append(other)
        return changed

    def _device_list_changes(
        self, user_id: str, after: int, upto: int
    ) -> tuple[list[str], list[str]]:
        """The membership side of Synapse's device_lists: users who newly share a room with
        ``user_id`` ("changed": their devices became relevant) and users who no longer share
        any ("left"). Key and device changes come from the device handler."""
        if after >= upto:
            return [], []
        shared_now: set[str] = set()
        joined_rooms = []
        for row in self.store.memberships_for_user(user_id):
            if row.membership == "join":
                room = self.rooms.get(row.room_id)
                if room is not None:
                    shared_now |= room.joined
                    joined_rooms.append(room)
        changed: list[str] = []
        gone: list[str] = []
        rooms_touched = {row.room_id for row in self.store.membership_changes(user_id, after, upto)}
        rooms_touched |= {room.room_id for room in joined_rooms}
        for room_id in rooms_touched:
            for event in self.store.room_events(
                room_id, after=after, upto=upto, limit=10_000, backwards=False, types=[ev.MEMBER]
            ):
                target = event.state_key
                if target is None:
                    continue
                if event.membership == "join" and target in shared_now:
                    if target == user_id:
                        # We joined: everyone already there is new to us.
                        room = self.rooms.get(room_id)
                        for member in sorted(room.joined if room is not None else ()):
                            if member not in changed and member != user_id:
                                changed.append(member)
                    if target not in changed:
                        changed.append(target)
                elif event.membership in ("leave", "ban"):
                    candidates = [target]
                    if target == user_id:
                        previous = self.store.state_ids_at(room_id, event.stream - 1)
                        members = self.store.get_events(
                            v for (t, _), v in previous.items() if t == ev.MEMBER
                        )
                        candidates = [
                            member.state_key
                            for member in members.values()
                            if member.membership == "join"
                            and member.state_key not in (None, user_id)
                        ]
                    for candidate in candidates:
                        if candidate and candidate not in shared_now and candidate not in gone:
                            gone.append(candidate)
        changed = [u for u in changed if u in shared_now]
        return changed, [u for u in gone if u not in shared_now]

    def _membership_at(self, user_id: str, room_id: str, stream: int) -> str | None:
        row = self.store.membership_at(user_id, room_id, stream)
        return None if row is None else row.membership

    def _global_account_data(
        self,
        user_id: str,
        since: SyncToken | None,
        now: SyncToken,
        filters: FilterCollection,
    ) -> list[dict[str, Any]]:
        if filters.account_data.blocks_all:
            return []
        items: dict[str, dict[str, Any]] = {}
        for room_id, data_type, content in self.store.account_data_since(
            user_id, since.stream if since is not None else 0, now.stream
        ):
            if room_id == "":
                items[data_type] = content
        if since is None:
            items["m.push_rules"] = self.push_rules.rules_for(user_id)
        return [
            {"type": data_type, "content": content}
            for data_type, content in items.items()
            if filters.account_data.matches(
                event_type=data_type, sender=None, room_id=None, content=content
            )
        ]

    def _room_account_data(
        self, user_id: str, room_id: str, since: SyncToken | None, upto: int, f: EventFilter
    ) -> list[dict[str, Any]]:
        items: dict[str, dict[str, Any]] = {}
        for data_room, data_type, content in self.store.account_data_since(
            user_id, since.stream if since is not None else 0, upto
        ):
            if data_room == room_id:
                items[data_type] = content
        return [
            {"type": t, "content": c}
            for t, c in items.items()
            if f.matches(event_type=t, sender=None, room_id=room_id, content=c)
        ]

    def _timeline(
        self,
        room: RoomState,
        after: int | None,
        upto: int,
        f: EventFilter,
        *,
        user_id: str,
    ) -> tuple[list[Event], bool]:
        """The last ``limit`` events matching ``f`` in (after, upto], oldest first, and whether
        more matching events were left out."""
        limit = max(0, f.limit)
        picked: list[Event] = []
        cursor = upto
        limited = False
        while True:
            batch = self.store.room_events(
                room.room_id, after=after, upto=cursor, limit=_SCAN_BATCH, backwards=True
            )
            allowed = {e.event_id for e in self.visibility.filter(user_id, room, batch)}
            for event in batch:
                if event.event_id not in allowed or not f.matches(
                    event_type=event.type,
                    sender=event.sender,
                    room_id=room.room_id,
                    content=event.content,
                ):
                    continue
                if len(picked) >= limit:
                    limited = True
                    break
                picked.append(event)
            if limited or len(batch) < _SCAN_BATCH:
                break
            cursor = batch[-1].stream - 1
        picked.reverse()
        return picked, limited

    def _room_entry(
        self,
        requester: Requester,
        room: RoomState,
        *,
        since: SyncToken | None,
        upto: int,
        filters: FilterCollection,
        full_state: bool,
        joined: bool,
        now_ms: int,
        only_own_membership: bool = False,
    ) -> dict[str, Any] | None:
        """One room of the response. ``only_own_membership``: a room the user never joined
        (a rejected or withdrawn invite) shows just their own membership event."""
        user_id = requester.user_id
        after = since.stream if since is not None else None
        timeline: list[Event]
        if only_own_membership:
            member = self.store.get_event(room.state[(ev.MEMBER, user_id)].event_id)
            timeline = [member] if member is not None else []
            limited = False
        elif after is not None and after >= upto and not full_state:
            timeline = []
            limited = False
        elif filters.timeline.blocks_all:
            timeline, limited = [], False
        else:
            timeline, limited = self._timeline(room, after, upto, filters.timeline, user_id=user_id)

        # Ephemeral and account data first: an incremental sync includes a quiet room only if
        # something other than the timeline changed.
        ephemeral: list[dict[str, Any]] = []
        if joined and not filters.ephemeral.blocks_all:
            typing_since = since.typing if since is not None else 0
            if (since is None and self.typing.is_anyone_typing(room.room_id)) or (
                since is not None and self.typing.changed_since(room.room_id, typing_since)
            ):
                ephemeral.append(self.typing.event(room.room_id))
            receipt = self.receipts.receipt_event(
                room.room_id, user_id, since.stream if since is not None else 0, upto
            )
            if receipt is not None:
                ephemeral.append(receipt)
            ephemeral = [
                e
                for e in ephemeral
                if filters.ephemeral.matches(
                    event_type=e["type"], sender=None, room_id=room.room_id, content=e["content"]
                )
            ]
        account_data = (
            []
            if filters.room_account_data.blocks_all
            else self._room_account_data(
                user_id, room.room_id, since, upto, filters.room_account_data
            )
        )
        if (
            since is not None
            and not full_state
            and not timeline
            and not ephemeral
            and not account_data
        ):
            return None

        state_events = (
            []
            if only_own_membership
            else self._state_for_timeline(
                room,
                timeline,
                since=since,
                limited=limited,
                upto=upto,
                full_state=full_state,
                filters=filters,
            )
        )
        scope = requester.txn_scope
        serialize = self.serializer.client_event
        first_stream = timeline[0].stream if timeline else upto + 1
        memberships = self.serializer.memberships_at(user_id, room.room_id, timeline)
        entry: dict[str, Any] = {
            "timeline": {
                "events": [
                    self._format(
                        serialize(e, "sync", txn_scope=scope, now_ms=now_ms, membership=m),
                        filters,
                    )
                    for e, m in zip(timeline, memberships, strict=True)
                ],
                "prev_batch": f"s{first_stream - 1}" if timeline else f"s{upto}",
                "limited": limited,
            },
            "state": {
                "events": [
                    self._format(serialize(e, "sync", now_ms=now_ms), filters) for e in state_events
                ]
            },
            "account_data": {"events": account_data},
        }
        if joined:
            entry["ephemeral"] = {"events": ephemeral}
            entry["unread_notifications"] = self._unread(room, user_id)
            entry["summary"] = self._summary(room, user_id, filters)
        return entry

    @staticmethod
    def _format(event: dict[str, Any], filters: FilterCollection) -> dict[str, Any]:
        if filters.event_fields:
            from cis_bot.homeserver.filtering import only_fields

            return only_fields(event, filters.event_fields)
        return event

    def _state_for_timeline(
        self,
        room: RoomState,
        timeline: list[Event],
        *,
        since: SyncToken | None,
        limited: bool,
        upto: int,
        full_state: bool,
        filters: FilterCollection,
    ) -> list[Event]:
        """Synapse's rule: the state at the start of the timeline, minus what the client already
        has (state at ``since``) and minus state events in the timeline itself."""
        if filters.state.blocks_all:
            return []
        if since is not None and not limited and not full_state:
            return []
        start = (timeline[0].stream - 1) if timeline else upto
        state_ids = self.store.state_ids_at(room.room_id, start)
        if full_state:
            state_ids.update(self.store.state_ids_at(room.room_id, upto))
        if since is not None and not full_state:
            previous = self.store.state_ids_at(room.room_id, since.stream)
            state_ids = {k: v for k, v in state_ids.items() if previous.get(k) != v}
        in_timeline = {e.event_id for e in timeline}
        wanted = {k: v for k, v in state_ids.items() if v not in in_timeline}
        if filters.state.lazy_load_members:
            senders = {e.sender for e in timeline}
            wanted = {
                k: v
                for k, v in wanted.items()
                if k[0] != ev.MEMBER or k[1] in senders or k[1] == ""
            }
        found = self.store.get_events(wanted.values())
        events = [found[event_id] for event_id in wanted.values() if event_id in found]
        events.sort(key=lambda e: e.stream)
        return [
            e
            for e in events
            if filters.state.matches(
                event_type=e.type, sender=e.sender, room_id=room.room_id, content=e.content
            )
        ]

    def _invite_entry(
        self, requester: Requester, room: RoomState, invite_event_id: str, now_ms: int
    ) -> dict[str, Any]:
        stripped = stripped_state(room)
        invite = self.store.get_event(invite_event_id)
        if invite is not None:
            inviter = room.state.get((ev.MEMBER, invite.sender))
            if inviter is not None and inviter.event_id != invite.event_id:
                stripped.append(inviter.stripped(room.version))
            stripped.append(invite.stripped(room.version))
        return {"invite_state": {"events": stripped}}

    def _unread(self, room: RoomState, user_id: str) -> dict[str, int]:
        return self.counts.counts(user_id, room)

    def _summary(self, room: RoomState, user_id: str, filters: FilterCollection) -> dict[str, Any]:
        if not filters.state.lazy_load_members:
            return {}
        summary: dict[str, Any] = {
            "m.joined_member_count": len(room.member_ids("join")),
            "m.invited_member_count": len(room.member_ids("invite")),
        }
        name = room.state.get((ev.NAME, ""))
        alias = room.state.get((ev.CANONICAL_ALIAS, ""))
        if (name and name.content.get("name")) or (alias and alias.content.get("alias")):
            return summary
        heroes = [
            uid
            for membership in ("join", "invite", "leave", "ban")
            for uid in sorted(room.member_ids(membership))
            if uid != user_id
        ]
        summary["m.heroes"] = heroes[:5]
        return summary

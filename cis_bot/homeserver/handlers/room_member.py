"""Membership changes: join, invite, leave, kick, ban, unban, and a profile change re-sent
into every joined room (Synapse's RoomMemberHandler and the profile handler's
``update_join_states``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.errors import MatrixError, bad_request, forbidden
from cis_bot.homeserver.handlers import event_auth
from cis_bot.homeserver.ids import parse_user_id

if TYPE_CHECKING:
    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.message import EventCreationHandler
    from cis_bot.homeserver.handlers.room_state import RoomStateHandler
    from cis_bot.homeserver.storage.store import Store

log = structlog.get_logger(__name__)


class RoomMemberHandler:
    def __init__(
        self, *, store: Store, rooms: RoomStateHandler, events: EventCreationHandler
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.events = events

    def profile_of(self, user_id: str) -> tuple[str | None, str | None]:
        user = self.store.get_user(user_id)
        if user is None:
            return None, None
        return user.displayname, user.avatar_url

    def member_content(
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
        room = self.rooms.get(room_id)
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
        body = self.member_content(effective, target, content)
        if (
            current is not None
            and current.membership == effective
            and current.sender == requester.user_id
            and current.content == body
        ):
            return current  # Synapse drops no-op membership changes
        return self.events.create(
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
        for room_id in self.rooms.joined_rooms(user_id):
            room = self.rooms.get(room_id)
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
                self.events.create(
                    room, sender=user_id, event_type=ev.MEMBER, content=content, state_key=user_id
                )
            except MatrixError as err:
                log.warning("profile.propagate_failed", room_id=room_id, error=err.message)

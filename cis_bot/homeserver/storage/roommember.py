"""Memberships: each user's current membership per room and the history of changes
(Synapse's RoomMemberStore)."""

from __future__ import annotations

import attrs

from cis_bot.homeserver.storage.database import StoreBase


@attrs.frozen
class MembershipRow:
    room_id: str
    user_id: str
    membership: str
    event_id: str
    stream: int


class RoomMemberStore(StoreBase):
    def memberships_for_user(self, user_id: str) -> list[MembershipRow]:
        return [
            MembershipRow(r[0], user_id, r[1], r[2], r[3])
            for r in self.conn.execute(
                "SELECT room_id, membership, event_id, stream_ordering FROM current_membership"
                " WHERE user_id = ?",
                (user_id,),
            )
        ]

    def membership_changes(self, user_id: str, after: int, upto: int) -> list[MembershipRow]:
        return [
            MembershipRow(r[0], user_id, r[1], r[2], r[3])
            for r in self.conn.execute(
                "SELECT room_id, membership, event_id, stream_ordering FROM membership_history"
                " WHERE user_id = ? AND stream_ordering > ? AND stream_ordering <= ?"
                " ORDER BY stream_ordering",
                (user_id, after, upto),
            )
        ]

    def membership_history(self, user_id: str, room_id: str) -> list[tuple[int, str]]:
        """(stream, membership) of every membership change of the user in the room, in order."""
        return [
            (int(r[0]), r[1])
            for r in self.conn.execute(
                "SELECT stream_ordering, membership FROM membership_history"
                " WHERE user_id = ? AND room_id = ? ORDER BY stream_ordering",
                (user_id, room_id),
            )
        ]

    def membership_at(self, user_id: str, room_id: str, stream: int) -> MembershipRow | None:
        row = self.conn.execute(
            "SELECT membership, event_id, stream_ordering FROM membership_history"
            " WHERE user_id = ? AND room_id = ? AND stream_ordering <= ?"
            " ORDER BY stream_ordering DESC LIMIT 1",
            (user_id, room_id, stream),
        ).fetchone()
        return None if row is None else MembershipRow(room_id, user_id, row[0], row[1], row[2])

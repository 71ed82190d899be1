"""Rooms and their directory visibility (Synapse's RoomStore)."""

from __future__ import annotations

import attrs

from cis_bot.homeserver.storage.database import StoreBase, now_ms


@attrs.frozen
class RoomRow:
    room_id: str
    room_version: str
    creator: str
    is_public: bool


class RoomStore(StoreBase):
    def create_room(self, room_id: str, room_version: str, creator: str, is_public: bool) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO rooms (room_id, room_version, creator, is_public, created_ts)"
                " VALUES (?, ?, ?, ?, ?)",
                (room_id, room_version, creator, int(is_public), now_ms()),
            )

    def get_room(self, room_id: str) -> RoomRow | None:
        row = self.conn.execute(
            "SELECT room_id, room_version, creator, is_public FROM rooms WHERE room_id = ?",
            (room_id,),
        ).fetchone()
        return None if row is None else RoomRow(row[0], row[1], row[2], bool(row[3]))

    def set_room_public(self, room_id: str, is_public: bool) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE rooms SET is_public = ? WHERE room_id = ?", (int(is_public), room_id)
            )

    def public_room_ids(self) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT room_id FROM rooms WHERE is_public = 1 ORDER BY created_ts"
            )
        ]

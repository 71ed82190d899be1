"""Room aliases (Synapse's DirectoryStore)."""

from __future__ import annotations

import sqlite3

from cis_bot.homeserver.storage.database import StoreBase


class DirectoryStore(StoreBase):
    def get_alias(self, alias: str) -> tuple[str, str] | None:
        row = self.conn.execute(
            "SELECT room_id, creator FROM room_aliases WHERE alias = ?", (alias,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def create_alias(self, alias: str, room_id: str, creator: str) -> bool:
        try:
            with self.transaction() as conn:
                conn.execute(
                    "INSERT INTO room_aliases (alias, room_id, creator) VALUES (?, ?, ?)",
                    (alias, room_id, creator),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def delete_alias(self, alias: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM room_aliases WHERE alias = ?", (alias,))

    def aliases_for_room(self, room_id: str) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT alias FROM room_aliases WHERE room_id = ? ORDER BY alias", (room_id,)
            )
        ]

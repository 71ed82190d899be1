"""Global and per-room account data (Synapse's AccountDataStore)."""

from __future__ import annotations

import json
from typing import Any

from cis_bot.homeserver.storage.database import StoreBase


class AccountDataStore(StoreBase):
    def set_account_data(
        self, user_id: str, room_id: str, data_type: str, content: dict[str, Any]
    ) -> int:
        stream = self.next_stream()
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO account_data (user_id, room_id, type, content, stream_id)"
                " VALUES (?, ?, ?, ?, ?)",
                (user_id, room_id, data_type, json.dumps(content), stream),
            )
        return stream

    def get_account_data(self, user_id: str, room_id: str, data_type: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT content FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?",
            (user_id, room_id, data_type),
        ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def account_data_since(
        self, user_id: str, after: int, upto: int
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """(room_id, type, content) changed in (after, upto]; room_id '' is global."""
        return [
            (r[0], r[1], json.loads(r[2]))
            for r in self.conn.execute(
                "SELECT room_id, type, content FROM account_data WHERE user_id = ?"
                " AND stream_id > ? AND stream_id <= ? ORDER BY stream_id",
                (user_id, after, upto),
            )
        ]

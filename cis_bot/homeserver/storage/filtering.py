"""Sync filters uploaded by clients (Synapse's FilteringStore)."""

from __future__ import annotations

import json
from typing import Any

from cis_bot.homeserver.storage.database import StoreBase


class FilteringStore(StoreBase):
    def add_filter(self, user_id: str, filter_json: dict[str, Any]) -> int:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT MAX(filter_id) FROM filters WHERE user_id = ?", (user_id,)
            ).fetchone()
            filter_id = 0 if row[0] is None else int(row[0]) + 1
            conn.execute(
                "INSERT INTO filters (user_id, filter_id, json) VALUES (?, ?, ?)",
                (user_id, filter_id, json.dumps(filter_json)),
            )
        return filter_id

    def get_filter(self, user_id: str, filter_id: int) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT json FROM filters WHERE user_id = ? AND filter_id = ?", (user_id, filter_id)
        ).fetchone()
        return None if row is None else dict(json.loads(row[0]))

"""Read receipts (Synapse's ReceiptsStore)."""

from __future__ import annotations

import json
from typing import Any

from cis_bot.homeserver.storage.database import StoreBase


class ReceiptsStore(StoreBase):
    def set_receipt(
        self,
        room_id: str,
        receipt_type: str,
        user_id: str,
        thread_id: str,
        event_id: str,
        data: dict[str, Any],
    ) -> int:
        stream = self.next_stream()
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO receipts (room_id, receipt_type, user_id, thread_id,"
                " event_id, data, stream_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (room_id, receipt_type, user_id, thread_id, event_id, json.dumps(data), stream),
            )
        return stream

    def receipts_since(
        self, room_id: str, after: int, upto: int
    ) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(receipt_type, user_id, event_id, data) in (after, upto]."""
        return [
            (r[0], r[1], r[2], json.loads(r[3]))
            for r in self.conn.execute(
                "SELECT receipt_type, user_id, event_id, data FROM receipts WHERE room_id = ?"
                " AND stream_id > ? AND stream_id <= ? ORDER BY stream_id",
                (room_id, after, upto),
            )
        ]

    def read_position(self, room_id: str, user_id: str) -> int | None:
        """Stream position of the event the user's latest read receipt points at."""
        row = self.conn.execute(
            "SELECT MAX(e.stream_ordering) FROM receipts r JOIN events e"
            " ON e.event_id = r.event_id WHERE r.room_id = ? AND r.user_id = ?"
            " AND r.receipt_type IN ('m.read', 'm.read.private')",
            (room_id, user_id),
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

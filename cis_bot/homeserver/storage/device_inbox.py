"""To-device messages waiting for their device (Synapse's device_inbox): each takes a position in
the global stream, is handed out by ``/sync`` and deleted once the device syncs past it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.storage.database import StoreBase

if TYPE_CHECKING:
    from collections.abc import Iterable


class DeviceInboxStore(StoreBase):
    def add_to_device_messages(self, messages: Iterable[tuple[str, str, dict[str, Any]]]) -> int:
        """Queue (user_id, device_id, message) items; the last stream position used."""
        rows = [(self.next_stream(), u, d, json.dumps(m)) for u, d, m in messages]
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO device_inbox (stream_id, user_id, device_id, message_json)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )
        return rows[-1][0] if rows else self.current_stream

    def get_to_device_messages(
        self, user_id: str, device_id: str, upto: int
    ) -> list[dict[str, Any]]:
        """Every undelivered message of the device at or before ``upto``, oldest first (all of
        them: the next sync's token deletes what this one handed out)."""
        return [
            json.loads(raw)
            for (raw,) in self.conn.execute(
                "SELECT message_json FROM device_inbox WHERE user_id = ? AND device_id = ?"
                " AND stream_id <= ? ORDER BY stream_id",
                (user_id, device_id, upto),
            )
        ]

    def has_to_device_messages(self, user_id: str, device_id: str, after: int, upto: int) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM device_inbox WHERE user_id = ? AND device_id = ? AND stream_id > ?"
            " AND stream_id <= ? LIMIT 1",
            (user_id, device_id, after, upto),
        ).fetchone()
        return row is not None

    def delete_to_device_messages(self, user_id: str, device_id: str, upto: int) -> None:
        """The device has them (it synced past ``upto``)."""
        if not self.has_to_device_messages(user_id, device_id, 0, upto):
            return  # the common case, and no write
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM device_inbox WHERE user_id = ? AND device_id = ? AND stream_id <= ?",
                (user_id, device_id, upto),
            )
            self.keep_stream_floor(conn)

    def delete_device_inbox(self, user_id: str, device_id: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM device_inbox WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            )
            self.keep_stream_floor(conn)

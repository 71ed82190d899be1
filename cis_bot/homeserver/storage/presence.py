"""Users' presence (Synapse's presence_stream): the latest state of each user, at the stream
position of its last change."""

from __future__ import annotations

from typing import Any

import attrs

from cis_bot.homeserver.storage.database import StoreBase


@attrs.frozen
class PresenceRow:
    user_id: str
    state: str
    status_msg: str | None
    last_active_ts: int
    currently_active: bool
    stream: int


def _row(row: tuple[Any, ...]) -> PresenceRow:
    user_id, state, status_msg, last_active_ts, currently_active, stream = row
    return PresenceRow(
        str(user_id), str(state), status_msg, int(last_active_ts), bool(currently_active), stream
    )


class PresenceStore(StoreBase):
    def get_presence(self, user_id: str) -> PresenceRow | None:
        row = self.conn.execute(
            "SELECT user_id, state, status_msg, last_active_ts, currently_active, stream_id"
            " FROM presence WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        return None if row is None else _row(row)

    def set_presence(
        self,
        user_id: str,
        state: str,
        status_msg: str | None,
        last_active_ts: int,
        currently_active: bool,
    ) -> PresenceRow:
        stream = self.next_stream()
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO presence (user_id, state, status_msg, last_active_ts,"
                " currently_active, stream_id) VALUES (?, ?, ?, ?, ?, ?)",
                (user_id, state, status_msg, last_active_ts, int(currently_active), stream),
            )
        return PresenceRow(user_id, state, status_msg, last_active_ts, currently_active, stream)

    def get_presence_not_offline(self) -> list[PresenceRow]:
        """Everyone online or unavailable (their timeouts run again after a restart)."""
        return [
            _row(row)
            for row in self.conn.execute(
                "SELECT user_id, state, status_msg, last_active_ts, currently_active, stream_id"
                " FROM presence WHERE state != 'offline'"
            )
        ]

    def presence_newest_stream(self) -> int:
        row = self.conn.execute("SELECT MAX(stream_id) FROM presence").fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

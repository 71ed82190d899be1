"""Appservice transactions: each appservice's read position in the stream and the
transactions sent but not yet acknowledged (Synapse's ApplicationServiceTransactionStore)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cis_bot.homeserver.storage.database import StoreBase

if TYPE_CHECKING:
    from collections.abc import Sequence


class ApplicationServiceTransactionStore(StoreBase):
    def appservice_state(self, as_id: str) -> tuple[int, int] | None:
        """(last_stream, next_txn_id), or None for an appservice never seen before."""
        row = self.conn.execute(
            "SELECT last_stream, next_txn_id FROM appservice_state WHERE as_id = ?", (as_id,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def init_appservice_state(self, as_id: str, last_stream: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO appservice_state (as_id, last_stream, next_txn_id)"
                " VALUES (?, ?, 1)",
                (as_id, last_stream),
            )

    def create_appservice_txn(
        self, as_id: str, txn_id: int, streams: Sequence[int], last_stream: int
    ) -> None:
        """Atomically: record the transaction and move the read position past its events."""
        with self.transaction() as conn:
            if streams:
                conn.execute(
                    "INSERT INTO appservice_txns (as_id, txn_id, event_streams) VALUES (?, ?, ?)",
                    (as_id, txn_id, json.dumps(list(streams))),
                )
            conn.execute(
                "UPDATE appservice_state SET last_stream = ?, next_txn_id = ? WHERE as_id = ?",
                (last_stream, txn_id + 1 if streams else txn_id, as_id),
            )

    def pending_appservice_txns(self, as_id: str) -> list[tuple[int, list[int]]]:
        return [
            (int(r[0]), [int(s) for s in json.loads(r[1])])
            for r in self.conn.execute(
                "SELECT txn_id, event_streams FROM appservice_txns WHERE as_id = ? ORDER BY txn_id",
                (as_id,),
            )
        ]

    def complete_appservice_txn(self, as_id: str, txn_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM appservice_txns WHERE as_id = ? AND txn_id = ?", (as_id, txn_id)
            )

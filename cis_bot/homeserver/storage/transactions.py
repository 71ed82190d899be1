"""Answers to idempotent requests (createRoom, join, ... with a transaction id), replayed
when the same client repeats the request (Synapse's HttpTransactionCache, persisted)."""

from __future__ import annotations

import json
from typing import Any

from cis_bot.homeserver.storage.database import StoreBase, now_ms


class RequestTransactionStore(StoreBase):
    def get_request_txn(self, scope: str, path: str) -> tuple[int, Any] | None:
        row = self.conn.execute(
            "SELECT status, body FROM request_txns WHERE scope = ? AND path = ?", (scope, path)
        ).fetchone()
        return None if row is None else (int(row[0]), json.loads(row[1]))

    def put_request_txn(self, scope: str, path: str, status: int, body: Any) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO request_txns (scope, path, status, body, created_ts)"
                " VALUES (?, ?, ?, ?, ?)",
                (scope, path, status, json.dumps(body), now_ms()),
            )

"""End-to-end encryption keys (Synapse's end_to_end_keys.py store): device keys, one-time and
fallback keys, cross-signing keys and their signatures, and the device-list change stream.

Keys are opaque JSON here: the server stores what devices upload and hands it to other devices;
it checks shapes, never signatures.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.storage.database import StoreBase

if TYPE_CHECKING:
    from collections.abc import Iterable

SIGNED_CURVE25519 = "signed_curve25519"


def canonical_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


class EndToEndKeyStore(StoreBase):
    # --- device keys ----------------------------------------------------------------------

    def set_device_keys(self, user_id: str, device_id: str, keys: dict[str, Any]) -> bool:
        """Store a device's keys; False when they are already stored unchanged."""
        new = canonical_json(keys)
        row = self.conn.execute(
            "SELECT key_json FROM e2e_device_keys WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        ).fetchone()
        if row is not None and row[0] == new:
            return False
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO e2e_device_keys (user_id, device_id, key_json)"
                " VALUES (?, ?, ?)",
                (user_id, device_id, new),
            )
        return True

    def get_device_keys(
        self, query: Iterable[tuple[str, str | None]]
    ) -> dict[str, dict[str, tuple[dict[str, Any], str | None]]]:
        """user_id -> device_id -> (keys, device display name) of existing devices with keys;
        a None device id asks for all of a user's devices."""
        found: dict[str, dict[str, tuple[dict[str, Any], str | None]]] = {}
        for user_id, device_id in query:
            sql = (
                "SELECT k.device_id, k.key_json, d.display_name FROM e2e_device_keys k"
                " JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id"
                " WHERE k.user_id = ?"
            )
            args: tuple[str, ...] = (user_id,)
            if device_id is not None:
                sql += " AND k.device_id = ?"
                args = (user_id, device_id)
            for device, raw, name in self.conn.execute(sql, args):
                found.setdefault(user_id, {})[device] = (json.loads(raw), name)
        return found

    def delete_e2e_keys_by_device(self, user_id: str, device_id: str) -> None:
        """Forget everything a device uploaded (it was deleted)."""
        with self.transaction() as conn:
            for table in ("e2e_device_keys", "e2e_one_time_keys", "e2e_fallback_keys"):
                conn.execute(
                    f"DELETE FROM {table} WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                )

    # --- one-time and fallback keys -------------------------------------------------------

    def get_one_time_keys(
        self, user_id: str, device_id: str, wanted: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], str]:
        """(algorithm, key_id) -> stored JSON of the wanted keys that exist."""
        found = {}
        for algorithm, key_id in wanted:
            row = self.conn.execute(
                "SELECT key_json FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ?"
                " AND algorithm = ? AND key_id = ?",
                (user_id, device_id, algorithm, key_id),
            ).fetchone()
            if row is not None:
                found[(algorithm, key_id)] = str(row[0])
        return found

    def add_one_time_keys(
        self, user_id: str, device_id: str, keys: Iterable[tuple[str, str, str]]
    ) -> None:
        """Insert (algorithm, key_id, JSON) keys."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO e2e_one_time_keys (user_id, device_id, algorithm, key_id,"
                " key_json) VALUES (?, ?, ?, ?, ?)",
                [(user_id, device_id, a, k, j) for a, k, j in keys],
            )

    def count_one_time_keys(self, user_id: str, device_id: str) -> dict[str, int]:
        """Algorithm -> count; signed_curve25519 always present (Synapse: clients rely on it)."""
        counts = {SIGNED_CURVE25519: 0}
        for algorithm, count in self.conn.execute(
            "SELECT algorithm, COUNT(*) FROM e2e_one_time_keys WHERE user_id = ? AND device_id = ?"
            " GROUP BY algorithm",
            (user_id, device_id),
        ):
            counts[algorithm] = int(count)
        return counts

    def claim_one_time_keys(
        self, user_id: str, device_id: str, algorithm: str, count: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """Take up to ``count`` keys, oldest first: ("algorithm:key_id", key)."""
        with self.transaction() as conn:
            rows = conn.execute(
                "SELECT added, key_id, key_json FROM e2e_one_time_keys WHERE user_id = ?"
                " AND device_id = ? AND algorithm = ? ORDER BY added LIMIT ?",
                (user_id, device_id, algorithm, count),
            ).fetchall()
            conn.executemany(
                "DELETE FROM e2e_one_time_keys WHERE added = ?", [(row[0],) for row in rows]
            )
        return [(f"{algorithm}:{key_id}", json.loads(raw)) for _, key_id, raw in rows]

    def set_fallback_keys(self, user_id: str, device_id: str, keys: dict[str, Any]) -> None:
        with self.transaction() as conn:
            for full_id, key in keys.items():
                algorithm, key_id = full_id.split(":", 1)
                new = canonical_json(key)
                row = conn.execute(
                    "SELECT key_json FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ?"
                    " AND algorithm = ?",
                    (user_id, device_id, algorithm),
                ).fetchone()
                if row is not None and row[0] == new:
                    continue  # the same key again must not become unused again
                conn.execute(
                    "INSERT OR REPLACE INTO e2e_fallback_keys (user_id, device_id, algorithm,"
                    " key_id, key_json, used) VALUES (?, ?, ?, ?, ?, 0)",
                    (user_id, device_id, algorithm, key_id, new),
                )

    def claim_fallback_key(
        self, user_id: str, device_id: str, algorithm: str, mark_used: bool
    ) -> tuple[str, dict[str, Any]] | None:
        row = self.conn.execute(
            "SELECT key_id, key_json, used FROM e2e_fallback_keys WHERE user_id = ?"
            " AND device_id = ? AND algorithm = ?",
            (user_id, device_id, algorithm),
        ).fetchone()
        if row is None:
            return None
        key_id, raw, used = row
        if mark_used and not used:
            with self.transaction() as conn:
                conn.execute(
                    "UPDATE e2e_fallback_keys SET used = 1 WHERE user_id = ? AND device_id = ?"
                    " AND algorithm = ?",
                    (user_id, device_id, algorithm),
                )
        return f"{algorithm}:{key_id}", json.loads(raw)

    def unused_fallback_key_types(self, user_id: str, device_id: str) -> list[str]:
        return [
            str(row[0])
            for row in self.conn.execute(
                "SELECT algorithm FROM e2e_fallback_keys WHERE user_id = ? AND device_id = ?"
                " AND used = 0 ORDER BY algorithm",
                (user_id, device_id),
            )
        ]

    # --- cross-signing --------------------------------------------------------------------

    def set_cross_signing_key(self, user_id: str, key_type: str, key: dict[str, Any]) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO e2e_cross_signing_keys (user_id, key_type, key_json)"
                " VALUES (?, ?, ?)",
                (user_id, key_type, canonical_json(key)),
            )

    def get_cross_signing_keys(self, user_id: str) -> dict[str, dict[str, Any]]:
        """key_type -> key as uploaded (without signatures uploaded later)."""
        return {
            key_type: json.loads(raw)
            for key_type, raw in self.conn.execute(
                "SELECT key_type, key_json FROM e2e_cross_signing_keys WHERE user_id = ?",
                (user_id,),
            )
        }

    def add_cross_signing_signatures(
        self, signer: str, items: Iterable[tuple[str, str, str, str]]
    ) -> None:
        """Store (key_id, target_user_id, target_device_id, signature) made by ``signer``."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO e2e_cross_signing_signatures (user_id, key_id,"
                " target_user_id, target_device_id, signature) VALUES (?, ?, ?, ?, ?)",
                [(signer, *item) for item in items],
            )

    def get_cross_signing_signatures(
        self, signer: str, target_user_id: str, target_device_id: str
    ) -> dict[str, str]:
        """key_id -> signature of what ``signer`` signed of the target."""
        return {
            str(key_id): str(signature)
            for key_id, signature in self.conn.execute(
                "SELECT key_id, signature FROM e2e_cross_signing_signatures WHERE user_id = ?"
                " AND target_user_id = ? AND target_device_id = ?",
                (signer, target_user_id, target_device_id),
            )
        }

    # --- the device-list stream -----------------------------------------------------------

    def add_device_list_change(self, user_id: str, *, audience: str | None = None) -> int:
        stream = self.next_stream()
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO device_list_changes (stream_id, user_id, audience) VALUES (?, ?, ?)",
                (stream, user_id, audience),
            )
        return stream

    def device_list_changes(self, after: int, upto: int) -> list[tuple[str, str | None]]:
        """(user_id, audience) of the changes in (after, upto]."""
        return [
            (str(row[0]), row[1])
            for row in self.conn.execute(
                "SELECT user_id, audience FROM device_list_changes"
                " WHERE stream_id > ? AND stream_id <= ? ORDER BY stream_id",
                (after, upto),
            )
        ]

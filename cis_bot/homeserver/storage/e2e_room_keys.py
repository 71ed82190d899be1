"""Server-side key backup (Synapse's e2e_room_keys store): versions of a user's backup and the
encrypted room keys in each. The keys are opaque: the server never sees what they open."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.homeserver.storage.database import StoreBase

if TYPE_CHECKING:
    from collections.abc import Iterable


@attrs.frozen
class BackupVersion:
    version: int
    algorithm: str
    auth_data: Any
    etag: int


class EndToEndRoomKeyStore(StoreBase):
    def get_backup_version(self, user_id: str, version: str | None = None) -> BackupVersion | None:
        """The given live version, or the newest when ``version`` is None."""
        if version is None:
            row = self.conn.execute(
                "SELECT version, algorithm, auth_data, etag FROM e2e_room_keys_versions"
                " WHERE user_id = ? AND deleted = 0 ORDER BY version DESC LIMIT 1",
                (user_id,),
            ).fetchone()
        else:
            try:
                number = int(version)
            except ValueError:
                return None
            row = self.conn.execute(
                "SELECT version, algorithm, auth_data, etag FROM e2e_room_keys_versions"
                " WHERE user_id = ? AND version = ? AND deleted = 0",
                (user_id, number),
            ).fetchone()
        if row is None:
            return None
        return BackupVersion(int(row[0]), str(row[1]), json.loads(row[2]), int(row[3]))

    def create_backup_version(self, user_id: str, algorithm: str, auth_data: Any) -> int:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT MAX(version) FROM e2e_room_keys_versions WHERE user_id = ?", (user_id,)
            ).fetchone()
            number = 1 if row[0] is None else int(row[0]) + 1
            conn.execute(
                "INSERT INTO e2e_room_keys_versions (user_id, version, algorithm, auth_data)"
                " VALUES (?, ?, ?, ?)",
                (user_id, number, algorithm, json.dumps(auth_data)),
            )
        return number

    def update_backup_version(
        self, user_id: str, version: int, *, auth_data: Any = None, etag: int | None = None
    ) -> None:
        with self.transaction() as conn:
            if auth_data is not None:
                conn.execute(
                    "UPDATE e2e_room_keys_versions SET auth_data = ? WHERE user_id = ?"
                    " AND version = ?",
                    (json.dumps(auth_data), user_id, version),
                )
            if etag is not None:
                conn.execute(
                    "UPDATE e2e_room_keys_versions SET etag = ? WHERE user_id = ? AND version = ?",
                    (etag, user_id, version),
                )

    def delete_backup_version(self, user_id: str, version: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE e2e_room_keys_versions SET deleted = 1 WHERE user_id = ? AND version = ?",
                (user_id, version),
            )
            conn.execute(
                "DELETE FROM e2e_room_keys WHERE user_id = ? AND version = ?", (user_id, version)
            )

    def get_backup_keys(
        self, user_id: str, version: int, room_id: str | None, session_id: str | None
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """room_id -> session_id -> key data."""
        sql = (
            "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified,"
            " session_data FROM e2e_room_keys WHERE user_id = ? AND version = ?"
        )
        args: list[Any] = [user_id, version]
        if room_id is not None:
            sql += " AND room_id = ?"
            args.append(room_id)
            if session_id is not None:
                sql += " AND session_id = ?"
                args.append(session_id)
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for room, session, first, forwarded, verified, data in self.conn.execute(sql, args):
            found.setdefault(room, {})[session] = {
                "first_message_index": first,
                "forwarded_count": forwarded,
                "is_verified": bool(verified),
                "session_data": json.loads(data),
            }
        return found

    def put_backup_keys(
        self, user_id: str, version: int, keys: Iterable[tuple[str, str, dict[str, Any]]]
    ) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO e2e_room_keys (user_id, version, room_id, session_id,"
                " first_message_index, forwarded_count, is_verified, session_data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        user_id,
                        version,
                        room_id,
                        session_id,
                        key["first_message_index"],
                        key["forwarded_count"],
                        int(bool(key["is_verified"])),
                        json.dumps(key["session_data"]),
                    )
                    for room_id, session_id, key in keys
                ],
            )

    def delete_backup_keys(
        self, user_id: str, version: int, room_id: str | None, session_id: str | None
    ) -> None:
        sql = "DELETE FROM e2e_room_keys WHERE user_id = ? AND version = ?"
        args: list[Any] = [user_id, version]
        if room_id is not None:
            sql += " AND room_id = ?"
            args.append(room_id)
            if session_id is not None:
                sql += " AND session_id = ?"
                args.append(session_id)
        with self.transaction() as conn:
            conn.execute(sql, args)

    def count_backup_keys(self, user_id: str, version: int) -> int:
        row = self.conn.execute(
            "SELECT COUNT(*) FROM e2e_room_keys WHERE user_id = ? AND version = ?",
            (user_id, version),
        ).fetchone()
        return int(row[0])

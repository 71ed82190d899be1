"""Accounts: users, access tokens and devices (Synapse's RegistrationWorkerStore and
DeviceStore)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import attrs

from cis_bot.homeserver.storage.database import StoreBase, now_ms

_HUMAN_USERS = (
    "SELECT user_id FROM users WHERE appservice_id IS NULL AND deactivated = 0 ORDER BY user_id"
)


def human_users_in(database: Path) -> list[str]:
    """``RegistrationStore.human_users`` of a database another process may be running a
    homeserver on, or starting one on: read only, without the store's set-up (none when there
    is no database or no table yet)."""
    if not database.exists():
        return []
    conn = sqlite3.connect(database, timeout=10.0)
    try:
        return [r[0] for r in conn.execute(_HUMAN_USERS).fetchall()]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


class UserExistsError(Exception):
    """The user id is already registered."""


@attrs.frozen
class UserRow:
    user_id: str
    password_hash: str | None
    admin: bool
    appservice_id: str | None
    displayname: str | None
    avatar_url: str | None
    deactivated: bool


class RegistrationStore(StoreBase):
    def get_user(self, user_id: str) -> UserRow | None:
        row = self.conn.execute(
            "SELECT user_id, password_hash, admin, appservice_id, displayname, avatar_url,"
            " deactivated FROM users WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        return UserRow(row[0], row[1], bool(row[2]), row[3], row[4], row[5], bool(row[6]))

    def human_users(self) -> list[str]:
        """Active accounts that belong to no appservice (``cis homeserver add-user``'s)."""
        return [r[0] for r in self.conn.execute(_HUMAN_USERS).fetchall()]

    def get_user_case_insensitive(self, user_id: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT user_id FROM users WHERE lower(user_id) = lower(?)", (user_id,)
        ).fetchall()
        return [r[0] for r in rows]

    def create_user(
        self,
        user_id: str,
        *,
        password_hash: str | None,
        admin: bool = False,
        appservice_id: str | None = None,
        displayname: str | None = None,
    ) -> None:
        try:
            with self.transaction() as conn:
                conn.execute(
                    "INSERT INTO users (user_id, password_hash, admin, appservice_id, displayname,"
                    " created_ts) VALUES (?, ?, ?, ?, ?, ?)",
                    (user_id, password_hash, int(admin), appservice_id, displayname, now_ms()),
                )
        except sqlite3.IntegrityError:
            raise UserExistsError(user_id) from None

    def set_profile_field(self, user_id: str, field: str, value: str | None) -> None:
        if field not in ("displayname", "avatar_url"):
            raise ValueError(field)
        with self.transaction() as conn:
            conn.execute(f"UPDATE users SET {field} = ? WHERE user_id = ?", (value, user_id))

    def add_access_token(
        self, token: str, user_id: str, device_id: str, ip: str | None = None
    ) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO access_tokens (token, user_id, device_id, created_ts)"
                " VALUES (?, ?, ?, ?)",
                (token, user_id, device_id, now_ms()),
            )
            conn.execute(
                "INSERT OR IGNORE INTO devices (user_id, device_id) VALUES (?, ?)",
                (user_id, device_id),
            )
            conn.execute(
                "UPDATE devices SET last_seen_ts = ?, last_seen_ip = ?"
                " WHERE user_id = ? AND device_id = ?",
                (now_ms(), ip, user_id, device_id),
            )

    def set_device_display_name(self, user_id: str, device_id: str, name: str | None) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?",
                (name, user_id, device_id),
            )

    def get_access_token(self, token: str) -> tuple[str, str] | None:
        row = self.conn.execute(
            "SELECT user_id, device_id FROM access_tokens WHERE token = ?", (token,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def delete_device(self, user_id: str, device_id: str) -> list[str]:
        with self.transaction() as conn:
            tokens = [
                r[0]
                for r in conn.execute(
                    "SELECT token FROM access_tokens WHERE user_id = ? AND device_id = ?",
                    (user_id, device_id),
                )
            ]
            conn.execute(
                "DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?",
                (user_id, device_id),
            )
            conn.execute(
                "DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id)
            )
        return tokens

    def delete_all_tokens(self, user_id: str) -> list[str]:
        with self.transaction() as conn:
            tokens = [
                r[0]
                for r in conn.execute(
                    "SELECT token FROM access_tokens WHERE user_id = ?", (user_id,)
                )
            ]
            conn.execute("DELETE FROM access_tokens WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))
        return tokens

    def get_devices(self, user_id: str) -> list[tuple[str, str | None, int | None, str | None]]:
        """(device_id, display_name, last_seen_ts, last_seen_ip) of each device."""
        return [
            (r[0], r[1], r[2], r[3])
            for r in self.conn.execute(
                "SELECT device_id, display_name, last_seen_ts, last_seen_ip FROM devices"
                " WHERE user_id = ? ORDER BY device_id",
                (user_id,),
            )
        ]

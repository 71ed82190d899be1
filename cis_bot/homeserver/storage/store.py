"""SQLite storage: schema, connection settings and every query the homeserver makes.

One connection, used from the event loop thread: each write is one short transaction. WAL mode
with ``synchronous=NORMAL`` makes a commit an append to the WAL without an fsync (durable
against a killed process, not against power loss), which is what lets a single writer keep up
with hundreds of events per second. ``cis homeserver add-user`` opens its own connection to the
same file while the server runs; ``busy_timeout`` makes the two wait for each other.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import OrderedDict
from importlib import resources
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.homeserver.events import MEMBER, Event

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

SCHEMA_VERSION = 1
EVENT_CACHE_SIZE = 512


def now_ms() -> int:
    return int(time.time() * 1000)


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


@attrs.frozen
class RoomRow:
    room_id: str
    room_version: str
    creator: str
    is_public: bool


@attrs.frozen
class MembershipRow:
    room_id: str
    user_id: str
    membership: str
    event_id: str
    stream: int


@attrs.frozen
class MediaRow:
    media_id: str
    user_id: str
    content_type: str
    upload_name: str | None
    size: int


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA cache_size=-2048")  # 2 MiB page cache: the memory budget is tight
    schema = resources.files("cis_bot.homeserver.storage").joinpath("schema.sql").read_text()
    conn.executescript(schema)  # every statement is CREATE ... IF NOT EXISTS
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
    elif int(row[0]) > SCHEMA_VERSION:
        raise RuntimeError(
            f"{path} was written by a newer cis homeserver (schema {row[0]} > {SCHEMA_VERSION})"
        )
    return conn


class _transaction:
    """``with _transaction(conn):`` BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


def _event_from_row(row: Sequence[Any]) -> Event:
    stream, event_id, raw, txn_id, txn_scope, prev_state, redacted_by = row
    return Event(
        event_id=event_id,
        pdu=json.loads(raw),
        stream=stream,
        txn_id=txn_id,
        txn_scope=txn_scope,
        prev_state=prev_state,
        redacted_by=redacted_by,
    )


_EVENT_COLUMNS = "stream_ordering, event_id, json, txn_id, txn_scope, prev_state, redacted_by"


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path)
        self._events: OrderedDict[str, Event] = OrderedDict()
        self._stream = self._load_max_stream()

    def close(self) -> None:
        self.conn.close()

    def server_name(self) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'server_name'").fetchone()
        return None if row is None else str(row[0])

    def claim_server_name(self, server_name: str) -> None:
        """Record the server name on first use; a database keeps the name its ids carry."""
        current = self.server_name()
        if current is None:
            with self.transaction() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('server_name', ?)",
                    (server_name,),
                )
        elif current != server_name:
            raise ValueError(f"{self.path} belongs to server name {current!r}, not {server_name!r}")

    def transaction(self) -> _transaction:
        return _transaction(self.conn)

    # --- the global stream ----------------------------------------------------------------

    def _load_max_stream(self) -> int:
        best = 0
        for table, column in (
            ("events", "stream_ordering"),
            ("account_data", "stream_id"),
            ("receipts", "stream_id"),
        ):
            row = self.conn.execute(f"SELECT MAX({column}) FROM {table}").fetchone()
            if row and row[0] is not None:
                best = max(best, int(row[0]))
        return best

    @property
    def current_stream(self) -> int:
        return self._stream

    def next_stream(self) -> int:
        self._stream += 1
        return self._stream

    # --- users, tokens, devices -----------------------------------------------------------

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
        rows = self.conn.execute(
            "SELECT user_id FROM users WHERE appservice_id IS NULL AND deactivated = 0"
            " ORDER BY user_id"
        ).fetchall()
        return [r[0] for r in rows]

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

    # --- rooms ----------------------------------------------------------------------------

    def create_room(self, room_id: str, room_version: str, creator: str, is_public: bool) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO rooms (room_id, room_version, creator, is_public, created_ts)"
                " VALUES (?, ?, ?, ?, ?)",
                (room_id, room_version, creator, int(is_public), now_ms()),
            )

    def get_room(self, room_id: str) -> RoomRow | None:
        row = self.conn.execute(
            "SELECT room_id, room_version, creator, is_public FROM rooms WHERE room_id = ?",
            (room_id,),
        ).fetchone()
        return None if row is None else RoomRow(row[0], row[1], row[2], bool(row[3]))

    def set_room_public(self, room_id: str, is_public: bool) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE rooms SET is_public = ? WHERE room_id = ?", (int(is_public), room_id)
            )

    def public_room_ids(self) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT room_id FROM rooms WHERE is_public = 1 ORDER BY created_ts"
            )
        ]

    # --- events ---------------------------------------------------------------------------

    def persist_event(self, event: Event, *, update_state: bool) -> None:
        """Write one event, and (for accepted state events) the current state it changes.
        ``event.stream`` must already be assigned."""
        pdu = event.pdu
        state_key = event.state_key
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO events (stream_ordering, event_id, room_id, type, state_key, sender,"
                " depth, origin_server_ts, json, txn_id, txn_scope, prev_state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.stream,
                    event.event_id,
                    event.room_id,
                    event.type,
                    state_key,
                    event.sender,
                    event.depth,
                    event.origin_server_ts,
                    json.dumps(pdu, ensure_ascii=False, separators=(",", ":")),
                    event.txn_id,
                    event.txn_scope,
                    event.prev_state,
                ),
            )
            if update_state and state_key is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO current_state (room_id, type, state_key, event_id)"
                    " VALUES (?, ?, ?, ?)",
                    (event.room_id, event.type, state_key, event.event_id),
                )
                if event.type == MEMBER and event.membership is not None:
                    conn.execute(
                        "INSERT INTO membership_history (stream_ordering, room_id, user_id,"
                        " membership, event_id) VALUES (?, ?, ?, ?, ?)",
                        (event.stream, event.room_id, state_key, event.membership, event.event_id),
                    )
                    conn.execute(
                        "INSERT OR REPLACE INTO current_membership (user_id, room_id, membership,"
                        " event_id, stream_ordering) VALUES (?, ?, ?, ?, ?)",
                        (state_key, event.room_id, event.membership, event.event_id, event.stream),
                    )
        self._cache_event(event)

    def _cache_event(self, event: Event) -> None:
        self._events[event.event_id] = event
        self._events.move_to_end(event.event_id)
        while len(self._events) > EVENT_CACHE_SIZE:
            self._events.popitem(last=False)

    def get_event(self, event_id: str) -> Event | None:
        cached = self._events.get(event_id)
        if cached is not None:
            return cached
        row = self.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?", (event_id,)
        ).fetchone()
        if row is None:
            return None
        event = _event_from_row(row)
        self._cache_event(event)
        return event

    def get_events(self, event_ids: Iterable[str]) -> dict[str, Event]:
        found: dict[str, Event] = {}
        missing = []
        for event_id in event_ids:
            cached = self._events.get(event_id)
            if cached is not None:
                found[event_id] = cached
            else:
                missing.append(event_id)
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id IN ({marks})", chunk
            ):
                event = _event_from_row(row)
                self._cache_event(event)
                found[event.event_id] = event
        return found

    def room_events(
        self,
        room_id: str,
        *,
        after: int | None = None,
        upto: int | None = None,
        limit: int,
        backwards: bool,
        types: Sequence[str] | None = None,
    ) -> list[Event]:
        """Events of a room with ``after < stream <= upto``, newest first when ``backwards``."""
        clauses = ["room_id = ?"]
        args: list[Any] = [room_id]
        if after is not None:
            clauses.append("stream_ordering > ?")
            args.append(after)
        if upto is not None:
            clauses.append("stream_ordering <= ?")
            args.append(upto)
        if types:
            clauses.append(f"type IN ({','.join('?' * len(types))})")
            args.extend(types)
        order = "DESC" if backwards else "ASC"
        args.append(limit)
        rows = self.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(clauses)}"
            f" ORDER BY stream_ordering {order} LIMIT ?",
            args,
        ).fetchall()
        events = []
        for row in rows:
            cached = self._events.get(row[1])
            if cached is None:
                cached = _event_from_row(row)
                self._cache_event(cached)
            events.append(cached)
        return events

    def event_for_txn(self, room_id: str, txn_scope: str, txn_id: str) -> Event | None:
        row = self.conn.execute(
            "SELECT event_id FROM events WHERE room_id = ? AND txn_scope = ? AND txn_id = ?",
            (room_id, txn_scope, txn_id),
        ).fetchone()
        return None if row is None else self.get_event(row[0])

    def mark_redacted(self, event_id: str, redaction_id: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE events SET redacted_by = ? WHERE event_id = ? AND redacted_by IS NULL",
                (redaction_id, event_id),
            )
        cached = self._events.get(event_id)
        if cached is not None and cached.redacted_by is None:
            cached.redacted_by = redaction_id

    def current_state_ids(self, room_id: str) -> dict[tuple[str, str], str]:
        return {
            (r[0], r[1]): r[2]
            for r in self.conn.execute(
                "SELECT type, state_key, event_id FROM current_state WHERE room_id = ?",
                (room_id,),
            )
        }

    def state_ids_at(self, room_id: str, stream: int) -> dict[tuple[str, str], str]:
        """Room state after the event at ``stream`` (inclusive). Rooms here are linear, so the
        state at a point is the latest state event of each (type, state_key) up to it."""
        rows = self.conn.execute(
            "SELECT type, state_key, event_id, MAX(stream_ordering) FROM events"
            " WHERE room_id = ? AND state_key IS NOT NULL AND stream_ordering <= ?"
            " GROUP BY type, state_key",
            (room_id, stream),
        ).fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def room_last_event(self, room_id: str) -> Event | None:
        rows = self.room_events(room_id, limit=1, backwards=True)
        return rows[0] if rows else None

    def room_ids(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT room_id FROM rooms")]

    def events_in_stream_range(self, after: int, upto: int, limit: int) -> list[Event]:
        rows = self.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_ordering > ? AND"
            " stream_ordering <= ? ORDER BY stream_ordering LIMIT ?",
            (after, upto, limit),
        ).fetchall()
        events = []
        for row in rows:
            cached = self._events.get(row[1])
            if cached is None:
                cached = _event_from_row(row)
                self._cache_event(cached)
            events.append(cached)
        return events

    def events_by_stream(self, streams: Sequence[int]) -> list[Event]:
        if not streams:
            return []
        marks = ",".join("?" * len(streams))
        rows = self.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_ordering IN ({marks})"
            " ORDER BY stream_ordering",
            list(streams),
        ).fetchall()
        return [_event_from_row(row) for row in rows]

    # --- memberships ----------------------------------------------------------------------

    def memberships_for_user(self, user_id: str) -> list[MembershipRow]:
        return [
            MembershipRow(r[0], user_id, r[1], r[2], r[3])
            for r in self.conn.execute(
                "SELECT room_id, membership, event_id, stream_ordering FROM current_membership"
                " WHERE user_id = ?",
                (user_id,),
            )
        ]

    def membership_changes(self, user_id: str, after: int, upto: int) -> list[MembershipRow]:
        return [
            MembershipRow(r[0], user_id, r[1], r[2], r[3])
            for r in self.conn.execute(
                "SELECT room_id, membership, event_id, stream_ordering FROM membership_history"
                " WHERE user_id = ? AND stream_ordering > ? AND stream_ordering <= ?"
                " ORDER BY stream_ordering",
                (user_id, after, upto),
            )
        ]

    def membership_history(self, user_id: str, room_id: str) -> list[tuple[int, str]]:
        """(stream, membership) of every membership change of the user in the room, in order."""
        return [
            (int(r[0]), r[1])
            for r in self.conn.execute(
                "SELECT stream_ordering, membership FROM membership_history"
                " WHERE user_id = ? AND room_id = ? ORDER BY stream_ordering",
                (user_id, room_id),
            )
        ]

    def membership_at(self, user_id: str, room_id: str, stream: int) -> MembershipRow | None:
        row = self.conn.execute(
            "SELECT membership, event_id, stream_ordering FROM membership_history"
            " WHERE user_id = ? AND room_id = ? AND stream_ordering <= ?"
            " ORDER BY stream_ordering DESC LIMIT 1",
            (user_id, room_id, stream),
        ).fetchone()
        return None if row is None else MembershipRow(room_id, user_id, row[0], row[1], row[2])

    # --- aliases --------------------------------------------------------------------------

    def get_alias(self, alias: str) -> tuple[str, str] | None:
        row = self.conn.execute(
            "SELECT room_id, creator FROM room_aliases WHERE alias = ?", (alias,)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def create_alias(self, alias: str, room_id: str, creator: str) -> bool:
        try:
            with self.transaction() as conn:
                conn.execute(
                    "INSERT INTO room_aliases (alias, room_id, creator) VALUES (?, ?, ?)",
                    (alias, room_id, creator),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def delete_alias(self, alias: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM room_aliases WHERE alias = ?", (alias,))

    def aliases_for_room(self, room_id: str) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute(
                "SELECT alias FROM room_aliases WHERE room_id = ? ORDER BY alias", (room_id,)
            )
        ]

    # --- filters --------------------------------------------------------------------------

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

    # --- account data ---------------------------------------------------------------------

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

    # --- receipts -------------------------------------------------------------------------

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

    # --- media ----------------------------------------------------------------------------

    def add_media(
        self, media_id: str, user_id: str, content_type: str, upload_name: str | None, size: int
    ) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO media (media_id, user_id, content_type, upload_name, size,"
                " created_ts) VALUES (?, ?, ?, ?, ?, ?)",
                (media_id, user_id, content_type, upload_name, size, now_ms()),
            )

    def get_media(self, media_id: str) -> MediaRow | None:
        row = self.conn.execute(
            "SELECT media_id, user_id, content_type, upload_name, size FROM media"
            " WHERE media_id = ?",
            (media_id,),
        ).fetchone()
        return None if row is None else MediaRow(row[0], row[1], row[2], row[3], row[4])

    # --- idempotent requests --------------------------------------------------------------

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

    # --- appservices ----------------------------------------------------------------------

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

    # --- push rules -----------------------------------------------------------------------

    def push_rule_overrides(self, user_id: str) -> list[tuple[str, str, dict[str, Any], Any, Any]]:
        return [
            (
                r[0],
                r[1],
                json.loads(r[2]),
                None if r[3] is None else bool(r[3]),
                None if r[4] is None else json.loads(r[4]),
            )
            for r in self.conn.execute(
                "SELECT kind, rule_id, rule, enabled, actions FROM push_rules WHERE user_id = ?"
                " ORDER BY priority",
                (user_id,),
            )
        ]

    def set_push_rule(
        self,
        user_id: str,
        kind: str,
        rule_id: str,
        *,
        rule: dict[str, Any] | None = None,
        enabled: bool | None = None,
        actions: list[Any] | None = None,
    ) -> None:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT rule, enabled, actions, priority FROM push_rules"
                " WHERE user_id = ? AND kind = ? AND rule_id = ?",
                (user_id, kind, rule_id),
            ).fetchone()
            current: tuple[dict[str, Any], Any, Any, int]
            if row is None:
                priority_row = conn.execute(
                    "SELECT COALESCE(MAX(priority), 0) + 1 FROM push_rules WHERE user_id = ?",
                    (user_id,),
                ).fetchone()
                current = ({}, None, None, int(priority_row[0]))
            else:
                current = (json.loads(row[0]), row[1], row[2], row[3])
            new_rule = rule if rule is not None else current[0]
            new_enabled = current[1] if enabled is None else int(enabled)
            new_actions = current[2] if actions is None else json.dumps(actions)
            conn.execute(
                "INSERT OR REPLACE INTO push_rules (user_id, kind, rule_id, rule, enabled,"
                " actions, priority) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    user_id,
                    kind,
                    rule_id,
                    json.dumps(new_rule),
                    new_enabled,
                    new_actions,
                    current[3],
                ),
            )

    def delete_push_rule(self, user_id: str, kind: str, rule_id: str) -> bool:
        with self.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM push_rules WHERE user_id = ? AND kind = ? AND rule_id = ?",
                (user_id, kind, rule_id),
            )
        return cursor.rowcount > 0

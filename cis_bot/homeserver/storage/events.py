"""Room events and current state (Synapse's EventsStore, EventsWorkerStore and StateStore)."""

from __future__ import annotations

import json
import sqlite3
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.events import MEMBER, Event
from cis_bot.homeserver.storage.database import StoreBase

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

EVENT_CACHE_SIZE = 512


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


class EventsStore(StoreBase):
    """Events, the rooms' current state and the recently used events, cached."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._events: OrderedDict[str, Event] = OrderedDict()

    def persist_event(self, event: Event, *, update_state: bool) -> None:
        """Write one event, and (for accepted state events) the current state it changes.
        ``event.stream`` must already be assigned."""
        self.persist_events([event], update_state=update_state)

    def persist_events(self, events: Sequence[Event], *, update_state: bool) -> None:
        """Write events in one transaction (or the caller's), cached once it commits."""
        transaction = self.transaction()
        with transaction as conn:
            for event in events:
                self._insert_event(conn, event, update_state=update_state)
            transaction.call_after(lambda: self._cache_events(events))

    @staticmethod
    def _insert_event(conn: sqlite3.Connection, event: Event, *, update_state: bool) -> None:
        pdu = event.pdu
        state_key = event.state_key
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

    def _cache_events(self, events: Sequence[Event]) -> None:
        for event in events:
            self._cache_event(event)

    def _cache_event(self, event: Event) -> None:
        self._events[event.event_id] = event
        self._events.move_to_end(event.event_id)
        while len(self._events) > EVENT_CACHE_SIZE:
            self._events.popitem(last=False)

    def _events_from_rows(self, rows: Iterable[Sequence[Any]]) -> list[Event]:
        """Rows of ``_EVENT_COLUMNS`` as events: the cached instance when there is one (it may
        carry a newer ``redacted_by``), else a new one, cached."""
        events = []
        for row in rows:
            event = self._events.get(row[1])
            if event is None:
                event = _event_from_row(row)
                self._cache_event(event)
            events.append(event)
        return events

    def get_event(self, event_id: str) -> Event | None:
        cached = self._events.get(event_id)
        if cached is not None:
            return cached
        rows = self.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id = ?", (event_id,)
        ).fetchall()
        found = self._events_from_rows(rows)
        return found[0] if found else None

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
            rows = self.conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE event_id IN ({marks})", chunk
            ).fetchall()
            for event in self._events_from_rows(rows):
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
        return self._events_from_rows(rows)

    def event_for_txn(self, room_id: str, txn_scope: str, txn_id: str) -> Event | None:
        row = self.conn.execute(
            "SELECT event_id FROM events WHERE room_id = ? AND txn_scope = ? AND txn_id = ?",
            (room_id, txn_scope, txn_id),
        ).fetchone()
        return None if row is None else self.get_event(row[0])

    def mark_redacted(self, event_id: str, redaction_id: str) -> None:
        transaction = self.transaction()
        with transaction as conn:
            conn.execute(
                "UPDATE events SET redacted_by = ? WHERE event_id = ? AND redacted_by IS NULL",
                (redaction_id, event_id),
            )
            transaction.call_after(lambda: self._mark_cached_redacted(event_id, redaction_id))

    def _mark_cached_redacted(self, event_id: str, redaction_id: str) -> None:
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

    def events_in_stream_range(self, after: int, upto: int, limit: int) -> list[Event]:
        rows = self.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_ordering > ? AND"
            " stream_ordering <= ? ORDER BY stream_ordering LIMIT ?",
            (after, upto, limit),
        ).fetchall()
        return self._events_from_rows(rows)

    def events_by_stream(self, streams: Sequence[int]) -> list[Event]:
        if not streams:
            return []
        marks = ",".join("?" * len(streams))
        rows = self.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_ordering IN ({marks})"
            " ORDER BY stream_ordering",
            list(streams),
        ).fetchall()
        return self._events_from_rows(rows)

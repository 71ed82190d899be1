"""The SQLite database under every store: schema, connection settings, transactions and the
global stream counter.

One connection, used from the event loop thread: each write is one short transaction. WAL mode
with ``synchronous=NORMAL`` makes a commit an append to the WAL without an fsync (durable
against a killed process, not against power loss), which is what lets a single writer keep up
with hundreds of events per second. ``cis homeserver add-user`` opens its own connection to the
same file while the server runs; ``busy_timeout`` makes the two wait for each other.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from importlib import resources
from typing import TYPE_CHECKING

from cis_bot import private

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

SCHEMA_VERSION = 1
#: The database's file in the homeserver's state directory.
DB_NAME = "homeserver.db"


def now_ms() -> int:
    return int(time.time() * 1000)


def connect(path: Path) -> sqlite3.Connection:
    # Access tokens and password hashes: for the owner only. SQLite gives the -wal and -shm
    # files the database's mode, so it is enough to make the database 0600 before SQLite opens
    # it (and to fix those an older version left readable).
    os.close(private.open_file(path, os.O_RDWR | os.O_CREAT))
    for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            private.fix_mode(companion)
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


class Transaction:
    """``with store.transaction() as conn:`` BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error).

    A ``with`` inside another joins the outer transaction, so writes of several stores can
    commit or fail as one (room creation: the room, its alias and its events). What must
    happen only once the data is durable (filling caches) goes to ``call_after``, run after
    the outermost COMMIT (Synapse's ``txn.call_after``)."""

    def __init__(self, store: StoreBase) -> None:
        self.store = store
        self.depth = 0
        self._after_commit: list[Callable[[], None]] = []

    def call_after(self, callback: Callable[[], None]) -> None:
        self._after_commit.append(callback)

    def __enter__(self) -> sqlite3.Connection:
        if self.depth == 0:
            self.store.conn.execute("BEGIN IMMEDIATE")
        self.depth += 1
        return self.store.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.depth -= 1
        if self.depth:
            return
        self.store._transaction = None
        if exc_type is not None:
            self._rollback()
            return
        try:
            self.store.conn.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()  # COMMIT can fail (disk full), leaving it open...
            raise
        for callback in self._after_commit:
            callback()

    def _rollback(self) -> None:
        # ... or not: SQLite rolls back by itself on some errors (a full disk), and a ROLLBACK
        # then would fail and hide the error that matters.
        if self.store.conn.in_transaction:
            self.store.conn.execute("ROLLBACK")


class StoreBase:
    """The connection, transactions and the global stream every per-domain store shares.
    Events, account data, receipts, device-list changes, to-device messages and presence take
    their positions from one counter, so a sync token is a position in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path)
        self._stream = self._load_max_stream()
        self._transaction: Transaction | None = None

    def transaction(self) -> Transaction:
        """The open transaction, or a new one."""
        if self._transaction is None:
            self._transaction = Transaction(self)
        return self._transaction

    def _load_max_stream(self) -> int:
        best = 0
        for table, column in (
            ("events", "stream_ordering"),
            ("account_data", "stream_id"),
            ("receipts", "stream_id"),
            ("device_list_changes", "stream_id"),
            ("device_inbox", "stream_id"),
            ("presence", "stream_id"),
        ):
            row = self.conn.execute(f"SELECT MAX({column}) FROM {table}").fetchone()
            if row and row[0] is not None:
                best = max(best, int(row[0]))
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'stream_floor'").fetchone()
        if row is not None:
            best = max(best, int(row[0]))
        return best

    def keep_stream_floor(self, conn: sqlite3.Connection) -> None:
        """Rows are about to be deleted from a stream table (delivered to-device messages):
        remember the current position so that a restart never hands it out again."""
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('stream_floor', ?)",
            (str(self._stream),),
        )

    @property
    def current_stream(self) -> int:
        return self._stream

    def next_stream(self) -> int:
        self._stream += 1
        return self._stream

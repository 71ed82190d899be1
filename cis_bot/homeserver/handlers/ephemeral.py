"""Typing notifications (in memory, with expiry) and read receipts (persisted)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import bad_request, forbidden

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.notifications import NotificationCounts
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.handlers.room_state import RoomStateHandler
    from cis_bot.homeserver.storage.store import Store

MAX_TYPING_TIMEOUT_MS = 120_000


class TypingHandler:
    def __init__(self, rooms: RoomStateHandler, notifier: Notifier) -> None:
        self.rooms = rooms
        self.notifier = notifier
        self.serial = 0
        self._typing: dict[str, dict[str, asyncio.TimerHandle]] = {}
        self._room_serial: dict[str, int] = {}

    def set_typing(self, room_id: str, user_id: str, typing: bool, timeout_ms: int) -> None:
        room = self.rooms.check_user_in_room(room_id, user_id)
        users = self._typing.setdefault(room_id, {})
        previous = users.pop(user_id, None)
        if previous is not None:
            previous.cancel()
        if typing:
            delay = min(max(timeout_ms, 0), MAX_TYPING_TIMEOUT_MS) / 1000
            loop = asyncio.get_running_loop()
            users[user_id] = loop.call_later(delay, self._expire, room_id, user_id)
        if previous is None and not typing:
            return
        self.serial += 1
        self._room_serial[room_id] = self.serial
        self.notifier.notify_users(room.joined)

    def _expire(self, room_id: str, user_id: str) -> None:
        users = self._typing.get(room_id, {})
        if users.pop(user_id, None) is None:
            return
        self.serial += 1
        self._room_serial[room_id] = self.serial
        room = self.rooms.get(room_id)
        if room is not None:
            self.notifier.notify_users(room.joined)

    def changed_since(self, room_id: str, since_serial: int) -> bool:
        return self._room_serial.get(room_id, 0) > since_serial

    def event(self, room_id: str) -> dict[str, Any]:
        return {"type": "m.typing", "content": {"user_ids": sorted(self._typing.get(room_id, {}))}}

    def is_anyone_typing(self, room_id: str) -> bool:
        return bool(self._typing.get(room_id))

    def close(self) -> None:
        for users in self._typing.values():
            for handle in users.values():
                handle.cancel()
        self._typing.clear()


class ReceiptHandler:
    def __init__(
        self,
        store: Store,
        rooms: RoomStateHandler,
        notifier: Notifier,
        counts: NotificationCounts,
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.notifier = notifier
        self.counts = counts

    def set_receipt(
        self, room_id: str, user_id: str, receipt_type: str, event_id: str, thread_id: Any
    ) -> None:
        if receipt_type not in ("m.read", "m.read.private"):
            raise bad_request("Receipt type must be 'm.read', 'm.read.private' or 'm.fully_read'")
        room = self.rooms.check_user_in_room(room_id, user_id)
        event = self.store.get_event(event_id)
        if event is None or event.room_id != room_id:
            raise forbidden("Event not found or not in this room")  # Synapse: "Unknown event"
        if thread_id is not None and not isinstance(thread_id, str):
            raise bad_request("thread_id field must be a non-empty string", "M_INVALID_PARAM")
        data: dict[str, Any] = {"ts": int(time.time() * 1000)}
        if thread_id:
            data["thread_id"] = thread_id
        self.store.set_receipt(room_id, receipt_type, user_id, thread_id or "", event_id, data)
        self.counts.on_read(user_id, room_id)
        self.notifier.notify_users(room.joined)

    def receipt_event(
        self, room_id: str, user_id: str, after: int, upto: int
    ) -> dict[str, Any] | None:
        content: dict[str, Any] = {}
        for receipt_type, reader, event_id, data in self.store.receipts_since(room_id, after, upto):
            if receipt_type == "m.read.private" and reader != user_id:
                continue
            content.setdefault(event_id, {}).setdefault(receipt_type, {})[reader] = data
        if not content:
            return None
        return {"type": "m.receipt", "content": content}

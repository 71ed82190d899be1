"""Wakes long-polling ``/sync`` requests and appservice pushers when something they care about
is written. No polling: a waiter is a future resolved by the writer."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable


class Notifier:
    def __init__(self) -> None:
        self._user_waiters: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)
        # The highest stream position (or typing serial bump) each user has been woken for;
        # a waiter that arrives after the wake sees it and returns at once.
        self._user_position: dict[str, int] = {}
        self._stream_waiters: set[asyncio.Future[None]] = set()
        self._generation = 0

    @property
    def generation(self) -> int:
        """Increases on every notification; lets a waiter detect a wake it raced with."""
        return self._generation

    def is_waiting(self, user_id: str) -> bool:
        """True while a long poll of ``user_id`` is parked here."""
        return bool(self._user_waiters.get(user_id))

    def user_generation(self, user_id: str) -> int:
        return self._user_position.get(user_id, 0)

    def notify_users(self, user_ids: Iterable[str]) -> None:
        self._generation += 1
        for user_id in user_ids:
            self._user_position[user_id] = self._generation
            waiters = self._user_waiters.pop(user_id, None)
            if waiters:
                for future in waiters:
                    if not future.done():
                        future.set_result(None)

    def notify_stream(self) -> None:
        """A new event exists (any room): wake the appservice pushers."""
        waiters, self._stream_waiters = self._stream_waiters, set()
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def wait_for_user(self, user_id: str, seen_generation: int, deadline: float) -> bool:
        """Wait until ``user_id`` is notified after ``seen_generation`` or the loop clock passes
        ``deadline``. Returns True when woken."""
        if self._user_position.get(user_id, 0) > seen_generation:
            return True
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            return False
        future: asyncio.Future[None] = loop.create_future()
        self._user_waiters[user_id].add(future)
        try:
            async with asyncio.timeout_at(deadline):
                await future
        except TimeoutError:
            return False
        finally:
            waiters = self._user_waiters.get(user_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._user_waiters[user_id]
        return True

    async def wait_for_stream(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stream_waiters.add(future)
        try:
            await future
        finally:
            self._stream_waiters.discard(future)

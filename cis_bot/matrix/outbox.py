"""A room's outgoing events: posted in order, in the background, through homeserver outages.

``post`` never blocks and never raises. One sender delivers the queue in order; while the
homeserver is unreachable (connection errors, 5xx, 429) it retries the head with backoff, reusing
the transaction id so a retry cannot duplicate an event. The queue is bounded: when it is full,
droppable events (output samples) are dropped first, oldest first; other events are never dropped.
A 4xx answer (forbidden, too large) is logged and the event skipped: retrying would not help.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import structlog
from mautrix.errors import MatrixConnectionError, MatrixRequestError

log = structlog.get_logger(__name__)


@attrs.define
class Outgoing:
    event_type: str
    content: dict[str, Any]
    state_key: str | None = None
    droppable: bool = False
    #: Runs just before the first send attempt and may fill in the content (an upload's mxc).
    prepare: Callable[[Outgoing], Awaitable[None]] | None = None
    on_sent: Callable[[str], None] | None = None
    txn_id: str = attrs.Factory(lambda: secrets.token_hex(8))
    prepared: bool = False


Sender = Callable[[Outgoing], Awaitable[str]]


class Outbox:
    def __init__(
        self,
        send: Sender,
        *,
        limit: int = 2000,
        retry_initial_secs: float = 0.2,
        retry_max_secs: float = 5.0,
    ) -> None:
        self._send = send
        self.limit = limit
        self.retry_initial_secs = retry_initial_secs
        self.retry_max_secs = retry_max_secs
        self._queue: deque[Outgoing] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0
        self.rejected = 0
        #: True while the homeserver does not answer (for status displays).
        self.offline = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def post(self, item: Outgoing) -> None:
        full = len(self._queue) >= self.limit and not self._drop_one()
        if full and item.droppable:
            self.dropped += 1
            return
        self._queue.append(item)
        self._idle.clear()
        self._wake.set()

    def _drop_one(self) -> bool:
        for queued in self._queue:
            if queued.droppable:
                self._queue.remove(queued)
                self.dropped += 1
                return True
        return False

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything posted so far is delivered; False if ``timeout`` ran out."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff = self.retry_initial_secs
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._queue[0]
            try:
                if item.prepare and not item.prepared:
                    await item.prepare(item)
                    item.prepared = True
                event_id = await self._send(item)
            except MatrixRequestError as exc:
                if exc.http_status in (429,) or exc.http_status >= 500:
                    backoff = await self._wait_offline(exc, backoff)
                    continue
                self.rejected += 1
                log.error(
                    "outbox.rejected",
                    type=item.event_type,
                    status=exc.http_status,
                    errcode=exc.errcode,
                    error=exc.message,
                )
            except (MatrixConnectionError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                backoff = await self._wait_offline(exc, backoff)
                continue
            except Exception:  # a bug must cost one event, not every event after it
                self.rejected += 1
                log.exception("outbox.failed", type=item.event_type)
            else:
                self.sent += 1
                if item.on_sent:
                    item.on_sent(event_id)
            if self._queue and self._queue[0] is item:
                self._queue.popleft()
            if self.offline:
                log.info("outbox.online", pending=len(self._queue))
                self.offline = False
            backoff = self.retry_initial_secs

    async def _wait_offline(self, exc: BaseException, backoff: float) -> float:
        if not self.offline:
            log.warning("outbox.offline", error=str(exc) or type(exc).__name__)
            self.offline = True
        await asyncio.sleep(backoff)
        return min(backoff * 2, self.retry_max_secs)

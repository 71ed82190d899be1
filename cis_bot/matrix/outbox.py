"""A room's outgoing events: posted in order, in the background, through homeserver outages.

``post`` never blocks and never raises. Events with the same ``key`` (a task, a session) go out
one after another in the order posted; events with different keys may be in flight together, up
to ``concurrency``, so one slow task's events do not hold up another's. An event without a key
is a barrier: it waits for everything posted before it, and everything after waits for it.

While the homeserver is unreachable (connection errors, 5xx, 429) sending pauses and retries
with backoff, reusing each event's transaction id so a retry cannot duplicate it. The queue is
bounded: when it is full, droppable events (output samples) are dropped first, oldest first;
other events are never dropped. A 4xx answer (forbidden, too large) is logged and the event
skipped: retrying would not help. An event that repeats (a heartbeat) may take the refusal itself
(``on_rejected``), to say it once rather than at every repetition.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import attrs
import structlog
from mautrix.errors import MatrixConnectionError, MatrixRequestError

log = structlog.get_logger(__name__)


@attrs.define(eq=False)
class Outgoing:
    event_type: str
    content: dict[str, Any]
    state_key: str | None = None
    droppable: bool = False
    #: Ordering: same key, same order; None orders against everything.
    key: str | None = None
    #: Runs just before the first send attempt and may fill in the content (an upload's mxc).
    prepare: Callable[[Outgoing], Awaitable[None]] | None = None
    on_sent: Callable[[str], None] | None = None
    #: Told of a 4xx refusal instead of the log.
    on_rejected: Callable[[MatrixRequestError], None] | None = None
    txn_id: str = attrs.Factory(lambda: secrets.token_hex(8))
    prepared: bool = False
    in_flight: bool = False


Sender = Callable[[Outgoing], Awaitable[str]]


class _Offline(Exception):
    pass


class Outbox:
    def __init__(
        self,
        send: Sender,
        *,
        limit: int = 2000,
        concurrency: int = 8,
        retry_initial_secs: float = 0.2,
        retry_max_secs: float = 5.0,
    ) -> None:
        self._send = send
        self.limit = limit
        self.concurrency = concurrency
        self.retry_initial_secs = retry_initial_secs
        self.retry_max_secs = retry_max_secs
        self._queue: list[Outgoing] = []
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._backoff = retry_initial_secs
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
        self._changed.set()

    def _drop_one(self) -> bool:
        for queued in self._queue:
            if queued.droppable and not queued.in_flight:
                self._queue.remove(queued)
                self.dropped += 1
                return True
        return False

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything posted so far is delivered, for as long as deliveries go on:
        False once ``timeout`` passes without one (the homeserver is away), however long the
        queue (a large run's last events take their time, and must not be cut off)."""
        while True:
            settled = self.sent + self.rejected + self.dropped
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                if self.sent + self.rejected + self.dropped == settled:
                    return False
                continue
            return True

    async def close(self) -> None:
        for task in [self._task, *self._workers]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        self._workers.clear()

    def _ready(self) -> list[Outgoing]:
        """Queued events that may start now, in order, without breaking any ordering rule."""
        if any(item.in_flight and item.key is None for item in self._queue):
            return []
        in_flight = sum(1 for item in self._queue if item.in_flight)
        limit = 1 if self.offline else self.concurrency  # while away, probe with one event
        blocked: set[str] = {item.key for item in self._queue if item.in_flight and item.key}
        ready: list[Outgoing] = []
        for index, item in enumerate(self._queue):
            if in_flight + len(ready) >= limit:
                break
            if item.key is None:  # a barrier: only from the head, with nothing in flight
                if index == 0 and in_flight == 0 and not ready:
                    ready.append(item)
                break
            if item.in_flight or item.key in blocked:
                blocked.add(item.key)
                continue
            ready.append(item)
            blocked.add(item.key)
        return ready

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
            self._changed.clear()
            for item in self._ready():
                item.in_flight = True
                worker = asyncio.create_task(self._deliver(item))
                self._workers.add(worker)
                worker.add_done_callback(self._workers.discard)
            await self._changed.wait()

    async def _deliver(self, item: Outgoing) -> None:
        try:
            await self._attempt(item)
        except _Offline as exc:
            await self._wait_offline(exc.__cause__ or exc)  # holding its slot: others wait
            item.in_flight = False
        except Exception:  # never leave an event in flight forever
            self.rejected += 1
            log.exception("outbox.failed", type=item.event_type)
            self._queue.remove(item)
        else:
            self._queue.remove(item)
            if self.offline:
                log.info("outbox.online", pending=len(self._queue))
                self.offline = False
            self._backoff = self.retry_initial_secs
        self._changed.set()

    async def _attempt(self, item: Outgoing) -> None:
        """Send once. Raises _Offline to retry later; anything else is settled here."""
        try:
            if item.prepare and not item.prepared:
                await item.prepare(item)
                item.prepared = True
            event_id = await self._send(item)
        except MatrixRequestError as exc:
            if exc.http_status == 429 or exc.http_status >= 500:
                raise _Offline from exc
            self.rejected += 1
            if item.on_rejected is not None:
                item.on_rejected(exc)
            else:
                log.error(
                    "outbox.rejected",
                    type=item.event_type,
                    status=exc.http_status,
                    errcode=exc.errcode,
                    error=exc.message,
                )
        except (MatrixConnectionError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Offline from exc
        except Exception:  # a bug must cost one event, not every event after it
            self.rejected += 1
            log.exception("outbox.failed", type=item.event_type)
        else:
            self.sent += 1
            if item.on_sent:
                item.on_sent(event_id)

    async def _wait_offline(self, exc: BaseException) -> None:
        if not self.offline:
            log.warning("outbox.offline", error=str(exc) or type(exc).__name__)
            self.offline = True
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, self.retry_max_secs)

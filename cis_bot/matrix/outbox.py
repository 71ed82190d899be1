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

Finding the next events to send costs O(log n) however long the queue: the queue is kept as
stretches between barriers, each with a FIFO per key and a heap of the keys whose next event is
not in flight, by posting order; droppable events are indexed apart, oldest first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
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
    #: Posting order, and the outbox's bookkeeping: where the event waits, whether it left.
    _seq: int = attrs.field(default=0, init=False, repr=False)
    _stretch: _Stretch | None = attrs.field(default=None, init=False, repr=False)
    _gone: bool = attrs.field(default=False, init=False, repr=False)


@attrs.define(eq=False)
class _Stretch:
    """The queued events up to the next barrier, or a barrier alone. Only the first stretch
    sends; the next one starts when it is empty."""

    barrier: Outgoing | None = None
    #: Per key, its events in order; the first is in flight or in ``ready``.
    by_key: dict[str, collections.deque[Outgoing]] = attrs.Factory(dict)
    #: (posting order, event) of each key's first event while it is not in flight.
    ready: list[tuple[int, Outgoing]] = attrs.Factory(list)
    #: Events here that have not left (sent, given up or dropped).
    count: int = 0


Sender = Callable[[Outgoing], Awaitable[str]]


class _Offline(Exception):
    pass


class Outbox:
    def __init__(
        self,
        send: Sender,
        *,
        limit: int = 2000,
        concurrency: int = 32,
        retry_initial_secs: float = 0.2,
        retry_max_secs: float = 5.0,
    ) -> None:
        self._send = send
        self.limit = limit
        self.concurrency = concurrency
        self.retry_initial_secs = retry_initial_secs
        self.retry_max_secs = retry_max_secs
        self._stretches: collections.deque[_Stretch] = collections.deque()
        #: Queued droppable events by posting order (oldest first), to drop from when full.
        self._droppable: collections.OrderedDict[int, Outgoing] = collections.OrderedDict()
        self._queued = 0
        self._in_flight = 0
        self._posted = 0
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
        full = self._queued >= self.limit and not self._drop_one()
        if full and item.droppable:
            self.dropped += 1
            return
        self._posted += 1
        item._seq = self._posted
        last = self._stretches[-1] if self._stretches else None
        if item.key is None:
            last = _Stretch(barrier=item)
            self._stretches.append(last)
        else:
            if last is None or last.barrier is not None:
                last = _Stretch()
                self._stretches.append(last)
            same_key = last.by_key.get(item.key)
            if same_key is None:
                same_key = last.by_key[item.key] = collections.deque()
                heapq.heappush(last.ready, (item._seq, item))
            same_key.append(item)
        last.count += 1
        item._stretch = last
        if item.droppable:
            self._droppable[item._seq] = item
        self._queued += 1
        self._idle.clear()
        self._changed.set()

    def _drop_one(self) -> bool:
        """Drop the oldest droppable event not in flight (passing at most ``concurrency``)."""
        for queued in self._droppable.values():
            if not queued.in_flight:
                self._leave(queued, dropped=True)
                self.dropped += 1
                return True
        return False

    def _leave(self, item: Outgoing, *, dropped: bool = False) -> None:
        """The event is no longer queued (sent, given up, dropped). Its place in its key's queue
        is cleared lazily, when the events before it have gone."""
        item._gone = True
        self._queued -= 1
        self._droppable.pop(item._seq, None)
        stretch = item._stretch
        assert stretch is not None
        stretch.count -= 1
        if item.key is not None:
            self._advance(stretch, item.key)
        elif dropped:
            self._unlink(stretch)  # a droppable barrier dropped: what it held apart joins up
        while self._stretches and not self._stretches[0].count:
            self._stretches.popleft()

    def _unlink(self, barrier: _Stretch) -> None:
        """Remove a barrier's stretch; the stretches either side of it become one."""
        at = self._stretches.index(barrier)
        del self._stretches[at]
        if at == 0 or at == len(self._stretches):
            return
        before, after = self._stretches[at - 1], self._stretches[at]
        if before.barrier is not None or after.barrier is not None:
            return
        del self._stretches[at]
        for key, events in after.by_key.items():
            for event in events:
                event._stretch = before
            same_key = before.by_key.get(key)
            if same_key is None:
                before.by_key[key] = events
                heapq.heappush(before.ready, (events[0]._seq, events[0]))
            else:
                same_key.extend(events)
        before.count += after.count

    @staticmethod
    def _advance(stretch: _Stretch, key: str) -> None:
        """Past the key's events that have gone: its next one, if any, becomes ready."""
        same_key = stretch.by_key.get(key)
        if same_key is None or not same_key[0]._gone:
            return
        while same_key and same_key[0]._gone:
            same_key.popleft()
        if same_key:
            heapq.heappush(stretch.ready, (same_key[0]._seq, same_key[0]))
        else:
            del stretch.by_key[key]

    @property
    def pending(self) -> int:
        return self._queued

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
        if not self._stretches:
            return []
        head = self._stretches[0]
        if head.barrier is not None:  # it goes alone, once everything before it is done
            barrier = head.barrier
            return [] if barrier.in_flight or self._in_flight else [barrier]
        limit = 1 if self.offline else self.concurrency  # while away, probe with one event
        ready: list[Outgoing] = []
        while head.ready and self._in_flight + len(ready) < limit:
            _, item = heapq.heappop(head.ready)
            if item._gone:  # dropped while it waited
                assert item.key is not None
                self._advance(head, item.key)
                continue
            ready.append(item)
        return ready

    async def _run(self) -> None:
        while True:
            if not self._queued:
                self._idle.set()
            self._changed.clear()
            for item in self._ready():
                item.in_flight = True
                self._in_flight += 1
                worker = asyncio.create_task(self._deliver(item))
                self._workers.add(worker)
                worker.add_done_callback(self._workers.discard)
            await self._changed.wait()

    async def _deliver(self, item: Outgoing) -> None:
        try:
            await self._attempt(item)
        except _Offline as exc:
            await self._wait_offline(exc.__cause__ or exc)  # holding its slot: others wait
            self._retry_later(item)
        except Exception:  # never leave an event in flight forever
            self.rejected += 1
            log.exception("outbox.failed", type=item.event_type)
            self._done(item)
        else:
            self._done(item)
            if self.offline:
                log.info("outbox.online", pending=self._queued)
                self.offline = False
            self._backoff = self.retry_initial_secs
        self._changed.set()

    def _done(self, item: Outgoing) -> None:
        item.in_flight = False
        self._in_flight -= 1
        self._leave(item)

    def _retry_later(self, item: Outgoing) -> None:
        item.in_flight = False
        self._in_flight -= 1
        stretch = item._stretch
        assert stretch is not None
        if item.key is not None:  # first of its key again (the barrier waits in its stretch)
            heapq.heappush(stretch.ready, (item._seq, item))

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

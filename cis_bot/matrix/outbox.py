"""A room's outgoing events: posted in order, in the background, through homeserver outages.

``post`` never blocks and never raises. Events with the same ``key`` (a task, a session) go out
one after another in the order posted; events with different keys may be in flight together, up
to ``concurrency`` requests, so one slow task's events do not hold up another's. An event
without a key is a barrier: it waits for everything posted before it, and everything after waits
for it.

Group commit: events marked ``batchable`` (the run log's message events) travel together. When a
batch may start (at most ``Batching.in_flight`` of them at a time), it takes every batchable
event deliverable then, in posting order, a key's later events after its earlier ones, up to
``Batching.limit`` bytes, and sends them as one event (``Batching.make``). One event alone goes
as itself: under light load nothing waits, and batches grow only while earlier ones are in
flight. Barriers, and events not batchable (state events, ``m.room.*``), always go alone. A
homeserver that refuses a batch (a 4xx: a room that forbids the batch's type) gets its events one
by one, and this outbox stops batching after a 403.

While the homeserver is unreachable (connection errors, 5xx, 429) sending pauses and retries
with backoff. Whatever was attempted (one event, a batch) is retried as it was, with the same
transaction id, so a retry cannot duplicate it. The queue is bounded: when it is full, droppable
events (output samples) are dropped first, oldest first; other events are never dropped. A 4xx
answer (forbidden, too large) is logged and the event skipped: retrying would not help. An event
that repeats (a heartbeat) may take the refusal itself (``on_rejected``), to say it once rather
than at every repetition.

Finding the next events to send costs O(log n) however long the queue: the queue is kept as
stretches between barriers, each with a FIFO per key and two heaps (batchable or not) of the
keys whose next event is not in flight, by posting order; droppable events are indexed apart,
oldest first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import secrets
from collections.abc import Awaitable, Callable, Sequence
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
    #: May travel in a batch with other events (see the module docstring).
    batchable: bool = False
    txn_id: str = attrs.Factory(lambda: secrets.token_hex(8))
    prepared: bool = False
    #: The content's size encoded (JSON, bytes), when known: batching reads it instead of
    #: encoding again. Forgotten when ``prepare`` has run (it may change the content).
    content_bytes: int | None = None
    in_flight: bool = False
    #: Posting order, and the outbox's bookkeeping: where the event waits, whether it left.
    _seq: int = attrs.field(default=0, init=False, repr=False)
    _stretch: _Stretch | None = attrs.field(default=None, init=False, repr=False)
    _gone: bool = attrs.field(default=False, init=False, repr=False)


@attrs.frozen
class Batching:
    """How an outbox groups batchable events: ``make`` turns some into the one event that
    carries them, ``size`` is what one adds to that event's content (bytes), ``limit`` the most
    a batch's events may add up to, ``in_flight`` how many batches may be under way at once."""

    make: Callable[[Sequence[Outgoing]], Outgoing]
    size: Callable[[Outgoing], int]
    limit: int
    in_flight: int = 1


@attrs.define(eq=False)
class _Stretch:
    """The queued events up to the next barrier, or a barrier alone. Only the first stretch
    sends; the next one starts when it is empty."""

    barrier: Outgoing | None = None
    #: Per key, its events in order; the first is in flight or in a ready heap.
    by_key: dict[str, collections.deque[Outgoing]] = attrs.Factory(dict)
    #: (posting order, event) of each key's first event while it is not in flight, by whether
    #: that event is batchable (batches take from the one, single sends from the other).
    ready: list[tuple[int, Outgoing]] = attrs.Factory(list)
    ready_batchable: list[tuple[int, Outgoing]] = attrs.Factory(list)
    #: Events here that have not left (sent, given up or dropped).
    count: int = 0

    def push_ready(self, item: Outgoing) -> None:
        heapq.heappush(self.ready_batchable if item.batchable else self.ready, (item._seq, item))


@attrs.define(eq=False)
class _Unit:
    """What one request carries: an event, or a batch of them in order."""

    items: list[Outgoing]
    #: Counted against ``Batching.in_flight`` (batchable events, one or many).
    batch: bool = False
    #: What goes on the wire, fixed at the first attempt: every retry sends it again.
    wire: Outgoing | None = None


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
        batching: Batching | None = None,
        retry_initial_secs: float = 0.2,
        retry_max_secs: float = 5.0,
    ) -> None:
        self._send = send
        self.limit = limit
        self.concurrency = concurrency
        self.batching = batching
        self.retry_initial_secs = retry_initial_secs
        self.retry_max_secs = retry_max_secs
        self._stretches: collections.deque[_Stretch] = collections.deque()
        #: Queued droppable events by posting order (oldest first), to drop from when full.
        self._droppable: collections.OrderedDict[int, Outgoing] = collections.OrderedDict()
        #: Units attempted and waiting to be sent again, as they were.
        self._retry: collections.deque[_Unit] = collections.deque()
        self._queued = 0
        #: Requests under way (or waiting out an outage), and how many of them are batches.
        self._in_flight = 0
        self._batches_in_flight = 0
        self._posted = 0
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._backoff = retry_initial_secs
        #: Events delivered, dropped and refused; ``batches``: how many went in batches.
        self.sent = 0
        self.dropped = 0
        self.rejected = 0
        self.batches = 0
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
                last.push_ready(item)
            same_key.append(item)
        last.count += 1
        item._stretch = last
        if item.droppable:
            self._droppable[item._seq] = item
        self._queued += 1
        self._idle.clear()
        self._changed.set()

    def _drop_one(self) -> bool:
        """Drop the oldest droppable event not in flight (passing at most ``concurrency``
        requests' worth)."""
        for queued in self._droppable.values():
            if not queued.in_flight:
                self._leave([queued], dropped=True)
                self.dropped += 1
                return True
        return False

    def _leave(self, items: Sequence[Outgoing], *, dropped: bool = False) -> None:
        """The events are no longer queued (sent, given up, dropped). Their places in their
        keys' queues are cleared lazily, when the events before them have gone (all of them
        first: a batch's events of one key leave together)."""
        for item in items:
            item._gone = True
            self._queued -= 1
            self._droppable.pop(item._seq, None)
            stretch = item._stretch
            assert stretch is not None
            stretch.count -= 1
        for item in items:
            stretch = item._stretch
            assert stretch is not None
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
                before.push_ready(events[0])
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
        if not same_key:
            del stretch.by_key[key]
        elif not same_key[0].in_flight:  # else it is in a batch, and moves on with it
            stretch.push_ready(same_key[0])

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

    # --- choosing what to send -------------------------------------------------------------------

    def _ready(self) -> list[_Unit]:
        """Units that may start now, without breaking any ordering rule."""
        limit = 1 if self.offline else self.concurrency  # while away, probe with one request
        units: list[_Unit] = []
        while self._retry and self._in_flight + len(units) < limit:
            units.append(self._retry.popleft())
        if not self._stretches:
            return units
        head = self._stretches[0]
        if head.barrier is not None:  # it goes alone, once everything before it is done
            barrier = head.barrier
            if not barrier.in_flight and not self._in_flight and not units:
                barrier.in_flight = True
                units.append(_Unit([barrier]))
            return units
        batches = sum(unit.batch for unit in units)
        batch_limit = self.batching.in_flight if self.batching else self.concurrency
        while self._in_flight + len(units) < limit:
            may_batch = head.ready_batchable and self._batches_in_flight + batches < batch_limit
            if may_batch and (not head.ready or head.ready_batchable[0][0] < head.ready[0][0]):
                _, item = heapq.heappop(head.ready_batchable)
                if not self._still_queued(head, item):
                    continue
                units.append(self._form_batch(head, item))
                batches += 1
            elif head.ready:
                _, item = heapq.heappop(head.ready)
                if not self._still_queued(head, item):
                    continue
                item.in_flight = True
                units.append(_Unit([item]))
            else:
                break
        return units

    def _still_queued(self, stretch: _Stretch, item: Outgoing) -> bool:
        """False for an event dropped while it waited in a ready heap (its key moves on)."""
        if item._gone:
            assert item.key is not None
            self._advance(stretch, item.key)
            return False
        return True

    def _form_batch(self, head: _Stretch, first: Outgoing) -> _Unit:
        """A batch starting with ``first``: then every batchable event deliverable now, in
        posting order (a key's next events once its earlier ones are in), within the limit."""
        first.in_flight = True
        unit = _Unit([first], batch=True)
        batching = self.batching
        if batching is None:
            return unit
        size = batching.size(first)
        #: Per key taken, where its last taken event is in its queue.
        at: dict[str, int] = {}
        #: (posting order, event, its place) of the taken keys' next events.
        following: list[tuple[int, Outgoing, int]] = []

        def take(item: Outgoing, place: int) -> None:
            assert item.key is not None
            at[item.key] = place
            same_key = head.by_key[item.key]
            place += 1
            while place < len(same_key) and same_key[place]._gone:
                place += 1
            if place < len(same_key) and same_key[place].batchable:
                heapq.heappush(following, (same_key[place]._seq, same_key[place], place))

        take(first, 0)
        ready = head.ready_batchable
        while following or ready:
            if following and (not ready or following[0][0] < ready[0][0]):
                _, item, place = following[0]
                grown = size + batching.size(item)
                if grown > batching.limit:
                    break
                heapq.heappop(following)
            else:
                item, place = ready[0][1], 0  # the first of its key: at the front of its queue
                if item._gone:
                    heapq.heappop(ready)
                    self._still_queued(head, item)
                    continue
                grown = size + batching.size(item)
                if grown > batching.limit:
                    break
                heapq.heappop(ready)
            size = grown
            item.in_flight = True
            unit.items.append(item)
            take(item, place)
        return unit

    def _put_back(self, unit: _Unit, items: Sequence[Outgoing]) -> None:
        """Events taken for ``unit`` but not sent in it: queued again, each key's first one
        ready unless an earlier event of its key stays in the unit."""
        kept = {item.key for item in unit.items}
        for item in items:
            item.in_flight = False
            stretch = item._stretch
            assert stretch is not None and item.key is not None
            if item.key not in kept:
                kept.add(item.key)
                stretch.push_ready(item)

    # --- sending ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queued:
                self._idle.set()
            self._changed.clear()
            for unit in self._ready():
                self._in_flight += 1
                self._batches_in_flight += unit.batch
                worker = asyncio.create_task(self._deliver(unit))
                self._workers.add(worker)
                worker.add_done_callback(self._workers.discard)
            await self._changed.wait()

    async def _deliver(self, unit: _Unit) -> None:
        try:
            await self._attempt(unit)
        except _Offline as exc:
            await self._wait_offline(exc.__cause__ or exc)  # holding its slot: others wait
            self._release(unit)
            self._retry.append(unit)
        except Exception:  # never leave an event in flight forever
            self.rejected += len(unit.items)
            log.exception("outbox.failed", type=unit.items[0].event_type)
            self._done(unit)
        else:
            self._done(unit)
            if self.offline:
                log.info("outbox.online", pending=self._queued)
                self.offline = False
            self._backoff = self.retry_initial_secs
        self._changed.set()

    def _release(self, unit: _Unit) -> None:
        self._in_flight -= 1
        self._batches_in_flight -= unit.batch

    def _done(self, unit: _Unit) -> None:
        self._release(unit)
        for item in unit.items:
            item.in_flight = False
        self._leave(unit.items)

    async def _attempt(self, unit: _Unit) -> None:
        """Send once. Raises _Offline to retry later; anything else is settled here."""
        if unit.wire is None:
            await self._prepare(unit)
            if not unit.items:
                return
            unit.wire = self._wire(unit)
        wire = unit.wire
        try:
            event_id = await self._send(wire)
        except MatrixRequestError as exc:
            if exc.http_status == 429 or exc.http_status >= 500:
                raise _Offline from exc
            if wire is unit.items[0]:
                self._refused(wire, exc)
            else:
                self._batch_refused(unit, exc)
        except (MatrixConnectionError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Offline from exc
        except Exception:  # a bug must cost one request, not every one after it
            self.rejected += len(unit.items)
            log.exception("outbox.failed", type=wire.event_type)
        else:
            self.sent += len(unit.items)
            if wire is unit.items[0]:
                if wire.on_sent:
                    wire.on_sent(event_id)
                return
            self.batches += 1
            for index, item in enumerate(unit.items):
                if item.on_sent:
                    item.on_sent(f"{event_id}#{index}")

    async def _prepare(self, unit: _Unit) -> None:
        """Run the events' ``prepare`` (together); an event whose preparation is refused or
        fails leaves the unit. Raises _Offline while the homeserver is away."""
        waiting = [item for item in unit.items if item.prepare and not item.prepared]
        if not waiting:
            return
        results = await asyncio.gather(
            *(item.prepare(item) for item in waiting if item.prepare), return_exceptions=True
        )
        offline: BaseException | None = None
        for item, result in zip(waiting, results, strict=True):
            if result is None:
                item.prepared = True
                item.content_bytes = None
            elif _is_offline(result):
                offline = offline or result
            elif isinstance(result, MatrixRequestError):
                self._refused(item, result)
                self._drop_from(unit, item)
            elif isinstance(result, Exception):
                self.rejected += 1
                log.error("outbox.failed", type=item.event_type, exc_info=result)
                self._drop_from(unit, item)
            else:
                raise result  # cancelled
        if offline is not None:
            raise _Offline from offline

    def _drop_from(self, unit: _Unit, item: Outgoing) -> None:
        """A refused event leaves the unit (and the queue); a later event of its key in the
        unit stays, in its order."""
        unit.items.remove(item)
        item.in_flight = False
        self._leave([item])

    def _wire(self, unit: _Unit) -> Outgoing:
        """What the unit sends: its event, or the batch carrying its events. A batch whose
        prepared events outgrew the limit gives back its last ones (they go in a later one)."""
        if len(unit.items) == 1 or self.batching is None:
            return unit.items[0]
        batching = self.batching
        sizes = [batching.size(item) for item in unit.items]
        total = sum(sizes)
        keep = len(unit.items)
        while keep > 1 and total > batching.limit:
            keep -= 1
            total -= sizes[keep]
        if keep < len(unit.items):
            spilled = unit.items[keep:]
            del unit.items[keep:]
            self._put_back(unit, spilled)
        if len(unit.items) == 1:
            return unit.items[0]
        return batching.make(unit.items)

    def _batch_refused(self, unit: _Unit, exc: MatrixRequestError) -> None:
        """The homeserver will not take this batch: its events go again, one by one (it stored
        none of them). After a 403 (the room forbids batches) this outbox stops batching."""
        if exc.http_status == 403 and self.batching is not None:
            log.warning(
                "outbox.batches_refused",
                status=exc.http_status,
                errcode=exc.errcode,
                error=exc.message,
                hint="events go one by one in this room; to batch, let the sender post "
                'cis.dag.batch (m.room.power_levels: its level under "events")',
            )
            self.batching = None
        else:
            log.warning("outbox.batch_refused", status=exc.http_status, errcode=exc.errcode)
        items = list(unit.items)
        unit.items.clear()
        for item in items:
            item.batchable = False
        self._put_back(unit, items)

    def _refused(self, item: Outgoing, exc: MatrixRequestError) -> None:
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

    async def _wait_offline(self, exc: BaseException) -> None:
        if not self.offline:
            log.warning("outbox.offline", error=str(exc) or type(exc).__name__)
            self.offline = True
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, self.retry_max_secs)


def _is_offline(exc: BaseException) -> bool:
    """Whether a failure means the homeserver is away (retry later) rather than a refusal."""
    if isinstance(exc, MatrixRequestError):
        return exc.http_status == 429 or exc.http_status >= 500
    return isinstance(exc, MatrixConnectionError | aiohttp.ClientError | OSError | TimeoutError)

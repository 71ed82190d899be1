"""One state event of ours in one room, kept current: a heartbeat, a coordinator's lease.

Only the newest content matters, so ``update`` replaces whatever still waits to be sent (a
backlog of stale heartbeats after an outage would be traffic for nothing). One request at a time,
each bounded by ``timeout`` (a request lost in a partition must not hold back the next beat); a
failure is retried after ``retry_secs`` with the newest content. ``renewed_at`` is when the
content the homeserver last took was made, on the monotonic clock: leases are reckoned from it
(the node that made a beat before a partition must not count it as renewed when it lands later).

Kept apart from the room's ``Outbox`` on purpose: that queue can be long (a large run's events)
and ordered, and a heartbeat waiting behind it would let the node's leases lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aiohttp
import structlog
from mautrix.errors import MatrixConnectionError, MatrixRequestError

from cis_bot.matrix.outbox import Outgoing

log = structlog.get_logger(__name__)

Sender = Callable[[Outgoing], Awaitable[str]]


class Beacon:
    def __init__(
        self,
        send: Sender,
        *,
        timeout: float,
        retry_secs: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self.timeout = timeout
        self.retry_secs = retry_secs
        self._clock = clock
        self._pending: tuple[Outgoing, float] | None = None
        self._wake = asyncio.Event()
        #: Set while nothing waits to be sent and nothing is on its way.
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        #: When (monotonic) the newest content the homeserver took was made; None: none yet.
        self.renewed_at: float | None = None
        #: True while the homeserver does not take our beats.
        self.failing = False

    def update(self, item: Outgoing, *, made_at: float | None = None) -> None:
        """Send ``item`` (made at ``made_at``, default now) instead of anything still waiting."""
        self._pending = (item, self._clock() if made_at is None else made_at)
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def renewed_within(self, secs: float) -> bool:
        return self.renewed_at is not None and self._clock() - self.renewed_at <= secs

    async def settle(self, timeout: float) -> bool:
        """Wait until what was given has gone (or failed for good); False after ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
                return True
        return False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._pending is None:
                continue
            item, made_at = self._pending
            self._pending = None
            if not await self._attempt(item, made_at) and self._pending is None:
                self._pending = (item, made_at)  # nothing newer: this one again
            if self._pending is not None:
                if self.failing:
                    await asyncio.sleep(self.retry_secs)
                self._wake.set()
            else:
                self._idle.set()

    async def _attempt(self, item: Outgoing, made_at: float) -> bool:
        """Send once; False to try again (the homeserver is away or overloaded)."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that comes as the send completes, and close() would wait forever.
            async with asyncio.timeout(self.timeout):
                event_id = await self._send(item)
        except MatrixRequestError as exc:
            if exc.http_status == 429 or exc.http_status >= 500:
                return self._failed(item, exc)
            if item.on_rejected is not None:
                item.on_rejected(exc)
            else:
                log.error(
                    "beacon.rejected",
                    type=item.event_type,
                    status=exc.http_status,
                    error=exc.message,
                )
            return True
        except (MatrixConnectionError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._failed(item, exc)
        if self.failing:
            log.info("beacon.online", type=item.event_type)
        self.failing = False
        self.renewed_at = made_at if self.renewed_at is None else max(self.renewed_at, made_at)
        if item.on_sent is not None:
            item.on_sent(event_id)
        return True

    def _failed(self, item: Outgoing, exc: BaseException) -> bool:
        if not self.failing:
            log.warning(
                "beacon.failing", type=item.event_type, error=str(exc) or type(exc).__name__
            )
        self.failing = True
        return False


async def wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Until ``event`` is set or ``timeout`` passes (None: no bound). Built on asyncio.timeout:
    on Python 3.11, ``wait_for`` swallows a cancellation that comes as the event is set, and a
    loop cancelled that way would run on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()

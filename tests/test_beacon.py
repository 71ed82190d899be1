"""The beacon's rules (one state event kept current), with a scripted sender: the newest content
wins over whatever waits, a failure is retried with the newest content, a hung request is given
up after the timeout, and ``renewed_at`` is when the delivered content was made.

(Heartbeats through beacons against real homeservers: the node and failover tests.)"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from mautrix.errors import MatrixConnectionError, MatrixUnknownRequestError

from cis_bot.matrix.beacon import Beacon
from cis_bot.matrix.outbox import Outgoing


class Sender:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.tried: list[int] = []
        self.gate: asyncio.Event | None = None
        self.failures: list[BaseException] = []
        self.progress = asyncio.Event()

    async def send(self, item: Outgoing) -> str:
        n = item.content["n"]
        self.tried.append(n)
        self.progress.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(n)
        self.progress.set()
        return f"$ev{n}"

    async def until(self, condition: Callable[[], bool], timeout: float = 2.0) -> None:
        """Wait for ``condition``, looked at whenever a send starts or ends (and every few
        milliseconds: a refusal's callback runs after its send)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"tried {self.tried}, sent {self.sent}"
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), 0.01)


def beat(n: int) -> Outgoing:
    return Outgoing("cis.node.heartbeat", {"n": n}, state_key="@w:x")


async def test_the_newest_content_replaces_what_waits() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()
    beacon = Beacon(sender.send, timeout=5)
    try:
        beacon.update(beat(1), made_at=1.0)
        await sender.until(lambda: sender.tried == [1])
        for n in (2, 3, 4):  # while 1 is in flight
            beacon.update(beat(n), made_at=float(n))
        sender.gate.set()
        await sender.until(lambda: beacon.renewed_at == 4.0)
        assert sender.sent == [1, 4]
    finally:
        await beacon.close()


async def test_a_failure_is_retried_with_the_newest_content() -> None:
    sender = Sender()
    sender.failures = [MatrixConnectionError("down"), MatrixUnknownRequestError(502, "bad")]
    beacon = Beacon(sender.send, timeout=5, retry_secs=0.01)
    try:
        beacon.update(beat(1), made_at=1.0)
        await sender.until(lambda: beacon.renewed_at == 1.0)
        assert sender.tried == [1, 1, 1] and sender.sent == [1] and not beacon.failing

        sender.failures = [MatrixConnectionError("down")]
        sender.gate = asyncio.Event()
        beacon.update(beat(2), made_at=2.0)
        await sender.until(lambda: sender.tried[-1] == 2)
        beacon.update(beat(3), made_at=3.0)
        sender.gate.set()
        await sender.until(lambda: beacon.renewed_at == 3.0)
        assert sender.sent == [1, 3]
    finally:
        await beacon.close()


async def test_a_hung_request_is_given_up_after_the_timeout() -> None:
    sender = Sender()
    sender.gate = asyncio.Event()  # never opens: a request lost in a partition
    beacon = Beacon(sender.send, timeout=0.05, retry_secs=0.01)
    try:
        beacon.update(beat(1), made_at=1.0)
        await sender.until(lambda: len(sender.tried) >= 3)
        assert beacon.failing and beacon.renewed_at is None
        sender.gate.set()
        await sender.until(lambda: beacon.renewed_at == 1.0)
        assert sender.sent == [1] and not beacon.failing
    finally:
        await beacon.close()


async def test_a_refusal_is_told_and_not_retried() -> None:
    sender = Sender()
    sender.failures = [MatrixUnknownRequestError(403, "M_FORBIDDEN")]
    refusals: list[int] = []
    beacon = Beacon(sender.send, timeout=5, retry_secs=0.01)
    try:
        item = beat(1)
        item.on_rejected = lambda exc: refusals.append(exc.http_status)
        beacon.update(item)
        await sender.until(lambda: refusals == [403])
        beacon.update(beat(2))
        await sender.until(lambda: sender.sent == [2])
        assert sender.tried == [1, 2]
    finally:
        await beacon.close()

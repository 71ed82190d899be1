"""The outbox's ordering, concurrency and outage rules, with a scripted sender.

(The outbox against real homeservers is exercised by the node tests, including an outage.)"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import pytest
from mautrix.errors import MatrixConnectionError, MatrixUnknownRequestError

from cis_bot.matrix.outbox import Outbox, Outgoing


class Recorder:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.done: list[str] = []
        self.txns: dict[str, list[str]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: dict[str, list[BaseException]] = {}
        self.max_in_flight = 0
        self._in_flight = 0
        self._progress = asyncio.Event()

    async def until(self, condition: Callable[[], bool], timeout: float = 2.0) -> None:
        """Wait until ``condition`` holds, re-checked at every send that starts or ends."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._progress.clear()
                await self._progress.wait()

    async def send(self, item: Outgoing) -> str:
        name = item.content["n"]
        self.started.append(name)
        self._progress.set()
        self.txns.setdefault(name, []).append(item.txn_id)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if name in self.gates:
                await self.gates[name].wait()
            else:
                await asyncio.sleep(0)  # a send is a round trip: others run meanwhile
            if self.fail.get(name):
                raise self.fail[name].pop(0)
        finally:
            self._in_flight -= 1
            self._progress.set()
        self.done.append(name)
        return f"$ev-{name}"


def item(name: str, key: str | None = "k", **kw: object) -> Outgoing:
    return Outgoing("t", {"n": name}, key=key, **kw)  # type: ignore[arg-type]


async def test_same_key_in_order_other_keys_overlap() -> None:
    r = Recorder()
    r.gates["a1"] = asyncio.Event()
    box = Outbox(r.send, concurrency=4)
    box.start()
    for post in (item("a1", "a"), item("a2", "a"), item("b1", "b"), item("b2", "b")):
        box.post(post)
    await r.until(lambda: "b2" in r.done)  # b goes on while a1 is held up
    assert r.started == ["a1", "b1", "b2"]  # a2 waits behind a1
    r.gates["a1"].set()
    assert await box.flush(timeout=2)
    assert r.done.index("a1") < r.done.index("a2")
    await box.close()


async def test_a_barrier_waits_for_everything_before_and_holds_everything_after() -> None:
    r = Recorder()
    r.gates["x"] = asyncio.Event()
    box = Outbox(r.send, concurrency=8)
    box.start()
    box.post(item("x", "a"))
    box.post(item("end", None))
    box.post(item("later", "b"))
    await r.until(lambda: "x" in r.started)
    assert r.started == ["x"]
    r.gates["x"].set()
    assert await box.flush(timeout=2)
    assert r.done == ["x", "end", "later"]
    await box.close()


async def test_concurrency_is_bounded() -> None:
    r = Recorder()
    box = Outbox(r.send, concurrency=3)
    box.start()
    for i in range(30):
        box.post(item(f"e{i}", f"k{i}"))
    assert await box.flush(timeout=2)
    assert r.max_in_flight <= 3
    assert sorted(r.done) == sorted(f"e{i}" for i in range(30))
    await box.close()


async def test_outage_retries_with_the_same_transaction_id_and_loses_nothing() -> None:
    r = Recorder()
    r.fail["a"] = [MatrixConnectionError("down"), MatrixUnknownRequestError(502, "down")]
    box = Outbox(r.send, retry_initial_secs=0.01, retry_max_secs=0.02)
    box.start()
    box.post(item("a", "k"))
    box.post(item("b", "k"))
    assert await box.flush(timeout=2)
    assert r.done == ["a", "b"]
    assert len(r.txns["a"]) == 3 and len(set(r.txns["a"])) == 1
    assert not box.offline
    await box.close()


async def test_a_refused_event_is_skipped_and_a_bug_costs_one_event() -> None:
    r = Recorder()
    r.fail["bad"] = [MatrixUnknownRequestError(403, "no", "M_FORBIDDEN")]
    r.fail["buggy"] = [ValueError("oops")]
    box = Outbox(r.send)
    box.start()
    for name in ("bad", "buggy", "fine"):
        box.post(item(name))
    assert await box.flush(timeout=2)
    assert r.done == ["fine"]
    assert box.rejected == 2
    await box.close()


async def test_when_full_output_samples_go_first_and_state_never() -> None:
    r = Recorder()
    r.gates["head"] = asyncio.Event()
    box = Outbox(r.send, limit=3, concurrency=1)
    box.start()
    box.post(item("head"))
    await r.until(lambda: "head" in r.started)  # in flight: not the queue's to drop
    box.post(item("sample1", droppable=True))
    box.post(item("state1"))
    box.post(item("state2"))  # full: the oldest sample makes room
    box.post(item("sample2", droppable=True))  # full, nothing droppable but itself
    box.post(item("state3"))  # never dropped: the queue grows past its limit instead
    r.gates["head"].set()
    assert await box.flush(timeout=2)
    assert r.done == ["head", "state1", "state2", "state3"]
    assert box.dropped == 2
    await box.close()


@pytest.mark.parametrize("concurrency", [1, 8])
async def test_flush_times_out_while_the_homeserver_is_away(concurrency: int) -> None:
    r = Recorder()
    r.fail["a"] = [MatrixConnectionError("down")] * 1000
    box = Outbox(r.send, concurrency=concurrency, retry_initial_secs=0.01, retry_max_secs=0.01)
    box.start()
    box.post(item("a"))
    assert not await box.flush(timeout=0.2)
    assert box.offline and box.pending == 1
    await box.close()


async def test_flush_waits_as_long_as_deliveries_go_on() -> None:
    """A large run's backlog takes longer than the flush timeout to deliver: the timeout is for
    a homeserver that stopped taking events, not for one that is busy taking them."""
    r = Recorder()
    names = [f"e{i}" for i in range(20)]
    for name in names:
        r.gates[name] = asyncio.Event()
    box = Outbox(r.send, concurrency=1)
    box.start()
    for name in names:
        box.post(item(name))

    async def deliver_slowly() -> None:
        for name in names:  # one every 20 ms: 0.4 s in all, four times the timeout
            await r.until(lambda name=name: name in r.started)
            await asyncio.sleep(0.02)
            r.gates[name].set()

    deliverer = asyncio.create_task(deliver_slowly())
    assert await box.flush(timeout=0.1)
    assert r.done == names
    await deliverer
    await box.close()


class QueueModel:
    """The outbox's rules as first written: the queue as a list, walked for every delivery."""

    def __init__(self, limit: int, concurrency: int) -> None:
        self.limit = limit
        self.concurrency = concurrency
        self.queue: list[Outgoing] = []
        self.started: list[str] = []
        self.dropped = 0

    def post(self, item: Outgoing) -> None:
        full = len(self.queue) >= self.limit and not self._drop_one()
        if full and item.droppable:
            self.dropped += 1
            return
        self.queue.append(item)
        self._start()

    def _drop_one(self) -> bool:
        for queued in self.queue:
            if queued.droppable and not queued.in_flight:
                self.queue.remove(queued)
                self.dropped += 1
                return True
        return False

    def done(self, item: Outgoing) -> None:
        self.queue.remove(item)
        item.in_flight = False
        self._start()

    def _start(self) -> None:
        for item in self._ready():
            item.in_flight = True
            self.started.append(item.content["n"])

    def _ready(self) -> list[Outgoing]:
        if any(item.in_flight and item.key is None for item in self.queue):
            return []
        in_flight = sum(1 for item in self.queue if item.in_flight)
        blocked: set[str] = {item.key for item in self.queue if item.in_flight and item.key}
        ready: list[Outgoing] = []
        for index, item in enumerate(self.queue):
            if in_flight + len(ready) >= self.concurrency:
                break
            if item.key is None:
                if index == 0 and in_flight == 0 and not ready:
                    ready.append(item)
                break
            if item.in_flight or item.key in blocked:
                blocked.add(item.key)
                continue
            ready.append(item)
            blocked.add(item.key)
        return ready


@pytest.mark.parametrize("seed", range(40))
async def test_sends_in_the_same_order_as_walking_the_whole_queue(seed: int) -> None:
    """Random posts (keys, barriers, droppable samples, past the limit) and deliveries in random
    order: the outbox starts exactly the events, in exactly the order, that walking the queue
    from its head would; nothing is lost but droppable events, and only when full."""
    rng = random.Random(seed)
    concurrency = rng.choice([1, 2, 3, 8])
    limit = rng.choice([3, 10, 1000])
    r = Recorder()
    box = Outbox(r.send, limit=limit, concurrency=concurrency)
    box.start()
    model = QueueModel(limit, concurrency)
    twins: dict[str, Outgoing] = {}  # the model's copy of each event, by name
    keys = [f"k{i}" for i in range(rng.choice([1, 3, 20]))]

    async def settle() -> None:
        """Until the outbox has started what the model did (or it never will: the asserts
        after this say how they differ)."""
        with contextlib.suppress(TimeoutError):
            await r.until(
                lambda: r.started == model.started and box.pending == len(model.queue), 1.0
            )

    for n in range(300):
        if rng.random() < 0.55:
            name = f"e{n}"
            key = None if rng.random() < 0.05 else rng.choice(keys)
            droppable = rng.random() < 0.3
            r.gates[name] = asyncio.Event()
            if rng.random() < 0.05:
                r.fail[name] = [MatrixUnknownRequestError(403, "no", "M_FORBIDDEN")]
            box.post(item(name, key, droppable=droppable))
            twins[name] = item(name, key, droppable=droppable)
            model.post(twins[name])
        else:
            waiting = [
                name for name in r.started if name not in r.done and not r.gates[name].is_set()
            ]
            if waiting:
                name = rng.choice(waiting)
                r.gates[name].set()
                model.done(twins[name])
        await settle()
        assert r.started == model.started
        assert box.pending == len(model.queue)
        assert box.dropped == model.dropped
    for gate in r.gates.values():
        gate.set()
    assert await box.flush(timeout=5)
    assert box.pending == 0
    await box.close()

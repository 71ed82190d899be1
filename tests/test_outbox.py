"""The outbox's ordering, concurrency and outage rules, with a scripted sender.

(The outbox against real homeservers is exercised by the node tests, including an outage.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
from mautrix.errors import MatrixConnectionError, MatrixUnknownRequestError

from cis_bot.matrix.outbox import Batching, Outbox, Outgoing


class Recorder:
    """A scripted homeserver: records what each request carries (a batch's name is its
    events' names joined by "+"), holds a request while it has a gate, fails it as told."""

    def __init__(self, *, hold: bool = False) -> None:
        #: Hold every request until its gate (made then, by its name) is set.
        self.hold = hold
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
            if self.hold:
                self.gates.setdefault(name, asyncio.Event())
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


def batched(name: str, key: str | None = "k", size: int = 10, **kw: object) -> Outgoing:
    """A batchable event that adds ``size`` bytes to a batch (see BATCHING)."""
    kw.setdefault("batchable", True)
    return Outgoing("t", {"n": name, "size": size}, key=key, **kw)  # type: ignore[arg-type]


def batch_of(items: Sequence[Outgoing]) -> Outgoing:
    return Outgoing("batch", {"n": "+".join(i.content["n"] for i in items)})


#: Batches of events' ``size`` up to 100, one in flight.
BATCHING = Batching(make=batch_of, size=lambda item: int(item.content["size"]), limit=100)


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


# --- batching (group commit) ---------------------------------------------------------------------


async def test_an_event_alone_goes_as_itself_and_what_queues_meanwhile_goes_in_one_batch() -> None:
    r = Recorder(hold=True)
    box = Outbox(r.send, batching=BATCHING)
    box.start()
    box.post(batched("a1", "a"))
    await r.until(lambda: r.started == ["a1"])  # nothing waits under light load
    for post in (batched("b1", "b"), batched("a2", "a"), batched("c1", "c"), batched("b2", "b")):
        box.post(post)
    await asyncio.sleep(0.01)
    assert r.started == ["a1"]  # one batch in flight at a time: the rest waits for it
    r.gates["a1"].set()
    await r.until(lambda: len(r.started) == 2)
    assert r.started[1] == "b1+a2+c1+b2"  # posting order, a key's events in theirs
    r.gates["b1+a2+c1+b2"].set()
    assert await box.flush(timeout=2)
    assert (box.sent, box.batches) == (5, 1)
    await box.close()


async def test_a_batch_holds_to_its_size_limit_and_a_key_stays_in_order_across_batches() -> None:
    r = Recorder(hold=True)
    box = Outbox(r.send, batching=BATCHING)
    box.start()
    box.post(batched("x", "x"))
    await r.until(lambda: r.started == ["x"])
    box.post(batched("a1", "a", size=40))
    box.post(batched("b1", "b", size=40))
    box.post(batched("a2", "a", size=40))  # does not fit: it and what follows wait
    box.post(batched("c1", "c", size=10))
    r.gates["x"].set()
    await r.until(lambda: len(r.started) == 2)
    assert r.started[1] == "a1+b1"
    r.gates["a1+b1"].set()
    await r.until(lambda: len(r.started) == 3)
    assert r.started[2] == "a2+c1"
    r.gates["a2+c1"].set()
    assert await box.flush(timeout=2)
    await box.close()


async def test_events_that_do_not_batch_go_alone_beside_a_batch_and_barriers_alone() -> None:
    r = Recorder(hold=True)
    box = Outbox(r.send, batching=BATCHING)
    box.start()
    box.post(batched("a1", "a"))
    await r.until(lambda: r.started == ["a1"])
    box.post(item("state", "s"))  # not batchable: its own request, at once
    box.post(batched("b1", "b"))
    box.post(item("end", None, batchable=True))  # a barrier, batchable or not
    box.post(batched("c1", "c"))
    await r.until(lambda: r.started == ["a1", "state"])
    r.gates["a1"].set()
    await r.until(lambda: r.started == ["a1", "state", "b1"])
    r.gates["b1"].set()
    r.gates["state"].set()
    await r.until(lambda: r.started == ["a1", "state", "b1", "end"])
    r.gates["end"].set()
    await r.until(lambda: r.started[-1] == "c1")
    r.gates["c1"].set()
    assert await box.flush(timeout=2)
    assert box.batches == 0
    await box.close()


async def test_a_batch_is_retried_as_it_was_with_its_transaction_id() -> None:
    r = Recorder()
    r.fail["a1+b1"] = [MatrixConnectionError("down"), MatrixUnknownRequestError(502, "down")]
    r.gates["x"] = asyncio.Event()
    box = Outbox(r.send, batching=BATCHING, retry_initial_secs=0.01, retry_max_secs=0.02)
    box.start()
    box.post(batched("x", "x"))
    await r.until(lambda: r.started == ["x"])
    box.post(batched("a1", "a"))
    box.post(batched("b1", "b"))
    r.gates["x"].set()
    await r.until(lambda: "a1+b1" in r.started)
    box.post(batched("c1", "c"))  # posted during the outage: not added to the batch
    box.post(batched("a2", "a"))
    assert await box.flush(timeout=2)
    assert r.done == ["x", "a1+b1", "c1+a2"]
    assert len(r.txns["a1+b1"]) == 3 and len(set(r.txns["a1+b1"])) == 1
    assert (box.sent, box.rejected, box.offline) == (5, 0, False)
    await box.close()


@pytest.mark.parametrize("status", [403, 413])
async def test_a_refused_batch_goes_one_by_one(status: int) -> None:
    """A room may forbid the batch's type: its events go again as themselves (the homeserver
    kept none), and after a 403 this outbox stops batching."""
    r = Recorder()
    r.fail["a1+b1+a2"] = [MatrixUnknownRequestError(status, "no", "M_FORBIDDEN")]
    r.gates["x"] = asyncio.Event()
    box = Outbox(r.send, batching=BATCHING)
    box.start()
    box.post(batched("x", "x"))
    await r.until(lambda: r.started == ["x"])
    for post in (batched("a1", "a"), batched("b1", "b"), batched("a2", "a")):
        box.post(post)
    r.gates["x"].set()
    await r.until(lambda: "a1+b1+a2" in r.started)
    assert await box.flush(timeout=2)
    assert r.done[1:3] == ["a1", "b1"] and r.done[3] == "a2"
    for post in (batched("c1", "c"), batched("d1", "d")):
        box.post(post)
    assert await box.flush(timeout=2)
    assert (box.sent, box.rejected) == (6, 0)
    assert (box.batching is None) == (status == 403)
    await box.close()


async def test_events_whose_preparation_outgrows_the_batch_wait_for_the_next_one() -> None:
    r = Recorder(hold=True)

    async def grow(item: Outgoing) -> None:
        item.content["size"] = 60

    box = Outbox(r.send, batching=BATCHING)
    box.start()
    box.post(batched("x", "x"))
    await r.until(lambda: r.started == ["x"])
    box.post(batched("a1", "a", size=30, prepare=grow))
    box.post(batched("a2", "a", size=30))
    box.post(batched("b1", "b", size=30, prepare=grow))
    r.gates["x"].set()
    await r.until(lambda: len(r.started) == 2)
    assert r.started[1] == "a1+a2"  # 60 + 30: b1 (60 now) goes next
    r.gates["a1+a2"].set()
    await r.until(lambda: len(r.started) == 3)
    assert r.started[2] == "b1"
    r.gates["b1"].set()
    assert await box.flush(timeout=2)
    await box.close()


async def test_what_preparation_adds_counts_against_the_event_size_bound() -> None:
    """Events measured as posted (``content_bytes``) are measured again once prepared: two that
    each grow past half the bound do not share a batch."""
    from cis_bot.matrix import events as ev
    from cis_bot.matrix.batch import BATCHING as REAL

    r = Recorder(hold=True)
    half = ev.MAX_CONTENT_BYTES // 2 + 1

    async def grow(item: Outgoing) -> None:
        item.content["upload"] = "x" * half

    def big(name: str, key: str) -> Outgoing:
        content = {"n": name}
        measured = len(json.dumps(content).encode())
        return Outgoing(
            "cis.dag.task.claimed", content, key=key, batchable=True, prepare=grow,
            content_bytes=measured,
        )  # fmt: skip

    box = Outbox(r.send, batching=attrs.evolve(REAL, make=batch_of))
    box.start()
    box.post(batched("x", "x"))
    await r.until(lambda: r.started == ["x"])
    box.post(big("a", "a"))
    box.post(big("b", "b"))
    r.gates["x"].set()
    await r.until(lambda: len(r.started) == 2)
    assert r.started[1] == "a"  # b, prepared too, no longer fits beside it
    r.gates["a"].set()
    await r.until(lambda: len(r.started) == 3)
    assert r.started[2] == "b"
    r.gates["b"].set()
    assert await box.flush(timeout=2)
    await box.close()


async def test_a_refused_preparation_costs_its_own_event_only() -> None:
    r = Recorder(hold=True)

    async def refused(item: Outgoing) -> None:
        raise MatrixUnknownRequestError(413, "too large", "M_TOO_LARGE")

    box = Outbox(r.send, batching=attrs.evolve(BATCHING, in_flight=2))
    box.start()
    box.post(batched("x", "x"))
    await r.until(lambda: r.started == ["x"])
    box.post(batched("y", "y"))  # the second batch that may be under way
    await r.until(lambda: r.started == ["x", "y"])
    box.post(batched("a1", "a", prepare=refused))
    box.post(batched("a2", "a"))
    box.post(batched("b1", "b"))
    r.gates["x"].set()
    await r.until(lambda: len(r.started) == 3)
    assert r.started[2] == "a2+b1"
    box.post(batched("c1", "c"))  # a2 is under way: the next batch must not take it again
    r.gates["y"].set()
    await r.until(lambda: len(r.started) == 4)
    assert r.started[3] == "c1"
    r.gates["a2+b1"].set()
    r.gates["c1"].set()
    assert await box.flush(timeout=2)
    assert (box.sent, box.rejected) == (5, 1)
    await box.close()


class BatchModel(QueueModel):
    """The batching rules as plainly as they can be said, walking the whole queue: a request
    starts with the first event whose key has nothing before it still queued (a batchable one
    only while a batch may start); a batch then takes, in posting order, every batchable event
    not in flight whose key's earlier events are all in it, until one does not fit."""

    def __init__(self, limit: int, concurrency: int, batching: Batching) -> None:
        super().__init__(limit, concurrency)
        self.batching = batching
        #: Requests under way: name -> (its events, whether it is a batch).
        self.flying: dict[str, tuple[list[Outgoing], bool]] = {}

    def done_request(self, name: str) -> None:
        items, _ = self.flying.pop(name)
        for event in items:
            self.queue.remove(event)
            event.in_flight = False
        self._start()

    def _start(self) -> None:
        for items, batch in self._ready_units():
            for event in items:
                event.in_flight = True
            name = "+".join(event.content["n"] for event in items)
            self.flying[name] = (items, batch)
            self.started.append(name)

    def _ready_units(self) -> list[tuple[list[Outgoing], bool]]:
        if any(event.in_flight and event.key is None for event in self.queue):
            return []
        units: list[tuple[list[Outgoing], bool]] = []
        while len(self.flying) + len(units) < self.concurrency:
            batches = sum(batch for _, batch in [*self.flying.values(), *units])
            first = self._first(batch_free=batches < self.batching.in_flight, taken=units)
            if first is None:
                break
            if first.key is None:
                units.append(([first], False))
                break
            first.in_flight = True
            if not first.batchable:
                units.append(([first], False))
                continue
            units.append((self._batch(first), True))
        return units

    def _first(
        self, *, batch_free: bool, taken: list[tuple[list[Outgoing], bool]]
    ) -> Outgoing | None:
        earlier: set[str] = set()
        for index, event in enumerate(self.queue):
            if event.key is None:
                nothing_flies = not self.flying and not taken
                return event if index == 0 and nothing_flies else None
            if event.key in earlier or event.in_flight:
                earlier.add(event.key)
                continue
            earlier.add(event.key)
            if not event.batchable or batch_free:
                return event
        return None

    def _batch(self, first: Outgoing) -> list[Outgoing]:
        batch = [first]
        size = self.batching.size(first)
        keys_in = {first.key}
        blocked: set[str | None] = set()
        for event in self.queue:
            if event.key is None:
                break
            if event is first or event in batch:
                continue
            eligible = (
                event.batchable
                and not event.in_flight
                and event.key not in blocked
                and all(
                    other in batch
                    for other in self.queue[: self.queue.index(event)]
                    if other.key == event.key
                )
            )
            if not eligible:
                blocked.add(event.key)
                continue
            if size + self.batching.size(event) > self.batching.limit:
                break
            size += self.batching.size(event)
            event.in_flight = True
            batch.append(event)
            keys_in.add(event.key)
        return batch


@pytest.mark.parametrize("seed", range(40))
async def test_batches_follow_the_rules_said_plainly(seed: int) -> None:
    """Random posts (keys, barriers, batchable or not, droppable, sizes, past the limit) and
    deliveries in random order: the outbox starts exactly the requests, with exactly the events
    in them, in exactly the order the plain model would; nothing is lost but droppable events,
    and only when full."""
    rng = random.Random(seed)
    concurrency = rng.choice([1, 2, 3, 8])
    limit = rng.choice([3, 10, 1000])
    batching = attrs.evolve(BATCHING, in_flight=rng.choice([1, 2]))
    r = Recorder(hold=True)
    box = Outbox(r.send, limit=limit, concurrency=concurrency, batching=batching)
    box.start()
    model = BatchModel(limit, concurrency, batching)
    keys = [f"k{i}" for i in range(rng.choice([1, 3, 20]))]

    async def settle() -> None:
        with contextlib.suppress(TimeoutError):
            await r.until(
                lambda: r.started == model.started and box.pending == len(model.queue), 1.0
            )

    for n in range(300):
        if rng.random() < 0.55:
            name = f"e{n}"
            key = None if rng.random() < 0.03 else rng.choice(keys)
            fields: dict[str, Any] = {
                "droppable": rng.random() < 0.2,
                "batchable": rng.random() < 0.7,
                "size": rng.randint(1, 60),
            }
            box.post(batched(name, key, **fields))
            model.post(batched(name, key, **fields))
        else:
            waiting = [name for name in r.started if name not in r.done and name in r.gates]
            if waiting:
                name = rng.choice(waiting)
                r.gates[name].set()
                model.done_request(name)
        await settle()
        assert r.started == model.started
        assert box.pending == len(model.queue)
        assert box.dropped == model.dropped
    r.hold = False
    for gate in r.gates.values():
        gate.set()
    assert await box.flush(timeout=5)
    assert box.pending == 0
    await box.close()

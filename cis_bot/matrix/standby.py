"""A standby coordinator (``cis node --coordinator``): it watches the runs of the coordinators it
trusts in its rooms, and takes over one whose coordinator stopped renewing its lease.

What it watches: every unfinished matrix- or federation-mode run coordinated by a user this node
trusts to coordinate (its own user and ``[node] coordinators``), whose coordinator holds it by a
``cis.dag.run.lease`` (runs made before leases existed are ``cis dag resume``'s; so are hybrid
runs, whose tasks ran in their coordinator's process). A run's lease
is renewed by its coordinator's lease events listing it at its epoch, reckoned on this node's
clock from when each reached it; a takeover (``cis.dag.run.takeover``) by another trusted
coordinator moves the run to it. A run not renewed for its lease period (the holder's
``ttl_ms``) is handed to ``take_over``, after a short random stagger so that two standbys rarely
try at once (when they do, the run log keeps the first takeover; the other finds it lost the race
and lets go). The node's own runs found unfinished when it starts are its own previous process's:
they are taken over at once. Runs this process drives itself are never watched.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import attrs
import structlog

from cis_bot.matrix import events as ev
from cis_bot.matrix.beacon import wait_event
from cis_bot.matrix.leases import RunLeases
from cis_bot.matrix.node import Node
from cis_bot.matrix.runlog import parse_room_event
from cis_bot.matrix.runs import read_runs

log = structlog.get_logger(__name__)

#: Modes whose runs a standby may take over: those coordinated through the room.
TAKEN_OVER_MODES = frozenset({"matrix", "federation"})

#: (room id, run id, the epoch it was seen at) -> whether this node took it (False: another
#: coordinator was quicker, or the run ended meanwhile).
TakeOver = Callable[[str, str, int], Awaitable[bool]]


@attrs.define
class _Watched:
    room_id: str
    run_id: str
    #: The coordinator holding it, and at which epoch.
    holder: str
    epoch: int
    #: When (monotonic) its lease was last renewed, and for how long.
    renewed_at: float
    lease_secs: float
    #: Handed to take_over already.
    taking: bool = False

    def lapses_at(self) -> float:
        return self.renewed_at + self.lease_secs


class Standby:
    def __init__(
        self,
        node: Node,
        *,
        trusted: Collection[str],
        leases: RunLeases,
        take_over: TakeOver,
        stagger_secs: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.trusted = frozenset(trusted)
        self.leases = leases
        self.take_over = take_over
        self.stagger_secs = stagger_secs
        self.clock = clock
        self._watched: dict[tuple[str, str], _Watched] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Rooms whose runs were read (a room joined later is read at its first event).
        self._rooms: set[str] = set()
        #: Runs seen to end (a lease may still list one for a moment after).
        self._ended: set[tuple[str, str]] = set()

    async def start(self, rooms: Collection[str]) -> None:
        """Watch the unfinished runs already in ``rooms``, then the rooms live."""
        self.node.add_listener(self.on_event)
        for room_id in rooms:
            self._rooms.add(room_id)
            await self._load(room_id)
        self._spawn(self._watch())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("standby.failed", error=repr(task.exception()), exc_info=task.exception())

    async def _load(self, room_id: str) -> None:
        now = self.clock()
        leases: dict[str, tuple[ev.RunLeaseContent, float]] = {}
        for raw in await self.node.room_state(room_id):
            event = parse_room_event(raw)
            if (
                event is not None
                and isinstance(event.content, ev.RunLeaseContent)
                and event.state_key == event.sender
            ):
                stamped = raw.get("origin_server_ts")
                age = (ev.now_ms() - stamped) / 1000 if isinstance(stamped, int) else math.inf
                leases[event.sender] = (event.content, now - max(0.0, age))
        for run in await read_runs(self.node, [room_id], self.trusted):
            if run.replay().finished:
                continue
            holder = run.coordinator_user
            if holder == self.node.user_id:
                # Ours (in any mode), and this process does not drive it: our previous
                # process's, which is gone. Now.
                self._watch_run(room_id, run.run_id, holder, run.log.epoch, -math.inf, 0.0)
                continue
            if run.created.mode not in TAKEN_OVER_MODES:
                continue
            lease = leases.get(holder)
            if lease is None or lease[0].runs.get(run.run_id) != run.log.epoch:
                continue  # never held by a lease (older coordinators): cis dag resume's
            content, renewed_at = lease
            self._watch_run(
                room_id, run.run_id, holder, run.log.epoch, renewed_at, content.ttl_ms / 1000
            )

    def _watch_run(
        self,
        room_id: str,
        run_id: str,
        holder: str,
        epoch: int,
        renewed_at: float,
        lease_secs: float,
    ) -> None:
        if self.leases.holds(room_id, run_id):
            return
        self._watched[(room_id, run_id)] = _Watched(
            room_id, run_id, holder, epoch, renewed_at, lease_secs
        )
        log.info("standby.watching", room_id=room_id, run_id=run_id, coordinator=holder)
        self._wake.set()

    # --- the room --------------------------------------------------------------------------------

    async def on_event(self, room_id: str, raw: Mapping[str, Any]) -> None:
        if room_id not in self._rooms:
            # Joined since it started (its own join is the first event it gets from there).
            self._rooms.add(room_id)
            self._spawn(self._load(room_id))
        event = parse_room_event(raw)
        if event is None or event.sender not in self.trusted:
            return
        payload = event.content
        now = self.clock()
        if isinstance(payload, ev.RunLeaseContent):
            if event.state_key != event.sender:
                return
            for held in self._watched.values():
                if (
                    held.room_id == room_id
                    and held.holder == event.sender
                    and payload.runs.get(held.run_id) == held.epoch
                ):
                    held.renewed_at, held.lease_secs = now, payload.ttl_ms / 1000
            if event.sender != self.node.user_id:
                # A run held that this node does not watch: it read the room between the run's
                # creation and its first lease. (Should the lease be stale, the takeover reads
                # the log first and lets go.)
                for run_id, epoch in payload.runs.items():
                    if (room_id, run_id) not in self._watched.keys() | self._ended:
                        self._watch_run(
                            room_id, run_id, event.sender, epoch, now, payload.ttl_ms / 1000
                        )
            self._wake.set()
            return
        if not isinstance(payload, ev.RunContent):
            return
        key = (room_id, payload.run_id)
        watched = self._watched.get(key)
        if isinstance(payload, ev.RunCreatedContent):
            if payload.mode in TAKEN_OVER_MODES and watched is None:
                # Held from its creation: its first lease event follows at once.
                self._watch_run(room_id, payload.run_id, event.sender, 1, now, self._lease_secs())
        elif watched is None:
            return
        elif isinstance(payload, ev.RunTakeoverContent):
            if (payload.epoch or 1) > watched.epoch:
                if event.sender == self.node.user_id:
                    del self._watched[key]  # ours now: this process drives it
                    return
                watched.holder, watched.epoch = event.sender, payload.epoch or 1
                watched.renewed_at, watched.taking = now, False
        elif isinstance(payload, ev.RunCompletedContent) and event.sender == watched.holder:
            del self._watched[key]
            self._ended.add(key)
        self._wake.set()

    def _lease_secs(self) -> float:
        return self.leases.lease_secs

    # --- taking over -----------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            now = self.clock()
            wake = math.inf
            for watched in list(self._watched.values()):
                if watched.taking or self.leases.holds(watched.room_id, watched.run_id):
                    continue
                lapses = watched.lapses_at()
                if now >= lapses:
                    watched.taking = True
                    self._spawn(self._take(watched))
                else:
                    wake = min(wake, lapses)
            self._wake.clear()
            await wait_event(self._wake, None if wake == math.inf else max(0.0, wake - now))

    async def _take(self, watched: _Watched) -> None:
        if watched.holder != self.node.user_id:
            await asyncio.sleep(random.uniform(0, self.stagger_secs))
            if not watched.taking:  # renewed or taken over meanwhile
                return
        log.warning(
            "standby.taking_over",
            room_id=watched.room_id,
            run_id=watched.run_id,
            coordinator=watched.holder,
            epoch=watched.epoch,
            silent_secs=None
            if watched.renewed_at == -math.inf
            else round(self.clock() - watched.renewed_at, 1),
        )
        taken = False
        try:
            taken = await self.take_over(watched.room_id, watched.run_id, watched.epoch)
        except Exception:
            log.exception("standby.take_over_failed", run_id=watched.run_id)
            taken = True  # not again: it would fail the same way
        finally:
            self._watched.pop((watched.room_id, watched.run_id), None)
        if not taken:
            # Another coordinator has it now, or it ended: watch it under its new holder.
            await self._load(watched.room_id)

"""A coordinator's lease on the runs it drives: one ``cis.dag.run.lease`` state event per room,
keyed by its own user id, listing the runs it holds there and the epoch of each.

Renewed every ``heartbeat_secs`` while it holds a run in the room, at once when it takes or
lets go of one, through a Beacon per room (newest content wins, each request bounded, never
behind the run's queue of events). A standby (``standby.py``) takes over a run this lease has
not renewed for ``lease_secs``. ``blind`` tells the coordinator when it cannot renew its own
lease for that long: it is the one cut off then, and must not take its workers' silence for
their death.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from cis_bot.matrix import events as ev
from cis_bot.matrix.beacon import Beacon, wait_event
from cis_bot.matrix.node import Node, outgoing
from cis_bot.matrix.outbox import Outgoing

log = structlog.get_logger(__name__)


class RunLeases:
    def __init__(self, node: Node, *, heartbeat_secs: float, lease_secs: float) -> None:
        self.node = node
        self.heartbeat_secs = heartbeat_secs
        self.lease_secs = lease_secs
        #: room id -> run id -> epoch.
        self._held: dict[str, dict[str, int]] = {}
        self._beacons: dict[str, Beacon] = {}
        #: room id -> when (monotonic) its lease is next renewed.
        self._next: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def hold(self, room_id: str, run_id: str, epoch: int) -> None:
        self._held.setdefault(room_id, {})[run_id] = epoch
        self._renew(room_id)

    def release(self, room_id: str, run_id: str) -> None:
        """Let go of a run (it ended, or another coordinator took it over)."""
        if self._held.get(room_id, {}).pop(run_id, None) is not None:
            self._renew(room_id)

    def holds(self, room_id: str, run_id: str) -> bool:
        return run_id in self._held.get(room_id, {})

    def blind(self, room_id: str) -> bool:
        """Whether this node has been unable to renew its lease in the room for a lease period
        (the homeserver does not take its events: it is the one cut off)."""
        beacon = self._beacons.get(room_id)
        return beacon is not None and beacon.failing and not beacon.renewed_within(self.lease_secs)

    async def close(self, *, settle_secs: float = 2.0) -> None:
        """Stop renewing; the last lease events (saying what was let go) get ``settle_secs``
        to reach the homeserver."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.gather(*(b.settle(settle_secs) for b in self._beacons.values()))
        for beacon in self._beacons.values():
            await beacon.close()

    def _renew(self, room_id: str) -> None:
        """Send the room's lease now: the runs held there (none: a last one, saying so)."""
        held = self._held.get(room_id, {})
        lease = ev.RunLeaseContent(
            node_id=self.node.identity.node_id,
            runs=dict(held),
            ttl_ms=int(self.lease_secs * 1000),
        )
        self._beacon(room_id).update(outgoing(lease, state_key=self.node.user_id))
        if held:
            self._next[room_id] = time.monotonic() + self.heartbeat_secs
        else:
            self._held.pop(room_id, None)
            self._next.pop(room_id, None)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def _beacon(self, room_id: str) -> Beacon:
        beacon = self._beacons.get(room_id)
        if beacon is None:

            async def send(item: Outgoing) -> str:
                return await self.node.send_outgoing(room_id, item)

            beacon = self._beacons[room_id] = Beacon(send, timeout=self.lease_secs)
        return beacon

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            for room_id, due in list(self._next.items()):
                if now >= due:
                    self._renew(room_id)
            self._wake.clear()
            wake = min(self._next.values(), default=None)
            await wait_event(self._wake, None if wake is None else max(0.0, wake - now))

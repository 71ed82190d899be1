"""The workers of a room as a coordinator sees them: who heartbeats, whether it is trusted,
whether it is live, what it holds.

A heartbeat (``cis.node.heartbeat``) counts only under its sender's own user id as state key,
and only from a user this node trusts to work for it (``Node.trusts_worker``: itself,
``[node] workers``, an allowed user, or a member at ``assign_power_level`` in the room), checked
at every beat: a worker whose power was taken away gets no more work. Refusals are logged once
per sender and reason.

Liveness is reckoned on this node's monotonic clock from when each heartbeat reached it, never
from the timestamp inside (another machine's clock wrote it): a worker is live for its beat's
``ttl_ms`` after that, unless one of its leases lapsed since (``presumed_dead``: it is live again
once a newer heartbeat arrives).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import structlog

from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Node
from cis_bot.matrix.runlog import RoomEvent, parse_room_event

log = structlog.get_logger(__name__)


@attrs.define
class WorkerInfo:
    #: The worker's identity.
    user_id: str
    #: Its newest heartbeat (its node id, for display and assignments' ``assigned_to``).
    beat: ev.NodeHeartbeatContent
    #: When (monotonic) that heartbeat reached us.
    seen_at: float
    #: When (monotonic) one of its leases lapsed with no heartbeat of it for the lease period;
    #: it is not live until a heartbeat newer than that arrives.
    presumed_dead_at: float | None = None

    @property
    def node_id(self) -> str:
        return self.beat.node_id

    @property
    def lease_secs(self) -> float:
        return self.beat.lease_period_ms / 1000

    def live(self, now: float) -> bool:
        if self.presumed_dead_at is not None and self.seen_at <= self.presumed_dead_at:
            return False
        return now < self.seen_at + self.beat.ttl_ms / 1000

    def silent_for(self, now: float) -> float:
        return now - self.seen_at

    def describe(self) -> str:
        return f"{self.node_id} ({self.user_id})"


class Roster:
    """The trusted workers of one room, fed with its heartbeats (``add``)."""

    def __init__(
        self, node: Node, room_id: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.node = node
        self.room_id = room_id
        self.clock = clock
        #: Trusted workers by user id.
        self.workers: dict[str, WorkerInfo] = {}
        #: Heartbeats already refused: (sender, why), logged once each.
        self._refused: set[tuple[str, str]] = set()

    def live(self) -> list[WorkerInfo]:
        now = self.clock()
        return [info for info in self.workers.values() if info.live(now)]

    async def load(self) -> list[WorkerInfo]:
        """The heartbeats in the room's state (each taken as received when the homeserver
        stamped it)."""
        added = []
        for raw in await self.node.room_state(self.room_id):
            if raw.get("type") == ev.NodeHeartbeatContent.TYPE:
                event = parse_room_event(raw)
                if event is not None and isinstance(event.content, ev.NodeHeartbeatContent):
                    info = await self.add(event, event.content, stamped=raw.get("origin_server_ts"))
                    if info is not None:
                        added.append(info)
        return added

    async def add(
        self, event: RoomEvent, beat: ev.NodeHeartbeatContent, *, stamped: Any = None
    ) -> WorkerInfo | None:
        """A heartbeat from the room: the worker it renews, or None when it does not count.
        ``stamped``: the homeserver's ``origin_server_ts`` of a beat read from the room's state
        rather than received live."""
        sender = event.sender
        if event.state_key != sender:
            # A heartbeat keyed by a node id is from a room cis_bot used before heartbeats were
            # bound to their sender: anyone could have written it.
            self._refuse(
                sender,
                "heartbeat.not_own_key",
                state_key=event.state_key,
                node=beat.node_id,
                hint="a heartbeat counts only under its sender's own user id as state key; "
                "old nodes keyed it by node id: upgrade them",
            )
            return None
        if not await self.node.trusts_worker(self.room_id, sender):
            # Checked at every beat: a worker whose power was taken away gets no more work.
            self.workers.pop(sender, None)
            self._refuse(
                sender,
                "heartbeat.untrusted",
                node=beat.node_id,
                hint=f"to let it work for this coordinator, give {sender} power level "
                f"{self.node.identity.assign_power_level} in the room, or list it in the "
                "coordinator's [node] workers",
            )
            return None
        self._refused.discard((sender, "heartbeat.untrusted"))
        now = self.clock()
        if isinstance(stamped, int) and not isinstance(stamped, bool):
            now -= max(0.0, (ev.now_ms() - stamped) / 1000)
        known = self.workers.get(sender)
        if known is None:
            known = self.workers[sender] = WorkerInfo(sender, beat, now)
            log.info("coordinator.worker_joined", user=sender, node=beat.node_id)
        elif now >= known.seen_at:
            known.beat, known.seen_at = beat, now
        return known

    def _refuse(self, sender: str, event_name: str, **fields: object) -> None:
        if (sender, event_name) not in self._refused:
            self._refused.add((sender, event_name))
            log.warning(event_name, room_id=self.room_id, sender=sender, **fields)


def heartbeat_of(raw: Mapping[str, Any]) -> tuple[RoomEvent, ev.NodeHeartbeatContent] | None:
    """``raw`` as a heartbeat, if it is a valid one."""
    if raw.get("type") != ev.NodeHeartbeatContent.TYPE:
        return None
    event = parse_room_event(raw)
    if event is None or not isinstance(event.content, ev.NodeHeartbeatContent):
        return None
    return event, event.content

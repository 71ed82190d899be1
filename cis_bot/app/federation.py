"""Federation mode's ``--workers``: before the run starts, every named worker must be live (a
trusted heartbeat in the room) within ``[dag.matrix] no_worker_timeout_secs``; else the run does
not start, and the error names each missing worker and why (never heard of in the room, or
silent since), with the live workers there. A named worker that dies later is a lost lease like
any other: its tasks run on the other named workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import structlog

from cis_bot.errors import UserError
from cis_bot.matrix.node import Node
from cis_bot.matrix.roster import Roster, WorkerInfo

log = structlog.get_logger(__name__)

#: How often the room's heartbeats are read again while waiting.
POLL_SECS = 0.5


async def await_workers(
    node: Node, room_id: str, names: Sequence[str], *, timeout: float, room_name: str
) -> None:
    """Return once every worker in ``names`` (node ids or user ids) is live in the room; raise a
    UserError naming the missing ones after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        roster = Roster(node, room_id)
        await roster.load()
        now = time.monotonic()
        missing = [n for n in names if not any(_named(w, n) for w in roster.live())]
        if not missing:
            return
        if now >= deadline:
            raise UserError(_missing_message(roster, missing, room_name, timeout, now))
        log.info("federation.waiting_for_workers", missing=missing, room_id=room_id)
        await asyncio.sleep(min(POLL_SECS, max(0.0, deadline - now)))


def _named(worker: WorkerInfo, name: str) -> bool:
    return name in (worker.node_id, worker.user_id)


def _missing_message(
    roster: Roster, missing: list[str], room_name: str, timeout: float, now: float
) -> str:
    whys = []
    for name in missing:
        known = next((w for w in roster.workers.values() if _named(w, name)), None)
        if known is None:
            whys.append(f"{name} never heartbeat in the room as a trusted worker")
        else:
            whys.append(f"{name}'s last heartbeat is {known.silent_for(now):.0f}s old")
    live = ", ".join(sorted(w.node_id for w in roster.live())) or "none"
    return (
        f"--workers: not live in {room_name} after {timeout:g}s ([dag.matrix] "
        f"no_worker_timeout_secs): {'; '.join(whys)}. Live workers there: {live}"
    )

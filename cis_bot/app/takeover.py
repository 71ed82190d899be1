"""Taking a run over from its log: by a standby whose coordinator's lease lapsed, by a node
picking up its own runs after a restart, by ``cis dag resume``.

The takeover is an event in the run log (``cis.dag.run.takeover``) at the run's next epoch; it
counts for a reader only when the reader trusts this node to coordinate, and only the first
takeover at an epoch counts. So the log is read back after posting it: when another
coordinator's came first, this node lets the run go.
"""

from __future__ import annotations

import structlog

from cis_bot.app.drive import RunPlan
from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Node
from cis_bot.matrix.runs import RoomRun, read_runs

log = structlog.get_logger(__name__)


async def take_over(node: Node, run: RoomRun, *, reason: str) -> RunPlan | None:
    """Take ``run`` over at its next epoch; the plan to drive it on, or None when another
    coordinator's takeover came first, or the run ended meanwhile."""
    epoch = run.log.epoch + 1
    await node.send(
        run.room_id,
        ev.RunTakeoverContent(
            run_id=run.run_id,
            epoch=epoch,
            coordinator=node.identity.node_id,
            previous=run.coordinator_user,
            reason=reason,
        ),
    )
    for again in await read_runs(node, [run.room_id], node.identity.trusted_coordinators):
        if again.run_id != run.run_id:
            continue
        if again.log.coordinator_user != node.user_id or again.log.epoch != epoch:
            log.warning(
                "run.takeover_lost",
                run_id=run.run_id,
                to=again.log.coordinator_user,
                epoch=again.log.epoch,
            )
            return None
        if again.replay().finished:
            return None
        log.warning("run.taken_over", run_id=run.run_id, previous=run.coordinator_user, epoch=epoch)
        return RunPlan.continuing(again)
    return None

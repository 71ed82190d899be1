"""``cis dag resume``: a run picked up again from its room.

An unfinished run whose coordinator stopped is driven on from where its log ends (attempts out on
workers are awaited, attempts lost with the coordinator go again); a failed or cancelled run is
run again as a new run that keeps (carries over) its completed tasks, but those its rollback
undid.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.app.connect import open_connection
from cis_bot.app.drive import (
    COORDINATED_MODES,
    OnStarted,
    RunPlan,
    announce,
    chat_scope,
    drive_run,
)
from cis_bot.app.takeover import take_over
from cis_bot.config import Config, ExecutionMode
from cis_bot.dag.engine import RunStatus, TaskCarried, TaskStatus
from cis_bot.errors import UserError
from cis_bot.ids import new_run_id
from cis_bot.matrix.runs import RoomRun, joined_rooms, pick_run, read_runs
from cis_bot.run.driver import RunObserver

if TYPE_CHECKING:
    from cis_bot.app.hsprocess import HomeserverProcess


@attrs.frozen
class Resumption:
    plan: RunPlan
    #: A new run that keeps the completed tasks (announce it, resumed from the old one); else
    #: the same run, driven on from where its log ends.
    new: bool
    resumed_from: str


def plan_resume(run: RoomRun, *, user_id: str, mode: ExecutionMode) -> Resumption:
    """How to resume ``run`` from the node whose user is ``user_id``: UserError when it
    completed, or when it is unfinished and another user coordinates it."""
    replayed = run.replay()
    if not replayed.finished:
        if run.coordinator_user != user_id:
            raise UserError(
                f"run {run.run_id} is coordinated by {run.coordinator_user} (node "
                f"{run.created.coordinator!r}), not by this node ({user_id})"
            )
        return Resumption(RunPlan.continuing(run), new=False, resumed_from=run.run_id)
    if replayed.status is RunStatus.COMPLETED:
        raise UserError(f"run {run.run_id} completed: nothing to resume")
    now = time.time()
    # A completed task whose rollback ran (or began) is undone, or may be: it runs again.
    carried = [
        TaskCarried(tid, now, record.output, run.run_id)
        for tid, record in replayed.tasks.items()
        if record.status is TaskStatus.COMPLETED and record.rollback is None
    ]
    plan = RunPlan(
        new_run_id(),
        run.room_id,
        run.spec,
        mode,
        run.created.max_workers,
        prelude=carried,
        workers=run.created.workers if mode is ExecutionMode.FEDERATION else None,
    )
    return Resumption(plan, new=True, resumed_from=run.run_id)


async def resume(
    config: Config,
    *,
    mode: ExecutionMode,
    wanted: str,
    room: str | None,
    state_dir: Path,
    work_dir: Path,
    observers: Sequence[RunObserver] = (),
    on_started: OnStarted | None = None,
    started: HomeserverProcess | None = None,
) -> dict[str, Any]:
    """Resume the run ``wanted`` names (an id or a unique prefix); returns the report.
    ``started``: the local homeserver, already starting in a child (``hsprocess.py``)."""
    connection = await open_connection(config, mode, state_dir, started=started)
    try:
        node = connection.node
        rooms = await joined_rooms(node, room)
        run = pick_run(await read_runs(node, rooms, node.identity.trusted_coordinators), wanted)
        resumption = plan_resume(run, user_id=node.user_id, mode=mode)
        if not resumption.new and resumption.plan.mode in COORDINATED_MODES:
            # A new epoch: should the process it follows still be alive somewhere, its late
            # decisions no longer count.
            plan = await take_over(node, run, reason="cis dag resume")
            if plan is None:
                raise UserError(
                    f"run {run.run_id} was taken over by another coordinator meanwhile, or "
                    "ended: see `cis dag status`"
                )
            resumption = attrs.evolve(resumption, plan=plan)
        chat = chat_scope(config, resumption.plan, own_room=mode is ExecutionMode.LOCAL)
        if resumption.new:
            await announce(
                node, resumption.plan, resumed_from=resumption.resumed_from, chat=chat is not None
            )
        return await drive_run(
            node,
            resumption.plan,
            config=config,
            state_dir=state_dir,
            work_dir=work_dir,
            observers=observers,
            on_started=on_started,
            kind="resume",
            chat=chat,
        )
    finally:
        await connection.close()

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
from typing import Any

from cis_bot.app.connect import open_connection
from cis_bot.app.drive import OnStarted, RunPlan, announce, drive_run
from cis_bot.config import Config, ExecutionMode
from cis_bot.dag.engine import RunStatus, TaskCarried, TaskStatus
from cis_bot.errors import UserError
from cis_bot.ids import new_run_id
from cis_bot.matrix.runs import joined_rooms, pick_run, read_runs
from cis_bot.run.driver import RunObserver


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
) -> dict[str, Any]:
    """Resume the run ``wanted`` names (an id or a unique prefix); returns the report."""
    connection = await open_connection(config, mode, state_dir)
    try:
        node = connection.node
        run = pick_run(await read_runs(node, await joined_rooms(node, room)), wanted)
        replayed = run.replay()
        if not replayed.finished:
            if run.created.coordinator != node.identity.node_id:
                raise UserError(
                    f"run {run.run_id} is coordinated by node {run.created.coordinator!r}, not "
                    f"by this node ({node.identity.node_id!r})"
                )
            plan = RunPlan.continuing(run)
        else:
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
            )
            await announce(node, plan, resumed_from=run.run_id)
        return await drive_run(
            node,
            plan,
            config=config,
            state_dir=state_dir,
            work_dir=work_dir,
            observers=observers,
            on_started=on_started,
            kind="resume",
        )
    finally:
        await connection.close()

"""The one entry point for a new run, in every mode (the seed's UnifiedDagExecutor)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.app.connect import open_connection
from cis_bot.app.drive import OnStarted, RunPlan, announce, chat_scope, drive_run
from cis_bot.app.federation import await_workers
from cis_bot.app.localhs import LocalHomeserverDir, run_alias_prefix
from cis_bot.config import Config, ExecutionMode
from cis_bot.dag.spec import DagSpec, resolve_stakeholders
from cis_bot.ids import new_run_id
from cis_bot.run.driver import RunObserver

if TYPE_CHECKING:
    from cis_bot.app.hsprocess import HomeserverProcess


@attrs.frozen
class RunRequest:
    spec: DagSpec
    config: Config
    mode: ExecutionMode
    max_workers: int
    state_dir: Path
    work_dir: Path
    room: str | None = None
    #: Federation mode: the only workers (node or user ids) the run may use.
    workers: tuple[str, ...] | None = None
    #: Local mode: the local homeserver, already starting in a child (``hsprocess.py``).
    started: HomeserverProcess | None = attrs.field(default=None, eq=False)


async def execute(
    request: RunRequest,
    *,
    observers: Sequence[RunObserver] = (),
    on_started: OnStarted | None = None,
) -> dict[str, Any]:
    """Run the DAG: a new run in its room (local mode: a new room on the local homeserver;
    else the room the request names); returns the report."""
    connection = await open_connection(
        request.config, request.mode, request.state_dir, started=request.started
    )
    try:
        node = connection.node
        run_id = new_run_id()
        if request.mode is ExecutionMode.LOCAL:
            watchers = request.config.dag.local.watchers
            if watchers is None:
                watchers = tuple(LocalHomeserverDir.of(request.state_dir).human_accounts())
            room_id = await node.create_room(
                name=f"DAG {request.spec.name} · run {run_id}",
                alias=f"{run_alias_prefix(request.config)}{run_id}",
                invite=watchers,
            )
        else:
            assert request.room is not None
            room_id = await node.resolve_room(request.room)
        if request.workers:
            await await_workers(
                node,
                room_id,
                request.workers,
                timeout=request.config.dag.matrix.no_worker_timeout_secs,
                room_name=request.room or room_id,
            )
        # Stakeholders CIS names by user name are users of the coordinator's homeserver.
        spec = resolve_stakeholders(request.spec, node.user_id.partition(":")[2])
        plan = RunPlan(
            run_id, room_id, spec, request.mode, request.max_workers, workers=request.workers
        )
        chat = chat_scope(request.config, plan, own_room=request.mode is ExecutionMode.LOCAL)
        await announce(node, plan, chat=chat is not None)
        return await drive_run(
            node,
            plan,
            config=request.config,
            state_dir=request.state_dir,
            work_dir=request.work_dir,
            observers=observers,
            on_started=on_started,
            chat=chat,
        )
    finally:
        await connection.close()

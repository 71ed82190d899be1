"""``cis node``: a long-lived node. It works for the rooms it is in until cancelled
(SIGINT/SIGTERM); as a coordinator it also answers chat commands (``[chat] enabled``, on by
default for a coordinator; docs/chat.md) and stands by: it picks up the unfinished runs it was
coordinating, and takes over those of the coordinators it trusts whose lease on them lapsed
(``matrix/standby.py``, docs/federation.md)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog

from cis_bot.app.chat.notices import NoticeIndex
from cis_bot.app.chat.rooms import RoomFacts
from cis_bot.app.chat.service import ChatScope, ChatService
from cis_bot.app.chat.starter import NodeRuns
from cis_bot.app.connect import connect_configured
from cis_bot.app.drive import RunPlan, drive_run, make_worker
from cis_bot.app.takeover import take_over
from cis_bot.config import Config
from cis_bot.control.service import start_control
from cis_bot.matrix.leases import RunLeases
from cis_bot.matrix.runs import joined_rooms, read_runs
from cis_bot.matrix.standby import Standby
from cis_bot.session.manager import SessionManager

log = structlog.get_logger(__name__)


async def serve_node(
    config: Config, *, state_dir: Path, work_dir: Path, coordinator: bool = False
) -> None:
    chat = config.chat.enabled if config.chat.enabled is not None else coordinator
    connection = await connect_configured(config)
    node = connection.node
    manager = SessionManager()
    worker = make_worker(node, manager, config, state_dir=state_dir, work_dir=work_dir, chat=chat)
    worker.start()
    resumed: list[asyncio.Task[dict[str, Any]]] = []
    control = await start_control(node, state_dir, kind="node")
    control.add_sessions(manager, worker.room_of)
    runs: NodeRuns | None = None
    service: ChatService | None = None
    # One per process: a coordinator's lease is one state event per room, keyed by its user.
    leases = RunLeases(
        node, heartbeat_secs=config.node.heartbeat_secs, lease_secs=config.node.lease_period_secs
    )
    standby: Standby | None = None
    if chat:
        index, facts = NoticeIndex(), RoomFacts(node)
        runs = NodeRuns(
            node,
            control,
            config,
            state_dir=state_dir,
            work_dir=work_dir,
            index=index,
            facts=facts,
            leases=leases,
        )
        service = ChatService(
            node, control, config, scope=ChatScope(), starter=runs, index=index, facts=facts
        )
        runs.reply = service.send_answer
        service.start()
    trusted = node.identity.trusted_coordinators

    def drive(plan: RunPlan) -> None:
        if runs is not None:
            runs.drive(plan, reply_to=None)
            return
        resumed.append(
            asyncio.create_task(
                drive_run(
                    node,
                    plan,
                    config=config,
                    state_dir=state_dir,
                    work_dir=work_dir,
                    control=control,
                    own_worker=False,
                    leases=leases,
                )
            )
        )

    async def take(room_id: str, run_id: str, epoch: int) -> bool:
        """Take the run over if it still is where the standby saw it."""
        found = [r for r in await read_runs(node, [room_id], trusted) if r.run_id == run_id]
        if not found or found[0].log.epoch != epoch or found[0].replay().finished:
            return False
        mine = found[0].coordinator_user == node.user_id
        reason = (
            "its coordinator (this node) restarted"
            if mine
            else f"the lease of its coordinator {found[0].coordinator_user} lapsed"
        )
        plan = await take_over(node, found[0], reason=reason)
        if plan is None:
            return False
        log.info("node.resuming_run", run_id=run_id, room_id=room_id, epoch=plan.epoch)
        drive(plan)
        return True

    try:
        if coordinator:
            standby = Standby(
                node,
                trusted=trusted,
                leases=leases,
                take_over=take,
                stagger_secs=min(1.0, config.node.heartbeat_secs),
            )
            await standby.start(await joined_rooms(node))
        await asyncio.Event().wait()
    finally:
        if standby is not None:
            await standby.close()
        for task in resumed:
            task.cancel()
        if service is not None:
            await service.close()
        if runs is not None:
            await runs.close()
        with contextlib.suppress(Exception):
            await manager.close()
        await worker.stop()
        await leases.close()
        await control.close()
        await connection.close()

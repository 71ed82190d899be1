"""``cis node``: a long-lived node. It works for the rooms it is in until cancelled
(SIGINT/SIGTERM); as a coordinator it also picks up the unfinished runs it was coordinating, and
answers chat commands (``[chat] enabled``, on by default for a coordinator; docs/chat.md)."""

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
from cis_bot.config import Config
from cis_bot.control.service import start_control
from cis_bot.matrix.runs import joined_rooms, read_runs
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
    if chat:
        index, facts = NoticeIndex(), RoomFacts(node)
        runs = NodeRuns(
            node, control, config, state_dir=state_dir, work_dir=work_dir, index=index, facts=facts
        )
        service = ChatService(
            node, control, config, scope=ChatScope(), starter=runs, index=index, facts=facts
        )
        runs.reply = service.send_answer
        service.start()
    try:
        if coordinator:
            # Only the runs this node's own user created: the content's coordinator field is a
            # name anyone could write.
            for run in await read_runs(node, await joined_rooms(node), {node.user_id}):
                if run.replay().finished:
                    continue
                log.info("node.resuming_run", run_id=run.run_id, room_id=run.room_id)
                plan = RunPlan.continuing(run)
                if runs is not None:
                    runs.drive(plan, reply_to=None)
                    continue
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
                        )
                    )
                )
        await asyncio.Event().wait()
    finally:
        for task in resumed:
            task.cancel()
        if service is not None:
            await service.close()
        if runs is not None:
            await runs.close()
        with contextlib.suppress(Exception):
            await manager.close()
        await worker.stop()
        await control.close()
        await connection.close()

"""One entry point, several modes (the seed's UnifiedDagExecutor), all the same bot.

local:   the node on an embedded loopback homeserver; tasks run here; the run's room is its log.
hybrid:  tasks run here; the run is broadcast to a room on the configured homeserver; an outage
         of that homeserver never stops local execution (the outbox queues, then flushes).
matrix:  this node only coordinates: dispatches become assignments to worker nodes in the room.

Whatever the mode: the RunEngine decides, the RunRecorder writes the run log into the room, and
the report has the same shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import yaml

from cis_bot.config import Config, ExecutionMode
from cis_bot.dag.engine import RunEngine
from cis_bot.dag.report import build_report
from cis_bot.dag.runner import LocalExecutor, RunDriver, RunObserver, RunPaths
from cis_bot.dag.spec import DagSpec, spec_to_document
from cis_bot.matrix import events as ev
from cis_bot.matrix.broadcast import RunRecorder, SessionReporter
from cis_bot.matrix.coordinator import RoomExecutor
from cis_bot.matrix.node import Node, NodeIdentity, outgoing
from cis_bot.matrix.worker import Worker
from cis_bot.session.manager import SessionManager

log = structlog.get_logger(__name__)

#: The local node's id and bot localpart on the embedded homeserver.
LOCAL_NODE_ID = "local"
#: Local run rooms are ``#dag-<run_id>:<server>``.
RUN_ALIAS = "dag-"


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@attrs.frozen
class RunRequest:
    spec: DagSpec
    config: Config
    mode: ExecutionMode
    max_workers: int
    state_dir: Path
    work_dir: Path
    room: str | None = None


@attrs.define
class Connection:
    """A started node, and the embedded homeserver under it in local mode."""

    node: Node
    homeserver: Any = None

    async def close(self) -> None:
        await self.node.stop()
        if self.homeserver is not None:
            await self.homeserver.stop()


async def connect_local(state_dir: Path, server_name: str) -> Connection:
    """The local node on the embedded homeserver kept in ``state_dir/homeserver``.

    The appservice listens first (the registration must name its port), then the homeserver
    starts with that registration; tokens are fresh each time, as nothing else holds them.
    """
    from cis_bot.homeserver.server import EmbeddedHomeserver

    identity = NodeIdentity(
        node_id=LOCAL_NODE_ID,
        homeserver="",
        server_name=server_name,
        localpart=f"cis_{LOCAL_NODE_ID}",
        as_token=secrets.token_urlsafe(32),
        hs_token=secrets.token_urlsafe(32),
    )
    node = Node(identity)
    port = await node.listen()
    hs_dir = state_dir / "homeserver"
    hs_dir.mkdir(parents=True, exist_ok=True)
    registration = hs_dir / "local-node.yaml"
    registration.write_text(
        yaml.safe_dump(
            identity.registration(url=f"http://127.0.0.1:{port}", room_alias_prefix=RUN_ALIAS)
        )
    )
    registration.chmod(0o600)
    homeserver = EmbeddedHomeserver(
        state_dir=hs_dir, server_name=server_name, appservice_files=[registration]
    )
    try:
        await homeserver.start()
        await node.connect(homeserver.base_url)
    except BaseException:
        await node.stop()
        await homeserver.stop()
        raise
    return Connection(node, homeserver)


async def connect_configured(config: Config, *, serve: bool = True) -> Connection:
    node = Node(NodeIdentity.from_config(config))
    await node.start(serve=serve)
    return Connection(node)


async def execute(
    request: RunRequest,
    *,
    observers: Sequence[RunObserver] = (),
    on_started: Callable[[RunDriver, SessionManager], None] | None = None,
) -> dict[str, Any]:
    """Run the DAG; returns the report. ``on_started`` gets the driver (submit RunCancelled to
    cancel) and the session manager once the run is under way."""
    spec, config = request.spec, request.config
    run_id = new_run_id()
    paths = RunPaths(request.state_dir / "runs" / run_id)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    matrix = config.dag.matrix
    if request.mode is ExecutionMode.LOCAL:
        connection = await connect_local(request.state_dir, matrix.home_server)
    else:
        connection = await connect_configured(config)
    node = connection.node
    manager = SessionManager()
    worker: Worker | None = None
    started = time.monotonic()
    try:
        if request.mode is ExecutionMode.LOCAL:
            room_id = await node.create_room(
                name=f"DAG {spec.name} · run {run_id}", alias=f"{RUN_ALIAS}{run_id}", public=True
            )
        else:
            assert request.room is not None
            room_id = await node.resolve_room(request.room)
        outbox = node.outbox(room_id)
        outbox.post(
            outgoing(
                ev.RunCreated(
                    run_id=run_id,
                    dag_name=spec.name,
                    spec=json.dumps(spec_to_document(spec)),
                    mode=str(request.mode),
                    max_workers=request.max_workers,
                    coordinator=node.identity.node_id,
                )
            )
        )
        runs_here = request.mode is not ExecutionMode.MATRIX
        reporter = None
        if runs_here and config.dag.hybrid.broadcast_status:
            reporter = SessionReporter(
                outbox,
                node_id=node.identity.node_id,
                upload=_uploader(node),
                interval_ms=matrix.broadcast_interval_ms,
                broadcast_output=config.dag.hybrid.broadcast_output,
            )
        recorder = RunRecorder(
            outbox,
            run_id=run_id,
            node_id=node.identity.node_id,
            user_id=node.user_id,
            record_local_dispatch=runs_here,
            reporter=reporter,
        )
        engine = RunEngine(spec, max_workers=request.max_workers)
        driver = RunDriver(engine, observers=[*observers, recorder])
        if runs_here:
            executor: LocalExecutor | RoomExecutor = LocalExecutor(
                driver,
                manager,
                run_id=run_id,
                paths=paths,
                profiles=config.agents,
                work_dir=request.work_dir,
            )
            if request.mode is ExecutionMode.HYBRID and config.dag.hybrid.accept_remote_tasks:
                worker = _worker(node, manager, config, request)
                worker.start()
        else:
            executor = RoomExecutor(driver, node, outbox, room_id=room_id, run_id=run_id)
            await executor.start_listening()
        if on_started:
            on_started(driver, manager)
        await driver.run(executor)
        await manager.close()
        report = build_report(
            engine,
            run_id=run_id,
            paths=paths,
            duration_s=time.monotonic() - started,
            transcripts=executor.transcripts if isinstance(executor, RoomExecutor) else None,
        )
        report["room_id"] = room_id
        paths.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if worker:
            await worker.stop()
        if not await outbox.flush(timeout=matrix.flush_timeout_secs):
            log.warning(
                "room.events_undelivered",
                room_id=room_id,
                pending=outbox.pending,
                hint="the homeserver did not come back in time; the run itself is complete",
            )
        await outbox.close()
        return report
    finally:
        await manager.close()
        await connection.close()


def _uploader(node: Node) -> Any:
    async def upload(data: bytes, mime_type: str, filename: str) -> str:
        return await node.upload(data, mime_type=mime_type, filename=filename)

    return upload


def _worker(node: Node, manager: SessionManager, config: Config, request: RunRequest) -> Worker:
    return Worker(
        node,
        manager,
        profiles=config.agents,
        accept_agents=config.node.accept_agents,
        max_workers=config.dag.local.max_workers,
        state_dir=request.state_dir,
        work_dir=request.work_dir,
        interval_ms=config.dag.matrix.broadcast_interval_ms,
        broadcast_output=config.dag.hybrid.broadcast_output,
        heartbeat_secs=config.node.heartbeat_secs,
    )


async def serve_node(config: Config, *, state_dir: Path, work_dir: Path) -> None:
    """``cis node``: a long-lived worker until cancelled (SIGINT/SIGTERM)."""
    connection = await connect_configured(config)
    manager = SessionManager()
    worker = Worker(
        connection.node,
        manager,
        profiles=config.agents,
        accept_agents=config.node.accept_agents,
        max_workers=config.dag.local.max_workers,
        state_dir=state_dir,
        work_dir=work_dir,
        interval_ms=config.dag.matrix.broadcast_interval_ms,
        broadcast_output=config.dag.hybrid.broadcast_output,
        heartbeat_secs=config.node.heartbeat_secs,
    )
    worker.start()
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await manager.close()
        await worker.stop()
        await connection.close()

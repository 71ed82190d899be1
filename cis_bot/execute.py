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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog

from cis_bot.config import Config, ExecutionMode
from cis_bot.control.server import ControlPlane, RunHandle
from cis_bot.control.service import start_control
from cis_bot.dag.engine import (
    Fact,
    Outcome,
    RunEngine,
    RunEvent,
    RunStatus,
    TaskCarried,
    TaskDispatched,
    TaskFinished,
    TaskStatus,
)
from cis_bot.dag.report import build_report
from cis_bot.dag.runner import LocalExecutor, RunDriver, RunObserver, RunPaths
from cis_bot.dag.spec import DagSpec, spec_to_document
from cis_bot.errors import UserError
from cis_bot.localhs import InUse, LocalHomeserverDir
from cis_bot.matrix import events as ev
from cis_bot.matrix.broadcast import RunRecorder, SessionReporter
from cis_bot.matrix.coordinator import RoomExecutor
from cis_bot.matrix.identity import NodeIdentity
from cis_bot.matrix.node import Node
from cis_bot.matrix.runlog import RunLog, fold_runs, parse_room_event, spec_from_text
from cis_bot.matrix.worker import Worker
from cis_bot.session.manager import SessionManager

log = structlog.get_logger(__name__)


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
    lock: Any = None
    directory: LocalHomeserverDir | None = None

    async def close(self) -> None:
        # The homeserver first: its appservice pusher must not be left waiting on our
        # appservice endpoint once that is gone.
        if self.homeserver is not None:
            if self.directory is not None:
                self.directory.withdraw_endpoint()
            await self.homeserver.stop()
        await self.node.stop()
        if self.lock is not None:
            self.lock.close()


def run_alias_prefix(config: Config) -> str:
    """Local run rooms are ``#<prefix><run_id>:<server>`` (from ``[dag.matrix] room_prefix``)."""
    return config.dag.matrix.room_prefix.lstrip("!#") or "dag-"


async def connect_local(
    state_dir: Path, server_name: str, alias_prefix: str, *, serve: bool = True
) -> Connection:
    """The local node on the local homeserver in ``state_dir/homeserver``.

    If a process already runs that homeserver, use it: a standalone ``cis homeserver`` for
    anything, another run's only to read (``serve=False``), since it ends with that run. Else
    start it here: the appservice listens first (the registration names its port), then the
    homeserver starts with the registrations in its directory, and says where it answers.
    """
    from cis_bot.homeserver.server import EmbeddedHomeserver

    directory = LocalHomeserverDir.of(state_dir)
    identity = directory.local_identity(server_name, alias_prefix)
    try:
        lock = directory.lock("cis")
    except InUse:
        running = directory.running_endpoint()
        if running is None or not (running[1] or not serve):
            raise
        node = Node(identity)
        if serve:
            await node.listen()  # the standalone homeserver knows this port from its start
        await node.connect(running[0])
        return Connection(node)
    node = Node(identity)
    homeserver = EmbeddedHomeserver(
        state_dir=directory.path,
        server_name=server_name,
        appservice_files=directory.registrations(),
    )
    try:
        if serve:
            try:
                await node.listen()
            except UserError:  # the port we used last time is taken now: take another one
                node.identity = attrs.evolve(identity, listen_port=0)
                node.identity = attrs.evolve(identity, listen_port=await node.listen())
            directory.save_registration(node.identity, alias_prefix)
            homeserver.appservice_files = tuple(directory.registrations())
        await homeserver.start()
        directory.publish_endpoint(homeserver.base_url, standalone=False)
        await node.connect(homeserver.base_url)
    except BaseException:
        await homeserver.stop()
        await node.stop()
        directory.withdraw_endpoint()
        lock.close()
        raise
    return Connection(node, homeserver, lock, directory)


async def connect_configured(config: Config, *, serve: bool = True) -> Connection:
    node = Node(NodeIdentity.from_config(config))
    await node.start(serve=serve)
    return Connection(node)


@attrs.frozen
class RunPlan:
    """What ``drive_run`` drives: a run in a room, new or picked up from its log."""

    run_id: str
    room_id: str
    spec: DagSpec
    mode: ExecutionMode
    max_workers: int
    #: Events already in the room (a run picked up after its coordinator stopped).
    history: Sequence[RunEvent] = ()
    #: (task, attempt) -> worker user, for attempts out on workers (from the run log).
    assignees: Mapping[tuple[str, int], str] = attrs.field(factory=dict)
    #: Facts to feed first (a resumed run's carried-over tasks).
    prelude: Sequence[Fact] = ()


async def execute(
    request: RunRequest,
    *,
    observers: Sequence[RunObserver] = (),
    on_started: Callable[[RunDriver, SessionManager], None] | None = None,
) -> dict[str, Any]:
    """Run the DAG; returns the report. ``on_started`` gets the driver (submit RunCancelled to
    cancel) and the session manager once the run is under way."""
    connection = await open_connection(request.config, request.mode, request.state_dir)
    try:
        node = connection.node
        run_id = new_run_id()
        if request.mode is ExecutionMode.LOCAL:
            room_id = await node.create_room(
                name=f"DAG {request.spec.name} · run {run_id}",
                alias=f"{run_alias_prefix(request.config)}{run_id}",
                public=True,
            )
        else:
            assert request.room is not None
            room_id = await node.resolve_room(request.room)
        plan = RunPlan(run_id, room_id, request.spec, request.mode, request.max_workers)
        await announce(node, plan)
        return await drive_run(
            connection,
            plan,
            config=request.config,
            state_dir=request.state_dir,
            work_dir=request.work_dir,
            observers=observers,
            on_started=on_started,
        )
    finally:
        await connection.close()


async def open_connection(
    config: Config, mode: ExecutionMode, state_dir: Path, *, serve: bool = True
) -> Connection:
    """A node to work with (``serve=False``: only to read rooms and post, no appservice)."""
    if mode is ExecutionMode.LOCAL:
        return await connect_local(
            state_dir, config.dag.matrix.home_server, run_alias_prefix(config), serve=serve
        )
    return await connect_configured(config, serve=serve)


async def announce(node: Node, plan: RunPlan, *, resumed_from: str | None = None) -> None:
    """Post the run's ``cis.dag.run.created`` (the spec in media when too big for an event)."""
    text = json.dumps(spec_to_document(plan.spec))
    created = ev.RunCreated(
        run_id=plan.run_id,
        dag_name=plan.spec.name,
        spec=text,
        mode=str(plan.mode),
        max_workers=plan.max_workers,
        coordinator=node.identity.node_id,
        resumed_from=resumed_from,
    )
    try:
        ev.encode(created)
    except ValueError:
        mxc = await node.upload(
            text.encode(), mime_type="application/json", filename=f"{plan.run_id}.dag.json"
        )
        created = attrs.evolve(created, spec=None, spec_mxc=mxc)
    await node.send(plan.room_id, created)


async def drive_run(
    connection: Connection,
    plan: RunPlan,
    *,
    config: Config,
    state_dir: Path,
    work_dir: Path,
    observers: Sequence[RunObserver] = (),
    on_started: Callable[[RunDriver, SessionManager], None] | None = None,
    control: ControlPlane | None = None,
    kind: str = "execute",
) -> dict[str, Any]:
    """Drive the run to its end. Its sessions and the run itself are served on ``control``
    (this process's control API; without one, the run serves its own as ``kind``)."""
    node = connection.node
    matrix = config.dag.matrix
    paths = RunPaths(state_dir / "runs" / plan.run_id)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    manager = SessionManager()
    worker: Worker | None = None
    started = time.monotonic()
    owned_control = control is None
    if control is None:
        control = await start_control(node, state_dir, kind=kind)
    unregister: list[Callable[[], None]] = []
    outbox = node.outbox(plan.room_id)
    try:
        runs_here = plan.mode is not ExecutionMode.MATRIX
        reporter = None
        if runs_here:
            reporter = SessionReporter(
                outbox,
                node_id=node.identity.node_id,
                upload=_uploader(node),
                interval_ms=matrix.broadcast_interval_ms,
                broadcast_status=config.dag.hybrid.broadcast_status,
                broadcast_output=config.dag.hybrid.broadcast_output,
            )
        recorder = RunRecorder(
            outbox,
            run_id=plan.run_id,
            node_id=node.identity.node_id,
            user_id=node.user_id,
            record_local_dispatch=runs_here,
            reporter=reporter,
        )
        engine = RunEngine.replay(plan.spec, plan.history, max_workers=plan.max_workers)
        driver = RunDriver(engine, observers=[*observers, recorder])
        if runs_here:
            executor: LocalExecutor | RoomExecutor = LocalExecutor(
                driver,
                manager,
                run_id=plan.run_id,
                paths=paths,
                profiles=config.agents,
                work_dir=work_dir,
            )
            if plan.mode is ExecutionMode.HYBRID and config.dag.hybrid.accept_remote_tasks:
                worker = make_worker(node, manager, config, state_dir=state_dir, work_dir=work_dir)
                worker.start()
        else:
            executor = RoomExecutor(
                driver,
                node,
                outbox,
                room_id=plan.room_id,
                run_id=plan.run_id,
                no_worker_timeout=matrix.no_worker_timeout_secs,
                policy=matrix.assignment,
            )
            await executor.start_listening()
        unregister.append(
            control.add_run(
                RunHandle(plan.run_id, plan.room_id, plan.spec.name, str(plan.mode), driver)
            )
        )
        unregister.append(control.add_sessions(manager, _room_of_session(plan, worker)))
        for fact in plan.prelude:
            driver.submit(fact)
        _pick_up_open_attempts(engine, driver, executor, plan)
        if on_started:
            on_started(driver, manager)
        await driver.run(executor)
        await manager.close()
        report = build_report(
            engine,
            run_id=plan.run_id,
            paths=paths,
            duration_s=time.monotonic() - started,
            transcripts=executor.transcripts if isinstance(executor, RoomExecutor) else None,
        )
        report["room_id"] = plan.room_id
        paths.report.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if worker:
            await worker.stop()
            worker = None
        if not await outbox.flush(timeout=matrix.flush_timeout_secs):
            log.warning(
                "room.events_undelivered",
                room_id=plan.room_id,
                pending=outbox.pending,
                hint="the homeserver did not come back in time; the run itself is complete",
            )
        return report
    finally:
        await outbox.close()
        await manager.close()
        if worker:  # the run failed: stop working for others too
            await worker.stop()
        for remove in unregister:
            remove()
        if owned_control:
            await control.close()


def _room_of_session(plan: RunPlan, worker: Worker | None) -> Callable[[str], str | None]:
    """The room a session on the run's manager belongs to: the run's own, or for a session
    the worker claimed from another run, that run's."""
    prefix = f"{plan.run_id}:"

    def room_of(session_id: str) -> str | None:
        if session_id.startswith(prefix):
            return plan.room_id
        return worker.room_of(session_id) if worker else None

    return room_of


def _pick_up_open_attempts(
    engine: RunEngine,
    driver: RunDriver,
    executor: LocalExecutor | RoomExecutor,
    plan: RunPlan,
) -> None:
    """Attempts the log shows under way when the coordinator stopped: those on workers are
    awaited (their results come through the room); those that ran in the stopped process are
    lost, and go again."""
    now = time.time()
    for task_id, record in engine.tasks.items():
        attempt = record.current
        if not record.status.is_active or attempt is None:
            continue
        assignee = plan.assignees.get((task_id, attempt.number))
        if isinstance(executor, RoomExecutor) and assignee:
            executor.adopt(
                record.spec,
                TaskDispatched(task_id, attempt.number, attempt.dispatched_at),
                assignee,
            )
        else:
            driver.submit(
                TaskFinished(
                    task_id,
                    attempt.number,
                    now,
                    Outcome.LOST,
                    error="its node stopped before it reported",
                )
            )


def _uploader(node: Node) -> Any:
    async def upload(data: bytes, mime_type: str, filename: str) -> str:
        return await node.upload(data, mime_type=mime_type, filename=filename)

    return upload


def make_worker(
    node: Node, manager: SessionManager, config: Config, *, state_dir: Path, work_dir: Path
) -> Worker:
    return Worker(
        node,
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


async def read_runs(node: Node, rooms: Sequence[str]) -> list[tuple[str, RunLog]]:
    """Every run the rooms' logs hold, as (room id, run log), oldest first per room."""
    found: list[tuple[str, RunLog]] = []
    for room_id in rooms:
        events = []
        async for raw in node.history(room_id):
            event = parse_room_event(raw)
            if event is not None:
                events.append(event)
        for run in fold_runs(events).values():
            created = run.created
            if run.spec is None and created is not None and created.spec_mxc:
                text = (await node.download(created.spec_mxc)).decode("utf-8", "replace")
                run.spec = spec_from_text(text, run_id=run.run_id)
            if run.spec is not None:
                found.append((room_id, run))
    return found


def pick_run(found: Sequence[tuple[str, RunLog]], wanted: str | None) -> tuple[str, RunLog]:
    """The run named by ``wanted`` (a run id or a unique prefix of one; None: the latest)."""
    if not found:
        raise UserError("no runs found")
    if wanted is None:
        return max(found, key=lambda f: f[1].created.timestamp if f[1].created else 0)
    exact = [f for f in found if f[1].run_id == wanted]
    matches = exact or [f for f in found if f[1].run_id.startswith(wanted)]
    if not matches:
        raise UserError(f"no run {wanted!r}; runs: {', '.join(f[1].run_id for f in found[-10:])}")
    if len(matches) > 1:
        raise UserError(f"{wanted!r} is ambiguous: {', '.join(f[1].run_id for f in matches[:10])}")
    return matches[0]


async def rooms_of(node: Node, room: str | None) -> list[str]:
    if room:
        return [await node.resolve_room(room)]
    return [str(r) for r in await node.intent.get_joined_rooms()]


async def resume(
    config: Config,
    *,
    mode: ExecutionMode,
    wanted: str,
    room: str | None,
    state_dir: Path,
    work_dir: Path,
    observers: Sequence[RunObserver] = (),
    on_started: Callable[[RunDriver, SessionManager], None] | None = None,
) -> dict[str, Any]:
    """``cis dag resume``: an unfinished run whose coordinator stopped is picked up where its
    log ends (attempts out on workers are awaited, attempts lost with the coordinator go
    again); a failed or cancelled run is run again as a new run that keeps (carries over) its
    completed tasks."""
    connection = await open_connection(config, mode, state_dir)
    try:
        node = connection.node
        room_id, run = pick_run(await read_runs(node, await rooms_of(node, room)), wanted)
        assert run.spec is not None and run.created is not None
        created = run.created
        replayed = RunEngine.replay(run.spec, run.events, max_workers=created.max_workers)
        if not replayed.finished:
            if created.coordinator != node.identity.node_id:
                raise UserError(
                    f"run {run.run_id} is coordinated by node {created.coordinator!r}, not by "
                    f"this node ({node.identity.node_id!r})"
                )
            plan = _continuation(room_id, run)
        else:
            if replayed.status is RunStatus.COMPLETED:
                raise UserError(f"run {run.run_id} completed: nothing to resume")
            now = time.time()
            carried = [
                TaskCarried(tid, now, record.output, run.run_id)
                for tid, record in replayed.tasks.items()
                if record.status is TaskStatus.COMPLETED
            ]
            plan = RunPlan(
                new_run_id(), room_id, run.spec, mode, created.max_workers, prelude=carried
            )
            await announce(node, plan, resumed_from=run.run_id)
        return await drive_run(
            connection,
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


async def serve_node(
    config: Config, *, state_dir: Path, work_dir: Path, coordinator: bool = False
) -> None:
    """``cis node``: a long-lived worker until cancelled (SIGINT/SIGTERM); with
    ``coordinator``, it also picks up the unfinished runs it was coordinating."""
    connection = await connect_configured(config)
    node = connection.node
    manager = SessionManager()
    worker = make_worker(node, manager, config, state_dir=state_dir, work_dir=work_dir)
    worker.start()
    resumed: list[asyncio.Task[dict[str, Any]]] = []
    control = await start_control(node, state_dir, kind="node")
    control.add_sessions(manager, worker.room_of)
    try:
        if coordinator:
            for room_id, run in await read_runs(node, await rooms_of(node, None)):
                plan = _unfinished_plan(node, room_id, run)
                if plan is not None:
                    log.info("node.resuming_run", run_id=run.run_id, room_id=room_id)
                    resumed.append(
                        asyncio.create_task(
                            drive_run(
                                connection,
                                plan,
                                config=config,
                                state_dir=state_dir,
                                work_dir=work_dir,
                                control=control,
                            )
                        )
                    )
        await asyncio.Event().wait()
    finally:
        for task in resumed:
            task.cancel()
        with contextlib.suppress(Exception):
            await manager.close()
        await worker.stop()
        await control.close()
        await connection.close()


def _unfinished_plan(node: Node, room_id: str, run: RunLog) -> RunPlan | None:
    created = run.created
    if created is None or run.spec is None or created.coordinator != node.identity.node_id:
        return None
    if RunEngine.replay(run.spec, run.events).finished:
        return None
    return _continuation(room_id, run)


def _continuation(room_id: str, run: RunLog) -> RunPlan:
    """Driving ``run`` on from where its log ends (its coordinator stopped)."""
    assert run.spec is not None and run.created is not None
    return RunPlan(
        run.run_id,
        room_id,
        run.spec,
        ExecutionMode(run.created.mode),
        run.created.max_workers,
        history=run.events,
        assignees=run.assignees,
    )


def run_summary(room_id: str, run: RunLog) -> dict[str, Any]:
    """A run as its room tells it: what ``cis dag status`` and ``cis dag list`` show."""
    assert run.spec is not None and run.created is not None
    engine = RunEngine.replay(run.spec, run.events, max_workers=run.created.max_workers)
    transcripts = {
        (e.payload.task_id, e.payload.attempt): e.payload.transcript
        for e in run.sessions
        if isinstance(e.payload, ev.SessionCompleted) and e.payload.transcript
    }
    tasks: dict[str, Any] = {}
    for task_id, record in engine.tasks.items():
        attempt = record.current
        duration = attempt.duration_s if attempt else None
        tasks[task_id] = {
            "status": str(record.status),
            "attempts": len(record.attempts),
            "exit_code": record.exit_code,
            "duration_s": None if duration is None else round(duration, 3),
            "transcript": transcripts.get((task_id, attempt.number)) if attempt else None,
            "reason": record.reason,
            "node": attempt.node if attempt else None,
        }
    return {
        "run_id": run.run_id,
        "dag": run.spec.name,
        "status": str(engine.status),
        "mode": run.created.mode,
        "coordinator": run.created.coordinator,
        "created_at": run.created.timestamp,
        "resumed_from": run.created.resumed_from,
        "room_id": room_id,
        "debts": engine.debts,
        "tasks": tasks,
    }

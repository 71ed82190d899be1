"""Driving a run in its room to its end, whatever the mode, new or picked up from its log.

local:   tasks run here; the run's room is on the embedded loopback homeserver.
hybrid:  tasks run here; the run is broadcast to a room on the configured homeserver; an outage
         of that homeserver never stops local execution (the outbox queues, then flushes).
matrix:  this node only coordinates: dispatches become assignments to worker nodes in the room,
         held by leases; the coordinator holds a lease on the run itself, so that a standby
         can take it over when this process dies (docs/federation.md).

Whatever the mode: the RunEngine decides, the RunRecorder writes the run log into the room, and
the report has the same shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import structlog

from cis_bot import private
from cis_bot.app.chat.notices import NoticeSettings, RunNotices
from cis_bot.app.chat.service import ChatScope, ChatService
from cis_bot.config import Config, ExecutionMode
from cis_bot.control.operations import ControlPlane, RunHandle
from cis_bot.control.service import start_control
from cis_bot.dag.document import spec_to_document
from cis_bot.dag.engine import Fact, Outcome, RunEngine, RunEvent, TaskDispatched, TaskFinished
from cis_bot.dag.report import build_report
from cis_bot.dag.spec import DagSpec
from cis_bot.errors import UserError
from cis_bot.ids import SessionId
from cis_bot.matrix import events as ev
from cis_bot.matrix.broadcast import RunRecorder, SessionReporter
from cis_bot.matrix.coordinator import RoomExecutor
from cis_bot.matrix.leases import RunLeases
from cis_bot.matrix.node import Node
from cis_bot.matrix.nodefacts import detect_facts
from cis_bot.matrix.runlog import parse_room_event
from cis_bot.matrix.runs import RoomRun, read_runs
from cis_bot.matrix.worker import Worker
from cis_bot.run.attempt import RunPaths
from cis_bot.run.driver import RunDriver, RunObserver
from cis_bot.run.local import LocalExecutor
from cis_bot.session.manager import SessionManager

log = structlog.get_logger(__name__)

#: Modes whose tasks a coordinator assigns to workers in the room, rather than running them.
COORDINATED_MODES = frozenset({ExecutionMode.MATRIX, ExecutionMode.FEDERATION})


@attrs.frozen
class StartedRun:
    """A run under way, as ``on_started`` hears of it."""

    run_id: str
    #: Submit RunCancelled to cancel the run.
    driver: RunDriver
    #: The sessions of the tasks run here (in matrix mode they run on workers).
    manager: SessionManager


#: Called once the run is under way.
OnStarted = Callable[[StartedRun], None]


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
    #: Federation mode: the only workers (node or user ids) the run may use.
    workers: tuple[str, ...] | None = None
    #: The epoch this process coordinates the run at (2 and more after a takeover).
    epoch: int = 1

    @classmethod
    def continuing(cls, run: RoomRun) -> RunPlan:
        """Driving ``run`` on from where its log ends (its coordinator stopped)."""
        return cls(
            run.run_id,
            run.room_id,
            run.spec,
            ExecutionMode(run.created.mode),
            run.created.max_workers,
            history=run.log.events,
            assignees=run.log.assignees,
            workers=run.created.workers,
            epoch=run.log.epoch,
        )


async def announce(
    node: Node, plan: RunPlan, *, resumed_from: str | None = None, chat: bool = False
) -> None:
    """Post the run's ``cis.dag.run.created`` (the spec in media when too big for an event);
    ``chat``: the process driving it answers chat commands about it."""
    text = json.dumps(spec_to_document(plan.spec))
    created = ev.RunCreatedContent(
        run_id=plan.run_id,
        dag_name=plan.spec.name,
        spec=text,
        mode=str(plan.mode),
        max_workers=plan.max_workers,
        coordinator=node.identity.node_id,
        resumed_from=resumed_from,
        chat=chat or None,
        workers=plan.workers,
    )
    await node.send(plan.room_id, created)


async def drive_run(
    node: Node,
    plan: RunPlan,
    *,
    config: Config,
    state_dir: Path,
    work_dir: Path,
    observers: Sequence[RunObserver] = (),
    on_started: OnStarted | None = None,
    control: ControlPlane | None = None,
    kind: str = "execute",
    chat: ChatScope | None = None,
    own_worker: bool = True,
    leases: RunLeases | None = None,
) -> dict[str, Any]:
    """Drive the run to its end; returns its report. Its sessions and the run itself are served
    on ``control`` (this process's control API; without one, the run serves its own as
    ``kind``). ``chat``: answer chat commands in the run's room while it runs (a node answers
    through its own chat service). ``own_worker``: in hybrid mode, a worker for the tasks others
    assign to this node (a node that has its worker already says False). ``leases``: the
    process's leases on the runs it coordinates (without, the run holds its own)."""
    matrix = config.dag.matrix
    paths = RunPaths.of(state_dir, plan.run_id)
    private.make_dirs(paths.run_dir)
    manager = SessionManager()
    worker: Worker | None = None
    started = time.monotonic()
    owned_control = control is None
    if control is None:
        control = await start_control(node, state_dir, kind=kind)
    unregister: list[Callable[[], None]] = []
    outbox = node.outbox(plan.room_id)
    service: ChatService | None = None
    notices: RunNotices | None = None
    coordinated = plan.mode in COORDINATED_MODES
    own_leases: RunLeases | None = None
    executor: LocalExecutor | RoomExecutor | None = None
    try:
        if chat is not None:
            service = ChatService(node, control, config, scope=chat)
            notices = run_notices(node, plan, config, service)
            observers = [*observers, notices]
            service.start()
        runs_here = not coordinated
        if coordinated:
            if leases is None:
                leases = own_leases = RunLeases(
                    node,
                    heartbeat_secs=config.node.heartbeat_secs,
                    lease_secs=config.node.lease_period_secs,
                )
            leases.hold(plan.room_id, plan.run_id, plan.epoch)
        reporter = None
        if runs_here:
            reporter = SessionReporter(
                outbox,
                node_id=node.identity.node_id,
                upload=node.upload_for_events,
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
            upload=node.upload_for_events,
            reporter=reporter,
            epoch=plan.epoch,
        )
        engine = RunEngine.replay(plan.spec, plan.history, max_workers=plan.max_workers)
        driver = RunDriver(engine, observers=[*observers, recorder], run_id=plan.run_id)
        if runs_here:
            executor = LocalExecutor(
                driver,
                manager,
                run_id=plan.run_id,
                node_id=node.identity.node_id,
                paths=paths,
                profiles=config.agents,
                work_dir=work_dir,
            )
            if (
                plan.mode is ExecutionMode.HYBRID
                and config.dag.hybrid.accept_remote_tasks
                and own_worker
            ):
                worker = make_worker(node, manager, config, state_dir=state_dir, work_dir=work_dir)
                worker.start()
        else:
            assert leases is not None
            held = leases
            executor = RoomExecutor(
                driver,
                node,
                outbox,
                room_id=plan.room_id,
                run_id=plan.run_id,
                no_worker_timeout=matrix.no_worker_timeout_secs,
                lost_exclusion=matrix.lost_exclusion_secs,
                breaker_failures=matrix.breaker_failures,
                breaker_cooldown=matrix.breaker_cooldown_secs,
                workers=plan.workers,
                policy=matrix.assignment,
                epoch=plan.epoch,
                blind=lambda: held.blind(plan.room_id),
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
        if isinstance(executor, RoomExecutor) and plan.assignees:
            await _catch_up(node, plan, executor)
        if on_started:
            on_started(StartedRun(plan.run_id, driver, manager))
        if isinstance(executor, RoomExecutor):
            await _drive_unless_taken_over(node, plan, driver, executor)
        else:
            await driver.run(executor)
        await manager.close()
        remote = executor.transcripts if isinstance(executor, RoomExecutor) else {}
        report = build_report(
            engine,
            run_id=plan.run_id,
            transcripts={**remote, **paths.transcripts_kept(engine)},
            duration_s=round(time.monotonic() - started, 3),
        )
        report["room_id"] = plan.room_id
        unwritten = _write_report(paths.report, report)
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
        if unwritten is not None:
            raise RunNotRecorded(report, unwritten)
        return report
    finally:
        if service is not None:
            await service.close()
        if notices is not None:
            await notices.close(timeout=matrix.flush_timeout_secs)
        await outbox.close()
        await manager.close()
        if worker:  # the run failed: stop working for others too
            await worker.stop()
        if isinstance(executor, RoomExecutor):
            executor.close()
        if coordinated and leases is not None:
            leases.release(plan.room_id, plan.run_id)
        if own_leases is not None:
            await own_leases.close()
        for remove in unregister:
            remove()
        if owned_control:
            await control.close()


def chat_scope(config: Config, plan: RunPlan, *, own_room: bool) -> ChatScope | None:
    """What a run process answers in the chat: its run, in its room (None: chat is off)."""
    if config.chat.enabled is False:
        return None
    return ChatScope(run_id=plan.run_id, room_id=plan.room_id, own_room=own_room)


def run_notices(node: Node, plan: RunPlan, config: Config, service: ChatService) -> RunNotices:
    """The notices of a run driven here, answered through ``service``."""
    chat = config.chat
    return RunNotices(
        node,
        room_id=plan.room_id,
        run_id=plan.run_id,
        index=service.index,
        settings=NoticeSettings(chat.prefix, chat.command_power_level, node.identity.allowed_users),
        people=service.facts,
    )


class RunNotRecorded(UserError):
    """The run ended, but its report could not be written (a full disk): the report is here."""

    exit_code = 1

    def __init__(self, report: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.report = report


def _write_report(path: Path, report: dict[str, Any]) -> str | None:
    """Write the report; why it could not be, or None."""
    try:
        private.write_file(path, json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        log.error("run.report_unwritten", path=str(path), error=str(exc))
        return (
            f"run {report['run_id']} {report['status']}, but its report could not be written to "
            f"{path}: {exc.strerror or exc}"
        )
    return None


def _room_of_session(plan: RunPlan, worker: Worker | None) -> Callable[[str], str | None]:
    """The room a session on the run's manager belongs to: the run's own, or for a session
    the worker claimed from another run, that run's."""

    def room_of(session_id: str) -> str | None:
        sid = SessionId.parse_or_none(session_id)
        if sid is not None and sid.run_id == plan.run_id:
            return plan.room_id
        return worker.room_of(session_id) if worker else None

    return room_of


class RunTakenOver(UserError):
    """Another coordinator took the run over (this one was thought gone): it goes on there."""

    exit_code = 1


async def _drive_unless_taken_over(
    node: Node, plan: RunPlan, driver: RunDriver, executor: RoomExecutor
) -> None:
    """Drive the run, but step down as soon as a coordinator this node trusts takes it over at
    a higher epoch (this process was cut off, or slow, long enough for a standby to take it):
    no decision more from here; its late ones are ignored by everyone."""
    taken: asyncio.Future[tuple[str, ev.RunTakeoverContent]] = (
        asyncio.get_running_loop().create_future()
    )
    trusted = node.identity.trusted_coordinators

    async def watch(room_id: str, raw: Mapping[str, Any]) -> None:
        event = parse_room_event(raw)
        if (
            room_id == plan.room_id
            and event is not None
            and isinstance(event.content, ev.RunTakeoverContent)
            and event.content.run_id == plan.run_id
            and (event.content.epoch or 1) > plan.epoch
            and event.sender in trusted
            and not taken.done()
        ):
            taken.set_result((event.sender, event.content))

    node.add_listener(watch)
    running: asyncio.Future[Any] = asyncio.ensure_future(driver.run(executor))
    try:
        await asyncio.wait([running, taken], return_when=asyncio.FIRST_COMPLETED)
    finally:
        node.remove_listener(watch)
    if running.done():
        running.result()
        return
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    sender, takeover = taken.result()
    log.warning(
        "coordinator.superseded",
        run_id=plan.run_id,
        by=sender,
        node=takeover.coordinator,
        epoch=takeover.epoch,
    )
    raise RunTakenOver(
        f"run {plan.run_id} was taken over by {takeover.coordinator} ({sender}) at epoch "
        f"{takeover.epoch}: it goes on there (`cis dag status {plan.run_id}` follows it)"
    )


async def _catch_up(node: Node, plan: RunPlan, executor: RoomExecutor) -> None:
    """Claims and results of the adopted attempts that reached the room after its log was
    read for ``plan`` and before the executor listened: read the log again for them."""
    trusted = node.identity.trusted_coordinators | {node.user_id}
    for run in await read_runs(node, [plan.room_id], trusted):
        if run.run_id == plan.run_id:
            executor.catch_up(run.log.sessions)


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


def make_worker(
    node: Node,
    manager: SessionManager,
    config: Config,
    *,
    state_dir: Path,
    work_dir: Path,
    chat: bool = False,
) -> Worker:
    """The node's worker; ``chat``: its heartbeats say the node answers chat commands."""
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
        lease_secs=config.node.lease_period_secs,
        idle_heartbeat_secs=config.node.idle_heartbeat_secs,
        chat=chat,
        facts=partial(
            detect_facts,
            work_dir,
            features=config.node.features,
            labels=config.node.labels,
            gpu_memory_mb=config.node.gpu_memory_mb,
        ),
    )

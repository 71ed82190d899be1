"""The worker: claims assignments addressed to this node, runs them, reports through the room.

A worker is its Matrix user: its heartbeat (``cis.node.heartbeat``) is a state event keyed by
that user id, and an assignment is for it when it names that user (``assigned_user``; the node id
is a name). An assignment is obeyed only when it comes from a sender this node trusts (an allowed
user, or one at the configured power level in the room), and asks for an agent profile this node
accepts (a raw shell command only where the owner allowed ``shell``). The claim goes out at once;
the session's events follow through the SessionReporter. The run's coordinator can end an attempt
early with ``cis.dag.task.cancelled`` / ``timed_out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog
from mautrix.errors import MatrixRequestError

from cis_bot.dag.document import parse_task_document
from cis_bot.dag.spec import TaskSpec
from cis_bot.errors import InputError
from cis_bot.ids import SessionId
from cis_bot.matrix import events as ev
from cis_bot.matrix.broadcast import SessionReporter
from cis_bot.matrix.node import Node, outgoing
from cis_bot.matrix.outbox import Outbox
from cis_bot.matrix.runlog import RoomEvent, parse_room_event
from cis_bot.run.agents import AgentKeeper
from cis_bot.run.attempt import RunPaths, attempt_session
from cis_bot.session.events import SessionCompleted, SessionState
from cis_bot.session.manager import SessionManager
from cis_bot.session.profile import AgentProfile

log = structlog.get_logger(__name__)


@attrs.define
class _Running:
    room_id: str
    run_id: str
    task_id: str
    attempt: int
    #: Who assigned it: the only sender whose cancel/timeout we obey for it.
    assigner: str


class Worker:
    def __init__(
        self,
        node: Node,
        manager: SessionManager,
        *,
        profiles: Mapping[str, AgentProfile],
        accept_agents: tuple[str, ...] | None,
        max_workers: int,
        state_dir: Path,
        work_dir: Path,
        interval_ms: int = 500,
        broadcast_output: bool = False,
        heartbeat_secs: float = 15.0,
        chat: bool = False,
    ) -> None:
        self.node = node
        self.manager = manager
        self.profiles = profiles
        self.accepted = frozenset(
            accept_agents if accept_agents is not None else (p for p in profiles if p != "shell")
        )
        self.max_workers = max_workers
        self.state_dir = state_dir
        self.work_dir = work_dir
        self.interval_ms = interval_ms
        self.broadcast_output = broadcast_output
        self.heartbeat_secs = heartbeat_secs
        #: Its heartbeats say the node answers chat commands (docs/chat.md, who answers).
        self.chat = chat
        self._outboxes: dict[str, Outbox] = {}
        self._reporters: dict[str, SessionReporter] = {}
        self._running: dict[str, _Running] = {}
        self._seen: set[tuple[str, str, int]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat_now = asyncio.Event()
        #: Agents kept for later tasks of the runs this node works for, and who coordinates
        #: each of those runs (whose cis.dag.run.completed ends them).
        self.keeper = AgentKeeper(manager)
        self._coordinators: dict[str, str] = {}
        self._joined_new_room = False
        #: Set on joining a room: its first beat goes at once, not after the once-a-second floor.
        self._joined_room = asyncio.Event()
        #: Rooms whose refusal of our heartbeats was logged.
        self._beat_refused: set[str] = set()
        self._subscription = manager.subscribe()

    @property
    def node_id(self) -> str:
        return self.node.identity.node_id

    @property
    def load(self) -> int:
        return len(self._running)

    def room_of(self, session_id: str) -> str | None:
        """The room of the assignment a running session came from."""
        running = self._running.get(session_id)
        return running.room_id if running else None

    def start(self) -> None:
        self.node.add_listener(self.on_event)
        self._spawn(self._forward_sessions())
        self._spawn(self._heartbeats())

    async def stop(self) -> None:
        """Stop heartbeating; deliver what is queued (the caller kills sessions first)."""
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._subscription.close()
        for outbox in self._outboxes.values():
            await outbox.flush(timeout=5)
            await outbox.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def outbox(self, room_id: str) -> Outbox:
        if room_id not in self._outboxes:
            self._outboxes[room_id] = self.node.outbox(room_id)
        return self._outboxes[room_id]

    def _reporter(self, room_id: str) -> SessionReporter:
        if room_id not in self._reporters:
            self._reporters[room_id] = SessionReporter(
                self.outbox(room_id),
                node_id=self.node_id,
                upload=self._upload,
                interval_ms=self.interval_ms,
                broadcast_output=self.broadcast_output,
            )
        return self._reporters[room_id]

    async def _upload(self, data: bytes, mime_type: str, filename: str) -> str:
        return await self.node.upload(data, mime_type=mime_type, filename=filename)

    # --- room events -----------------------------------------------------------------------------

    async def on_event(self, room_id: str, raw: Mapping[str, Any]) -> None:
        if _joined(raw, self.node.user_id):
            # Coordinators in a room learn of workers from their heartbeats: say it at once.
            self._joined_new_room = True
            self._joined_room.set()
            self._heartbeat_now.set()
            return
        event = parse_room_event(raw)
        if event is None:
            return
        payload = event.content
        if (
            isinstance(payload, ev.TaskAssignedContent)
            and payload.assigned_user == self.node.user_id
            and not payload.local
        ):
            sent = raw.get("origin_server_ts")
            if isinstance(sent, int):
                log.debug("assignment.received", lag_ms=int(time.time() * 1000) - sent)
            await self._on_assigned(room_id, event, payload)
        elif (
            isinstance(payload, ev.TaskCancelledContent | ev.TaskTimedOutContent)
            and payload.attempt
        ):
            await self._on_stop(event, payload)
        elif (
            isinstance(payload, ev.RunCompletedContent)
            and self._coordinators.get(payload.run_id) == event.sender
        ):
            del self._coordinators[payload.run_id]
            self._spawn(self.keeper.release_run(payload.run_id))

    async def _on_assigned(self, room_id: str, event: RoomEvent, a: ev.TaskAssignedContent) -> None:
        key = (a.run_id, a.task_id, a.attempt)
        if key in self._seen:
            return
        if not await self.node.authorised(room_id, event.sender):
            log.warning(
                "assignment.unauthorised", room_id=room_id, sender=event.sender, run_id=a.run_id
            )
            return
        self._seen.add(key)
        sid = str(SessionId(a.run_id, a.task_id, a.attempt))
        outbox = self.outbox(room_id)
        task = await self._accept(a)
        if isinstance(task, str):
            log.warning("assignment.refused", session_id=sid, reason=task)
            outbox.post(outgoing(_refused(a, sid, task)))
            return
        outbox.post(
            outgoing(
                ev.TaskClaimedContent(
                    run_id=a.run_id,
                    task_id=a.task_id,
                    attempt=a.attempt,
                    claimed_by=self.node_id,
                    session_id=sid,
                )
            )
        )
        self._running[sid] = _Running(room_id, a.run_id, a.task_id, a.attempt, event.sender)
        self._heartbeat_now.set()
        try:
            upstream = await self._upstream(a)
        except (MatrixRequestError, OSError, ValueError) as exc:
            upstream = {}
            log.warning("assignment.upstream_missing", session_id=sid, error=str(exc))
        paths = RunPaths.of(self.state_dir, a.run_id)
        spec = attempt_session(
            task,
            a.attempt,
            run_id=a.run_id,
            node_id=self.node_id,
            paths=paths,
            profile=self.profiles[task.agent],
            upstream=upstream,
            work_dir=self.work_dir,
        )
        spec = self.keeper.prepare(spec, task, a.run_id, a.attempt)
        if task.keep_agent:
            self._coordinators[a.run_id] = event.sender
        log.info("assignment.claimed", session_id=sid, agent=task.agent)
        await self.manager.start(spec)

    async def _accept(self, a: ev.TaskAssignedContent) -> TaskSpec | str:
        """The task to run, or why this node will not run it."""
        if a.agent not in self.accepted or a.agent not in self.profiles:
            accepted = ", ".join(sorted(self.accepted & set(self.profiles))) or "none"
            return f"node {self.node_id} does not run agent {a.agent!r} (it runs: {accepted})"
        try:
            document = await self._task_document(a)
            task = parse_task_document(document, file="assignment", agents=self.accepted)
        except (MatrixRequestError, OSError, ValueError) as exc:
            return f"cannot read the task's document ({a.task_mxc}): {exc}"
        except InputError as exc:
            return f"invalid task: {exc}"
        if task.id != a.task_id or task.agent != a.agent:
            return "the task document does not match the assignment"
        return task

    async def _task_document(self, a: ev.TaskAssignedContent) -> Any:
        """The task's document: in the event, or (a long one) in media."""
        if a.task is not None:
            return json.loads(a.task)
        assert a.task_mxc is not None  # the catalogue requires one of the two
        return await self.node.download_json(a.task_mxc)

    async def _upstream(self, a: ev.TaskAssignedContent) -> dict[str, str]:
        if a.upstream is not None:
            return dict(a.upstream)
        if a.upstream_mxc:
            data = await self.node.download_json(a.upstream_mxc)
            if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
                return {str(k): v for k, v in data.items()}
            raise ValueError("upstream media is not a JSON object of strings")
        return {}

    async def _on_stop(
        self, event: RoomEvent, payload: ev.TaskCancelledContent | ev.TaskTimedOutContent
    ) -> None:
        if payload.attempt is None:
            return
        sid = str(SessionId(payload.run_id, payload.task_id, payload.attempt))
        running = self._running.get(sid)
        if running is None or running.assigner != event.sender:
            return
        state = (
            SessionState.TIMEOUT
            if isinstance(payload, ev.TaskTimedOutContent)
            else SessionState.KILLED
        )
        # Killing waits out the grace period: do it aside, the room's events keep flowing.
        self._spawn(self.manager.kill(sid, state=state, reason=payload.reason))

    # --- sessions --------------------------------------------------------------------------------

    async def _forward_sessions(self) -> None:
        async for event in self._subscription:
            running = self._running.get(event.session_id)
            if running is None:
                continue  # not a room assignment (a local run shares the manager)
            reporter = self._reporter(running.room_id)
            reporter.report(event, running.run_id, running.task_id, running.attempt)
            if isinstance(event, SessionCompleted):
                self.keeper.completed(event)
                del self._running[event.session_id]
                self._heartbeat_now.set()

    # --- heartbeats ------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        last_load = -1
        while True:
            self._joined_new_room = False  # the rooms are read just below
            self._joined_room.clear()
            try:
                rooms = await self.node.intent.get_joined_rooms()
            except Exception as exc:
                log.warning("heartbeat.failed", error=str(exc))
                rooms = []
            beat = ev.NodeHeartbeatContent(
                node_id=self.node_id,
                agents=tuple(sorted(self.accepted & set(self.profiles))),
                max_workers=self.max_workers,
                load=self.load,
                ttl_ms=int(self.heartbeat_secs * 3000),
                chat=self.chat or None,
            )
            for room_id in rooms:
                item = outgoing(beat, state_key=self.node.user_id)
                item.on_rejected = self._heartbeat_refused(str(room_id))
                item.on_sent = lambda _, room=str(room_id): self._beat_refused.discard(room)
                self.outbox(str(room_id)).post(item)
            last_load = self.load
            # Load changes are announced at once, but at most once a second; a new room at once
            # (its coordinators learn of this worker from the beat: a dev cluster's first `up`
            # waits for it).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._joined_room.wait(), min(1.0, self.heartbeat_secs))
            deadline = time.monotonic() + self.heartbeat_secs
            while self.load == last_load and not self._joined_new_room:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._heartbeat_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._heartbeat_now.wait(), remaining)

    def _heartbeat_refused(self, room_id: str) -> Callable[[MatrixRequestError], None]:
        beat = ev.NodeHeartbeatContent.TYPE

        def refused(exc: MatrixRequestError) -> None:
            if room_id in self._beat_refused:
                return  # said once: it would repeat at every beat
            self._beat_refused.add(room_id)
            log.error(
                "heartbeat.refused",
                room_id=room_id,
                status=exc.http_status,
                errcode=exc.errcode,
                error=exc.message,
                hint="the room forbids this node's heartbeats, so no coordinator there sees it; "
                f"a room admin can allow them: in m.room.power_levels set {beat} to 0 under "
                f'"events" ({{"events": {{"{beat}": 0}}}}), or raise {self.node.user_id} to the '
                "room's state_default",
            )

        return refused


def _joined(raw: Mapping[str, Any], user_id: str) -> bool:
    """Whether ``raw`` is ``user_id`` joining a room."""
    content = raw.get("content")
    return (
        raw.get("type") == "m.room.member"
        and raw.get("state_key") == user_id
        and isinstance(content, Mapping)
        and content.get("membership") == "join"
    )


def _refused(a: ev.TaskAssignedContent, sid: str, reason: str) -> ev.SessionCompletedContent:
    return ev.SessionCompletedContent(
        run_id=a.run_id,
        session_id=sid,
        task_id=a.task_id,
        attempt=a.attempt,
        status=str(SessionState.FAILED),
        error=reason,
    )

"""The worker: claims assignments addressed to this node, runs them, reports through the room.

A worker is its Matrix user: its heartbeat (``cis.node.heartbeat``) is a state event keyed by
that user id, and an assignment is for it when it names that user (``assigned_user``; the node id
is a name). An assignment is obeyed only when it comes from a sender this node trusts (an allowed
user, or one at the configured power level in the room), and asks for an agent profile this node
accepts (a raw shell command only where the owner allowed ``shell``). The claim goes out at once;
the session's events follow through the SessionReporter. The run's coordinator can end an attempt
early with ``cis.dag.task.cancelled`` / ``timed_out`` / ``lost``.

Leases (docs/federation.md): the heartbeat in a room lists the attempts this node holds there,
and renews their leases. It goes out every ``heartbeat_secs`` in a room where the node holds
attempts, every ``idle_heartbeat_secs`` elsewhere (good for three of those), through a Beacon of
its own per room, so a long queue of run events never holds it back. A node that could not
renew its lease in a room for its lease period stops its sessions of that room's runs itself
(self-fencing, as Nomad's ``stop_on_client_after``): the coordinator runs them elsewhere by now,
and their results would be ignored. When the homeserver takes its heartbeats again it is a
healthy worker again.
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
from cis_bot.dag.placement import NodeFacts
from cis_bot.dag.spec import TaskSpec
from cis_bot.errors import InputError
from cis_bot.ids import SessionId
from cis_bot.matrix import events as ev
from cis_bot.matrix.beacon import Beacon, wait_event
from cis_bot.matrix.broadcast import SessionReporter
from cis_bot.matrix.node import Node, outgoing
from cis_bot.matrix.outbox import Outbox, Outgoing
from cis_bot.matrix.runlog import RoomEvent, parse_room_event
from cis_bot.run.agents import AgentKeeper
from cis_bot.run.attempt import RunPaths, attempt_session
from cis_bot.session.events import SessionCompleted, SessionState
from cis_bot.session.manager import SessionManager
from cis_bot.session.profile import AgentProfile
from cis_bot.session.session import SessionError

log = structlog.get_logger(__name__)


@attrs.define
class _Running:
    room_id: str
    run_id: str
    task_id: str
    attempt: int
    #: Who assigned it: the only sender whose cancel/timeout/lost we obey for it.
    assigner: str
    #: When (monotonic) this node took it: its lease counts from then until a heartbeat renews.
    taken_at: float = attrs.Factory(time.monotonic)
    #: Stopped by this node itself, its lease lapsed (self-fencing).
    fenced: bool = False


@attrs.define
class _Room:
    """A joined room, as the heartbeats see it."""

    beacon: Beacon
    #: When (monotonic) the next heartbeat is due there.
    next_beat: float = 0.0


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
        heartbeat_secs: float = 2.0,
        lease_secs: float = 5.0,
        idle_heartbeat_secs: float = 10.0,
        chat: bool = False,
        facts: Callable[[], NodeFacts] | None = None,
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
        self.lease_secs = lease_secs
        self.idle_heartbeat_secs = idle_heartbeat_secs
        #: Its heartbeats say the node answers chat commands (docs/chat.md, who answers).
        self.chat = chat
        #: What its heartbeats say it is, for tasks' node_selector (read at every beat: free
        #: disk changes).
        self.facts = facts
        self._outboxes: dict[str, Outbox] = {}
        self._rooms: dict[str, _Room] = {}
        self._reporters: dict[str, SessionReporter] = {}
        self._running: dict[str, _Running] = {}
        self._seen: set[tuple[str, str, int]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat_now = asyncio.Event()
        self._fence_wake = asyncio.Event()
        #: run id -> (epoch, coordinator user) of the latest takeover of that run.
        self._takeovers: dict[str, tuple[int, str]] = {}
        #: Agents kept for later tasks of the runs this node works for, and who coordinates
        #: each of those runs (whose cis.dag.run.completed ends them).
        self.keeper = AgentKeeper(manager)
        self._coordinators: dict[str, str] = {}
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
        self._spawn(self._fence())

    async def stop(self) -> None:
        """Stop heartbeating, saying goodbye; deliver what is queued (the caller kills sessions
        first)."""
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._subscription.close()
        for room in self._rooms.values():
            await room.beacon.close()
        await self._farewell()
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
        membership = _own_membership(raw, self.node.user_id)
        if membership == "join":
            # Coordinators in a room learn of workers from their heartbeats: say it at once.
            self._room(room_id).next_beat = 0.0
            self._heartbeat_now.set()
            return
        if membership in ("leave", "ban"):
            room = self._rooms.pop(room_id, None)
            if room is not None:
                await room.beacon.close()
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
            isinstance(
                payload, ev.TaskCancelledContent | ev.TaskTimedOutContent | ev.TaskLostContent
            )
            and payload.attempt
        ):
            await self._on_stop(event, payload)
        elif isinstance(payload, ev.RunTakeoverContent):
            await self._on_takeover(room_id, event, payload)
        elif (
            isinstance(payload, ev.RunCompletedContent)
            and payload.run_id in self._coordinators
            and self._directs(
                payload.run_id, event.sender, payload.epoch, self._coordinators[payload.run_id]
            )
        ):
            del self._coordinators[payload.run_id]
            self._spawn(self.keeper.release_run(payload.run_id))

    async def _on_takeover(
        self, room_id: str, event: RoomEvent, payload: ev.RunTakeoverContent
    ) -> None:
        """Another coordinator took a run over: from now on only it directs that run's
        attempts here, and only at its epoch (the one it superseded may still be sending)."""
        epoch = payload.epoch or 1
        known = self._takeovers.get(payload.run_id)
        if (known is None or epoch > known[0]) and await self.node.authorised(
            room_id, event.sender
        ):
            self._takeovers[payload.run_id] = (epoch, event.sender)
            log.info("worker.run_taken_over", run_id=payload.run_id, by=event.sender, epoch=epoch)

    def _directs(self, run_id: str, sender: str, epoch: int | None, assigner: str) -> bool:
        """Whether ``sender``, deciding at ``epoch``, directs that run's attempts here: the
        coordinator that assigned them, unless another took the run over since."""
        known = self._takeovers.get(run_id)
        if known is None:
            return sender == assigner
        return (epoch or 1) >= known[0] and sender == known[1]

    async def _on_assigned(self, room_id: str, event: RoomEvent, a: ev.TaskAssignedContent) -> None:
        key = (a.run_id, a.task_id, a.attempt)
        if key in self._seen:
            return
        if not await self.node.authorised(room_id, event.sender):
            log.warning(
                "assignment.unauthorised", room_id=room_id, sender=event.sender, run_id=a.run_id
            )
            return
        if not self._directs(a.run_id, event.sender, a.epoch, event.sender):
            # A late order of a coordinator another took the run over from: the new one does
            # not know of this attempt, so no answer either.
            log.warning(
                "assignment.superseded", run_id=a.run_id, sender=event.sender, epoch=a.epoch or 1
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
        # Holding a lease here now: beat at the busy pace (the claim renewed it already).
        room = self._room(room_id)
        room.next_beat = min(room.next_beat, time.monotonic() + self.heartbeat_secs)
        self._heartbeat_now.set()
        self._fence_wake.set()
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
        self,
        event: RoomEvent,
        payload: ev.TaskCancelledContent | ev.TaskTimedOutContent | ev.TaskLostContent,
    ) -> None:
        if payload.attempt is None:
            return
        sid = str(SessionId(payload.run_id, payload.task_id, payload.attempt))
        running = self._running.get(sid)
        if running is None or not self._directs(
            payload.run_id, event.sender, payload.epoch, running.assigner
        ):
            return
        state = (
            SessionState.TIMEOUT
            if isinstance(payload, ev.TaskTimedOutContent)
            else SessionState.KILLED
        )
        reason = payload.reason
        if isinstance(payload, ev.TaskLostContent):
            # The coordinator gave up on this attempt (its lease lapsed, as it saw it) and runs
            # it elsewhere: whatever this one would report is ignored now.
            log.warning("worker.attempt_lost", session_id=sid, reason=reason)
            reason = f"the coordinator declared this attempt lost: {reason}"
        # Killing waits out the grace period: do it aside, the room's events keep flowing.
        self._spawn(self._kill(sid, state, reason))

    async def _kill(self, sid: str, state: SessionState, reason: str | None) -> None:
        try:
            await self.manager.kill(sid, state=state, reason=reason)
        except SessionError as exc:  # it ended meanwhile, or never started
            log.info("worker.kill_skipped", session_id=sid, reason=str(exc))

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

    # --- heartbeats ------------------------------------------------------------------------------

    def _room(self, room_id: str) -> _Room:
        room = self._rooms.get(room_id)
        if room is None:

            async def send(item: Outgoing) -> str:
                return await self.node.send_outgoing(room_id, item)

            room = self._rooms[room_id] = _Room(Beacon(send, timeout=self.lease_secs))
        return room

    def holds(self, room_id: str) -> dict[str, dict[str, int]]:
        """The attempts this node holds in ``room_id``: run id -> task id -> attempt."""
        held: dict[str, dict[str, int]] = {}
        for running in self._running.values():
            if running.room_id == room_id:
                held.setdefault(running.run_id, {})[running.task_id] = running.attempt
        return held

    async def _heartbeats(self) -> None:
        while True:
            try:
                joined = await self.node.intent.get_joined_rooms()
            except Exception as exc:
                log.warning("heartbeat.rooms_unknown", error=str(exc))
                await asyncio.sleep(min(self.heartbeat_secs, 5.0))
                continue
            for joined_id in joined:
                self._room(str(joined_id))
            break
        while True:
            now = time.monotonic()
            for room_id, room in list(self._rooms.items()):
                if now >= room.next_beat:
                    self._beat(room_id, room, now)
            wake = min((room.next_beat for room in self._rooms.values()), default=None)
            self._heartbeat_now.clear()
            timeout = None if wake is None else max(0.0, wake - time.monotonic())
            await wait_event(self._heartbeat_now, timeout)

    def _heartbeat(self, room_id: str, ttl_secs: float) -> ev.NodeHeartbeatContent:
        return ev.NodeHeartbeatContent(
            node_id=self.node_id,
            agents=tuple(sorted(self.accepted & set(self.profiles))),
            max_workers=self.max_workers,
            load=self.load,
            ttl_ms=max(1, int(ttl_secs * 1000)),
            lease_ms=int(self.lease_secs * 1000),
            holds=self.holds(room_id),
            chat=self.chat or None,
            facts=self.facts() if self.facts is not None else None,
        )

    def _beat(self, room_id: str, room: _Room, now: float) -> None:
        if self.holds(room_id):
            interval, ttl = self.heartbeat_secs, self.lease_secs
        else:
            # Idle here: beat seldom (state events are not free), good for three periods.
            interval, ttl = self.idle_heartbeat_secs, 3 * self.idle_heartbeat_secs
        beat = self._heartbeat(room_id, ttl)
        room.next_beat = now + interval
        try:
            item = outgoing(beat, state_key=self.node.user_id)
        except ev.ContentTooLarge as exc:
            log.error(
                "heartbeat.too_large",
                room_id=room_id,
                error=str(exc),
                hint="this node holds too many attempts in one room to list them in one "
                "heartbeat: lower its max_workers",
            )
            return
        item.on_rejected = self._heartbeat_refused(room_id)
        item.on_sent = lambda _: self._beat_refused.discard(room_id)
        room.beacon.update(item, made_at=now)

    async def _farewell(self, timeout: float = 2.0) -> None:
        """A last heartbeat in each room that lapses at once: coordinators stop counting on this
        node now (its attempts are lost at their next look), the chat's \"who answers\" too."""

        async def goodbye(room_id: str) -> None:
            item = outgoing(self._heartbeat(room_id, 0), state_key=self.node.user_id)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await self.node.send_outgoing(room_id, item)

        await asyncio.gather(*(goodbye(room_id) for room_id in self._rooms))

    # --- self-fencing ---------------------------------------------------------------------------

    def _lease_end(self, running: _Running) -> float:
        """When (monotonic) the lease of that attempt lapses, as this node reckons it: from its
        last heartbeat in the room that the homeserver took (from when it was made), or from
        when it took the attempt."""
        room = self._rooms.get(running.room_id)
        renewed = room.beacon.renewed_at if room is not None else None
        start = running.taken_at if renewed is None else max(running.taken_at, renewed)
        return start + self.lease_secs

    async def _fence(self) -> None:
        while True:
            now = time.monotonic()
            wake: float | None = None
            lapsed: dict[str, list[str]] = {}
            for sid, running in self._running.items():
                if running.fenced:
                    continue
                end = self._lease_end(running)
                if now >= end:
                    lapsed.setdefault(running.room_id, []).append(sid)
                else:
                    wake = end if wake is None else min(wake, end)
            for room_id, sessions in lapsed.items():
                room = self._rooms.get(room_id)
                renewed = room.beacon.renewed_at if room is not None else None
                since = "ever" if renewed is None else f"{now - renewed:.1f}s"
                log.error(
                    "worker.self_fenced",
                    room_id=room_id,
                    sessions=sessions,
                    not_renewed_for=since,
                    hint="this node could not renew its lease in the room for its lease period "
                    f"({self.lease_secs:g}s): the coordinator runs these tasks elsewhere, so it "
                    "stops them; it works again once the homeserver takes its heartbeats",
                )
                for sid in sessions:
                    self._running[sid].fenced = True
                    reason = f"self-fenced: could not renew its lease for {self.lease_secs:g}s"
                    self._spawn(self._kill(sid, SessionState.KILLED, reason))
            self._fence_wake.clear()
            timeout = None if wake is None else max(0.0, wake - time.monotonic())
            await wait_event(self._fence_wake, timeout)

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


def _own_membership(raw: Mapping[str, Any], user_id: str) -> str | None:
    """The membership ``raw`` gives ``user_id`` (join, leave, ...), if it is about that user."""
    content = raw.get("content")
    if (
        raw.get("type") != "m.room.member"
        or raw.get("state_key") != user_id
        or not isinstance(content, Mapping)
    ):
        return None
    membership = content.get("membership")
    return membership if isinstance(membership, str) else None


def _refused(a: ev.TaskAssignedContent, sid: str, reason: str) -> ev.SessionCompletedContent:
    return ev.SessionCompletedContent(
        run_id=a.run_id,
        session_id=sid,
        task_id=a.task_id,
        attempt=a.attempt,
        status=str(SessionState.FAILED),
        error=reason,
    )

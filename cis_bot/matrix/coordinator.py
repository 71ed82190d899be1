"""The coordinator's executor for matrix mode: dispatches become assignments to worker nodes.

Workers announce themselves with ``cis.node.heartbeat`` state events (agents, capacity, load),
each keyed by the worker's own Matrix user id: the user is the worker's identity, its node id a
name. A heartbeat counts only from a user this node trusts to work for it (``Node.trusts_worker``:
itself, ``[node] workers``, an allowed user, or a member at ``assign_power_level`` in the room);
a member at power level 0 announcing itself gets no work, and cannot speak for another user.

A dispatch goes to a live trusted worker that runs the task's agent, chosen round-robin or
least-loaded (its reported load plus what we assigned it since). With no such worker the dispatch
waits for one to appear, and fails after ``no_worker_timeout``. Claims and completions come back
through the room and count only from the user the attempt was assigned to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Mapping
from typing import Any

import attrs
import structlog

from cis_bot.config import Assignment
from cis_bot.dag.document import task_to_document
from cis_bot.dag.engine import Outcome, TaskDispatched, TaskFinished
from cis_bot.dag.spec import TaskSpec
from cis_bot.ids import SessionId
from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Node, outgoing
from cis_bot.matrix.outbox import Outbox
from cis_bot.matrix.runlog import RoomEvent, finished_fact, parse_room_event, started_fact
from cis_bot.run.driver import RunDriver
from cis_bot.session.events import SessionBlocked, SessionState, SessionStateChanged

log = structlog.get_logger(__name__)


@attrs.define
class WorkerInfo:
    #: The worker's identity.
    user_id: str
    #: Its newest heartbeat (its node id, for display and assignments' ``assigned_to``).
    beat: ev.NodeHeartbeatContent
    #: Attempts we assigned it that have not completed.
    in_flight: set[str] = attrs.Factory(set)

    @property
    def load(self) -> float:
        return max(self.beat.load, len(self.in_flight)) / self.beat.max_workers


@attrs.define
class _Attempt:
    task: TaskSpec
    dispatch: TaskDispatched
    upstream: dict[str, str]
    #: The user id of the worker it was assigned to.
    worker_user: str | None = None
    waiting_since: float = attrs.Factory(time.monotonic)
    done: bool = False


class RoomExecutor:
    def __init__(
        self,
        driver: RunDriver,
        node: Node,
        outbox: Outbox,
        *,
        room_id: str,
        run_id: str,
        policy: Assignment = Assignment.LEAST_LOADED,
        lease_ms: int = 60_000,
        no_worker_timeout: float = 60.0,
        drain_timeout: float = 30.0,
    ) -> None:
        self.driver = driver
        self.node = node
        self.outbox = outbox
        self.room_id = room_id
        self.run_id = run_id
        self.policy = policy
        self.lease_ms = lease_ms
        self.no_worker_timeout = no_worker_timeout
        self.drain_timeout = drain_timeout
        #: Trusted workers by user id.
        self.workers: dict[str, WorkerInfo] = {}
        #: Heartbeats already refused: (sender, why), logged once each.
        self._refused: set[tuple[str, str]] = set()
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._waiting: list[_Attempt] = []
        self._rr = itertools.count()
        # Woken by anything from the room: the assigner retries waiting tasks (a worker may
        # have appeared), drain re-checks what is still out. Two events, as each clears its own.
        self._retry_wake = asyncio.Event()
        self._drain_wake = asyncio.Event()
        #: (task, attempt) -> the transcript's mxc URI, as workers report them.
        self.transcripts: dict[tuple[str, int], str] = {}
        self._retry_task: asyncio.Task[None] | None = None

    async def start_listening(self) -> None:
        """Learn the workers present from the room's state, then follow the room live."""
        self.node.add_listener(self.on_event)
        for raw in await self.node.room_state(self.room_id):
            if raw.get("type") == ev.NodeHeartbeatContent.TYPE:
                await self.on_event(self.room_id, raw)
        self._retry_task = asyncio.create_task(self._retry_waiting())

    def adopt(self, task: TaskSpec, dispatch: TaskDispatched, worker_user: str) -> None:
        """An attempt assigned before a restart, still out on a worker (from the run log)."""
        self._attempts[(task.id, dispatch.attempt)] = _Attempt(
            task, dispatch, {}, worker_user=worker_user
        )

    # --- Executor --------------------------------------------------------------------------------

    async def start(
        self, dispatch: TaskDispatched, task: TaskSpec, upstream: dict[str, str]
    ) -> None:
        attempt = _Attempt(task, dispatch, upstream)
        self._attempts[(task.id, dispatch.attempt)] = attempt
        if not await self._assign(attempt):
            self._waiting.append(attempt)

    async def stop(self, task_id: str, attempt: int, *, timed_out: bool, reason: str) -> None:
        """The decision (cancelled / timed out) is in the room already: the worker acts on it."""
        record = self._attempts.get((task_id, attempt))
        if record is None:
            return
        if record in self._waiting:
            self._waiting.remove(record)
            record.done = True
        self._wake()

    async def drain(self) -> None:
        """Wait for the workers to report the end of every attempt (bounded: a dead worker
        never answers)."""
        deadline = time.monotonic() + self.drain_timeout
        while any(not a.done and a.worker_user for a in self._attempts.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("coordinator.drain_timeout", run_id=self.run_id)
                break
            self._drain_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_wake.wait(), remaining)
        if self._retry_task:
            self._retry_task.cancel()

    # --- assignment ------------------------------------------------------------------------------

    def _candidates(self, agent: str, node: str | None) -> list[WorkerInfo]:
        now = ev.now_ms()
        return [
            info
            for info in self.workers.values()
            if info.beat.alive_at(now)
            and agent in info.beat.agents
            and (node is None or info.beat.node_id == node)
        ]

    def _requirement(self, task: TaskSpec) -> str:
        """What a worker needs to take the task, for the error when none can."""
        node = self.driver.engine.placement(task.id)
        if node is None:
            return f"runs agent {task.agent!r}"
        why = (
            f"holds the agent of task {task.reuse_agent}"
            if task.reuse_agent and not self.driver.engine.tasks[task.id].rollback
            else "ran the task it undoes"
        )
        return f"is node {node!r}, which {why}, and runs agent {task.agent!r}"

    async def _assign(self, attempt: _Attempt) -> bool:
        # A rollback goes where its task ran; a continued agent is where it was kept.
        node = self.driver.engine.placement(attempt.task.id)
        candidates = self._candidates(attempt.task.agent, node)
        if not candidates:
            return False
        # Rotate, so that round-robin takes turns and least-loaded shares out ties.
        turn = next(self._rr) % len(candidates)
        candidates = candidates[turn:] + candidates[:turn]
        if self.policy is Assignment.ROUND_ROBIN:
            info = candidates[0]
        else:
            info = min(candidates, key=lambda c: c.load)
        node_id = info.beat.node_id
        task, dispatch = attempt.task, attempt.dispatch
        sid = str(SessionId(self.run_id, task.id, dispatch.attempt))
        attempt.worker_user = info.user_id
        info.in_flight.add(sid)
        self.outbox.post(
            outgoing(
                ev.TaskAssignedContent(
                    run_id=self.run_id,
                    task_id=task.id,
                    attempt=dispatch.attempt,
                    assigned_to=node_id,
                    assigned_user=info.user_id,
                    assigned_by=self.node.user_id,
                    agent=task.agent,
                    lease_ms=self.lease_ms,
                    upstream_tasks=task.deps,
                    task=json.dumps(task_to_document(task)),
                    upstream=dict(attempt.upstream),
                ),
                # Upstream outputs, then a long task, go to media when they make it too large.
                upload=self.node.upload_for_events,
            )
        )
        log.info("coordinator.assigned", session_id=sid, worker=node_id, user=info.user_id)
        return True

    async def _retry_waiting(self) -> None:
        while True:
            self._retry_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_wake.wait(), 1.0)
            for attempt in list(self._waiting):
                if await self._assign(attempt):
                    self._waiting.remove(attempt)
                elif time.monotonic() - attempt.waiting_since > self.no_worker_timeout:
                    self._waiting.remove(attempt)
                    attempt.done = True
                    need = self._requirement(attempt.task)
                    self.driver.submit(
                        TaskFinished(
                            attempt.task.id,
                            attempt.dispatch.attempt,
                            time.time(),
                            Outcome.FAILED,
                            error=f"no live worker in the room {need}",
                        )
                    )

    # --- the room --------------------------------------------------------------------------------

    async def on_event(self, room_id: str, raw: Mapping[str, Any]) -> None:
        if room_id != self.room_id:
            return
        event = parse_room_event(raw)
        if event is None:
            return
        payload = event.content
        if isinstance(payload, ev.NodeHeartbeatContent):
            await self._on_heartbeat(event, payload)
        elif isinstance(payload, ev.TaskClaimedContent | ev.SessionCompletedContent):
            if payload.run_id != self.run_id:
                return
            record = self._attempts.get((payload.task_id, payload.attempt))
            if record is None or record.worker_user != event.sender:
                log.warning(
                    "event.unauthorised", type=payload.TYPE, sender=event.sender, run=self.run_id
                )
                return
            if isinstance(payload, ev.TaskClaimedContent):
                self.driver.submit(started_fact(payload))
            else:
                record.done = True
                if payload.transcript:
                    self.transcripts[(payload.task_id, payload.attempt)] = payload.transcript
                if record.worker_user in self.workers:
                    self.workers[record.worker_user].in_flight.discard(payload.session_id)
                self.driver.submit(finished_fact(payload))
        elif isinstance(payload, ev.SessionBlockedContent | ev.SessionStateContent):
            self._tell_observers(event.sender, payload)
        self._wake()

    def _tell_observers(
        self, sender: str, payload: ev.SessionBlockedContent | ev.SessionStateContent
    ) -> None:
        """A worker says one of our attempts is blocked, or running again: the observers (the
        status notice, the chat's notices) hear it as they would of a session run here."""
        sid = SessionId.parse_or_none(payload.session_id)
        if payload.run_id != self.run_id or sid is None or sid.run_id != self.run_id:
            return
        record = self._attempts.get((sid.task_id, sid.attempt))
        if record is None or record.worker_user != sender or record.done:
            return
        event: SessionBlocked | SessionStateChanged
        if isinstance(payload, ev.SessionBlockedContent):
            event = SessionBlocked(payload.session_id, payload.reason, payload.output_preview)
        else:
            try:
                old, new = SessionState(payload.old_state), SessionState(payload.new_state)
            except ValueError:
                return
            event = SessionStateChanged(payload.session_id, old, new, payload.reason)
        for observer in self.driver.observers:
            observer.on_session_event(event, sid.task_id, sid.attempt)

    def _wake(self) -> None:
        self._retry_wake.set()
        self._drain_wake.set()

    async def _on_heartbeat(self, event: RoomEvent, beat: ev.NodeHeartbeatContent) -> None:
        sender = event.sender
        if event.state_key != sender:
            # A heartbeat keyed by a node id is from a room cis_bot used before heartbeats were
            # bound to their sender: anyone could have written it.
            self._refuse(
                sender,
                "heartbeat.not_own_key",
                state_key=event.state_key,
                node=beat.node_id,
                hint="a heartbeat counts only under its sender's own user id as state key; "
                "old nodes keyed it by node id: upgrade them",
            )
            return
        if not await self.node.trusts_worker(self.room_id, sender):
            # Checked at every beat: a worker whose power was taken away gets no more work.
            self.workers.pop(sender, None)
            self._refuse(
                sender,
                "heartbeat.untrusted",
                node=beat.node_id,
                hint=f"to let it work for this coordinator, give {sender} power level "
                f"{self.node.identity.assign_power_level} in the room, or list it in the "
                "coordinator's [node] workers",
            )
            return
        self._refused.discard((sender, "heartbeat.untrusted"))
        known = self.workers.get(sender)
        if known is None:
            self.workers[sender] = WorkerInfo(sender, beat)
            log.info("coordinator.worker_joined", user=sender, node=beat.node_id)
        elif beat.timestamp >= known.beat.timestamp:
            known.beat = beat

    def _refuse(self, sender: str, event_name: str, **fields: object) -> None:
        """Log a refused heartbeat once per sender and reason (they repeat every few seconds)."""
        if (sender, event_name) not in self._refused:
            self._refused.add((sender, event_name))
            log.warning(event_name, room_id=self.room_id, sender=sender, **fields)

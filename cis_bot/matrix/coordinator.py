"""The coordinator's executor for matrix mode: dispatches become assignments to worker nodes.

Workers announce themselves with ``cis.node.heartbeat`` state events (agents, capacity, load, the
attempts they hold); ``roster.py`` keeps the trusted ones and their liveness. A dispatch goes to
a live trusted worker that runs the task's agent and has room for it (its capacity less what it
runs), chosen least-loaded or round-robin. With none that can take it, the dispatch waits for one
to appear, and fails after ``no_worker_timeout`` naming what no worker offered; with some that
could but are full, it waits for room without a bound (the run's ``max_workers`` bounds that).

Leases (docs/federation.md): an attempt out on a worker is renewed by the assignment, the claim,
every event of its session and every heartbeat of that worker that lists it. One not renewed for
the worker's lease period is lost: recorded as ``cis.dag.task.lost``, dispatched again at once
(the engine does not count it against ``retry``) to another worker, the one that lost it kept out
of that task for ``lost_exclusion``. Its late results, if any, are recorded and ignored (the
engine fences them by attempt number). Claims and completions count only from the user the
attempt was assigned to.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import attrs
import structlog

from cis_bot.config import Assignment
from cis_bot.dag.document import task_to_document
from cis_bot.dag.engine import Outcome, TaskDispatched, TaskFinished
from cis_bot.dag.spec import TaskSpec
from cis_bot.ids import SessionId
from cis_bot.matrix import events as ev
from cis_bot.matrix.beacon import wait_event
from cis_bot.matrix.node import Node, outgoing
from cis_bot.matrix.outbox import Outbox
from cis_bot.matrix.roster import Roster, WorkerInfo, heartbeat_of
from cis_bot.matrix.runlog import RoomEvent, finished_fact, parse_room_event, started_fact
from cis_bot.run.driver import RunDriver
from cis_bot.session.events import SessionBlocked, SessionState, SessionStateChanged

log = structlog.get_logger(__name__)

#: The lease assumed for a worker whose heartbeat we have not seen (an attempt adopted from the
#: log, assigned to a worker that never beat since).
DEFAULT_LEASE_SECS = 5.0

AttemptKey = tuple[str, int]


@attrs.define
class _Attempt:
    task: TaskSpec
    dispatch: TaskDispatched
    upstream: dict[str, str]
    #: The user id of the worker it was assigned to.
    worker_user: str | None = None
    #: When (monotonic) its lease was last renewed.
    renewed_at: float = 0.0
    #: Since when (monotonic) no worker could take it; None while one can (even if busy).
    unplaceable_since: float | None = None
    done: bool = False
    #: A decision ended it (cancelled, timed out): its worker winds it down, no lease applies.
    stopping: bool = False

    @property
    def key(self) -> AttemptKey:
        return (self.task.id, self.dispatch.attempt)


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
        no_worker_timeout: float = 60.0,
        lost_exclusion: float = 30.0,
        breaker_failures: int = 3,
        breaker_cooldown: float = 60.0,
        workers: Collection[str] | None = None,
        drain_timeout: float = 30.0,
        epoch: int = 1,
        blind: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.driver = driver
        self.node = node
        self.outbox = outbox
        self.room_id = room_id
        self.run_id = run_id
        self.policy = policy
        self.no_worker_timeout = no_worker_timeout
        self.lost_exclusion = lost_exclusion
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        #: Federation mode's ``--workers``: the only workers (node or user ids) the run uses.
        self.allowed = frozenset(workers) if workers is not None else None
        self.drain_timeout = drain_timeout
        #: The epoch this coordinator holds the run at: its assignments carry it.
        self.epoch = epoch
        #: Whether this node is cut off from the room (it cannot renew its own lease): then its
        #: workers' silence says nothing about them, and no lease of theirs lapses.
        self.blind = blind
        self._was_blind = False
        self.clock = clock
        self.roster = Roster(node, room_id, clock=clock)
        self._attempts: dict[AttemptKey, _Attempt] = {}
        #: Attempts out on each worker (by user id), not done.
        self._out: dict[str, set[AttemptKey]] = {}
        self._waiting: list[_Attempt] = []
        #: task id -> worker user -> until when (monotonic) it is kept out of that task.
        self._excluded: dict[str, dict[str, float]] = {}
        self._rr = itertools.count()
        #: worker user -> its attempts of this run lost or failed in a row.
        self._failures: dict[str, int] = {}
        #: worker user -> until when (monotonic) it is cooled down (the circuit breaker).
        self._cooled: dict[str, float] = {}
        # Woken by anything from the room: the assigner retries waiting tasks (a worker may
        # have appeared, or finished something), drain re-checks what is still out, the lease
        # watch looks again. Three events, as each clears its own.
        self._retry_wake = asyncio.Event()
        self._drain_wake = asyncio.Event()
        self._lease_wake = asyncio.Event()
        #: (task, attempt) -> the transcript's mxc URI, as workers report them.
        self.transcripts: dict[tuple[str, int], str] = {}
        self._loops: list[asyncio.Task[None]] = []

    @property
    def workers(self) -> dict[str, WorkerInfo]:
        return self.roster.workers

    async def start_listening(self) -> None:
        """Learn the workers present from the room's state, then follow the room live."""
        self.node.add_listener(self.on_event)
        await self.roster.load()
        self._loops = [
            asyncio.create_task(self._retry_waiting()),
            asyncio.create_task(self._watch_leases()),
        ]

    def adopt(self, task: TaskSpec, dispatch: TaskDispatched, worker_user: str) -> None:
        """An attempt assigned before this coordinator took the run (from the run log), still
        out on a worker: its lease starts now, so a live worker renews it with its next
        heartbeat and a dead one loses it after one lease period."""
        attempt = _Attempt(task, dispatch, {}, worker_user=worker_user, renewed_at=self.clock())
        self._attempts[attempt.key] = attempt
        self._out.setdefault(worker_user, set()).add(attempt.key)
        self._lease_wake.set()

    # --- Executor --------------------------------------------------------------------------------

    async def start(
        self, dispatch: TaskDispatched, task: TaskSpec, upstream: dict[str, str]
    ) -> None:
        attempt = _Attempt(task, dispatch, upstream)
        self._attempts[attempt.key] = attempt
        if not self._assign(attempt):
            self._waiting.append(attempt)

    async def stop(self, task_id: str, attempt: int, *, timed_out: bool, reason: str) -> None:
        """The decision (cancelled / timed out) is in the room already: the worker acts on it."""
        record = self._attempts.get((task_id, attempt))
        if record is None:
            return
        if record in self._waiting:
            self._waiting.remove(record)
            self._finish(record)
        record.stopping = True
        self._wake()

    async def drain(self) -> None:
        """Wait for the workers to report the end of every attempt (bounded: a dead worker
        never answers, and its leases lapse meanwhile)."""
        deadline = time.monotonic() + self.drain_timeout
        while any(self._out.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("coordinator.drain_timeout", run_id=self.run_id)
                break
            self._drain_wake.clear()
            await wait_event(self._drain_wake, remaining)
        self.close()

    def close(self) -> None:
        """Stop following the room."""
        self.node.remove_listener(self.on_event)
        for loop in self._loops:
            loop.cancel()

    # --- assignment ------------------------------------------------------------------------------

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

    def _place(self, attempt: _Attempt) -> WorkerInfo | str | None:
        """The worker to take the attempt; why no worker can (a string); None when some can
        but none has room for it now."""
        task = attempt.task
        now = self.clock()
        live = self.roster.live()
        if self.allowed is not None:
            live = [w for w in live if w.node_id in self.allowed or w.user_id in self.allowed]
            if not live:
                names = ", ".join(sorted(self.allowed))
                return f"none of the run's workers ({names}) is live in the room"
        if not live:
            return "no live worker in the room"
        # A rollback goes where its task ran; a continued agent is where it was kept.
        pinned = self.driver.engine.placement(task.id)
        if pinned is not None:
            live = [w for w in live if w.node_id == pinned]
            if not live:
                return f"no live worker in the room {self._requirement(task)}"
        placement = task.placement
        if placement.constrained:
            fit, misfits = [], []
            for w in live:
                why = placement.unmet(w.node_id, w.user_id, w.beat.facts)
                if why is None:
                    fit.append(w)
                else:
                    misfits.append(f"{w.node_id} {why}")
            if not fit:
                return f"no live worker meets {placement.describe()} ({'; '.join(misfits)})"
            live = fit
        able = [w for w in live if task.agent in w.beat.agents]
        if not able:
            offered = "; ".join(
                f"{w.node_id} runs {', '.join(w.beat.agents) or 'nothing'}" for w in live
            )
            return f"no live worker in the room runs agent {task.agent!r} ({offered})"
        excluded = self._excluded.get(task.id, {})
        allowed = [w for w in able if excluded.get(w.user_id, 0.0) <= now]
        if not allowed:
            until = min(excluded[w.user_id] for w in able)
            names = ", ".join(w.node_id for w in able)
            return (
                f"the live workers that run agent {task.agent!r} ({names}) lost an attempt of "
                f"this task; they may take it again in {until - now:.0f}s"
            )
        # Cooled-down workers (the circuit breaker) get nothing while another worker could take
        # the task; when every one that could is cooled down, one of them rather than none (as
        # Envoy never ejects every host): a run must not stall on its breaker.
        warm = [w for w in allowed if self._cooled.get(w.user_id, 0.0) <= now]
        allowed = warm or allowed
        with_room = [w for w in allowed if self._free(w) > 0]
        if not with_room:
            return None
        # Rotate, so that round-robin takes turns and least-loaded shares out ties.
        turn = next(self._rr) % len(with_room)
        with_room = with_room[turn:] + with_room[:turn]
        if self.policy is Assignment.ROUND_ROBIN:
            return with_room[0]
        return min(with_room, key=lambda w: self._load(w) / w.beat.max_workers)

    def _load(self, worker: WorkerInfo) -> int:
        """What the worker runs: ours, as we know them now, plus what its heartbeat said it ran
        for others (other runs and rooms)."""
        ours_now = len(self._out.get(worker.user_id, ()))
        holds = worker.beat.holds
        ours_then = len(holds.get(self.run_id, {})) if holds is not None else ours_now
        return max(0, worker.beat.load - ours_then) + ours_now

    def _free(self, worker: WorkerInfo) -> int:
        return worker.beat.max_workers - self._load(worker)

    def _assign(self, attempt: _Attempt) -> bool:
        placed = self._place(attempt)
        if not isinstance(placed, WorkerInfo):
            if placed is None:
                attempt.unplaceable_since = None
            elif attempt.unplaceable_since is None:
                attempt.unplaceable_since = self.clock()
            return False
        info = placed
        task, dispatch = attempt.task, attempt.dispatch
        sid = str(SessionId(self.run_id, task.id, dispatch.attempt))
        attempt.worker_user = info.user_id
        attempt.renewed_at = self.clock()
        self._out.setdefault(info.user_id, set()).add(attempt.key)
        self.outbox.post(
            outgoing(
                ev.TaskAssignedContent(
                    run_id=self.run_id,
                    task_id=task.id,
                    attempt=dispatch.attempt,
                    assigned_to=info.node_id,
                    assigned_user=info.user_id,
                    assigned_by=self.node.user_id,
                    agent=task.agent,
                    lease_ms=info.beat.lease_period_ms,
                    upstream_tasks=task.deps,
                    task=json.dumps(task_to_document(task)),
                    upstream=dict(attempt.upstream),
                    epoch=self.epoch if self.epoch > 1 else None,
                ),
                # Upstream outputs, then a long task, go to media when they make it too large.
                upload=self.node.upload_for_events,
            )
        )
        self._lease_wake.set()
        log.info("coordinator.assigned", session_id=sid, worker=info.node_id, user=info.user_id)
        return True

    async def _retry_waiting(self) -> None:
        while True:
            self._retry_wake.clear()
            await wait_event(self._retry_wake, 1.0)
            for attempt in list(self._waiting):
                if self._assign(attempt):
                    self._waiting.remove(attempt)
                    continue
                since = attempt.unplaceable_since
                if since is not None and self.clock() - since > self.no_worker_timeout:
                    self._waiting.remove(attempt)
                    self._finish(attempt)
                    reason = self._place(attempt)
                    self.driver.submit(
                        TaskFinished(
                            attempt.task.id,
                            attempt.dispatch.attempt,
                            time.time(),
                            Outcome.FAILED,
                            error=reason if isinstance(reason, str) else "no worker took it",
                        )
                    )

    def _finish(self, attempt: _Attempt) -> None:
        attempt.done = True
        if attempt.worker_user is not None:
            self._out.get(attempt.worker_user, set()).discard(attempt.key)

    # --- the circuit breaker ----------------------------------------------------------------------

    def _count_failure(self, user: str, node_id: str, why: str) -> None:
        """One more attempt the worker lost or failed; at ``breaker_failures`` in a row it is
        cooled down, and the room is told (its next failure after the cooldown, the first one
        it is allowed, cools it down again)."""
        failures = self._failures[user] = self._failures.get(user, 0) + 1
        now = self.clock()
        if self.breaker_failures <= 0 or failures < self.breaker_failures:
            return
        if self._cooled.get(user, 0.0) > now:
            return  # an attempt it had before it was cooled down: said so already
        self._cooled[user] = now + self.breaker_cooldown
        log.warning(
            "coordinator.worker_cooled_down",
            run_id=self.run_id,
            worker=node_id,
            user=user,
            failures=failures,
            cooldown_secs=self.breaker_cooldown,
        )
        self.outbox.post(
            outgoing(
                ev.WorkerCooldownContent(
                    run_id=self.run_id,
                    worker=node_id,
                    worker_user=user,
                    failures=failures,
                    cooldown_ms=int(self.breaker_cooldown * 1000),
                    reason=f"{failures} attempts in a row lost or failed; the last: {why}",
                    epoch=self.epoch if self.epoch > 1 else None,
                )
            )
        )

    # --- leases ----------------------------------------------------------------------------------

    async def _watch_leases(self) -> None:
        while True:
            now = self.clock()
            if self.blind():
                # Cut off ourselves: look again soon, and give every attempt a full lease from
                # when we see the room again.
                self._was_blind = True
                self._lease_wake.clear()
                await wait_event(self._lease_wake, 0.5)
                continue
            if self._was_blind:
                self._was_blind = False
                log.info("coordinator.sees_the_room_again", run_id=self.run_id)
                for keys in self._out.values():
                    for key in keys:
                        self._attempts[key].renewed_at = now
            wake = math.inf
            for user, keys in list(self._out.items()):
                worker = self.workers.get(user)
                lease = worker.lease_secs if worker else DEFAULT_LEASE_SECS
                for key in list(keys):
                    attempt = self._attempts[key]
                    deadline = attempt.renewed_at + lease
                    if now < deadline:
                        wake = min(wake, deadline)
                    elif attempt.stopping:
                        self._finish(attempt)  # ended by a decision; its worker is gone
                    else:
                        self._lose(attempt, worker, lease, now)
            self._lease_wake.clear()
            timeout = None if wake == math.inf else max(0.0, wake - self.clock())
            await wait_event(self._lease_wake, timeout)

    def _lose(self, attempt: _Attempt, worker: WorkerInfo | None, lease: float, now: float) -> None:
        user = attempt.worker_user
        assert user is not None
        task_id, number = attempt.key
        name = worker.describe() if worker else user
        if worker is None or worker.silent_for(now) >= lease:
            if worker is not None:
                worker.presumed_dead_at = now
            silence = f"{worker.silent_for(now):.1f}s" if worker else "ever"
            why = f"worker {name} stopped renewing it: no heartbeat for {silence}"
        else:
            why = f"worker {name} heartbeats without it (did it restart?)"
        reason = f"lease lapsed ({lease:g}s): {why}"
        self._finish(attempt)
        self._count_failure(user, worker.node_id if worker else user, reason)
        if self.lost_exclusion > 0:
            self._excluded.setdefault(task_id, {})[user] = now + self.lost_exclusion
        log.warning(
            "coordinator.lease_lapsed",
            session_id=str(SessionId(self.run_id, task_id, number)),
            worker=name,
            reason=reason,
        )
        self.driver.submit(TaskFinished(task_id, number, time.time(), Outcome.LOST, error=reason))
        self._wake()

    def _renew(self, keys: Mapping[str, int] | None, user: str, now: float) -> None:
        """A heartbeat of ``user`` listing ``keys`` (task -> attempt) of this run; None: a node
        older than leases, which renews everything assigned to it."""
        out = self._out.get(user)
        if not out:
            return
        if keys is None:
            held = list(out)
        else:
            held = [(task_id, number) for task_id, number in keys.items()]
        for key in held:
            if key in out:
                self._attempts[key].renewed_at = now

    # --- the room --------------------------------------------------------------------------------

    async def on_event(self, room_id: str, raw: Mapping[str, Any]) -> None:
        if room_id != self.room_id:
            return
        beat = heartbeat_of(raw)
        if beat is not None:
            info = await self.roster.add(*beat)
            if info is not None:
                holds = info.beat.holds
                keys = None if holds is None else holds.get(self.run_id, {})
                self._renew(keys, info.user_id, info.seen_at)
            self._wake()
            return
        event = parse_room_event(raw)
        if event is None:
            return
        payload = event.content
        if (
            isinstance(payload, ev.SessionContent | ev.TaskClaimedContent)
            and payload.run_id == self.run_id
        ):
            self._on_attempt_event(event, payload)
        self._wake()

    def catch_up(self, events: Iterable[RoomEvent]) -> None:
        """The attempts' events the run log shows (from their workers), for attempts adopted
        from it: those that reached the room before this executor listened."""
        for event in events:
            payload = event.content
            if isinstance(payload, ev.TaskClaimedContent | ev.SessionCompletedContent):
                self._on_attempt_event(event, payload, replay=True)

    def _on_attempt_event(
        self,
        event: RoomEvent,
        payload: ev.SessionContent | ev.TaskClaimedContent,
        *,
        replay: bool = False,
    ) -> None:
        sid = SessionId.parse_or_none(payload.session_id)
        if sid is None or sid.run_id != self.run_id:
            return
        record = self._attempts.get((sid.task_id, sid.attempt))
        if record is None or record.worker_user != event.sender:
            if not replay:
                log.warning(
                    "event.unauthorised", type=payload.TYPE, sender=event.sender, run=self.run_id
                )
            return
        if record.done and isinstance(payload, ev.TaskClaimedContent | ev.SessionCompletedContent):
            # A lost attempt's worker came back: the engine records and ignores it.
            log.info("coordinator.late_report", type=payload.TYPE, session_id=payload.session_id)
        elif not record.done:
            record.renewed_at = self.clock()
        if isinstance(payload, ev.TaskClaimedContent):
            self.driver.submit(started_fact(payload))
        elif isinstance(payload, ev.SessionBlockedContent | ev.SessionStateContent):
            if not record.done:
                self._tell_observers(sid, payload)
        elif isinstance(payload, ev.SessionCompletedContent):
            late = record.done
            self._finish(record)
            if late:
                pass  # counted already, as lost (or stopped by a decision)
            elif payload.status == "completed":
                self._failures.pop(event.sender, None)
            elif payload.status == "failed":
                info = self.workers.get(event.sender)
                node = info.node_id if info is not None else event.sender
                self._count_failure(event.sender, node, payload.error or "the attempt failed")
            if payload.transcript:
                self.transcripts[(payload.task_id, payload.attempt)] = payload.transcript
            self.driver.submit(finished_fact(payload))

    def _tell_observers(
        self, sid: SessionId, payload: ev.SessionBlockedContent | ev.SessionStateContent
    ) -> None:
        """A worker says one of our attempts is blocked, or running again: the observers (the
        status notice, the chat's notices) hear it as they would of a session run here."""
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
        self._lease_wake.set()

"""The run log: engine events as room payloads, and a room's events folded back into an engine.

Trust the sender, never the content. Folding a room takes, as an explicit input, the Matrix
users the reader trusts to coordinate runs (:func:`fold_runs`' ``coordinators``):

- a run exists only when its ``cis.dag.run.created`` comes from one of them; its sender is the
  run's coordinator (the content's ``coordinator`` field is a node id, for display only);
- the coordinator is the only writer of decisions (assignments, skips, cancellations, the end):
  the creator, until another trusted coordinator takes the run over at a higher epoch (its
  ``cis.dag.run.takeover``); from then on only the new one's decisions at that epoch count;
- the facts of an attempt (claim, session events, result) count only from the Matrix user the
  coordinator assigned it to, so a stranger in the room cannot complete a task, and a late answer
  from a reassigned worker is fenced off by its attempt number;
- a decision that closes an attempt (lost, timed out, cancelled) voids a result of that attempt
  the room shows before it: the coordinator decided without having taken that result (it was on
  its way), so the run went on as though it never came, and the fold must too.

Every event that fails these checks is counted in ``RunLog.rejected`` and dropped.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import attrs
import structlog

from cis_bot.dag.engine import (
    ApprovalRequested,
    Outcome,
    RollbackStarted,
    RunCancelled,
    RunEngine,
    RunEvent,
    RunFinished,
    RunStatus,
    TaskAborted,
    TaskApproved,
    TaskCancelled,
    TaskCarried,
    TaskDispatched,
    TaskFinished,
    TaskSkipped,
    TaskStarted,
    TaskTimedOut,
)
from cis_bot.dag.load import parse_dag
from cis_bot.dag.spec import DagSpec
from cis_bot.errors import InputError
from cis_bot.ids import SessionId
from cis_bot.matrix import events as ev

log = structlog.get_logger(__name__)


def ms(at: float) -> int:
    return int(at * 1000)


def seconds(timestamp_ms: int) -> float:
    return timestamp_ms / 1000


def decision_content(run_id: str, decision: RunEvent, engine: RunEngine) -> ev.EventContent | None:
    """The room event recording one of the engine's decisions (dispatches are the executor's:
    the assignment names a worker, which the engine does not choose)."""
    match decision:
        case TaskTimedOut(task_id=tid, attempt=attempt, at=at):
            timeout = engine.spec.task(tid).timeout_secs
            reason = f"timed out after {timeout:g}s"
            return ev.TaskTimedOutContent(
                run_id=run_id, task_id=tid, attempt=attempt, reason=reason, timestamp=ms(at)
            )
        case TaskCancelled(task_id=tid, attempt=attempt, reason=reason, at=at):
            return ev.TaskCancelledContent(
                run_id=run_id, task_id=tid, attempt=attempt, reason=reason, timestamp=ms(at)
            )
        case TaskSkipped(task_id=tid, reason=reason, at=at):
            return ev.TaskSkippedContent(
                run_id=run_id, task_id=tid, reason=reason, timestamp=ms(at)
            )
        case TaskAborted(task_id=tid, reason=reason, at=at):
            return ev.TaskAbortedContent(
                run_id=run_id, task_id=tid, reason=reason, timestamp=ms(at)
            )
        case ApprovalRequested(task_id=tid, stakeholders=who, deadline=deadline, at=at):
            return ev.TaskApprovalRequestedContent(
                run_id=run_id,
                task_id=tid,
                stakeholders=who,
                deadline=None if deadline is None else ms(deadline),
                reason=ev.clip(decision.reason, ev.REASON_CHARS),
                timestamp=ms(at),
            )
        case RollbackStarted(task_id=tid, attempt=attempt, at=at):
            commands = tuple(
                ev.clip(c, ev.REASON_CHARS) or "" for c in engine.spec.task(tid).rollback
            )
            return ev.TaskRollbackContent(
                run_id=run_id, task_id=tid, attempt=attempt, commands=commands, timestamp=ms(at)
            )
        case TaskApproved(task_id=tid, by=by, at=at):
            return ev.TaskApprovedContent(run_id=run_id, task_id=tid, by=by, timestamp=ms(at))
        case RunCancelled(by=by, at=at):
            return ev.RunCancelledContent(run_id=run_id, by=by, timestamp=ms(at))
        case TaskCarried(task_id=tid, output=output, from_run=from_run, at=at):
            return ev.TaskCarriedContent(
                run_id=run_id,
                task_id=tid,
                from_run=from_run,
                output=ev.clip(output, ev.OUTPUT_SUMMARY_CHARS, max_bytes=ev.OUTPUT_SUMMARY_BYTES)
                or "",
                timestamp=ms(at),
            )
        case TaskFinished(task_id=tid, attempt=attempt, outcome=Outcome.LOST, at=at):
            # Other results are the workers' to report; a lost attempt has no one else to.
            return ev.TaskLostContent(
                run_id=run_id, task_id=tid, attempt=attempt, reason=decision.error, timestamp=ms(at)
            )
        case RunFinished(status=status, at=at):
            tasks = {tid: str(record.status) for tid, record in engine.tasks.items()}
            return ev.RunCompletedContent(
                run_id=run_id, status=str(status), tasks=tasks, timestamp=ms(at)
            )
    return None


_OUTCOMES = {o.value: o for o in Outcome}


def finished_fact(payload: ev.SessionCompletedContent) -> TaskFinished:
    return TaskFinished(
        payload.task_id,
        payload.attempt,
        seconds(payload.timestamp),
        _OUTCOMES[payload.status],
        exit_code=payload.exit_code,
        output=payload.output,
        error=payload.error,
    )


def started_fact(payload: ev.TaskClaimedContent) -> TaskStarted:
    return TaskStarted(
        payload.task_id,
        payload.attempt,
        seconds(payload.timestamp),
        session_id=payload.session_id,
        node=payload.claimed_by,
    )


@attrs.frozen
class RoomEvent:
    """A ``cis.*`` event as read from a room: who sent it, and its validated payload."""

    sender: str
    content: ev.EventContent
    event_id: str = ""
    #: A state event's key (heartbeats: the sender's own user id); None for message events.
    state_key: str | None = None


def parse_room_event(raw: Mapping[str, Any]) -> RoomEvent | None:
    """A raw Matrix event (client or appservice format) as a RoomEvent; None when it is not ours
    or is malformed (logged)."""
    event_type = raw.get("type")
    if not isinstance(event_type, str) or not event_type.startswith("cis."):
        return None
    sender = raw.get("sender")
    if not isinstance(sender, str):
        return None
    try:
        payload = ev.decode(event_type, raw.get("content"))
    except ev.InvalidEvent as exc:
        log.warning("event.dropped", event_id=raw.get("event_id"), sender=sender, error=str(exc))
        return None
    state_key = raw.get("state_key")
    return RoomEvent(
        sender=sender,
        content=payload,
        event_id=str(raw.get("event_id", "")),
        state_key=state_key if isinstance(state_key, str) else None,
    )


@attrs.define
class RunLog:
    """Everything the room says about one run, authorised, in room order.

    ``coordinators`` are the users the reader trusts to coordinate (see the module docstring);
    ``coordinator_user`` is the one of them that coordinates this run, and every decision is
    checked against it alone, and against the run's ``epoch``: the creator at epoch 1, then
    whoever took the run over last (``cis.dag.run.takeover``: from a member of ``coordinators``,
    at a higher epoch). A superseded coordinator's late decisions are recorded and ignored.
    """

    run_id: str
    coordinators: frozenset[str]
    created: ev.RunCreatedContent | None = None
    coordinator_user: str | None = None
    #: The node id of that coordinator (for people, and for finding it to send it requests).
    coordinator_node: str | None = None
    epoch: int = 1
    #: The takeovers that counted, in order.
    takeovers: list[ev.RunTakeoverContent] = attrs.Factory(list)
    spec: DagSpec | None = None
    #: The engine's events, ready for RunEngine.replay.
    events: list[RunEvent] = attrs.Factory(list)
    #: (task, attempt) -> the worker's user id, from the assignment.
    assignees: dict[tuple[str, int], str] = attrs.Factory(dict)
    completed: ev.RunCompletedContent | None = None
    #: The attempts' events (claims, session events, results), from their workers, in order.
    sessions: list[RoomEvent] = attrs.Factory(list)
    rejected: int = 0
    #: (task, attempt) of the results in ``events``, to void them (see the module docstring).
    _results: set[tuple[str, int]] = attrs.Factory(set)

    def add(self, event: RoomEvent) -> None:
        payload = event.content
        if not isinstance(payload, ev.RunContent) or payload.run_id != self.run_id:
            return
        if isinstance(payload, ev.RunCreatedContent):
            if self.created is None and event.sender in self.coordinators:
                self._created(event.sender, payload)
            elif self.created is None or event.sender != self.coordinator_user:
                self._reject(event, "not a trusted coordinator")
            return
        if self.coordinator_user is None:
            self._reject(event, "the run has no trusted creation event")
        elif isinstance(payload, ev.SessionContent | ev.TaskClaimedContent):
            self._from_worker(event)
        elif isinstance(payload, ev.RunTakeoverContent):
            self._takeover(event, payload)
        elif event.sender != self.coordinator_user:
            superseded = any(t.previous == event.sender for t in self.takeovers)
            self._reject(event, "a superseded coordinator" if superseded else "not its coordinator")
        elif (payload.epoch or 1) != self.epoch:
            self._reject(
                event, f"decided at epoch {payload.epoch or 1}, the run is at {self.epoch}"
            )
        else:
            self._from_coordinator(payload)

    def _takeover(self, event: RoomEvent, payload: ev.RunTakeoverContent) -> None:
        epoch = payload.epoch or 1
        if event.sender not in self.coordinators:
            self._reject(event, "not a trusted coordinator")
        elif epoch <= self.epoch:
            self._reject(event, f"epoch {epoch} is not above the run's {self.epoch}")
        else:
            self.epoch = epoch
            self.coordinator_user = event.sender
            self.coordinator_node = payload.coordinator
            self.takeovers.append(payload)

    def _reject(self, event: RoomEvent, why: str, **fields: object) -> None:
        self.rejected += 1
        log.info(
            "event.unauthorised",
            run_id=self.run_id,
            type=event.content.TYPE,
            sender=event.sender,
            why=why,
            **fields,
        )

    def _created(self, sender: str, payload: ev.RunCreatedContent) -> None:
        self.created = payload
        self.coordinator_user = sender
        self.coordinator_node = payload.coordinator
        if payload.spec is not None:  # else it is in media: the reader fetches it
            self.spec = spec_from_text(payload.spec, run_id=self.run_id)

    def _from_worker(self, event: RoomEvent) -> None:
        payload = event.content
        attempt = _attempt_of(payload)
        owner = self.assignees.get(attempt) if attempt else None
        if owner is None or owner != event.sender:
            self._reject(event, "not the attempt's worker", assignee=owner)
            return
        if isinstance(payload, ev.TaskClaimedContent):
            self.events.append(started_fact(payload))
        elif isinstance(payload, ev.SessionCompletedContent):
            self.events.append(finished_fact(payload))
            self._results.add((payload.task_id, payload.attempt))
        self.sessions.append(event)

    def _close(self, task_id: str, attempt: int) -> None:
        """The coordinator closed this attempt: a result of it earlier in the room is void."""
        if (task_id, attempt) not in self._results:
            return
        self._results.discard((task_id, attempt))
        self.events = [
            e
            for e in self.events
            if not (
                isinstance(e, TaskFinished)
                and (e.task_id, e.attempt) == (task_id, attempt)
                and e.outcome is not Outcome.LOST
            )
        ]

    def _from_coordinator(self, payload: ev.EventContent) -> None:
        at = seconds(payload.timestamp)
        match payload:
            case ev.TaskAssignedContent():
                self.assignees[(payload.task_id, payload.attempt)] = payload.assigned_user
                self.events.append(TaskDispatched(payload.task_id, payload.attempt, at))
            case ev.TaskTimedOutContent(task_id=tid, attempt=int(attempt)):
                self._close(tid, attempt)
                self.events.append(TaskTimedOut(tid, attempt, at))
            case ev.TaskCancelledContent(task_id=tid, attempt=attempt, reason=reason):
                if attempt is not None:
                    self._close(tid, attempt)
                self.events.append(TaskCancelled(tid, at, attempt, reason or "run cancelled"))
            case ev.TaskSkippedContent(task_id=tid, reason=reason):
                self.events.append(TaskSkipped(tid, at, reason or ""))
            case ev.TaskAbortedContent(task_id=tid, reason=reason):
                self.events.append(TaskAborted(tid, at, reason or ""))
            case ev.TaskApprovalRequestedContent(
                task_id=tid, stakeholders=who, deadline=deadline, reason=reason
            ):
                limit = None if deadline is None else seconds(deadline)
                self.events.append(ApprovalRequested(tid, at, who, limit, reason))
            case ev.TaskRollbackContent(task_id=tid, attempt=attempt):
                self.events.append(RollbackStarted(tid, attempt, at))
            case ev.TaskApprovedContent(task_id=tid, by=by):
                self.events.append(TaskApproved(tid, at, by))
            case ev.RunCancelledContent(by=by):
                self.events.append(RunCancelled(at, by))
            case ev.TaskCarriedContent(task_id=tid, output=output, from_run=from_run):
                self.events.append(TaskCarried(tid, at, output, from_run))
            case ev.TaskLostContent(task_id=tid, attempt=int(attempt), reason=reason):
                self._close(tid, attempt)
                self.events.append(TaskFinished(tid, attempt, at, Outcome.LOST, error=reason))
            case ev.RunCompletedContent():
                self.completed = payload
                self.events.append(RunFinished(RunStatus(payload.status), at))


def spec_from_text(text: str, *, run_id: str) -> DagSpec | None:
    try:
        return parse_dag(
            text,
            file=f"the spec of run {run_id}",
            fmt="json",
            agents=None,
            default_agent="",
        )
    except InputError as exc:
        log.warning("run.spec_invalid", run_id=run_id, error=str(exc))
        return None


def _attempt_of(payload: ev.EventContent) -> tuple[str, int] | None:
    """(task, attempt) an attempt's event is about: from its fields, or its session id."""
    if isinstance(payload, ev.TaskClaimedContent | ev.SessionCompletedContent):
        return payload.task_id, payload.attempt
    if isinstance(payload, ev.SessionCreatedContent):
        return payload.task_id, payload.attempt
    if isinstance(payload, ev.SessionContent):
        sid = SessionId.parse_or_none(payload.session_id)
        if sid is not None and sid.run_id == payload.run_id:
            return sid.task_id, sid.attempt
    return None


def fold_runs(events: Iterable[RoomEvent], coordinators: Collection[str]) -> dict[str, RunLog]:
    """Every run a room's events speak of that one of ``coordinators`` (Matrix user ids) created,
    keyed by run id, in the order they were created. Pure: the same events and trust give the
    same logs."""
    trusted = frozenset(coordinators)
    runs: dict[str, RunLog] = {}
    for event in events:
        payload = event.content
        if not isinstance(payload, ev.RunContent):
            continue
        run = runs.get(payload.run_id)
        if run is None:
            if not isinstance(payload, ev.RunCreatedContent):
                continue
            run = runs[payload.run_id] = RunLog(payload.run_id, trusted)
        run.add(event)
    return {run_id: run for run_id, run in runs.items() if run.created is not None}

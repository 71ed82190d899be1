"""The run log: engine events as room payloads, and a room's events folded back into an engine.

The coordinator is the only writer of decisions; workers write the facts about the attempts they
were assigned. Folding a room accepts each event only from its rightful sender, so a stranger in
the room cannot complete a task, and a late answer from a reassigned worker is fenced off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import structlog

from cis_bot.dag import engine as en
from cis_bot.dag.spec import DagSpec, parse_dag
from cis_bot.errors import InputError
from cis_bot.matrix import events as ev

log = structlog.get_logger(__name__)


def ms(at: float) -> int:
    return int(at * 1000)


def seconds(timestamp_ms: int) -> float:
    return timestamp_ms / 1000


def decision_payload(run_id: str, decision: en.RunEvent, engine: en.RunEngine) -> ev.Payload | None:
    """The room event recording one of the engine's decisions (dispatches are the executor's:
    the assignment names a worker, which the engine does not choose)."""
    match decision:
        case en.TaskTimedOut(task_id=tid, attempt=attempt, at=at):
            timeout = engine.spec.task(tid).timeout_secs
            reason = f"timed out after {timeout:g}s"
            return ev.TaskTimedOut(
                run_id=run_id, task_id=tid, attempt=attempt, reason=reason, timestamp=ms(at)
            )
        case en.TaskCancelled(task_id=tid, attempt=attempt, reason=reason, at=at):
            return ev.TaskCancelled(
                run_id=run_id, task_id=tid, attempt=attempt, reason=reason, timestamp=ms(at)
            )
        case en.TaskSkipped(task_id=tid, reason=reason, at=at):
            return ev.TaskSkipped(run_id=run_id, task_id=tid, reason=reason, timestamp=ms(at))
        case en.TaskAborted(task_id=tid, reason=reason, at=at):
            return ev.TaskAborted(run_id=run_id, task_id=tid, reason=reason, timestamp=ms(at))
        case en.ApprovalRequested(task_id=tid, stakeholders=who, deadline=deadline, at=at):
            return ev.ApprovalRequested(
                run_id=run_id,
                task_id=tid,
                stakeholders=who,
                deadline=None if deadline is None else ms(deadline),
                timestamp=ms(at),
            )
        case en.TaskApproved(task_id=tid, by=by, at=at):
            return ev.TaskApproved(run_id=run_id, task_id=tid, by=by, timestamp=ms(at))
        case en.RunCancelled(by=by, at=at):
            return ev.RunCancelled(run_id=run_id, by=by, timestamp=ms(at))
        case en.TaskCarried(task_id=tid, output=output, from_run=from_run, at=at):
            return ev.TaskCarried(
                run_id=run_id,
                task_id=tid,
                from_run=from_run,
                output=ev.clip(output, ev.OUTPUT_SUMMARY_CHARS) or "",
                timestamp=ms(at),
            )
        case en.TaskFinished(task_id=tid, attempt=attempt, outcome=en.Outcome.LOST, at=at):
            # Other results are the workers' to report; a lost attempt has no one else to.
            return ev.TaskLost(
                run_id=run_id, task_id=tid, attempt=attempt, reason=decision.error, timestamp=ms(at)
            )
        case en.RunFinished(status=status, at=at):
            tasks = {tid: str(record.status) for tid, record in engine.tasks.items()}
            return ev.RunCompleted(run_id=run_id, status=str(status), tasks=tasks, timestamp=ms(at))
    return None


_OUTCOMES = {o.value: o for o in en.Outcome}


def finished_fact(payload: ev.SessionCompleted) -> en.TaskFinished:
    return en.TaskFinished(
        payload.task_id,
        payload.attempt,
        seconds(payload.timestamp),
        _OUTCOMES[payload.status],
        exit_code=payload.exit_code,
        output=payload.output,
        error=payload.error,
    )


def started_fact(payload: ev.TaskClaimed) -> en.TaskStarted:
    return en.TaskStarted(
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
    payload: ev.Payload
    event_id: str = ""


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
    return RoomEvent(sender=sender, payload=payload, event_id=str(raw.get("event_id", "")))


@attrs.define
class RunLog:
    """Everything the room says about one run, authorised, in room order."""

    run_id: str
    created: ev.RunCreated | None = None
    coordinator_user: str | None = None
    spec: DagSpec | None = None
    #: The engine's events, ready for RunEngine.replay.
    events: list[en.RunEvent] = attrs.Factory(list)
    #: (task, attempt) -> the worker's user id, from the assignment.
    assignees: dict[tuple[str, int], str] = attrs.Factory(dict)
    completed: ev.RunCompleted | None = None
    #: Session events (created/state/blocked/output/completed) for display.
    sessions: list[RoomEvent] = attrs.Factory(list)
    rejected: int = 0

    def add(self, event: RoomEvent) -> None:
        payload = event.payload
        if not isinstance(payload, ev.RunPayload) or payload.run_id != self.run_id:
            return
        if isinstance(payload, ev.RunCreated):
            if self.created is None:
                self._created(event.sender, payload)
            return
        if self.coordinator_user is None:
            self.rejected += 1
            return
        if isinstance(payload, ev.SessionPayload | ev.TaskClaimed):
            self._from_worker(event)
        elif event.sender == self.coordinator_user:
            self._from_coordinator(payload)
        else:
            self.rejected += 1
            log.warning(
                "event.unauthorised", run_id=self.run_id, type=payload.TYPE, sender=event.sender
            )

    def _created(self, sender: str, payload: ev.RunCreated) -> None:
        self.created = payload
        self.coordinator_user = sender
        if payload.spec is not None:  # else it is in media: the reader fetches it
            self.spec = spec_from_text(payload.spec, run_id=self.run_id)

    def _from_worker(self, event: RoomEvent) -> None:
        payload = event.payload
        assert isinstance(payload, ev.SessionPayload | ev.TaskClaimed)
        if isinstance(payload, ev.TaskClaimed | ev.SessionCompleted):
            owner = self.assignees.get((payload.task_id, payload.attempt))
            if owner != event.sender:
                self.rejected += 1
                log.warning(
                    "event.unauthorised",
                    run_id=self.run_id,
                    type=payload.TYPE,
                    sender=event.sender,
                    assignee=owner,
                )
                return
            if isinstance(payload, ev.TaskClaimed):
                self.events.append(started_fact(payload))
            else:
                self.events.append(finished_fact(payload))
        self.sessions.append(event)

    def _from_coordinator(self, payload: ev.Payload) -> None:
        at = seconds(payload.timestamp)
        match payload:
            case ev.TaskAssigned():
                self.assignees[(payload.task_id, payload.attempt)] = payload.assigned_user
                self.events.append(en.TaskDispatched(payload.task_id, payload.attempt, at))
            case ev.TaskTimedOut(task_id=tid, attempt=int(attempt)):
                self.events.append(en.TaskTimedOut(tid, attempt, at))
            case ev.TaskCancelled(task_id=tid, attempt=attempt, reason=reason):
                self.events.append(en.TaskCancelled(tid, at, attempt, reason or "run cancelled"))
            case ev.TaskSkipped(task_id=tid, reason=reason):
                self.events.append(en.TaskSkipped(tid, at, reason or ""))
            case ev.TaskAborted(task_id=tid, reason=reason):
                self.events.append(en.TaskAborted(tid, at, reason or ""))
            case ev.ApprovalRequested(task_id=tid, stakeholders=who, deadline=deadline):
                limit = None if deadline is None else seconds(deadline)
                self.events.append(en.ApprovalRequested(tid, at, who, limit))
            case ev.TaskApproved(task_id=tid, by=by):
                self.events.append(en.TaskApproved(tid, at, by))
            case ev.RunCancelled(by=by):
                self.events.append(en.RunCancelled(at, by))
            case ev.TaskCarried(task_id=tid, output=output, from_run=from_run):
                self.events.append(en.TaskCarried(tid, at, output, from_run))
            case ev.TaskLost(task_id=tid, attempt=int(attempt), reason=reason):
                self.events.append(en.TaskFinished(tid, attempt, at, en.Outcome.LOST, error=reason))
            case ev.RunCompleted():
                self.completed = payload
                self.events.append(en.RunFinished(en.RunStatus(payload.status), at))


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


def fold_runs(events: Iterable[RoomEvent]) -> dict[str, RunLog]:
    """Every run a room's events speak of, keyed by run id, in the order they were created."""
    runs: dict[str, RunLog] = {}
    for event in events:
        payload = event.payload
        if not isinstance(payload, ev.RunPayload):
            continue
        run = runs.get(payload.run_id)
        if run is None:
            if not isinstance(payload, ev.RunCreated):
                continue
            run = runs[payload.run_id] = RunLog(payload.run_id)
        run.add(event)
    return {run_id: run for run_id, run in runs.items() if run.created is not None}

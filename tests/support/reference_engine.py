"""The run engine as it was before it became incremental: every ``decide`` walks every task.

Kept verbatim (bar the name) as the reference the incremental ``RunEngine`` must agree with,
decision for decision (tests/test_engine_equivalence.py). It is quadratic in the run's size and
is not used by cis_bot itself.
"""

from __future__ import annotations

import graphlib
from collections.abc import Callable, Iterable, Mapping

from cis_bot.dag.engine import (
    ApprovalRequested,
    Attempt,
    Decision,
    Outcome,
    RunCancelled,
    RunEvent,
    RunFinished,
    RunStatus,
    TaskAborted,
    TaskApproved,
    TaskCancelled,
    TaskCarried,
    TaskDispatched,
    TaskFinished,
    TaskRecord,
    TaskSkipped,
    TaskStarted,
    TaskStatus,
    TaskTimedOut,
)
from cis_bot.dag.spec import (
    MAX_RETRY_BACKOFF_SECS,
    DagSpec,
    DefaultAction,
    LevelKind,
    Policy,
    TaskSpec,
    Trigger,
)

_Make = Callable[[Decision], None]
_FAILURES = (TaskStatus.FAILED, TaskStatus.TIMEOUT)


class ReferenceEngine:
    def __init__(self, spec: DagSpec, *, max_workers: int | None = None) -> None:
        self.spec = spec
        self.max_workers = max(1, max_workers or spec.max_workers or len(spec.tasks))
        self._tasks = {t.id: TaskRecord(spec=t) for t in spec.tasks}
        depth: dict[str, int] = {}
        for tid in graphlib.TopologicalSorter({t.id: t.deps for t in spec.tasks}).static_order():
            depth[tid] = 1 + max((depth[d] for d in spec.task(tid).deps), default=-1)
        position = {t.id: i for i, t in enumerate(spec.tasks)}
        # Topological, ties broken by file order, so one pass settles cascades of skips.
        self._order = sorted(depth, key=lambda tid: (depth[tid], position[tid]))
        has_dependents = {d for t in spec.tasks for d in t.deps}
        self._sinks = tuple(tid for tid in self._order if tid not in has_dependents)
        self._cancel_requested: RunCancelled | None = None
        self._aborted = False
        self._finished: RunFinished | None = None
        #: Results that arrived for an attempt that was no longer open (fencing).
        self.stale_results: list[TaskStarted | TaskFinished] = []

    @classmethod
    def replay(
        cls, spec: DagSpec, events: Iterable[RunEvent], *, max_workers: int | None = None
    ) -> ReferenceEngine:
        engine = cls(spec, max_workers=max_workers)
        for event in events:
            engine.apply(event)
        return engine

    # --- queries ---------------------------------------------------------------------------------

    @property
    def tasks(self) -> Mapping[str, TaskRecord]:
        return self._tasks

    @property
    def status(self) -> RunStatus:
        return self._finished.status if self._finished else RunStatus.RUNNING

    @property
    def finished(self) -> bool:
        return self._finished is not None

    @property
    def debts(self) -> list[str]:
        if self.spec.policy is not Policy.ALLOW_DEBT:
            return []
        return [tid for tid in self._order if self._tasks[tid].status.is_failure]

    def upstream_outputs(self, task_id: str) -> dict[str, str]:
        """Outputs of the task's finished dependencies, in dependency order."""
        return {
            dep: self._tasks[dep].output
            for dep in self._tasks[task_id].spec.deps
            if self._tasks[dep].status in (TaskStatus.COMPLETED, *_FAILURES)
        }

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time after ``now`` at which ``decide`` would act without any new event."""
        times: list[float] = []
        for record in self._tasks.values():
            if record.status is TaskStatus.READY and record.not_before > now:
                times.append(record.not_before)
            elif record.status.is_active and record.spec.timeout_secs is not None:
                attempt = record.current
                assert attempt is not None
                times.append(attempt.dispatched_at + record.spec.timeout_secs)
            elif (
                record.status is TaskStatus.AWAITING_APPROVAL
                and record.approval_deadline is not None
            ):
                times.append(record.approval_deadline)
        return min((t for t in times if t > now), default=None)

    # --- fold ------------------------------------------------------------------------------------

    def apply(self, event: RunEvent) -> bool:
        """Fold one event into the state. Returns False when the event was ignored (stale,
        duplicate, unknown task, or too late), True when it changed something."""
        if isinstance(event, RunFinished):
            self._finished = event
            return True
        if isinstance(event, RunCancelled):
            if self._finished or self._cancel_requested:
                return False
            self._cancel_requested = event
            return True
        record = self._tasks.get(event.task_id)
        if record is None:
            return False
        match event:
            case TaskStarted():
                return self._apply_started(record, event)
            case TaskFinished():
                return self._apply_finished(record, event)
            case TaskDispatched():
                if record.status.is_terminal or record.status.is_active:
                    return False
                record.attempts.append(Attempt(number=event.attempt, dispatched_at=event.at))
                record.status = TaskStatus.DISPATCHED
                return True
            case TaskTimedOut():
                attempt = record.current
                if (
                    not record.status.is_active
                    or attempt is None
                    or attempt.number != event.attempt
                ):
                    return False
                attempt.finished_at = event.at
                attempt.outcome = Outcome.TIMEOUT
                attempt.error = f"timed out after {record.spec.timeout_secs:g}s"
                self._conclude_failure(record, TaskStatus.TIMEOUT, event.at, attempt.error)
                return True
            case TaskCancelled():
                if record.status.is_terminal:
                    return False
                if record.status.is_active and (attempt := record.current) is not None:
                    attempt.finished_at = event.at
                    attempt.error = event.reason
                record.status = TaskStatus.CANCELLED
                record.reason = event.reason
                return True
            case TaskSkipped():
                if record.status.is_terminal or record.status.is_active:
                    return False
                record.status = TaskStatus.SKIPPED
                record.reason = event.reason
                return True
            case ApprovalRequested():
                if record.status is not TaskStatus.PENDING:
                    return False
                record.status = TaskStatus.AWAITING_APPROVAL
                record.approval_deadline = event.deadline
                return True
            case TaskApproved():
                return self._apply_approved(record, event)
            case TaskCarried():
                if record.status is not TaskStatus.PENDING or record.attempts:
                    return False
                record.status = TaskStatus.COMPLETED
                record.output = event.output
                record.reason = f"carried over from run {event.from_run}"
                return True
            case TaskAborted():
                if record.status.is_terminal or record.status.is_active:
                    return False
                record.status = TaskStatus.FAILED
                record.reason = event.reason
                self._aborted = True
                return True

    def _apply_started(self, record: TaskRecord, event: TaskStarted) -> bool:
        attempt = record.current
        if not record.status.is_active or attempt is None or attempt.number != event.attempt:
            self.stale_results.append(event)
            return False
        if record.status is TaskStatus.RUNNING:
            return False
        attempt.started_at = event.at
        attempt.session_id = event.session_id
        attempt.node = event.node
        record.status = TaskStatus.RUNNING
        return True

    def _apply_finished(self, record: TaskRecord, event: TaskFinished) -> bool:
        attempt = record.current
        if not record.status.is_active or attempt is None or attempt.number != event.attempt:
            self.stale_results.append(event)
            return False
        attempt.finished_at = event.at
        attempt.outcome = event.outcome
        attempt.exit_code = event.exit_code
        attempt.error = event.error
        record.output = event.output
        if event.outcome is Outcome.COMPLETED:
            record.status = TaskStatus.COMPLETED
            record.reason = None
        elif event.outcome is Outcome.KILLED:
            record.status = TaskStatus.FAILED
            record.reason = event.error or "killed"
        else:
            failed = TaskStatus.TIMEOUT if event.outcome is Outcome.TIMEOUT else TaskStatus.FAILED
            self._conclude_failure(record, failed, event.at, event.error)
        return True

    def _conclude_failure(
        self, record: TaskRecord, status: TaskStatus, at: float, error: str | None
    ) -> None:
        """Retry while attempts remain and the run goes on; otherwise the failure is final.
        A lost attempt is not the task's failure: it goes again at once, uncounted."""
        attempts_made = sum(1 for a in record.attempts if a.outcome is not Outcome.LOST)
        lost = record.current is not None and record.current.outcome is Outcome.LOST
        if (lost or attempts_made < record.spec.max_attempts) and not self._stopping:
            backoff = self.spec.retry_backoff_secs * 2 ** (attempts_made - 1)
            record.status = TaskStatus.READY
            record.not_before = at if lost else at + min(backoff, MAX_RETRY_BACKOFF_SECS)
        else:
            record.status = status
        record.reason = error

    def _apply_approved(self, record: TaskRecord, event: TaskApproved) -> bool:
        if record.approved or record.status not in (
            TaskStatus.PENDING,
            TaskStatus.AWAITING_APPROVAL,
        ):
            return False
        level = record.spec.level
        if level.kind is LevelKind.ARBITRATED and level.stakeholders:
            if event.by not in level.stakeholders or event.by in record.approvals:
                return False
            record.approvals.add(event.by)
            record.approved = record.approvals.issuperset(level.stakeholders)
        else:
            record.approved = True
        if record.approved and record.status is TaskStatus.AWAITING_APPROVAL:
            record.status = TaskStatus.READY
        return True

    @property
    def _first_success_winner(self) -> str | None:
        if self.spec.policy is not Policy.FIRST_SUCCESS:
            return None
        return next((t for t in self._sinks if self._tasks[t].status is TaskStatus.COMPLETED), None)

    @property
    def _stopping(self) -> bool:
        return (
            self._cancel_requested is not None
            or self._aborted
            or self._first_success_winner is not None
        )

    # --- decide ----------------------------------------------------------------------------------

    def decide(self, now: float) -> list[Decision]:
        """What to do at time ``now``. The decisions are folded into the state before returning,
        so calling decide again without new events returns nothing new."""
        if self._finished:
            return []
        decisions: list[Decision] = []

        def make(decision: Decision) -> None:
            self.apply(decision)
            decisions.append(decision)

        self._decide_timeouts(now, make)
        if not self._stopping:
            self._decide_eligibility(now, make)  # may abort the run
        if self._stopping:
            winner = self._first_success_winner
            if self._cancel_requested:
                reason = "run cancelled"
            elif self._aborted:
                reason = "run aborted"
            else:
                reason = f"first_success: {winner} completed"
            for tid in self._order:
                record = self._tasks[tid]
                if not record.status.is_terminal:
                    open_attempt = record.current if record.status.is_active else None
                    number = open_attempt.number if open_attempt else None
                    make(TaskCancelled(tid, now, attempt=number, reason=reason))
        else:
            self._decide_dispatch(now, make)
        if all(r.status.is_terminal for r in self._tasks.values()):
            make(RunFinished(self._final_status(), now))
        return decisions

    def _decide_timeouts(self, now: float, make: _Make) -> None:
        for tid in self._order:
            record = self._tasks[tid]
            timeout = record.spec.timeout_secs
            attempt = record.current
            if (
                record.status.is_active
                and timeout is not None
                and attempt is not None
                and now >= attempt.dispatched_at + timeout
            ):
                make(TaskTimedOut(tid, attempt.number, now))

    def _decide_eligibility(self, now: float, make: _Make) -> None:
        for tid in self._order:
            record = self._tasks[tid]
            if record.status is TaskStatus.PENDING:
                verdict = self._trigger_verdict(record.spec)
                if verdict is None:
                    continue
                if isinstance(verdict, str):
                    make(TaskSkipped(tid, now, verdict))
                elif record.spec.level.needs_approval and not record.approved:
                    level = record.spec.level
                    deadline = None
                    if level.kind is LevelKind.RECOMMENDED and level.timeout_secs is not None:
                        deadline = now + level.timeout_secs
                    make(ApprovalRequested(tid, now, level.stakeholders, deadline))
                else:
                    record.status = TaskStatus.READY
            if (
                record.status is TaskStatus.AWAITING_APPROVAL
                and record.approval_deadline is not None
                and now >= record.approval_deadline
            ):
                self._apply_default_action(record, now, make)

    def _apply_default_action(self, record: TaskRecord, now: float, make: _Make) -> None:
        level = record.spec.level
        waited = f"no decision within {level.timeout_secs:g}s"
        match level.default_action:
            case DefaultAction.EXECUTE:
                make(TaskApproved(record.spec.id, now, by=None))
            case DefaultAction.SKIP:
                make(TaskSkipped(record.spec.id, now, f"{waited}; default action skip"))
            case DefaultAction.ABORT:
                make(TaskAborted(record.spec.id, now, f"{waited}; default action abort"))

    def _decide_dispatch(self, now: float, make: _Make) -> None:
        active = sum(1 for r in self._tasks.values() if r.status.is_active)
        for tid in self._order:
            if active >= self.max_workers:
                break
            record = self._tasks[tid]
            if record.status is TaskStatus.READY and record.not_before <= now:
                make(TaskDispatched(tid, len(record.attempts) + 1, now))
                active += 1

    def _trigger_verdict(self, task: TaskSpec) -> bool | str | None:
        """True: may run. A string: skip, for that reason. None: wait for more dependencies."""
        if not task.deps:
            return True
        statuses = {dep: self._tasks[dep].status for dep in task.deps}
        debt_ok = self.spec.policy is Policy.ALLOW_DEBT
        succeeded = [
            d
            for d, s in statuses.items()
            if s is TaskStatus.COMPLETED or (debt_ok and s.is_failure)
        ]
        failed = [d for d, s in statuses.items() if s.is_failure]
        not_ok = [d for d, s in statuses.items() if s.is_terminal and d not in succeeded]
        all_done = all(s.is_terminal for s in statuses.values())
        match task.trigger:
            case Trigger.ALL_SUCCESS:
                if not_ok:
                    return f"upstream {not_ok[0]} {statuses[not_ok[0]]}"
                return True if all_done else None
            case Trigger.ALL_DONE:
                return True if all_done else None
            case Trigger.ONE_FAILED:
                if failed:
                    return True
                return "no upstream task failed" if all_done else None
            case Trigger.ONE_SUCCESS:
                if succeeded:
                    return True
                return "no upstream task succeeded" if all_done else None
            case Trigger.NONE_FAILED:
                if failed:
                    return f"upstream {failed[0]} {statuses[failed[0]]}"
                return True if all_done else None

    def _final_status(self) -> RunStatus:
        if self._cancel_requested is not None:
            return RunStatus.CANCELLED
        if self._aborted:
            return RunStatus.FAILED
        statuses = [r.status for r in self._tasks.values()]
        match self.spec.policy:
            case Policy.FIRST_SUCCESS:
                won = any(self._tasks[t].status is TaskStatus.COMPLETED for t in self._sinks)
                return RunStatus.COMPLETED if won else RunStatus.FAILED
            case Policy.ALLOW_DEBT:
                return RunStatus.COMPLETED
            case Policy.ALL_SUCCESS:
                failed = any(s.is_failure for s in statuses)
                return RunStatus.FAILED if failed else RunStatus.COMPLETED

"""The run engine as it was before it became incremental: every ``decide`` walks every task.

Kept (bar the name) as the reference the incremental ``RunEngine`` must agree with, decision for
decision (tests/test_engine_equivalence.py), and given every feature the engine gained since in
the same plain style: conditions, fix-ups (handled failures), lost attempts of non-idempotent
tasks, rollback. It is quadratic in the run's size and is not used by cis_bot itself.
"""

from __future__ import annotations

import graphlib
import math
from collections.abc import Callable, Iterable, Mapping

from cis_bot.dag.engine import (
    ApprovalRequested,
    Attempt,
    Decision,
    Outcome,
    RollbackStarted,
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
    condition_value,
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
        waits = {t.id: spec.waits_for(t.id) for t in spec.tasks}
        for tid in graphlib.TopologicalSorter(waits).static_order():
            depth[tid] = 1 + max((depth[d] for d in waits[tid]), default=-1)
        position = {t.id: i for i, t in enumerate(spec.tasks)}
        # Topological, ties broken by file order, so one pass settles cascades of skips.
        self._order = sorted(depth, key=lambda tid: (depth[tid], position[tid]))
        # A fix-up is no sink; a task whose only dependent is its fix-up is one.
        has_dependents = {d for t in spec.tasks for d in t.deps if spec.task(d).on_failure != t.id}
        self._sinks = tuple(
            tid for tid in self._order if tid not in has_dependents and spec.fixes(tid) is None
        )

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
        return [
            tid
            for tid in self._order
            if self._tasks[tid].status.is_failure and self.handled_by(tid) is None
        ]

    def handled_by(self, task_id: str) -> str | None:
        fixer = self._tasks[task_id].spec.on_failure
        if (
            fixer is not None
            and self._tasks[task_id].status.is_failure
            and self._tasks[fixer].status is TaskStatus.COMPLETED
        ):
            return fixer
        return None

    def upstream_outputs(self, task_id: str) -> dict[str, str]:
        """Outputs of the task's finished dependencies, in dependency order."""
        outputs: dict[str, str] = {}
        for dep in self._tasks[task_id].spec.deps:
            if self._tasks[dep].status in (TaskStatus.COMPLETED, *_FAILURES):
                outputs[dep] = self._tasks[dep].output
                fixer = self.handled_by(dep)
                if fixer is not None and fixer != task_id:
                    outputs[fixer] = self._tasks[fixer].output
        return outputs

    def placement(self, task_id: str) -> str | None:
        record = self._tasks[task_id]
        if record.rollback is not None:
            return record.current.node if record.current else None
        owner = record.spec.reuse_agent
        if owner is not None:
            attempt = self._tasks[owner].current
            return attempt.node if attempt else None
        return None

    @property
    def rollback_plan(self) -> list[str]:
        if not all(r.status.is_terminal for r in self._tasks.values()):
            return []
        if self.spec.policy is not Policy.ALL_SUCCESS or self._final_status() not in (
            RunStatus.FAILED,
            RunStatus.CANCELLED,
        ):
            return []

        def finished_at(tid: str) -> float:
            attempt = self._tasks[tid].current
            if attempt is None or attempt.finished_at is None:
                return -math.inf
            return attempt.finished_at

        position = {tid: i for i, tid in enumerate(self._order)}
        done = [
            tid
            for tid in self._order
            if self._tasks[tid].status is TaskStatus.COMPLETED and self._tasks[tid].spec.rollback
        ]
        return sorted(done, key=lambda tid: (finished_at(tid), position[tid]), reverse=True)

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
                timeout = record.spec.timeout_secs
                attempt.error = "timed out" if timeout is None else f"timed out after {timeout:g}s"
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
            case RollbackStarted():
                if (
                    record.status is not TaskStatus.COMPLETED
                    or record.rollback is not None
                    or not record.spec.rollback
                ):
                    return False
                record.rollback = Attempt(number=event.attempt, dispatched_at=event.at)
                return True
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
        rollback = record.rollback
        if rollback is not None and rollback.number == event.attempt and rollback.outcome is None:
            if rollback.started_at is not None:
                return False
            rollback.started_at = event.at
            rollback.session_id = event.session_id
            rollback.node = event.node
            return True
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
        rollback = record.rollback
        if rollback is not None and rollback.number == event.attempt and rollback.outcome is None:
            rollback.finished_at = event.at
            rollback.outcome = event.outcome
            rollback.exit_code = event.exit_code
            rollback.error = event.error
            return True
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
        record.reason = error
        if lost and not record.spec.idempotent and not self._stopping:
            number = record.current.number if record.current else 0
            why = f" ({error})" if error else ""
            record.held = (
                f"attempt {number} was lost{why}; task {record.spec.id} is not idempotent and "
                "may have half-happened: approve it to run again"
            )
            record.reason = record.held
            record.status = TaskStatus.PENDING
        elif (lost or attempts_made < record.spec.max_attempts) and not self._stopping:
            backoff = self.spec.retry_backoff_secs * 2 ** (attempts_made - 1)
            record.status = TaskStatus.READY
            record.not_before = at if lost else at + min(backoff, MAX_RETRY_BACKOFF_SECS)
        else:
            record.status = status

    def _apply_approved(self, record: TaskRecord, event: TaskApproved) -> bool:
        if record.held is not None and record.status in (
            TaskStatus.PENDING,
            TaskStatus.AWAITING_APPROVAL,
        ):
            record.held = None
            if record.status is TaskStatus.AWAITING_APPROVAL:
                record.not_before = event.at
                record.status = TaskStatus.READY
            return True
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
        if all(r.status.is_terminal for r in self._tasks.values()) and not self._rolling_back(
            now, make
        ):
            make(RunFinished(self._final_status(), now))
        return decisions

    def _rolling_back(self, now: float, make: _Make) -> bool:
        for tid in self.rollback_plan:
            record = self._tasks[tid]
            if record.rollback is None:
                make(RollbackStarted(tid, len(record.attempts) + 1, now))
                return True
            if record.rollback.outcome is None:
                return True
            if record.rollback.outcome is not Outcome.COMPLETED:
                return False
        return False

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
            if record.status is TaskStatus.PENDING and record.held is not None:
                make(ApprovalRequested(tid, now, reason=record.held))
            elif record.status is TaskStatus.PENDING:
                verdict = self._trigger_verdict(record.spec)
                if verdict is None:
                    continue
                if verdict is True:
                    verdict = self._start_verdict(record.spec)
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

    def _start_verdict(self, task: TaskSpec) -> bool | str:
        fixed = self.spec.fixes(task.id)
        if fixed is not None and not self._tasks[fixed].status.is_failure:
            return f"{fixed} {self._tasks[fixed].status}: nothing to fix"
        if task.condition is not None:
            true, shown = task.condition.evaluate(
                lambda ref: condition_value(self._tasks[ref.task], ref.field)
            )
            if not true:
                return f"condition is false: {task.condition.source} ({shown})"
        return True

    def _seen_status(self, dep: str, task: TaskSpec) -> TaskStatus:
        """The dependency's status as ``task`` sees it: a failure whose fix-up (not ``task``)
        completed is a success; one whose fix-up has not finished is not finished."""
        status = self._tasks[dep].status
        fixer = self._tasks[dep].spec.on_failure
        if fixer is None or fixer == task.id or not status.is_failure:
            return status
        fixer_status = self._tasks[fixer].status
        if fixer_status is TaskStatus.COMPLETED:
            return TaskStatus.COMPLETED
        return TaskStatus.PENDING if not fixer_status.is_terminal else status

    def _trigger_verdict(self, task: TaskSpec) -> bool | str | None:
        """True: may run. A string: skip, for that reason. None: wait for more dependencies."""
        if not task.deps:
            return True
        statuses = {dep: self._seen_status(dep, task) for dep in task.deps}
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
                    return f"upstream {not_ok[0]} {self._tasks[not_ok[0]].status}"
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
                    return f"upstream {failed[0]} {self._tasks[failed[0]].status}"
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
                failed = any(
                    s.is_failure and self.handled_by(tid) is None
                    for tid, s in zip(self._tasks, statuses, strict=True)
                )
                return RunStatus.FAILED if failed else RunStatus.COMPLETED

"""The run engine: a pure state machine for one DAG run.

``state = fold(events)``; ``decide(now) -> decisions``. No I/O, no clock reads, no asyncio: the
caller feeds facts (a task started, finished, was approved; the run was cancelled) with the time
they happened, and asks what to do at a given time. Every decision is itself an event, folded into
the state as it is made, so a log of all events (the room, in Matrix modes) replays to the same
state and the same pending work — which is how a coordinator resumes after a crash.

Attempts fence results: each dispatch opens a new attempt number, and a result for any attempt but
the open one (a late answer from a timed-out or reassigned attempt) is recorded and ignored.

Semantics (see docs/dag-format.md for the user's view):
- Trigger rules decide whether a task whose dependencies have (partly) finished runs or is
  skipped. ``one_failed`` / ``one_success`` fire as soon as one dependency qualifies; the others
  wait until every dependency is terminal, except that ``all_success`` and ``none_failed`` skip
  early once a dependency has ruled them out.
- ``all_success``: the run completes only if no task failed; independent branches keep running
  after a failure so that ``cis dag resume`` has the least left to do.
- ``allow_debt``: a failure is a debt: dependents run as though it had succeeded (trigger
  ``all_success``), the run completes, and the report lists the debts.
- ``first_success``: the run completes as soon as a sink task (one nothing depends on) completes;
  everything still going is cancelled. It fails when no sink can complete any more.
- Retries: a failed or timed-out attempt is retried while attempts remain, after
  ``retry_backoff_secs * 2**(attempt-1)`` seconds (capped). A killed attempt is not retried.
  A lost attempt goes again at once, uncounted, unless the task is not ``idempotent``: then it
  waits for a person's approval, since it may have half-happened.
- ``condition``: once the trigger lets a task start, a false condition skips it (the reason
  quotes the condition and the values it read).
- ``on_failure``: the fix-up task runs only when its task failed; if it completes, the failure
  is handled: the failed task's other dependents see it as a success, and it counts against
  neither ``all_success`` nor as a debt. A fix-up task is no sink (``first_success``), and a
  handled failure is no sink's completion.
- Rollback: when an ``all_success`` run ends failed or cancelled, the ``rollback`` commands of
  its completed tasks run, newest completion first, one task at a time, before the run ends; the
  first rollback that fails stops the others (they may depend on what it did not undo).
"""

from __future__ import annotations

import graphlib
import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

import attrs

from cis_bot.dag.condition import Field, Ref, Value, status_for_condition
from cis_bot.dag.spec import (
    MAX_RETRY_BACKOFF_SECS,
    DagSpec,
    DefaultAction,
    LevelKind,
    Policy,
    TaskSpec,
    Trigger,
)


class TaskStatus(StrEnum):
    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    READY = "ready"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def is_active(self) -> bool:
        return self in (TaskStatus.DISPATCHED, TaskStatus.RUNNING)

    @property
    def is_failure(self) -> bool:
        return self in (TaskStatus.FAILED, TaskStatus.TIMEOUT)


_TERMINAL = frozenset(
    {
        TaskStatus.COMPLETED,
        TaskStatus.FAILED,
        TaskStatus.TIMEOUT,
        TaskStatus.SKIPPED,
        TaskStatus.CANCELLED,
    }
)
_ACTIVE = frozenset({TaskStatus.DISPATCHED, TaskStatus.RUNNING})
_FAILURE_SET = frozenset({TaskStatus.FAILED, TaskStatus.TIMEOUT})


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Outcome(StrEnum):
    """How an attempt ended, as the executor saw it."""

    COMPLETED = "completed"
    FAILED = "failed"
    #: The executor enforced the timeout itself (a worker may); same as the engine's own timeout.
    TIMEOUT = "timeout"
    #: Killed on a person's request: a failure that is not retried.
    KILLED = "killed"
    #: No result will ever come (its node stopped): dispatched again at once, and not counted
    #: against the task's retries.
    LOST = "lost"


# --- facts fed in by the caller ------------------------------------------------------------------


@attrs.frozen
class TaskStarted:
    task_id: str
    attempt: int
    at: float
    session_id: str | None = None
    node: str | None = None


@attrs.frozen
class TaskFinished:
    task_id: str
    attempt: int
    at: float
    outcome: Outcome
    exit_code: int | None = None
    output: str = ""
    error: str | None = None


@attrs.frozen
class TaskApproved:
    """A person (or, for ``recommended`` tasks, the expired countdown: ``by=None``) approved."""

    task_id: str
    at: float
    by: str | None = None


@attrs.frozen
class RunCancelled:
    at: float
    by: str | None = None


@attrs.frozen
class TaskCarried:
    """A resumed run keeps this task's result from an earlier run instead of running it."""

    task_id: str
    at: float
    output: str = ""
    from_run: str = ""


# --- decisions: events the engine makes itself ---------------------------------------------------


@attrs.frozen
class TaskDispatched:
    """Start attempt ``attempt`` of the task. The executor replies with TaskStarted/TaskFinished."""

    task_id: str
    attempt: int
    at: float


@attrs.frozen
class TaskTimedOut:
    """The open attempt ran past ``timeout_secs``: kill it (its late result will be ignored)."""

    task_id: str
    attempt: int
    at: float


@attrs.frozen
class TaskCancelled:
    """The task will not run (any more). ``attempt`` is set when an attempt is open: kill it."""

    task_id: str
    at: float
    attempt: int | None = None
    reason: str = "run cancelled"


@attrs.frozen
class TaskSkipped:
    task_id: str
    at: float
    reason: str


@attrs.frozen
class ApprovalRequested:
    """The task may run once approved; ``deadline`` is when a ``recommended`` task decides alone.
    ``reason`` says why a task that needs no approval by its level waits for one (its lost
    attempt may have half-happened)."""

    task_id: str
    at: float
    stakeholders: tuple[str, ...] = ()
    deadline: float | None = None
    reason: str | None = None


@attrs.frozen
class TaskAborted:
    """A ``recommended`` task's countdown ended with default action ``abort``: the run stops."""

    task_id: str
    at: float
    reason: str


@attrs.frozen
class RollbackStarted:
    """Run the task's rollback commands as attempt ``attempt`` (a number none of its attempts
    has). The executor replies with TaskStarted / TaskFinished for that attempt."""

    task_id: str
    attempt: int
    at: float


@attrs.frozen
class RunFinished:
    status: RunStatus
    at: float


Fact = TaskStarted | TaskFinished | TaskApproved | RunCancelled | TaskCarried
Decision = (
    TaskDispatched
    | TaskTimedOut
    | TaskCancelled
    | TaskSkipped
    | ApprovalRequested
    | TaskAborted
    | TaskApproved
    | RollbackStarted
    | RunFinished
)
RunEvent = Fact | Decision
_Make = Callable[[Decision], None]


@attrs.define
class Attempt:
    number: int
    dispatched_at: float
    started_at: float | None = None
    finished_at: float | None = None
    outcome: Outcome | None = None
    exit_code: int | None = None
    error: str | None = None
    session_id: str | None = None
    node: str | None = None

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return self.finished_at - (self.started_at or self.dispatched_at)


@attrs.define
class TaskRecord:
    spec: TaskSpec
    status: TaskStatus = TaskStatus.PENDING
    attempts: list[Attempt] = attrs.Factory(list)
    #: Earliest time a READY task may be dispatched (retry backoff).
    not_before: float = 0.0
    approved: bool = False
    #: Stakeholders who approved an ``arbitrated`` task so far.
    approvals: set[str] = attrs.Factory(set)
    approval_deadline: float | None = None
    output: str = ""
    #: Why the task ended as it did, for people: the skip reason, the error, the cancel reason.
    reason: str | None = None
    #: Why the task waits for a person before running again (a non-idempotent lost attempt).
    held: str | None = None
    #: Its rollback, once the run's rollback reached it.
    rollback: Attempt | None = None

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def exit_code(self) -> int | None:
        return self.current.exit_code if self.current else None


@attrs.define(eq=False, slots=True)
class _Node:
    """What the engine keeps beside a task's record to decide without walking the whole run."""

    #: Position in the engine's topological order (decisions are made in this order).
    index: int
    record: TaskRecord
    #: Indexes of the task's dependencies, each once, in the order the spec lists them.
    deps: tuple[int, ...]
    #: Indexes of the tasks that depend on this one.
    dependents: list[int] = attrs.Factory(list)
    sink: bool = False
    #: Its fix-up task (``on_failure``), and the task it is the fix-up of.
    fixer: int | None = None
    fixes: int | None = None
    #: Of ``deps``: how many are terminal, how many count as succeeded (completed, or failed
    #: under ``allow_debt``, or a failure its fix-up handled), how many failed or timed out. A
    #: failure whose fix-up has not finished counts as nothing yet, except to the fix-up.
    deps_terminal: int = 0
    deps_succeeded: int = 0
    deps_failed: int = 0
    #: In the dispatch heap (a READY task whose backoff has passed, waiting for a slot).
    queued: bool = False
    #: In the heap of tasks whose trigger rule may have something new to say.
    candidate: bool = False


_Class = tuple[int, int, int]
#: A failure whose fix-up has not finished: not done yet, for the failed task's dependents.
_AWAITING_FIX: _Class = (0, 0, 0)
#: A failure its fix-up handled: a success, for the failed task's dependents.
_HANDLED: _Class = (1, 1, 0)

#: (terminal, succeeded, failed) of a dependency in each status, with and without ``allow_debt``.
_DEP_CLASS = {
    debt: {
        status: (
            int(status in _TERMINAL),
            int(status is TaskStatus.COMPLETED or (debt and status in _FAILURE_SET)),
            int(status in _FAILURE_SET),
        )
        for status in TaskStatus
    }
    for debt in (False, True)
}


class RunEngine:
    """The run's state, with indexes kept up to date as events are folded, so that the work per
    event is proportional to what the event changes:

    - a heap of tasks whose trigger rule may have changed its verdict (a dependency's status
      changed, or the task was never looked at), with per-task counts of finished, succeeded
      and failed dependencies, so a verdict costs O(1);
    - a heap of READY tasks in dispatch order, and heaps of deadlines: retry backoffs, attempt
      timeouts, approval countdowns (entries that no longer apply are dropped when they surface);
    - counts of active, unfinished and failed tasks for capacity and the run's outcome.

    Decisions are the same, in the same order, as walking every task in topological order on
    every ``decide`` (the tests keep that algorithm as the reference and compare the two).
    """

    def __init__(self, spec: DagSpec, *, max_workers: int | None = None) -> None:
        self.spec = spec
        self.max_workers = max(1, max_workers or spec.max_workers or len(spec.tasks))
        self._tasks = {t.id: TaskRecord(spec=t) for t in spec.tasks}
        depth: dict[str, int] = {}
        waits = {t.id: spec.waits_for(t.id) for t in spec.tasks}
        for tid in graphlib.TopologicalSorter(waits).static_order():
            depth[tid] = 1 + max((depth[d] for d in waits[tid]), default=-1)
        position = {t.id: i for i, t in enumerate(spec.tasks)}
        # Topological, ties broken by file order: dependents always come after their
        # dependencies and the fix-ups of those, so one pass in this order settles cascades.
        self._order = sorted(depth, key=lambda tid: (depth[tid], position[tid]))
        self._position = {tid: i for i, tid in enumerate(self._order)}
        self._nodes = [
            _Node(
                i,
                self._tasks[tid],
                tuple(self._position[d] for d in dict.fromkeys(self._tasks[tid].spec.deps)),
            )
            for i, tid in enumerate(self._order)
        ]
        for node in self._nodes:
            for dep in node.deps:
                self._nodes[dep].dependents.append(node.index)
            fixer = node.record.spec.on_failure
            if fixer is not None:
                node.fixer = self._position[fixer]
                self._nodes[node.fixer].fixes = node.index
        for node in self._nodes:
            # A fix-up is no end of the pipeline, and the task it fixes ends it when it completes.
            node.sink = node.fixes is None and all(d == node.fixer for d in node.dependents)
        self._sinks = tuple(n.record.spec.id for n in self._nodes if n.sink)
        self._dep_class = _DEP_CLASS[spec.policy is Policy.ALLOW_DEBT]
        self._cancel_requested: RunCancelled | None = None
        self._aborted = False
        self._finished: RunFinished | None = None
        #: Results that arrived for an attempt that was no longer open (fencing).
        self.stale_results: list[TaskStarted | TaskFinished] = []
        self._active = 0
        self._unfinished = len(self._nodes)
        self._failures = 0
        #: Failed tasks whose fix-up completed (they count against neither policy).
        self._handled = 0
        #: The first sink (in order) that completed, under ``first_success``.
        self._winner: int | None = None
        self._sinks_completed = 0
        # Every task starts as a candidate: roots are ready, and the rest wait for their deps.
        self._candidates = list(range(len(self._nodes)))
        for node in self._nodes:
            node.candidate = True
        #: READY tasks by (not_before, index); moved to ``_queue`` once their time has come.
        self._backoff: list[tuple[float, int]] = []
        #: Indexes of READY tasks whose backoff has passed, dispatched lowest first.
        self._queue: list[int] = []
        #: The latest ``now`` at which backoffs were moved to ``_queue``.
        self._moved_until = -math.inf
        #: (deadline, index, sequence, attempt) of open attempts that have a timeout.
        self._timeouts: list[tuple[float, int, int, Attempt]] = []
        self._opened = 0
        #: (deadline, index) of tasks awaiting approval with a countdown.
        self._countdowns: list[tuple[float, int]] = []

    @classmethod
    def replay(
        cls, spec: DagSpec, events: Iterable[RunEvent], *, max_workers: int | None = None
    ) -> RunEngine:
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
        if self.spec.policy is not Policy.ALLOW_DEBT or self._failures == self._handled:
            return []
        return [
            n.record.spec.id
            for n in self._nodes
            if n.record.status in _FAILURE_SET and not self._is_handled(n)
        ]

    def handled_by(self, task_id: str) -> str | None:
        """The fix-up task that handled this task's failure, if one did."""
        node = self._nodes[self._position[task_id]]
        return (
            self._order[node.fixer] if node.fixer is not None and self._is_handled(node) else None
        )

    def upstream_outputs(self, task_id: str) -> dict[str, str]:
        """Outputs of the task's finished dependencies, in dependency order; a failure that its
        fix-up handled brings the fix-up's output too."""
        outputs: dict[str, str] = {}
        for dep in self._tasks[task_id].spec.deps:
            record = self._tasks[dep]
            if record.status in (TaskStatus.COMPLETED, *_FAILURES):
                outputs[dep] = record.output
                fixer = self.handled_by(dep)
                if fixer is not None and fixer != task_id:
                    outputs[fixer] = self._tasks[fixer].output
        return outputs

    def placement(self, task_id: str) -> str | None:
        """The node a dispatch of the task must go to (None: any node that runs its agent):
        its rollback goes where it ran; a task continuing another's agent goes to the node that
        holds that agent."""
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
        """The tasks the run's rollback undoes, in order: once every task has ended, when an
        ``all_success`` run failed or was cancelled, its completed tasks that have rollback
        commands, newest completion first (empty otherwise)."""
        if self._unfinished or self.spec.policy is not Policy.ALL_SUCCESS:
            return []
        if self._final_status() not in (RunStatus.FAILED, RunStatus.CANCELLED):
            return []
        undoable = [
            n
            for n in self._nodes
            if n.record.status is TaskStatus.COMPLETED and n.record.spec.rollback
        ]
        undoable.sort(key=lambda n: (_finished_at(n.record), n.index), reverse=True)
        return [n.record.spec.id for n in undoable]

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time after ``now`` at which ``decide`` would act without any new event."""
        times = [
            _earliest_after(self._backoff, now, self._backoff_due),
            _earliest_after(self._timeouts, now, self._timeout_due),
            _earliest_after(self._countdowns, now, self._countdown_due),
        ]
        if now < self._moved_until:
            # The clock went back: tasks already queued for dispatch may be in backoff again.
            times.extend(
                record.not_before
                for i in self._queue
                if (record := self._nodes[i].record).status is TaskStatus.READY
                and record.not_before > now
            )
        return min((t for t in times if t is not None), default=None)

    def _backoff_due(self, entry: tuple[float, int]) -> bool:
        record = self._nodes[entry[1]].record
        return record.status is TaskStatus.READY and record.not_before == entry[0]

    def _timeout_due(self, entry: tuple[float, int, int, Attempt]) -> bool:
        record = self._nodes[entry[1]].record
        return record.status in _ACTIVE and record.current is entry[3]

    def _countdown_due(self, entry: tuple[float, int]) -> bool:
        record = self._nodes[entry[1]].record
        return (
            record.status is TaskStatus.AWAITING_APPROVAL and record.approval_deadline == entry[0]
        )

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
                if record.status in _TERMINAL or record.status in _ACTIVE:
                    return False
                opened = Attempt(number=event.attempt, dispatched_at=event.at)
                record.attempts.append(opened)
                self._set(record, TaskStatus.DISPATCHED)
                if record.spec.timeout_secs is not None:
                    deadline = opened.dispatched_at + record.spec.timeout_secs
                    self._opened += 1  # ties between attempts of one task go by age
                    entry = (deadline, self._index(record), self._opened, opened)
                    heapq.heappush(self._timeouts, entry)
                return True
            case TaskTimedOut():
                attempt = record.current
                if (
                    record.status not in _ACTIVE
                    or attempt is None
                    or attempt.number != event.attempt
                ):
                    return False
                attempt.finished_at = event.at
                attempt.outcome = Outcome.TIMEOUT
                attempt.error = _timed_out(record.spec.timeout_secs)
                self._conclude_failure(record, TaskStatus.TIMEOUT, event.at, attempt.error)
                return True
            case TaskCancelled():
                if record.status in _TERMINAL:
                    return False
                if record.status in _ACTIVE and (attempt := record.current) is not None:
                    attempt.finished_at = event.at
                    attempt.error = event.reason
                self._set(record, TaskStatus.CANCELLED)
                record.reason = event.reason
                return True
            case TaskSkipped():
                if record.status in _TERMINAL or record.status in _ACTIVE:
                    return False
                self._set(record, TaskStatus.SKIPPED)
                record.reason = event.reason
                return True
            case ApprovalRequested():
                if record.status is not TaskStatus.PENDING:
                    return False
                record.approval_deadline = event.deadline
                self._set(record, TaskStatus.AWAITING_APPROVAL)
                if event.deadline is not None:
                    heapq.heappush(self._countdowns, (event.deadline, self._index(record)))
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
                self._set(record, TaskStatus.COMPLETED)
                record.output = event.output
                record.reason = f"carried over from run {event.from_run}"
                return True
            case TaskAborted():
                if record.status in _TERMINAL or record.status in _ACTIVE:
                    return False
                self._set(record, TaskStatus.FAILED)
                record.reason = event.reason
                self._aborted = True
                return True

    def _index(self, record: TaskRecord) -> int:
        return self._position[record.spec.id]

    def _set(self, record: TaskRecord, status: TaskStatus) -> None:
        """Change a task's status, keeping every index in step with it."""
        old = record.status
        if old is status:
            return
        node = self._nodes[self._index(record)]
        before = self._effective(node)
        record.status = status
        if old in _ACTIVE:
            self._active -= 1
        if status in _ACTIVE:
            self._active += 1
        if old in _FAILURE_SET:
            self._failures -= 1
        if status in _FAILURE_SET:
            self._failures += 1
        if status in _TERMINAL and old not in _TERMINAL:  # terminal statuses are final
            self._unfinished -= 1
        if status is TaskStatus.READY:
            heapq.heappush(self._backoff, (record.not_before, node.index))
        elif status is TaskStatus.COMPLETED and node.sink:
            self._sinks_completed += 1
            if self.spec.policy is Policy.FIRST_SUCCESS and (
                self._winner is None or node.index < self._winner
            ):
                self._winner = node.index
        raw_before, raw_after = self._dep_class[old], self._dep_class[status]
        after = self._effective(node)
        for i in node.dependents:
            if i == node.fixer:
                self._count(i, raw_before, raw_after)
            else:
                self._count(i, before, after)
        if node.fixes is not None:  # a fix-up moved: the failure it is there for may be handled
            fixed = self._nodes[node.fixes]
            record.status = old
            fixed_before, was_handled = self._effective(fixed), self._is_handled(fixed)
            record.status = status
            fixed_after = self._effective(fixed)
            self._handled += self._is_handled(fixed) - was_handled
            for i in fixed.dependents:
                if i != node.index:
                    self._count(i, fixed_before, fixed_after)
        if node.fixer is not None:
            self._handled += self._is_handled(node) - (
                old in _FAILURE_SET
                and self._nodes[node.fixer].record.status is TaskStatus.COMPLETED
            )

    def _is_handled(self, node: _Node) -> bool:
        return (
            node.fixer is not None
            and node.record.status in _FAILURE_SET
            and self._nodes[node.fixer].record.status is TaskStatus.COMPLETED
        )

    def _effective(self, node: _Node) -> _Class:
        """The task's class as its dependents (but its fix-up) see it."""
        status = node.record.status
        if node.fixer is not None and status in _FAILURE_SET:
            fixer = self._nodes[node.fixer].record.status
            if fixer is TaskStatus.COMPLETED:
                return _HANDLED
            if fixer not in _TERMINAL:
                return _AWAITING_FIX
        return self._dep_class[status]

    def _seen_by(self, dep: _Node, node: _Node) -> _Class:
        """The dependency's class as ``node`` sees it."""
        return (
            self._dep_class[dep.record.status] if dep.fixer == node.index else self._effective(dep)
        )

    def _count(self, index: int, before: _Class, after: _Class) -> None:
        if before == after:
            return
        terminal, succeeded, failed = (a - b for a, b in zip(after, before, strict=True))
        dependent = self._nodes[index]
        dependent.deps_terminal += terminal
        dependent.deps_succeeded += succeeded
        dependent.deps_failed += failed
        self._wake(dependent)

    def _wake(self, node: _Node) -> None:
        if node.record.status is TaskStatus.PENDING and not node.candidate:
            node.candidate = True
            heapq.heappush(self._candidates, node.index)

    def _apply_started(self, record: TaskRecord, event: TaskStarted) -> bool:
        rollback = _open_rollback(record, event.attempt)
        if rollback is not None:
            if rollback.started_at is not None:
                return False
            rollback.started_at = event.at
            rollback.session_id = event.session_id
            rollback.node = event.node
            return True
        attempt = record.current
        if record.status not in _ACTIVE or attempt is None or attempt.number != event.attempt:
            self.stale_results.append(event)
            return False
        if record.status is TaskStatus.RUNNING:
            return False
        attempt.started_at = event.at
        attempt.session_id = event.session_id
        attempt.node = event.node
        self._set(record, TaskStatus.RUNNING)
        return True

    def _apply_finished(self, record: TaskRecord, event: TaskFinished) -> bool:
        rollback = _open_rollback(record, event.attempt)
        if rollback is not None:
            rollback.finished_at = event.at
            rollback.outcome = event.outcome
            rollback.exit_code = event.exit_code
            rollback.error = event.error
            return True
        attempt = record.current
        if record.status not in _ACTIVE or attempt is None or attempt.number != event.attempt:
            self.stale_results.append(event)
            return False
        attempt.finished_at = event.at
        attempt.outcome = event.outcome
        attempt.exit_code = event.exit_code
        attempt.error = event.error
        record.output = event.output
        if event.outcome is Outcome.COMPLETED:
            record.reason = None
            self._set(record, TaskStatus.COMPLETED)
        elif event.outcome is Outcome.KILLED:
            record.reason = event.error or "killed"
            self._set(record, TaskStatus.FAILED)
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
            record.held = _held_reason(record, error)
            record.reason = record.held
            self._set(record, TaskStatus.PENDING)
            self._wake(self._nodes[self._index(record)])
        elif (lost or attempts_made < record.spec.max_attempts) and not self._stopping:
            backoff = self.spec.retry_backoff_secs * 2 ** (attempts_made - 1)
            record.not_before = at if lost else at + min(backoff, MAX_RETRY_BACKOFF_SECS)
            self._set(record, TaskStatus.READY)
        else:
            self._set(record, status)

    def _apply_approved(self, record: TaskRecord, event: TaskApproved) -> bool:
        if record.held is not None and record.status in (
            TaskStatus.PENDING,
            TaskStatus.AWAITING_APPROVAL,
        ):
            # Anyone the coordinator trusts may let a lost attempt run again.
            record.held = None
            if record.status is TaskStatus.AWAITING_APPROVAL:
                record.not_before = event.at
                self._set(record, TaskStatus.READY)
            else:
                self._wake(self._nodes[self._index(record)])
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
            self._set(record, TaskStatus.READY)
        return True

    @property
    def _first_success_winner(self) -> str | None:
        return None if self._winner is None else self._order[self._winner]

    @property
    def _stopping(self) -> bool:
        return self._cancel_requested is not None or self._aborted or self._winner is not None

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
            # Once per run: everything left ends here, and the run with it.
            for node in self._nodes:
                record = node.record
                if record.status not in _TERMINAL:
                    open_attempt = record.current if record.status in _ACTIVE else None
                    number = open_attempt.number if open_attempt else None
                    make(TaskCancelled(record.spec.id, now, attempt=number, reason=reason))
        else:
            self._decide_dispatch(now, make)
        if not self._unfinished and not self._rolling_back(now, make):
            make(RunFinished(self._final_status(), now))
        return decisions

    def _rolling_back(self, now: float, make: _Make) -> bool:
        """Once every task has ended: undo the completed tasks of a failed or cancelled
        ``all_success`` run, one at a time. True while that is under way."""
        for task_id in self.rollback_plan:
            record = self._tasks[task_id]
            rollback = record.rollback
            if rollback is None:
                make(RollbackStarted(task_id, len(record.attempts) + 1, now))
                return True
            if rollback.outcome is None:
                return True
            if rollback.outcome is not Outcome.COMPLETED:
                return False  # what is left may depend on what this one did not undo
        return False

    def _decide_timeouts(self, now: float, make: _Make) -> None:
        expired: list[tuple[int, Attempt]] = []
        while self._timeouts and self._timeouts[0][0] <= now:
            entry = heapq.heappop(self._timeouts)
            if self._timeout_due(entry):
                expired.append((entry[1], entry[3]))
        expired.sort(key=lambda e: e[0])
        for i, attempt in expired:
            make(TaskTimedOut(self._order[i], attempt.number, now))

    def _decide_eligibility(self, now: float, make: _Make) -> None:
        """The trigger rules of tasks whose dependencies moved, and the countdowns that ran
        out, in topological order (what becomes terminal here feeds later tasks at once)."""
        candidates = self._candidates
        expired: list[tuple[float, int]] = []
        while self._countdowns and self._countdowns[0][0] <= now:
            entry = heapq.heappop(self._countdowns)
            if self._countdown_due(entry):
                expired.append(entry)
                node = self._nodes[entry[1]]
                if not node.candidate:
                    node.candidate = True
                    heapq.heappush(candidates, node.index)
        while candidates:
            node = self._nodes[heapq.heappop(candidates)]
            node.candidate = False
            record = node.record
            if record.status is TaskStatus.PENDING and record.held is not None:
                make(ApprovalRequested(record.spec.id, now, reason=record.held))
            elif record.status is TaskStatus.PENDING:
                verdict = self._trigger_verdict(node)
                if verdict is None:
                    continue
                if verdict is True:
                    verdict = self._start_verdict(node)
                if isinstance(verdict, str):
                    make(TaskSkipped(record.spec.id, now, verdict))
                elif record.spec.level.needs_approval and not record.approved:
                    level = record.spec.level
                    deadline = None
                    if level.kind is LevelKind.RECOMMENDED and level.timeout_secs is not None:
                        deadline = now + level.timeout_secs
                    make(ApprovalRequested(record.spec.id, now, level.stakeholders, deadline))
                else:
                    self._set(record, TaskStatus.READY)
            if (
                record.status is TaskStatus.AWAITING_APPROVAL
                and record.approval_deadline is not None
                and now >= record.approval_deadline
            ):
                self._apply_default_action(record, now, make)
        for entry in expired:  # a countdown whose default action did not take is due again
            if self._countdown_due(entry):
                heapq.heappush(self._countdowns, entry)

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
        queue = self._queue
        while self._backoff and self._backoff[0][0] <= now:
            entry = heapq.heappop(self._backoff)
            node = self._nodes[entry[1]]
            if self._backoff_due(entry) and not node.queued:
                node.queued = True
                heapq.heappush(queue, node.index)
        self._moved_until = max(self._moved_until, now)
        while queue and self._active < self.max_workers:
            node = self._nodes[heapq.heappop(queue)]
            node.queued = False
            record = node.record
            if record.status is not TaskStatus.READY:
                continue
            if record.not_before > now:  # the clock went back: wait for the backoff again
                heapq.heappush(self._backoff, (record.not_before, node.index))
                continue
            make(TaskDispatched(record.spec.id, len(record.attempts) + 1, now))

    def _start_verdict(self, node: _Node) -> bool | str:
        """Once the trigger lets a task start: a fix-up whose task did not fail, and a task
        whose condition is false, are skipped (the reason says why)."""
        spec = node.record.spec
        if node.fixes is not None:
            fixed = self._nodes[node.fixes].record
            if fixed.status not in _FAILURE_SET:
                return f"{fixed.spec.id} {fixed.status}: nothing to fix"
        if spec.condition is not None:
            true, shown = spec.condition.evaluate(self._read)
            if not true:
                return f"condition is false: {spec.condition.source} ({shown})"
        return True

    def _read(self, ref: Ref) -> Value:
        return condition_value(self._tasks[ref.task], ref.field)

    def _trigger_verdict(self, node: _Node) -> bool | str | None:
        """True: may run. A string: skip, for that reason. None: wait for more dependencies."""
        if not node.deps:
            return True
        all_done = node.deps_terminal == len(node.deps)
        match node.record.spec.trigger:
            case Trigger.ALL_SUCCESS:
                if node.deps_terminal > node.deps_succeeded:
                    dep = self._first_dep(node, lambda c: bool(c[0] and not c[1]))
                    return f"upstream {dep.spec.id} {dep.status}"
                return True if all_done else None
            case Trigger.ALL_DONE:
                return True if all_done else None
            case Trigger.ONE_FAILED:
                if node.deps_failed:
                    return True
                return "no upstream task failed" if all_done else None
            case Trigger.ONE_SUCCESS:
                if node.deps_succeeded:
                    return True
                return "no upstream task succeeded" if all_done else None
            case Trigger.NONE_FAILED:
                if node.deps_failed:
                    dep = self._first_dep(node, lambda c: bool(c[2]))
                    return f"upstream {dep.spec.id} {dep.status}"
                return True if all_done else None

    def _first_dep(self, node: _Node, matches: Callable[[_Class], bool]) -> TaskRecord:
        """The first dependency whose class, as the task sees it, matches."""
        return next(
            self._nodes[i].record for i in node.deps if matches(self._seen_by(self._nodes[i], node))
        )

    def _final_status(self) -> RunStatus:
        if self._cancel_requested is not None:
            return RunStatus.CANCELLED
        if self._aborted:
            return RunStatus.FAILED
        match self.spec.policy:
            case Policy.FIRST_SUCCESS:
                return RunStatus.COMPLETED if self._sinks_completed else RunStatus.FAILED
            case Policy.ALLOW_DEBT:
                return RunStatus.COMPLETED
            case Policy.ALL_SUCCESS:
                return RunStatus.FAILED if self._failures > self._handled else RunStatus.COMPLETED


_Entry = TypeVar("_Entry", bound=tuple[Any, ...])


def _earliest_after(heap: list[_Entry], now: float, due: Callable[[_Entry], bool]) -> float | None:
    """The earliest time after ``now`` among a lazily pruned heap's entries that still apply.
    Entries that no longer apply are dropped from the top; a still-due entry at or before
    ``now`` (one ``decide(now)`` has not taken yet) means looking further down."""
    while heap and not due(heap[0]):
        heapq.heappop(heap)
    if not heap:
        return None
    first: float = heap[0][0]
    if first > now:
        return first
    return min((e[0] for e in heap if e[0] > now and due(e)), default=None)


_FAILURES = (TaskStatus.FAILED, TaskStatus.TIMEOUT)
_FAILED_OUTCOMES = frozenset({Outcome.FAILED, Outcome.TIMEOUT, Outcome.KILLED})


def condition_value(record: TaskRecord, field: Field) -> Value:
    """What ``task.field`` reads in a condition (``dag/condition.py``)."""
    match field:
        case Field.STATUS:
            return status_for_condition(str(record.status))
        case Field.EXIT_CODE:
            code = record.exit_code
            return None if code is None else float(code)
        case Field.ATTEMPTS:
            return float(len(record.attempts))
        case Field.FAIL_COUNT:
            return float(sum(1 for a in record.attempts if a.outcome in _FAILED_OUTCOMES))
        case Field.OUTPUT:
            return record.output.strip()


def _held_reason(record: TaskRecord, error: str | None) -> str:
    attempt = record.current.number if record.current else 0
    why = f" ({error})" if error else ""
    return (
        f"attempt {attempt} was lost{why}; task {record.spec.id} is not idempotent and may have "
        "half-happened: approve it to run again"
    )


def _open_rollback(record: TaskRecord, attempt: int) -> Attempt | None:
    """The task's rollback, when ``attempt`` is its number and it has not ended."""
    rollback = record.rollback
    if rollback is None or rollback.number != attempt or rollback.outcome is not None:
        return None
    return rollback


def _finished_at(record: TaskRecord) -> float:
    """When the task completed (a task carried over from an earlier run: before them all)."""
    attempt = record.current
    if attempt is None or attempt.finished_at is None:
        return -math.inf
    return attempt.finished_at


def _timed_out(timeout: float | None) -> str:
    # A log may hold a timeout for a task that has none (from a coordinator with another spec).
    return "timed out" if timeout is None else f"timed out after {timeout:g}s"

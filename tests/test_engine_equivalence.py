"""The incremental RunEngine against the reference (the algorithm that walks every task on every
``decide``, kept in tests/support/reference_engine.py): randomly generated DAGs, driven through
random outcomes, clocks, approvals, cancellations, stale results and replayed log events, must
get exactly the same decisions, the same answers to every event and query, and the same state.
The DAGs use every key the engine reads: conditions over the deps' fields, fix-up tasks
(``on_failure``), rollback commands (rollbacks succeed, fail or are lost), tasks that are not
idempotent (their lost attempts wait for an approval).

Hypothesis draws the shape of each run (size, policy, how often each thing happens, the seed);
the run itself is generated from the seed, so that DAGs of thousands of tasks stay cheap to
draw and a failure still shrinks to a small, reproducible case.
"""

from __future__ import annotations

import graphlib
import random
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cis_bot.dag.condition import Condition, parse_condition
from cis_bot.dag.engine import (
    ApprovalRequested,
    Decision,
    Outcome,
    RollbackStarted,
    RunCancelled,
    RunEngine,
    RunEvent,
    TaskAborted,
    TaskApproved,
    TaskCancelled,
    TaskCarried,
    TaskDispatched,
    TaskFinished,
    TaskSkipped,
    TaskStarted,
    TaskStatus,
    TaskTimedOut,
)
from cis_bot.dag.spec import (
    DagSpec,
    DefaultAction,
    Level,
    LevelKind,
    Policy,
    TaskSpec,
    Trigger,
)
from tests.support.reference_engine import ReferenceEngine

STAKEHOLDERS = ("@a:x", "@b:x", "@c:x")
APPROVERS = (*STAKEHOLDERS, "@mallory:x", None)


@attrs.frozen
class Shape:
    """What hypothesis draws: the run's size and temperament; the rest comes from ``seed``."""

    seed: int
    tasks: int
    policy: Policy
    max_workers: int
    #: Probabilities (per task) of each feature, and (per step) of each kind of event.
    deps: float
    retry: float
    timeout: float
    approval: float
    fail: float
    carried: float
    stray: float
    cancel: float
    backoff: float
    fixup: float
    condition: float
    rollback: float
    fragile: float
    lost: float


def shapes(
    low: int,
    high: int,
    *,
    workers: tuple[int, ...],
    fail: st.SearchStrategy[float],
    approval: st.SearchStrategy[float],
    rare: st.SearchStrategy[float],
) -> st.SearchStrategy[Shape]:
    """Shapes of runs of ``low`` to ``high`` tasks. Large runs need rare failures and approvals:
    one countdown that aborts, or one early failure under ``all_success``, ends them at once."""
    p = st.floats(0, 1)
    return st.builds(
        Shape,
        seed=st.integers(0, 2**32),
        tasks=st.integers(low, high),
        policy=st.sampled_from(Policy),
        max_workers=st.sampled_from(workers),
        deps=p,
        retry=p,
        timeout=p,
        approval=approval,
        fail=fail,
        carried=rare,
        stray=rare,
        cancel=st.sampled_from([0.0, 0.0, 0.0005, 0.005]),
        backoff=st.sampled_from([0.0, 0.5, 1.0]),
        fixup=p,
        condition=p,
        rollback=p,
        fragile=p,
        lost=st.sampled_from([0.0, 0.02, 0.1]),
    )


def make_spec(shape: Shape, rng: random.Random) -> DagSpec:
    """Dependencies point at earlier tasks of a hidden topological order; the file order is
    shuffled, so the engine's own order (depth, then file position) has work to do."""
    ids = [f"t{i}" for i in range(shape.tasks)]
    tasks = []
    #: fix-up -> the task it fixes (an earlier task that has no fix-up yet)
    fixes: dict[str, str] = {}

    for i, tid in enumerate(ids):
        deps: list[str] = []
        if i and rng.random() < shape.deps:
            window = ids[max(0, i - rng.choice([2, 10, 200])) : i]
            deps = rng.sample(window, min(len(window), rng.choice([1, 1, 2, 3, 6])))
        trigger = rng.choice(list(Trigger)) if rng.random() < 0.3 else Trigger.ALL_SUCCESS
        free = [t for t in ids[max(0, i - 10) : i] if t not in fixes.values()]
        if free and rng.random() < shape.fixup * 0.3:
            fixed = rng.choice(free)
            fixes[tid] = fixed
            deps = list(dict.fromkeys([*deps, fixed]))
            trigger = rng.choice([Trigger.ALL_DONE, Trigger.ALL_DONE, Trigger.ONE_FAILED])
        tasks.append(
            TaskSpec(
                id=tid,
                agent="shell",
                prompt="true",
                deps=tuple(deps),
                retry=rng.choice([1, 2, 5]) if rng.random() < shape.retry else 0,
                timeout_secs=rng.choice([0.5, 1.0, 3.0]) if rng.random() < shape.timeout else None,
                level=make_level(shape, rng),
                trigger=trigger,
                condition=make_condition(deps, rng) if rng.random() < shape.condition else None,
                rollback=("undo",) if rng.random() < shape.rollback else (),
                idempotent=rng.random() >= shape.fragile * 0.5,
            )
        )
    drop_waiting_fixups(tasks, fixes)
    on_failure = {fixed: fixer for fixer, fixed in fixes.items()}
    tasks = [attrs.evolve(t, on_failure=on_failure.get(t.id)) for t in tasks]
    rng.shuffle(tasks)
    return DagSpec(
        name="equivalence",
        tasks=tuple(tasks),
        policy=shape.policy,
        max_workers=shape.max_workers,
        retry_backoff_secs=shape.backoff,
    )


def drop_waiting_fixups(tasks: list[TaskSpec], fixes: dict[str, str]) -> None:
    """A failed task's dependents wait for its fix-up, so a fix-up that depends on one of them
    waits for itself (the loader refuses such DAGs): drop such fix-ups until none is left."""
    deps = {t.id: t.deps for t in tasks}
    while True:
        fixer_of = {fixed: fixer for fixer, fixed in fixes.items()}
        waits = {
            tid: (*ds, *(f for d in ds if (f := fixer_of.get(d)) is not None and f != tid))
            for tid, ds in deps.items()
        }
        try:
            graphlib.TopologicalSorter(waits).prepare()
            return
        except graphlib.CycleError as exc:
            del fixes[next(t for t in exc.args[1] if t in fixes)]


def make_condition(deps: list[str], rng: random.Random) -> Condition | None:
    """A condition over the task's deps, as a DAG could write it."""
    if not deps:
        return None

    def comparison() -> str:
        dep = rng.choice(deps)
        return rng.choice(
            [
                f"{dep}.status == 'failed'",
                f"{dep}.status != 'completed'",
                f"{dep}.status == 'completed'",
                f"{dep}.exit_code == 0",
                f"{dep}.exit_code != 1",
                f"{dep}.attempts > 1",
                f"{dep}.fail_count >= 1",
                f"{dep}.output == 'o-{dep}-1'",
            ]
        )

    text = comparison()
    for _ in range(rng.choice([0, 0, 1, 2])):
        negate = "not " if rng.random() < 0.3 else ""
        text = f"{text} {rng.choice(['and', 'or'])} {negate}({comparison()})"
    return parse_condition(f"if {text}" if rng.random() < 0.5 else text, deps=deps)


def make_level(shape: Shape, rng: random.Random) -> Level:
    if rng.random() >= shape.approval:
        return Level()
    kind = rng.choice([LevelKind.RECOMMENDED, LevelKind.CONFIRMED, LevelKind.ARBITRATED])
    if kind is LevelKind.RECOMMENDED:
        return Level(
            kind,
            timeout_secs=rng.choice([0.0, 0.5, 2.0]),
            default_action=rng.choice(list(DefaultAction)),
        )
    if kind is LevelKind.ARBITRATED:
        return Level(kind, stakeholders=tuple(rng.sample(STAKEHOLDERS, rng.randint(0, 2))))
    return Level(kind)


class Twins:
    """The reference and the incremental engine fed the same events; every answer compared."""

    def __init__(self, spec: DagSpec) -> None:
        self.spec = spec
        self.reference = ReferenceEngine(spec)
        self.engine = RunEngine(spec)
        self.log: list[RunEvent] = []
        self.decisions = 0

    def apply(self, event: RunEvent) -> bool:
        expected = self.reference.apply(event)
        assert self.engine.apply(event) == expected, event
        self.log.append(event)
        return expected

    def decide(self, now: float) -> list[Decision]:
        expected = self.reference.decide(now)
        assert self.engine.decide(now) == expected, now
        self.log.extend(expected)
        self.decisions += len(expected)
        return expected

    def next_wakeup(self, now: float) -> float | None:
        expected = self.reference.next_wakeup(now)
        assert self.engine.next_wakeup(now) == expected, now
        return expected

    def check_state(self) -> None:
        assert snapshot(self.engine) == snapshot(self.reference)


def snapshot(engine: RunEngine | ReferenceEngine) -> dict[str, Any]:
    return {
        "status": engine.status,
        "finished": engine.finished,
        "debts": engine.debts,
        "stale": list(engine.stale_results),
        "tasks": {
            tid: (
                r.status,
                r.attempts,
                r.not_before,
                r.approved,
                r.approvals,
                r.approval_deadline,
                r.output,
                r.reason,
                r.held,
                r.rollback,
                engine.handled_by(tid),
                engine.placement(tid),
            )
            for tid, r in engine.tasks.items()
        },
        "upstream": {tid: engine.upstream_outputs(tid) for tid in engine.tasks},
        "rollback": engine.rollback_plan,
    }


def run(shape: Shape, *, check_every: int, burst: int) -> Twins:
    """Drive both engines to the run's end; each step ends up to ``burst`` attempts."""
    rng = random.Random(shape.seed)
    spec = make_spec(shape, rng)
    twins = Twins(spec)
    ids = [t.id for t in spec.tasks]
    needing_approval = [t.id for t in spec.tasks if t.level.needs_approval]
    records = twins.reference.tasks
    #: Tasks with an open attempt, in a stable order (a set's order would vary between runs).
    active: dict[str, None] = {}
    #: Tasks whose rollback is under way.
    rolling: dict[str, None] = {}

    def apply(event: RunEvent) -> None:
        twins.apply(event)
        note(getattr(event, "task_id", None))

    def note(tid: str | None) -> None:
        if tid is None:
            return
        if records[tid].status.is_active:
            active[tid] = None
        else:
            active.pop(tid, None)
        rollback = records[tid].rollback
        if rollback is not None and rollback.outcome is None:
            rolling[tid] = None
        else:
            rolling.pop(tid, None)

    now = 1000.0
    for tid in ids:  # a resumed run: some tasks carried over before anything is decided
        if rng.random() < shape.carried:
            apply(TaskCarried(tid, now, output=f"kept-{tid}", from_run="r0"))
    for step in range(20 * len(ids) + 100):
        for decision in twins.decide(now):
            note(getattr(decision, "task_id", None))
        wakeup = twins.next_wakeup(now)
        if twins.engine.finished:
            break
        if step % 4 == 0:
            twins.next_wakeup(now + rng.choice([-1.0, 0.25, 5.0]))
        if step % check_every == 0:
            twins.check_state()
        for tid in rng.sample(list(active), min(len(active), rng.randint(0, burst))):
            record = records[tid]
            attempt = record.current
            assert attempt is not None
            if record.status is TaskStatus.DISPATCHED and rng.random() < 0.7:
                apply(TaskStarted(tid, attempt.number, now, session_id=f"s-{tid}"))
            if rng.random() < 0.8:
                apply(finished(tid, attempt.number, now, shape, rng))
        for tid in list(rolling):
            rollback = records[tid].rollback
            assert rollback is not None
            if rollback.started_at is None and rng.random() < 0.7:
                apply(TaskStarted(tid, rollback.number, now, session_id=f"r-{tid}"))
            if rng.random() < 0.6:
                outcome = rng.choice([Outcome.COMPLETED] * 4 + [Outcome.FAILED, Outcome.LOST])
                apply(TaskFinished(tid, rollback.number, now, outcome, exit_code=0))
        if needing_approval and rng.random() < shape.approval:
            for tid in rng.sample(needing_approval, min(len(needing_approval), 3)):
                if records[tid].status in (TaskStatus.PENDING, TaskStatus.AWAITING_APPROVAL):
                    apply(TaskApproved(tid, now, by=rng.choice(APPROVERS)))
        for tid in [t for t in ids if records[t].held is not None]:
            if rng.random() < 0.3:
                apply(TaskApproved(tid, now, by=rng.choice(APPROVERS)))
        if rng.random() < shape.stray:
            apply(stray_event(spec, rng.choice(ids), now, rng))
        if rng.random() < shape.cancel:
            apply(RunCancelled(now, by="@me:x"))
        now = advance(now, wakeup, active, rng)
    else:
        # Stray events can leave a task waiting for good (an approval it already has): cancel,
        # and let the rollback that the cancellation starts run its course.
        apply(RunCancelled(now, by="@me:x"))
        for _ in range(2 * len(ids) + 2):
            for decision in twins.decide(now):
                note(getattr(decision, "task_id", None))
            if twins.engine.finished:
                break
            for tid in list(rolling):
                rollback = records[tid].rollback
                assert rollback is not None
                apply(TaskFinished(tid, rollback.number, now, Outcome.COMPLETED, exit_code=0))
            now += 0.1
        assert twins.engine.finished
    twins.check_state()
    return twins


def finished(tid: str, attempt: int, now: float, shape: Shape, rng: random.Random) -> TaskFinished:
    outcome = Outcome.COMPLETED
    if rng.random() < shape.fail:
        outcome = rng.choice([Outcome.FAILED, Outcome.FAILED, Outcome.TIMEOUT, Outcome.KILLED])
    elif rng.random() < 0.02 + shape.lost:
        outcome = Outcome.LOST
    code = 0 if outcome is Outcome.COMPLETED else 1
    return TaskFinished(tid, attempt, now, outcome, exit_code=code, output=f"o-{tid}-{attempt}")


def stray_event(spec: DagSpec, tid: str, now: float, rng: random.Random) -> RunEvent:
    """What a room's log (replayed, duplicated, from a stopped coordinator) may also hold: any
    event about any task, fitting its state or not."""
    attempt = rng.randint(1, 3)
    level = spec.task(tid).level
    deadline = None  # as the coordinator would have asked: a countdown for recommended tasks
    if level.kind is LevelKind.RECOMMENDED and level.timeout_secs is not None:
        deadline = now + rng.choice([0.0, level.timeout_secs])
    return rng.choice(
        [
            TaskStarted(tid, attempt, now),
            TaskFinished(tid, attempt, now, Outcome.COMPLETED, exit_code=0, output="stray"),
            TaskFinished(tid, attempt, now, Outcome.LOST, error="its node stopped"),
            TaskDispatched(tid, attempt, now),
            TaskTimedOut(tid, attempt, now),
            TaskCancelled(tid, now, attempt, "replayed"),
            TaskSkipped(tid, now, "replayed"),
            ApprovalRequested(tid, now, level.stakeholders, deadline),
            ApprovalRequested(tid, now, reason="replayed hold"),
            TaskApproved(tid, now, by=rng.choice(APPROVERS)),
            TaskCarried(tid, now, output="stray", from_run="r0"),
            TaskAborted(tid, now, "replayed"),
            RollbackStarted(tid, attempt + 1, now),
        ]
    )


def advance(now: float, wakeup: float | None, active: Any, rng: random.Random) -> float:
    roll = rng.random()
    if not active and wakeup is not None and roll < 0.8:
        return wakeup  # nothing running: the next thing to happen is the engine's own
    if roll < 0.3:
        return now
    if roll < 0.31:
        return now - rng.choice([0.1, 2.0])  # the wall clock stepped back
    return now + rng.choice([0.001, 0.1, 0.5, 1.0, 3.0])


def check_replay(twins: Twins, shape: Shape) -> None:
    """The log rebuilds the same state in both engines, and (state = fold(events)) the state
    the run ended in. Stray events are left out of the second part: one that came while a
    task was ready to go (a state no event records) may take differently on replay."""
    replayed = RunEngine.replay(twins.spec, twins.log)
    assert snapshot(replayed) == snapshot(ReferenceEngine.replay(twins.spec, twins.log))
    if not shape.stray:
        assert snapshot(replayed) == snapshot(twins.engine)


EQUIVALENCE = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@settings(EQUIVALENCE, max_examples=400)
@given(
    shapes(
        1,
        60,
        workers=(1, 2, 3, 8, 50, 10_000),
        fail=st.floats(0, 1),
        approval=st.sampled_from([0.0, 0.05, 0.3]),
        rare=st.sampled_from([0.0, 0.001, 0.01, 0.05]),
    )
)
def test_small_runs_decide_exactly_as_the_reference(shape: Shape) -> None:
    twins = run(shape, check_every=1, burst=6)
    check_replay(twins, shape)


@pytest.mark.slow
@settings(EQUIVALENCE, max_examples=8)
@given(
    shapes(
        1000,
        3000,
        workers=(8, 50, 10_000),
        fail=st.sampled_from([0.0, 0.01, 0.05, 0.2]),
        approval=st.sampled_from([0.0, 0.001, 0.005]),
        rare=st.sampled_from([0.0, 0.0002, 0.001]),
    )
)
def test_runs_of_thousands_of_tasks_decide_exactly_as_the_reference(shape: Shape) -> None:
    # The reference walks every task at every step: a few thousand steps at most keep this
    # under a minute (one-at-a-time runs are the small test's).
    twins = run(shape, check_every=500, burst=40)
    assert twins.engine.finished
    check_replay(twins, shape)


def test_a_countdown_whose_default_action_cannot_take_comes_up_again() -> None:
    # A log may hold an approval given before the task asked for one, then the request: the
    # task awaits an approval it already has, and the countdown's approval does not take.
    level = Level(LevelKind.RECOMMENDED, timeout_secs=1.0, default_action=DefaultAction.EXECUTE)
    twins = Twins(
        DagSpec(
            name="t",
            tasks=(
                TaskSpec(id="t", agent="shell", prompt="true", level=level),
                TaskSpec(id="other", agent="shell", prompt="true"),
            ),
        )
    )
    now = 1000.0
    assert twins.apply(TaskApproved("t", now, by="@a:x"))
    assert twins.apply(ApprovalRequested("t", now, (), now + 1.0))
    twins.decide(now)
    assert twins.next_wakeup(now) == now + 1.0
    for later in (now + 1.0, now + 2.0):
        twins.decide(later)
        assert twins.reference.decide(later + 1) == [TaskApproved("t", later + 1, by=None)]
        assert twins.engine.decide(later + 1) == [TaskApproved("t", later + 1, by=None)]
    twins.check_state()

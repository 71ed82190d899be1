"""The run engine, driven without an event loop: facts in, decisions out, time injected."""

from __future__ import annotations

from typing import Any

import pytest

from cis_bot.dag.engine import (
    ApprovalRequested,
    Decision,
    Outcome,
    RunCancelled,
    RunEngine,
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
    TaskStatus,
    TaskTimedOut,
)
from cis_bot.dag.spec import DagSpec, DefaultAction, Level, LevelKind, Policy, TaskSpec, Trigger


def task(tid: str, *deps: str, **kw: Any) -> TaskSpec:
    return TaskSpec(id=tid, agent="shell", prompt="true", deps=deps, **kw)


def dag(*tasks: TaskSpec, **kw: Any) -> DagSpec:
    return DagSpec(name="t", tasks=tasks, **kw)


def dispatched(decisions: list[Decision]) -> list[str]:
    return [d.task_id for d in decisions if isinstance(d, TaskDispatched)]


class Driver:
    """Runs an engine like the asyncio runner would, but with a hand-moved clock."""

    def __init__(self, spec: DagSpec, **kw: Any) -> None:
        self.engine = RunEngine(spec, **kw)
        self.now = 1000.0
        self.log: list[Any] = []

    def decide(self) -> list[Decision]:
        decisions = self.engine.decide(self.now)
        self.log.extend(decisions)
        return decisions

    def attempt(self, tid: str) -> int:
        current = self.engine.tasks[tid].current
        assert current is not None
        return current.number

    def start(self, tid: str) -> None:
        event = TaskStarted(tid, self.attempt(tid), self.now, session_id=f"r:{tid}")
        assert self.engine.apply(event)
        self.log.append(event)

    def finish(self, tid: str, outcome: Outcome = Outcome.COMPLETED, **kw: Any) -> None:
        exit_code = 0 if outcome is Outcome.COMPLETED else 1
        event = TaskFinished(tid, self.attempt(tid), self.now, outcome, exit_code=exit_code, **kw)
        assert self.engine.apply(event)
        self.log.append(event)

    def run_ok(self, tid: str) -> None:
        self.start(tid)
        self.finish(tid, output=f"out-{tid}")

    def status(self, tid: str) -> TaskStatus:
        return self.engine.tasks[tid].status


def test_diamond_runs_in_dependency_order_and_passes_outputs() -> None:
    d = Driver(dag(task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c")))
    assert dispatched(d.decide()) == ["a"]
    assert d.decide() == []  # decisions are folded: asking again changes nothing
    d.run_ok("a")
    assert dispatched(d.decide()) == ["b", "c"]
    d.run_ok("b")
    assert dispatched(d.decide()) == []
    d.run_ok("c")
    assert dispatched(d.decide()) == ["d"]
    assert d.engine.upstream_outputs("d") == {"b": "out-b", "c": "out-c"}
    d.run_ok("d")
    decisions = d.decide()
    assert decisions == [RunFinished(RunStatus.COMPLETED, d.now)]
    assert d.engine.status is RunStatus.COMPLETED


def test_fan_out_respects_max_workers_and_fan_in_waits_for_all() -> None:
    leaves = [task(f"l{i}", "root") for i in range(5)]
    spec = dag(task("root"), *leaves, task("sink", *(t.id for t in leaves)))
    d = Driver(spec, max_workers=2)
    d.decide()
    d.run_ok("root")
    assert dispatched(d.decide()) == ["l0", "l1"]
    d.run_ok("l0")
    assert dispatched(d.decide()) == ["l2"]
    for tid in ["l1", "l2"]:
        d.run_ok(tid)
    assert dispatched(d.decide()) == ["l3", "l4"]
    d.run_ok("l3")
    assert dispatched(d.decide()) == []
    d.run_ok("l4")
    assert dispatched(d.decide()) == ["sink"]


def test_max_workers_defaults_to_spec_then_task_count() -> None:
    spec = dag(task("a"), task("b"), task("c"), max_workers=2)
    assert RunEngine(spec).max_workers == 2
    assert RunEngine(spec, max_workers=3).max_workers == 3
    assert RunEngine(dag(task("a"), task("b"))).max_workers == 2


def test_all_success_failure_skips_downstream_but_independent_branch_runs() -> None:
    d = Driver(dag(task("a"), task("b", "a"), task("c", "b"), task("x")))
    assert dispatched(d.decide()) == ["a", "x"]
    d.start("a")
    d.finish("a", Outcome.FAILED, error="exit 1")
    decisions = d.decide()
    assert TaskSkipped("b", d.now, "upstream a failed") in decisions
    assert TaskSkipped("c", d.now, "upstream b skipped") in decisions
    assert d.engine.status is RunStatus.RUNNING  # x is still going
    d.run_ok("x")
    assert d.decide() == [RunFinished(RunStatus.FAILED, d.now)]
    assert d.status("x") is TaskStatus.COMPLETED


def test_allow_debt_runs_dependents_of_a_failure_and_completes_with_debts() -> None:
    d = Driver(dag(task("a"), task("b", "a"), policy=Policy.ALLOW_DEBT))
    d.decide()
    d.start("a")
    d.finish("a", Outcome.FAILED, output="partial")
    assert dispatched(d.decide()) == ["b"]
    assert d.engine.upstream_outputs("b") == {"a": "partial"}
    d.run_ok("b")
    assert d.decide() == [RunFinished(RunStatus.COMPLETED, d.now)]
    assert d.engine.debts == ["a"]


def test_first_success_cancels_the_rest_when_a_sink_completes() -> None:
    spec = dag(
        task("prep"),
        task("fast", "prep"),
        task("slow", "prep"),
        task("never", "slow"),
        policy=Policy.FIRST_SUCCESS,
    )
    d = Driver(spec)
    d.decide()
    d.run_ok("prep")  # not a sink: the run goes on
    assert dispatched(d.decide()) == ["fast", "slow"]
    d.start("slow")
    d.run_ok("fast")
    decisions = d.decide()
    assert TaskCancelled("slow", d.now, attempt=1, reason="first_success: fast completed") in (
        decisions
    )
    assert TaskCancelled("never", d.now, attempt=None, reason="first_success: fast completed") in (
        decisions
    )
    assert decisions[-1] == RunFinished(RunStatus.COMPLETED, d.now)
    # The cancelled attempt's late result is fenced off.
    assert not d.engine.apply(TaskFinished("slow", 1, d.now, Outcome.COMPLETED))
    assert d.status("slow") is TaskStatus.CANCELLED


def test_first_success_fails_when_no_sink_can_complete() -> None:
    d = Driver(dag(task("a"), task("b"), policy=Policy.FIRST_SUCCESS))
    d.decide()
    for tid in ("a", "b"):
        d.start(tid)
        d.finish(tid, Outcome.FAILED)
    assert d.decide() == [RunFinished(RunStatus.FAILED, d.now)]


@pytest.mark.parametrize(
    ("trigger", "a_outcome", "b_outcome", "runs"),
    [
        (Trigger.ALL_SUCCESS, Outcome.COMPLETED, Outcome.COMPLETED, True),
        (Trigger.ALL_SUCCESS, Outcome.COMPLETED, Outcome.FAILED, False),
        (Trigger.ALL_DONE, Outcome.FAILED, Outcome.FAILED, True),
        (Trigger.ONE_FAILED, Outcome.COMPLETED, Outcome.FAILED, True),
        (Trigger.ONE_FAILED, Outcome.COMPLETED, Outcome.COMPLETED, False),
        (Trigger.ONE_SUCCESS, Outcome.FAILED, Outcome.COMPLETED, True),
        (Trigger.ONE_SUCCESS, Outcome.FAILED, Outcome.FAILED, False),
        (Trigger.NONE_FAILED, Outcome.COMPLETED, Outcome.COMPLETED, True),
        (Trigger.NONE_FAILED, Outcome.COMPLETED, Outcome.TIMEOUT, False),
    ],
)
def test_trigger_rules(
    trigger: Trigger, a_outcome: Outcome, b_outcome: Outcome, runs: bool
) -> None:
    d = Driver(dag(task("a"), task("b"), task("c", "a", "b", trigger=trigger)))
    d.decide()
    for tid, outcome in (("a", a_outcome), ("b", b_outcome)):
        d.start(tid)
        d.finish(tid, outcome)
    decisions = d.decide()
    assert ("c" in dispatched(decisions)) is runs
    assert d.status("c") is (TaskStatus.DISPATCHED if runs else TaskStatus.SKIPPED)


def test_one_failed_fires_as_soon_as_one_upstream_fails() -> None:
    d = Driver(dag(task("a"), task("b"), task("alert", "a", "b", trigger=Trigger.ONE_FAILED)))
    d.decide()
    d.start("a")
    d.finish("a", Outcome.FAILED)
    assert dispatched(d.decide()) == ["alert"]  # b is still running


def test_none_failed_accepts_skipped_upstream() -> None:
    spec = dag(
        task("a"),
        task("only_on_failure", "a", trigger=Trigger.ONE_FAILED),
        task("after", "a", "only_on_failure", trigger=Trigger.NONE_FAILED),
    )
    d = Driver(spec)
    d.decide()
    d.run_ok("a")
    decisions = d.decide()
    assert TaskSkipped("only_on_failure", d.now, "no upstream task failed") in decisions
    assert dispatched(decisions) == ["after"]


def test_retry_waits_exponential_backoff_on_the_injected_clock() -> None:
    d = Driver(dag(task("a", retry=3), retry_backoff_secs=2.0))
    d.decide()
    t0 = d.now
    for expected_backoff in (2.0, 4.0, 8.0):
        d.start("a")
        d.finish("a", Outcome.FAILED)
        assert d.status("a") is TaskStatus.READY
        assert d.engine.next_wakeup(d.now) == d.now + expected_backoff
        d.now += expected_backoff - 0.001
        assert d.decide() == []
        d.now += 0.001
        assert dispatched(d.decide()) == ["a"]
    assert d.attempt("a") == 4
    d.start("a")
    d.finish("a", Outcome.FAILED, error="still broken")
    assert d.decide() == [RunFinished(RunStatus.FAILED, d.now)]
    record = d.engine.tasks["a"]
    assert len(record.attempts) == 4
    assert record.reason == "still broken"
    assert d.now - t0 == pytest.approx(14.0)


def test_backoff_is_capped() -> None:
    d = Driver(dag(task("a", retry=20), retry_backoff_secs=1.0))
    d.decide()
    for _ in range(10):
        d.start("a")
        d.finish("a", Outcome.FAILED)
        wake = d.engine.next_wakeup(d.now)
        assert wake is not None
        d.now = wake
        d.decide()
    assert wake - d.engine.tasks["a"].attempts[-2].finished_at == 60.0  # type: ignore[operator]


def test_mechanical_level_retry_is_resolved_into_task_retry() -> None:
    # The loader folds level.retry into TaskSpec.retry; the engine reads only TaskSpec.retry.
    t = task("a", retry=1, level=Level(LevelKind.MECHANICAL, retry=1))
    assert t.max_attempts == 2


def test_timeout_kills_and_retries_then_fails_with_timeout_status() -> None:
    d = Driver(dag(task("a", timeout_secs=5.0, retry=1), retry_backoff_secs=1.0))
    d.decide()
    d.start("a")
    assert d.engine.next_wakeup(d.now) == d.now + 5.0
    d.now += 5.0
    assert d.decide() == [TaskTimedOut("a", 1, d.now)]
    assert d.status("a") is TaskStatus.READY
    # The killed session reports late: fenced.
    assert not d.engine.apply(TaskFinished("a", 1, d.now, Outcome.TIMEOUT))
    d.now += 1.0
    assert dispatched(d.decide()) == ["a"]
    d.start("a")
    d.now += 5.0
    decisions = d.decide()
    assert decisions == [TaskTimedOut("a", 2, d.now), RunFinished(RunStatus.FAILED, d.now)]
    assert d.status("a") is TaskStatus.TIMEOUT
    assert d.engine.tasks["a"].reason == "timed out after 5s"


def test_killed_attempt_is_not_retried() -> None:
    d = Driver(dag(task("a", retry=3)))
    d.decide()
    d.start("a")
    d.finish("a", Outcome.KILLED, error="killed by @alice:x")
    assert d.status("a") is TaskStatus.FAILED
    assert d.decide() == [RunFinished(RunStatus.FAILED, d.now)]


def test_cancel_kills_running_cancels_pending_and_stops_retries() -> None:
    d = Driver(dag(task("a"), task("b", "a"), task("c", retry=2)))
    d.decide()
    d.start("a")
    d.start("c")
    d.finish("c", Outcome.FAILED)  # c now waits for a retry
    assert d.engine.apply(RunCancelled(d.now, by="@me:x"))
    assert not d.engine.apply(RunCancelled(d.now))  # once
    decisions = d.decide()
    assert decisions == [
        TaskCancelled("a", d.now, attempt=1),
        TaskCancelled("c", d.now, attempt=None),
        TaskCancelled("b", d.now, attempt=None),
        RunFinished(RunStatus.CANCELLED, d.now),
    ]
    assert not d.engine.apply(TaskFinished("a", 1, d.now, Outcome.KILLED))
    assert d.engine.decide(d.now) == []


def test_stale_attempt_results_are_fenced() -> None:
    d = Driver(dag(task("a", timeout_secs=1.0, retry=1), retry_backoff_secs=0.5))
    d.decide()
    d.start("a")
    d.now += 1.0
    d.decide()  # attempt 1 times out
    d.now += 0.5
    d.decide()  # attempt 2 dispatched
    assert d.attempt("a") == 2
    late_start = TaskStarted("a", 1, d.now)
    late_result = TaskFinished("a", 1, d.now, Outcome.COMPLETED, exit_code=0, output="late")
    assert not d.engine.apply(late_start)
    assert not d.engine.apply(late_result)
    assert d.engine.stale_results == [late_start, late_result]
    assert d.status("a") is TaskStatus.DISPATCHED
    d.run_ok("a")
    assert not d.engine.apply(TaskFinished("a", 2, d.now, Outcome.FAILED))  # duplicate
    assert d.engine.tasks["a"].output == "out-a"


def test_unknown_task_events_are_ignored() -> None:
    d = Driver(dag(task("a")))
    assert not d.engine.apply(TaskStarted("nope", 1, d.now))
    assert not d.engine.apply(TaskApproved("nope", d.now, by="@x:y"))


def test_confirmed_task_waits_for_approval_before_it_starts() -> None:
    d = Driver(dag(task("a"), task("deploy", "a", level=Level(LevelKind.CONFIRMED))))
    d.decide()
    d.run_ok("a")
    decisions = d.decide()
    assert decisions == [ApprovalRequested("deploy", d.now)]
    d.now += 3600
    assert d.decide() == []
    assert d.engine.next_wakeup(d.now) is None
    assert d.engine.apply(TaskApproved("deploy", d.now, by="@alice:x"))
    assert dispatched(d.decide()) == ["deploy"]


def test_approval_given_before_it_is_asked_is_kept() -> None:
    d = Driver(dag(task("a"), task("deploy", "a", level=Level(LevelKind.CONFIRMED))))
    d.decide()
    assert d.engine.apply(TaskApproved("deploy", d.now, by="@alice:x"))
    d.run_ok("a")
    assert dispatched(d.decide()) == ["deploy"]


def test_arbitrated_task_needs_every_stakeholder() -> None:
    level = Level(LevelKind.ARBITRATED, stakeholders=("@a:x", "@b:x"))
    d = Driver(dag(task("t", level=level)))
    assert d.decide() == [ApprovalRequested("t", d.now, stakeholders=("@a:x", "@b:x"))]
    assert not d.engine.apply(TaskApproved("t", d.now, by="@mallory:x"))
    assert d.engine.apply(TaskApproved("t", d.now, by="@a:x"))
    assert not d.engine.apply(TaskApproved("t", d.now, by="@a:x"))
    assert d.decide() == []
    assert d.engine.apply(TaskApproved("t", d.now, by="@b:x"))
    assert dispatched(d.decide()) == ["t"]


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (DefaultAction.EXECUTE, TaskStatus.DISPATCHED),
        (DefaultAction.SKIP, TaskStatus.SKIPPED),
        (DefaultAction.ABORT, TaskStatus.FAILED),
    ],
)
def test_recommended_countdown_applies_default_action(
    action: DefaultAction, expected: TaskStatus
) -> None:
    level = Level(LevelKind.RECOMMENDED, timeout_secs=30.0, default_action=action)
    d = Driver(dag(task("t", level=level), task("other"), task("after", "other")))
    decisions = d.decide()
    assert ApprovalRequested("t", d.now, deadline=d.now + 30.0) in decisions
    assert d.engine.next_wakeup(d.now) == d.now + 30.0
    d.now += 30.0
    d.decide()
    assert d.status("t") is expected
    if action is DefaultAction.ABORT:
        assert any(isinstance(e, TaskAborted) for e in d.log)
        # Aborting stops the run: what was running is cancelled, nothing new starts.
        assert d.status("other") is TaskStatus.CANCELLED
        assert d.status("after") is TaskStatus.CANCELLED
        assert d.engine.status is RunStatus.FAILED


def test_recommended_task_approved_early_runs_at_once() -> None:
    level = Level(LevelKind.RECOMMENDED, timeout_secs=30.0, default_action=DefaultAction.SKIP)
    d = Driver(dag(task("t", level=level)))
    d.decide()
    d.engine.apply(TaskApproved("t", d.now + 1, by="@alice:x"))
    d.now += 1
    assert dispatched(d.decide()) == ["t"]
    d.now += 60
    assert d.decide() == []  # the expired countdown no longer applies


def test_replaying_the_log_rebuilds_the_same_state_and_pending_work() -> None:
    spec = dag(
        task("a"),
        task("b", "a", retry=1, timeout_secs=10.0),
        task("c", "a"),
        task("d", "b", "c"),
        retry_backoff_secs=1.0,
    )
    d = Driver(spec)
    d.decide()
    d.run_ok("a")
    d.decide()
    d.start("b")
    d.finish("b", Outcome.FAILED)
    d.start("c")
    replayed = RunEngine.replay(spec, d.log)
    for tid, record in d.engine.tasks.items():
        assert replayed.tasks[tid].status is record.status
        assert replayed.tasks[tid].attempts == record.attempts
    # Both agree on what comes next, and neither repeats finished work.
    d.now += 1.0
    assert replayed.decide(d.now) == d.engine.decide(d.now) == [TaskDispatched("b", 2, d.now)]


def test_tasks_are_dispatched_in_file_order_within_a_level() -> None:
    d = Driver(dag(task("z"), task("y"), task("m", "z"), task("a")), max_workers=10)
    assert dispatched(d.decide()) == ["z", "y", "a"]


def test_long_chain_is_linear_not_recursive() -> None:
    chain = [task("t0")] + [task(f"t{i}", f"t{i - 1}") for i in range(1, 1200)]
    d = Driver(dag(*chain))
    for i in range(1200):
        assert dispatched(d.decide()) == [f"t{i}"]
        d.run_ok(f"t{i}")
    assert d.decide() == [RunFinished(RunStatus.COMPLETED, d.now)]


def test_lost_attempt_goes_again_at_once_without_using_a_retry() -> None:
    d = Driver(dag(task("a", retry=0), retry_backoff_secs=10.0))
    d.decide()
    d.start("a")
    d.finish("a", Outcome.LOST, error="its node stopped")
    assert d.status("a") is TaskStatus.READY
    assert dispatched(d.decide()) == ["a"]  # no backoff
    d.start("a")
    d.finish("a", Outcome.FAILED)
    assert d.decide() == [RunFinished(RunStatus.FAILED, d.now)]  # retry=0: the real failure ends it
    assert [a.outcome for a in d.engine.tasks["a"].attempts] == [Outcome.LOST, Outcome.FAILED]


def test_carried_tasks_count_as_completed_and_feed_their_output() -> None:
    d = Driver(dag(task("a"), task("b", "a")))
    assert d.engine.apply(TaskCarried("a", d.now, output="kept", from_run="r1"))
    assert not d.engine.apply(TaskCarried("a", d.now, output="again"))
    assert dispatched(d.decide()) == ["b"]
    assert d.engine.upstream_outputs("b") == {"a": "kept"}
    assert d.engine.tasks["a"].attempts == []

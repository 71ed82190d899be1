"""The run-log fold: who may create a run, decide for it and report on its attempts.

The fold is pure and takes the trusted coordinators as an input, so each rule is checked here on
plain event lists; tests/security/ replays the same attacks through real rooms and processes.
"""

from __future__ import annotations

import json

import attrs

from cis_bot.dag.engine import RunEngine, TaskStatus
from cis_bot.matrix import events as ev
from cis_bot.matrix.runlog import RoomEvent, fold_runs

COORD = "@cis_coord:cis.local"
OTHER_COORD = "@cis_other:cis.local"
WORKER = "@cis_wa:cis.local"
MALLORY = "@mallory:cis.local"
RUN = "20260101-000000-abcd"

SPEC = json.dumps({"name": "d", "tasks": [{"id": "a", "agent": "shell", "prompt": "true"}]})


def created(
    sender: str, run_id: str = RUN, *, coordinator: str = "coord", at: int = 1000
) -> RoomEvent:
    return RoomEvent(
        sender,
        ev.RunCreatedContent(
            run_id=run_id,
            dag_name="d",
            spec=SPEC,
            mode="matrix",
            max_workers=1,
            coordinator=coordinator,
            timestamp=at,
        ),
    )


def assigned(sender: str, user: str = WORKER, attempt: int = 1) -> RoomEvent:
    return RoomEvent(
        sender,
        ev.TaskAssignedContent(
            run_id=RUN,
            task_id="a",
            attempt=attempt,
            assigned_to="wa",
            assigned_user=user,
            assigned_by=sender,
            agent="shell",
            lease_ms=1000,
            timestamp=2000,
        ),
    )


def claimed(sender: str, attempt: int = 1) -> RoomEvent:
    return RoomEvent(
        sender,
        ev.TaskClaimedContent(
            run_id=RUN,
            task_id="a",
            attempt=attempt,
            claimed_by="wa",
            session_id=f"{RUN}:a:{attempt}",
            timestamp=3000,
        ),
    )


def state(sender: str, attempt: int = 1) -> RoomEvent:
    return RoomEvent(
        sender,
        ev.SessionStateContent(
            run_id=RUN,
            session_id=f"{RUN}:a:{attempt}",
            old_state="running",
            new_state="blocked",
            timestamp=3500,
        ),
    )


def completed(sender: str, status: str = "completed", attempt: int = 1) -> RoomEvent:
    return RoomEvent(
        sender,
        ev.SessionCompletedContent(
            run_id=RUN,
            session_id=f"{RUN}:a:{attempt}",
            task_id="a",
            attempt=attempt,
            status=status,
            exit_code=0 if status == "completed" else 1,
            output="forged" if sender == MALLORY else "real",
            timestamp=4000,
        ),
    )


def run_completed(sender: str) -> RoomEvent:
    return RoomEvent(
        sender,
        ev.RunCompletedContent(
            run_id=RUN, status="completed", tasks={"a": "completed"}, timestamp=5000
        ),
    )


def replay(events: list[RoomEvent], coordinators: set[str]) -> RunEngine:
    log = fold_runs(events, coordinators)[RUN]
    assert log.spec is not None and log.created is not None
    return RunEngine.replay(log.spec, log.events, max_workers=log.created.max_workers)


def test_a_run_exists_only_when_a_trusted_coordinator_created_it() -> None:
    forged = [created(MALLORY, coordinator="coord", at=9_999_999_999_999)]
    assert fold_runs(forged, {COORD}) == {}
    # The content's coordinator field names a node for display; it confers nothing.
    assert fold_runs([created(MALLORY, coordinator=COORD)], {COORD}) == {}
    assert set(fold_runs([created(COORD)], {COORD})) == {RUN}
    # Another reader who trusts Mallory sees her run: trust is the reader's input.
    assert set(fold_runs(forged, {MALLORY})) == {RUN}


def test_a_forged_creation_first_does_not_take_a_run_over() -> None:
    events = [created(MALLORY), created(COORD), assigned(MALLORY, user=MALLORY)]
    log = fold_runs(events, {COORD})[RUN]
    assert log.coordinator_user == COORD
    assert log.assignees == {}
    assert log.rejected == 2


def test_decisions_count_only_from_the_runs_coordinator() -> None:
    # Both are trusted coordinators; the run is COORD's, so OTHER_COORD's decisions are not.
    events = [created(COORD), assigned(OTHER_COORD, user=OTHER_COORD), run_completed(MALLORY)]
    log = fold_runs(events, {COORD, OTHER_COORD})[RUN]
    assert log.assignees == {} and log.completed is None
    assert replay(events, {COORD, OTHER_COORD}).tasks["a"].status is TaskStatus.PENDING


def test_an_attempts_facts_count_only_from_its_worker() -> None:
    events = [
        created(COORD),
        assigned(COORD),
        claimed(MALLORY),
        state(MALLORY),
        completed(MALLORY),
    ]
    log = fold_runs(events, {COORD})[RUN]
    assert log.sessions == [] and log.rejected == 3
    engine = replay(events, {COORD})
    assert engine.tasks["a"].status is TaskStatus.DISPATCHED

    honest = [*events, claimed(WORKER), state(WORKER), completed(WORKER)]
    log = fold_runs(honest, {COORD})[RUN]
    assert [e.sender for e in log.sessions] == [WORKER] * 3
    engine = replay(honest, {COORD})
    assert engine.tasks["a"].status is TaskStatus.COMPLETED
    assert engine.tasks["a"].output == "real"


def test_a_late_result_of_an_earlier_attempt_is_fenced_off() -> None:
    events = [
        created(COORD),
        assigned(COORD, user=WORKER, attempt=1),
        RoomEvent(
            COORD,
            ev.TaskLostContent(run_id=RUN, task_id="a", attempt=1, reason="gone", timestamp=2500),
        ),
        assigned(COORD, user=OTHER_COORD, attempt=2),
        completed(WORKER, status="failed", attempt=2),  # not its attempt: rejected
        completed(WORKER, status="failed", attempt=1),  # its attempt, but lost: stale
        completed(OTHER_COORD, attempt=2),
    ]
    log = fold_runs(events, {COORD})[RUN]
    assert log.rejected == 1
    record = replay(events, {COORD}).tasks["a"]
    assert record.status is TaskStatus.COMPLETED and len(record.attempts) == 2


def test_the_fold_is_pure() -> None:
    events = [created(COORD), assigned(COORD), claimed(WORKER), completed(MALLORY)]
    first, second = fold_runs(events, {COORD}), fold_runs(events, {COORD})
    assert first[RUN].events == second[RUN].events
    assert first[RUN].rejected == second[RUN].rejected == 1


def lost(attempt: int = 1) -> RoomEvent:
    return RoomEvent(
        COORD,
        ev.TaskLostContent(run_id=RUN, task_id="a", attempt=attempt, reason="gone", timestamp=2500),
    )


def test_a_result_the_room_shows_before_its_attempt_was_declared_lost_is_void() -> None:
    """The coordinator decided the attempt was lost while its result was on its way: the run
    went on without that result (the live engine ignored it), so the fold does too, whatever
    order the room shows them in."""
    events = [
        created(COORD),
        assigned(COORD, user=WORKER, attempt=1),
        claimed(WORKER, attempt=1),
        completed(WORKER, attempt=1),  # in the room first...
        lost(attempt=1),  # ...but the coordinator had not taken it when it decided this
        assigned(COORD, user=OTHER_COORD, attempt=2),
        completed(OTHER_COORD, status="failed", attempt=2),
    ]
    record = replay(events, {COORD}).tasks["a"]
    assert record.status is TaskStatus.FAILED and len(record.attempts) == 2
    assert record.current is not None and record.current.number == 2
    # The voided result stays in the log of the attempt's events, for people to read.
    log = fold_runs(events, {COORD})[RUN]
    assert [e.content.attempt for e in log.sessions if e.sender == WORKER][-1] == 1  # type: ignore[attr-defined]


def test_a_cancellation_voids_a_result_the_room_shows_before_it() -> None:
    cancelled = [
        RoomEvent(COORD, ev.RunCancelledContent(run_id=RUN, by="@alice:x", timestamp=2600)),
        RoomEvent(
            COORD,
            ev.TaskCancelledContent(
                run_id=RUN, task_id="a", attempt=1, reason="run cancelled", timestamp=2600
            ),
        ),
    ]
    before = [created(COORD), assigned(COORD), completed(WORKER), *cancelled]
    after = [created(COORD), assigned(COORD), *cancelled, completed(WORKER)]
    for events in (before, after):
        assert replay(events, {COORD}).tasks["a"].status is TaskStatus.CANCELLED


def takeover(sender: str, epoch: int, previous: str = COORD) -> RoomEvent:
    return RoomEvent(
        sender,
        ev.RunTakeoverContent(
            run_id=RUN,
            epoch=epoch,
            coordinator=sender.split(":")[0].removeprefix("@cis_"),
            previous=previous,
            reason="lease lapsed",
            timestamp=3000,
        ),
    )


def at_epoch(event: RoomEvent, epoch: int) -> RoomEvent:
    assert isinstance(event.content, ev.RunContent)
    return RoomEvent(event.sender, attrs.evolve(event.content, epoch=epoch))


def test_a_takeover_moves_the_run_to_a_trusted_coordinator_and_fences_the_old_one() -> None:
    events = [
        created(COORD),
        assigned(COORD, attempt=1),
        takeover(OTHER_COORD, 2),
        run_completed(COORD),  # the superseded coordinator, late: ignored
        at_epoch(lost(1), 2),  # COORD's, though it carries the new epoch: not its run now
        claimed(WORKER),  # the adopted attempt's worker still reports
        completed(WORKER),
        at_epoch(run_completed(OTHER_COORD), 2),
    ]
    log = fold_runs(events, {COORD, OTHER_COORD})[RUN]
    assert (log.coordinator_user, log.coordinator_node, log.epoch) == (OTHER_COORD, "other", 2)
    assert log.rejected == 2
    assert log.completed is not None and log.completed.epoch == 2
    record = replay(events, {COORD, OTHER_COORD}).tasks["a"]
    assert record.status is TaskStatus.COMPLETED and len(record.attempts) == 1


def test_a_takeover_counts_only_from_a_trusted_coordinator_above_the_runs_epoch() -> None:
    events = [
        created(COORD),
        takeover(MALLORY, 2),  # not trusted by this reader
        takeover(OTHER_COORD, 1),  # not above the run's epoch
        takeover(OTHER_COORD, 3),
        takeover(COORD, 3),  # the same epoch again: the first one counted
        at_epoch(assigned(OTHER_COORD), 2),  # the new coordinator, at a stale epoch
        at_epoch(assigned(OTHER_COORD), 3),
    ]
    log = fold_runs(events, {COORD, OTHER_COORD})[RUN]
    assert (log.coordinator_user, log.epoch) == (OTHER_COORD, 3)
    assert [t.epoch for t in log.takeovers] == [3]
    assert log.rejected == 4
    assert log.assignees == {("a", 1): WORKER}
    # A reader that does not trust OTHER_COORD keeps the run with its creator (who took it
    # over itself, as after a restart), and none of OTHER_COORD's decisions.
    log = fold_runs(events, {COORD})[RUN]
    assert (log.coordinator_user, log.epoch, log.assignees) == (COORD, 3, {})

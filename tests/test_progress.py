"""The live progress table stays as small as the terminal, whatever the run's size."""

from __future__ import annotations

import io

from rich.console import Console

from cis_bot.cli.keys import parse_keys
from cis_bot.cli.progress import LiveProgress
from cis_bot.dag.engine import (
    Outcome,
    RunEngine,
    TaskDispatched,
    TaskFinished,
    TaskStarted,
)
from cis_bot.dag.spec import DagSpec, TaskSpec
from cis_bot.session.events import SessionBlocked


def test_a_big_run_shows_what_needs_a_look_and_counts_the_rest() -> None:
    spec = DagSpec(
        name="big",
        tasks=tuple(TaskSpec(id=f"t{i}", agent="shell", prompt="true") for i in range(5000)),
        max_workers=8,
    )
    engine = RunEngine(spec)
    decisions = engine.decide(1000.0)
    running = [d.task_id for d in decisions if isinstance(d, TaskDispatched)]
    for tid in running:
        engine.apply(TaskStarted(tid, 1, 1000.0))
    engine.apply(TaskFinished(running[0], 1, 1001.0, Outcome.FAILED, error="exit 1"))
    console = Console(file=io.StringIO(), width=100, height=20, force_terminal=True)
    progress = LiveProgress(console)
    progress.on_run_event(decisions[0], engine)
    progress.on_session_event(SessionBlocked(f"r:{running[1]}:1", "asks", ""), running[1], 1)

    with console.capture() as capture:
        console.print(progress._render())
    screen = capture.get()

    assert len(screen.splitlines()) <= 20
    assert "blocked" in screen and running[1] in screen
    assert "exit 1" in screen  # the failure is shown, with its reason
    assert all(tid in screen for tid in running[2:])  # the running tasks
    assert "4992 ready, 7 running, 1 failed" in screen


def test_a_small_run_shows_every_task() -> None:
    spec = DagSpec(
        name="small",
        tasks=tuple(TaskSpec(id=f"t{i}", agent="shell", prompt="true") for i in range(5)),
    )
    engine = RunEngine(spec)
    console = Console(file=io.StringIO(), width=100, height=40, force_terminal=True)
    progress = LiveProgress(console)
    progress.on_run_event(engine.decide(1000.0)[0], engine)
    with console.capture() as capture:
        console.print(progress._render())
    assert all(f"t{i}" in capture.get() for i in range(5))


def test_the_live_views_keys_in_what_a_terminal_sends() -> None:
    assert parse_keys(b"\x1b[A\x1b[Bjk\r\n") == ["up", "down", "down", "up", "enter", "enter"]
    # Application cursor mode (SS3) arrows; what means nothing here is skipped.
    assert parse_keys(b"\x1bOAx\x1bOB\x1b[C q") == ["up", "down"]
    assert parse_keys(b"") == []

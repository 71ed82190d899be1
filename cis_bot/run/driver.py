"""The loop around the sans-I/O engine: feeds it facts, acts on its decisions.

``RunDriver`` owns the loop; an ``Executor`` carries out dispatches and kills. The local executor
(``run/local.py``) runs tasks as sessions on this node's SessionManager; the Matrix coordinator
(``matrix/coordinator.py``) is another executor that posts assignments to a room instead.
Observers (the progress display, the room recorder) see every run event and every session event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from cis_bot.dag.engine import (
    Fact,
    RollbackStarted,
    RunEngine,
    RunEvent,
    TaskCancelled,
    TaskDispatched,
    TaskTimedOut,
)
from cis_bot.dag.spec import TaskSpec
from cis_bot.run.attempt import rendered, rollback_task
from cis_bot.session.events import SessionEvent


class RunObserver(Protocol):
    def on_run_event(self, event: RunEvent, engine: RunEngine) -> None: ...

    def on_session_event(self, event: SessionEvent, task_id: str, attempt: int) -> None: ...


class Executor(Protocol):
    async def start(
        self, dispatch: TaskDispatched, task: TaskSpec, upstream: dict[str, str]
    ) -> None:
        """Begin the attempt; report TaskStarted / TaskFinished through the driver."""

    async def stop(self, task_id: str, attempt: int, *, timed_out: bool, reason: str) -> None:
        """End the attempt early (timeout or cancellation)."""

    async def drain(self) -> None:
        """Wait until every attempt this executor started has ended."""


class RunDriver:
    def __init__(
        self,
        engine: RunEngine,
        *,
        observers: Sequence[RunObserver] = (),
        clock: Callable[[], float] = time.time,
        run_id: str = "",
    ) -> None:
        self.engine = engine
        self.run_id = run_id
        self.observers = list(observers)
        self.clock = clock
        self.executor: Executor | None = None
        self._facts: list[Fact] = []
        self._wake = asyncio.Event()

    def submit(self, fact: Fact) -> None:
        """Hand a fact to the engine; it is folded on the driver's next turn."""
        self._facts.append(fact)
        self._wake.set()

    async def run(self, executor: Executor) -> RunEngine:
        self.executor = executor
        engine = self.engine
        while not engine.finished:
            self._wake.clear()
            facts, self._facts = self._facts, []
            for fact in facts:
                if engine.apply(fact):
                    self._notify(fact)
            now = self.clock()
            for decision in engine.decide(now):
                self._notify(decision)
                await self._act(executor, decision)
            if engine.finished or self._facts:
                continue
            wakeup = engine.next_wakeup(now)
            delay = None if wakeup is None else max(0.0, wakeup - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        await executor.drain()
        return engine

    async def _act(self, executor: Executor, decision: RunEvent) -> None:
        match decision:
            case TaskDispatched(task_id=tid, attempt=attempt):
                task = self.engine.spec.task(tid)
                task = rendered(task, self.engine, run_id=self.run_id, attempt=attempt)
                await executor.start(decision, task, self.engine.upstream_outputs(tid))
            case RollbackStarted(task_id=tid, attempt=attempt, at=at):
                # The rollback is one more attempt of the task, of its commands in the shell.
                task = rollback_task(self.engine.spec.task(tid))
                await executor.start(TaskDispatched(tid, attempt, at), task, {})
            case TaskTimedOut(task_id=tid, attempt=attempt):
                timeout = self.engine.spec.task(tid).timeout_secs
                await executor.stop(
                    tid, attempt, timed_out=True, reason=f"timed out after {timeout:g}s"
                )
            case TaskCancelled(task_id=tid, attempt=int(attempt), reason=reason):
                await executor.stop(tid, attempt, timed_out=False, reason=reason)

    def _notify(self, event: RunEvent) -> None:
        for observer in self.observers:
            observer.on_run_event(event, self.engine)

"""The asyncio side of a run: feeds facts to the RunEngine, acts on its decisions.

``RunDriver`` owns the loop around the sans-I/O engine; an ``Executor`` carries out dispatches
and kills. ``LocalExecutor`` runs tasks as sessions on this node's SessionManager; the Matrix
coordinator is another executor that posts assignments to a room instead. Observers (the progress
display, the room broadcaster) see every run event and every session event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import attrs
import structlog

from cis_bot.dag.engine import (
    Fact,
    Outcome,
    RunEngine,
    RunEvent,
    TaskCancelled,
    TaskDispatched,
    TaskFinished,
    TaskStarted,
    TaskTimedOut,
)
from cis_bot.dag.spec import TaskSpec
from cis_bot.session.events import (
    SessionCompleted,
    SessionCreated,
    SessionEvent,
    SessionState,
)
from cis_bot.session.manager import SessionManager, SessionSpec
from cis_bot.session.profile import AgentProfile

log = structlog.get_logger(__name__)

#: Each upstream output appended to an agent's prompt is cut to its last this-many characters.
UPSTREAM_PROMPT_LIMIT = 10_000

_OUTCOMES = {
    SessionState.COMPLETED: Outcome.COMPLETED,
    SessionState.FAILED: Outcome.FAILED,
    SessionState.KILLED: Outcome.KILLED,
    SessionState.TIMEOUT: Outcome.TIMEOUT,
}


def session_id(run_id: str, task_id: str, attempt: int) -> str:
    return f"{run_id}:{task_id}:{attempt}"


@attrs.frozen
class RunPaths:
    """Where a run keeps its files: ``<state_dir>/runs/<run_id>/``."""

    run_dir: Path

    def transcript(self, task_id: str, attempt: int) -> Path:
        return self.run_dir / "sessions" / f"{task_id}.{attempt}.log"

    def upstream_dir(self, task_id: str) -> Path:
        return self.run_dir / "upstream" / task_id

    @property
    def report(self) -> Path:
        return self.run_dir / "report.json"


def prompt_with_upstream(prompt: str, upstream: Mapping[str, str]) -> str:
    """The prompt plus an "Upstream task outputs" section, each output bounded."""
    if not upstream:
        return prompt
    parts = [prompt.rstrip(), "", "## Upstream task outputs"]
    for dep, output in upstream.items():
        text = output.strip()
        if len(text) > UPSTREAM_PROMPT_LIMIT:
            omitted = len(text) - UPSTREAM_PROMPT_LIMIT
            text = f"[... {omitted} earlier characters omitted]\n{text[-UPSTREAM_PROMPT_LIMIT:]}"
        parts += ["", f"### {dep}", text or "(no output)"]
    return "\n".join(parts) + "\n"


def attempt_session(
    task: TaskSpec,
    attempt: int,
    *,
    run_id: str,
    paths: RunPaths,
    profile: AgentProfile,
    upstream: Mapping[str, str],
    work_dir: Path,
) -> SessionSpec:
    """How one attempt of a task runs as a session, wherever it runs: the CIS_* environment,
    the upstream outputs as files (and in the prompt, for agents), the transcript's path."""
    sid = session_id(run_id, task.id, attempt)
    env = {
        **task.env,
        "CIS_RUN_ID": run_id,
        "CIS_TASK_ID": task.id,
        "CIS_ATTEMPT": str(attempt),
        "CIS_SESSION_ID": sid,
    }
    if task.deps:
        directory = paths.upstream_dir(task.id)
        directory.mkdir(parents=True, exist_ok=True)
        for dep, output in upstream.items():
            (directory / f"{dep}.txt").write_text(output, encoding="utf-8")
        env["CIS_UPSTREAM_DIR"] = str(directory)
    prompt = task.prompt
    if profile.upstream_in_prompt:
        prompt = prompt_with_upstream(prompt, upstream)
    return SessionSpec(
        session_id=sid,
        profile=profile,
        prompt=prompt,
        work_dir=work_dir / task.work_dir if task.work_dir else work_dir,
        transcript_path=paths.transcript(task.id, attempt),
        env=env,
    )


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
    ) -> None:
        self.engine = engine
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
            case TaskDispatched(task_id=tid):
                task = self.engine.spec.task(tid)
                await executor.start(decision, task, self.engine.upstream_outputs(tid))
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


class LocalExecutor:
    """Runs each attempt as a session on this node's SessionManager."""

    def __init__(
        self,
        driver: RunDriver,
        manager: SessionManager,
        *,
        run_id: str,
        paths: RunPaths,
        profiles: Mapping[str, AgentProfile],
        work_dir: Path,
    ) -> None:
        self.driver = driver
        self.manager = manager
        self.run_id = run_id
        self.paths = paths
        self.profiles = profiles
        self.work_dir = work_dir
        self._attempts: dict[str, tuple[str, int]] = {}
        self._live: set[str] = set()
        self._kills: set[asyncio.Task[SessionCompleted]] = set()
        self._all_ended = asyncio.Event()
        self._all_ended.set()
        self._subscription = manager.subscribe()
        self._listener = asyncio.create_task(self._listen())

    async def start(
        self, dispatch: TaskDispatched, task: TaskSpec, upstream: dict[str, str]
    ) -> None:
        spec = attempt_session(
            task,
            dispatch.attempt,
            run_id=self.run_id,
            paths=self.paths,
            profile=self.profiles[task.agent],
            upstream=upstream,
            work_dir=self.work_dir,
        )
        self._attempts[spec.session_id] = (task.id, dispatch.attempt)
        self._live.add(spec.session_id)
        self._all_ended.clear()
        await self.manager.start(spec)

    async def stop(self, task_id: str, attempt: int, *, timed_out: bool, reason: str) -> None:
        sid = session_id(self.run_id, task_id, attempt)
        if sid in self._live:
            state = SessionState.TIMEOUT if timed_out else SessionState.KILLED
            # Killing waits out the grace period: do it aside so the run goes on meanwhile.
            kill = asyncio.create_task(self.manager.kill(sid, state=state, reason=reason))
            self._kills.add(kill)
            kill.add_done_callback(self._kills.discard)

    async def drain(self) -> None:
        await self._all_ended.wait()
        self._subscription.close()
        self._listener.cancel()

    async def _listen(self) -> None:
        async for event in self._subscription:
            owner = self._attempts.get(event.session_id)
            if owner is None:
                continue  # another run's session on the same manager
            task_id, attempt = owner
            for observer in self.driver.observers:
                observer.on_session_event(event, task_id, attempt)
            now = self.driver.clock()
            if isinstance(event, SessionCreated):
                self.driver.submit(TaskStarted(task_id, attempt, now, session_id=event.session_id))
            elif isinstance(event, SessionCompleted):
                self.driver.submit(
                    TaskFinished(
                        task_id,
                        attempt,
                        now,
                        _OUTCOMES[event.state],
                        exit_code=event.exit_code,
                        output=event.output,
                        error=event.error,
                    )
                )
                self._live.discard(event.session_id)
                if not self._live:
                    self._all_ended.set()

"""The local executor: each attempt runs as a session on this node's SessionManager."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from cis_bot.dag.engine import Outcome, TaskDispatched, TaskFinished, TaskStarted
from cis_bot.dag.spec import TaskSpec
from cis_bot.ids import SessionId
from cis_bot.run.agents import AgentKeeper
from cis_bot.run.attempt import RunPaths, attempt_session
from cis_bot.run.driver import RunDriver
from cis_bot.session.events import SessionCompleted, SessionCreated, SessionState
from cis_bot.session.manager import SessionManager
from cis_bot.session.profile import AgentProfile

_OUTCOMES = {
    SessionState.COMPLETED: Outcome.COMPLETED,
    SessionState.FAILED: Outcome.FAILED,
    SessionState.KILLED: Outcome.KILLED,
    SessionState.TIMEOUT: Outcome.TIMEOUT,
}


class LocalExecutor:
    """Runs each attempt as a session on this node's SessionManager."""

    def __init__(
        self,
        driver: RunDriver,
        manager: SessionManager,
        *,
        run_id: str,
        node_id: str,
        paths: RunPaths,
        profiles: Mapping[str, AgentProfile],
        work_dir: Path,
    ) -> None:
        self.driver = driver
        self.manager = manager
        self.node_id = node_id
        self.run_id = run_id
        self.paths = paths
        self.profiles = profiles
        self.work_dir = work_dir
        self._attempts: dict[str, tuple[str, int]] = {}
        self._live: set[str] = set()
        self._kills: set[asyncio.Task[SessionCompleted]] = set()
        self._all_ended = asyncio.Event()
        self._all_ended.set()
        #: Agents kept for later tasks of the run (keep_agent / reuse_agent).
        self.keeper = AgentKeeper(manager)
        self._subscription = manager.subscribe()
        self._listener = asyncio.create_task(self._listen())

    async def start(
        self, dispatch: TaskDispatched, task: TaskSpec, upstream: dict[str, str]
    ) -> None:
        spec = attempt_session(
            task,
            dispatch.attempt,
            run_id=self.run_id,
            node_id=self.node_id,
            paths=self.paths,
            profile=self.profiles[task.agent],
            upstream=upstream,
            work_dir=self.work_dir,
        )
        spec = self.keeper.prepare(spec, task, self.run_id, dispatch.attempt)
        self._attempts[spec.session_id] = (task.id, dispatch.attempt)
        self._live.add(spec.session_id)
        self._all_ended.clear()
        await self.manager.start(spec)

    async def stop(self, task_id: str, attempt: int, *, timed_out: bool, reason: str) -> None:
        sid = str(SessionId(self.run_id, task_id, attempt))
        if sid in self._live:
            state = SessionState.TIMEOUT if timed_out else SessionState.KILLED
            # Killing waits out the grace period: do it aside so the run goes on meanwhile.
            kill = asyncio.create_task(self.manager.kill(sid, state=state, reason=reason))
            self._kills.add(kill)
            kill.add_done_callback(self._kills.discard)

    async def drain(self) -> None:
        await self._all_ended.wait()
        await self.keeper.release_run(self.run_id)
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
                # Before the driver hears of it: a task it then starts may continue this agent.
                self.keeper.completed(event)
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

"""SessionManager: the one place a process starts, lists, kills and talks to agent sessions.

Subscribers get every SessionEvent in order. Nothing is dropped: a subscription's queue holds at
most one pending SessionOutputUpdated per session (a newer one replaces it in place, which is the
coalescing the event promises anyway); every other event is kept until read.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
from typing import TYPE_CHECKING, Self

import attrs
import structlog

from cis_bot.session.events import (
    SessionCompleted,
    SessionEvent,
    SessionOutputUpdated,
    SessionState,
)
from cis_bot.session.session import AgentSession, SessionError, SessionSettings

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from types import TracebackType

    from cis_bot.session.profile import AgentProfile

log = structlog.get_logger(__name__)

#: ``${NAME}`` in a task's environment values.
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Variables describing the parent's terminal that would contradict the agent's PTY.
_TERMINAL_VARS = ("COLUMNS", "LINES", "TERMCAP")
_DEFAULT_TERM = "xterm-256color"


@attrs.frozen
class SessionSpec:
    session_id: str
    profile: AgentProfile
    prompt: str
    work_dir: Path
    transcript_path: Path
    #: Extra variables, merged over os.environ and the profile's env (``${NAME}`` in a value is
    #: the variable as set so far, so ``PATH = "${CUDA_HOME}/bin:${PATH}"`` works).
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: Arguments before the profile's ``--`` (agent_config; a kept conversation's keep/resume).
    options: tuple[str, ...] = ()
    #: The session whose UUID names the agent's conversation (default: this one).
    conversation: str | None = None
    #: Keep the agent when its turn is over (a later session continues it through the PTY).
    keep: bool = False
    #: The parked agent this session continues (its turn typed into that agent's PTY).
    continues: AgentSession | None = None
    #: Do not start: the session fails at once, with this error.
    refuse: str | None = None
    #: Said as the session starts running (why it is what it is).
    notice: str | None = None


def agent_environment(profile: AgentProfile, extra: Mapping[str, str]) -> dict[str, str]:
    """os.environ, then the profile's env, then the task's; TERM set for a PTY."""
    env = dict(os.environ)
    for name in _TERMINAL_VARS:
        env.pop(name, None)
    env.update(profile.env)
    for name, value in extra.items():
        env[name] = _REFERENCE.sub(lambda m: env.get(m.group(1), ""), value)
    if not env.get("TERM") or env["TERM"] == "dumb":
        env["TERM"] = _DEFAULT_TERM
    return env


class Subscription:
    """An async iterator of SessionEvents; a context manager (sync or async) to unsubscribe."""

    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager
        # Each item is a one-element list so a queued OutputUpdated can be replaced in place.
        self._queue: collections.deque[list[SessionEvent]] = collections.deque()
        self._queued_output: dict[str, list[SessionEvent]] = {}
        self._wakeup: asyncio.Future[None] | None = None
        self._closed = False

    def _push(self, event: SessionEvent) -> None:
        if self._closed:
            return
        if isinstance(event, SessionOutputUpdated):
            slot = self._queued_output.get(event.session_id)
            if slot is not None:
                slot[0] = event
                return
            slot = [event]
            self._queued_output[event.session_id] = slot
            self._queue.append(slot)
        else:
            self._queue.append([event])
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def get_nowait(self) -> SessionEvent | None:
        """The next queued event, or None."""
        if not self._queue:
            return None
        event = self._queue.popleft()[0]
        if isinstance(event, SessionOutputUpdated):
            del self._queued_output[event.session_id]
        return event

    async def get(self) -> SessionEvent:
        """The next event; raises StopAsyncIteration once closed and drained."""
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        event = self.get_nowait()
        assert event is not None
        return event

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionEvent:
        return await self.get()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Unsubscribe: nothing new is queued; iteration ends after what is already queued."""
        if not self._closed:
            self._closed = True
            self._manager._unsubscribe(self)
            self._wake()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SessionManager:
    """One per process: owns every AgentSession and publishes their events."""

    def __init__(
        self, settings: SessionSettings | None = None, *, keep_finished: int = 1000
    ) -> None:
        self.settings = settings or SessionSettings()
        #: How many ended sessions ``get``/``list`` still know (oldest forgotten first).
        self.keep_finished = keep_finished
        self._sessions: dict[str, AgentSession] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._subscriptions: list[Subscription] = []
        self._closed = False

    async def start(self, spec: SessionSpec) -> AgentSession:
        """Spawn a session. A spawn failure is not raised: the session ends failed, with its
        SessionCompleted published like any other."""
        if self._closed:
            raise SessionError("the session manager is closed")
        existing = self._sessions.get(spec.session_id)
        if existing is not None and not existing.state.is_terminal:
            raise SessionError(f"session {spec.session_id} is already running")
        session = AgentSession(
            session_id=spec.session_id,
            profile=spec.profile,
            prompt=spec.prompt,
            work_dir=spec.work_dir,
            transcript_path=spec.transcript_path,
            env=agent_environment(spec.profile, spec.env),
            settings=self.settings,
            publish=self._publish,
            options=spec.options,
            conversation=spec.conversation,
            keep=spec.keep,
            continues=spec.continues,
            refuse=spec.refuse,
            notice=spec.notice,
        )
        self._sessions[spec.session_id] = session
        session.start()
        return session

    def get(self, session_id: str) -> AgentSession | None:
        return self._sessions.get(session_id)

    def list(self) -> list[AgentSession]:
        """Live sessions and the most recent ended ones, in start order."""
        return list(self._sessions.values())

    def _require(self, session_id: str) -> AgentSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(f"no session {session_id!r}")
        return session

    async def kill(
        self,
        session_id: str,
        *,
        state: SessionState = SessionState.KILLED,
        reason: str | None = None,
        grace_secs: float | None = None,
    ) -> SessionCompleted:
        """Kill a session's process group (TERM, then KILL after the grace period); waits for
        it to end. Killing an ended session returns how it ended."""
        return await self._require(session_id).kill(state, reason, grace_secs=grace_secs)

    async def send_input(self, session_id: str, data: str | bytes) -> None:
        self._require(session_id).send_input(data)

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscriptions.append(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def _publish(self, event: SessionEvent) -> None:
        for subscription in self._subscriptions:
            subscription._push(event)
        if isinstance(event, SessionCompleted):
            self._remember_finished(event.session_id)

    def _remember_finished(self, session_id: str) -> None:
        self._finished.append(session_id)
        while len(self._finished) > self.keep_finished:
            old = self._finished.popleft()
            session = self._sessions.get(old)
            if session is not None and session.state.is_terminal and not session.parked:
                del self._sessions[old]

    async def close(self, *, grace_secs: float | None = None) -> None:
        """Kill every session still running, wait for them, and end all subscriptions."""
        self._closed = True
        running = [s for s in self._sessions.values() if not s.state.is_terminal]
        parked = [s for s in self._sessions.values() if s.parked]
        if running or parked:
            log.info("session_manager.closing", running=len(running), kept=len(parked))
            await asyncio.gather(
                *(
                    s.kill(SessionState.KILLED, "session manager closed", grace_secs=grace_secs)
                    for s in running
                ),
                *(s.release("session manager closed", grace_secs=grace_secs) for s in parked),
            )
        for subscription in list(self._subscriptions):
            subscription.close()

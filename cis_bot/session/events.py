"""Session states and the events a SessionManager publishes to its subscribers."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import attrs


class SessionState(StrEnum):
    SPAWNING = "spawning"
    RUNNING = "running"
    BLOCKED = "blocked"
    #: Exited with status 0.
    COMPLETED = "completed"
    #: Could not start, exited non-zero, died of a signal, or its output says it failed.
    FAILED = "failed"
    #: Killed on request (a person, or a cancelled run).
    KILLED = "killed"
    #: Killed because it ran past its task's timeout.
    TIMEOUT = "timeout"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {SessionState.COMPLETED, SessionState.FAILED, SessionState.KILLED, SessionState.TIMEOUT}
)


@attrs.frozen
class SessionCreated:
    session_id: str
    agent: str
    pid: int | None
    transcript_path: Path


@attrs.frozen
class SessionStateChanged:
    session_id: str
    old: SessionState
    new: SessionState
    reason: str | None = None


@attrs.frozen
class SessionOutputUpdated:
    """Coalesced: at most one per session per coalescing interval."""

    session_id: str
    total_bytes: int
    #: The last lines of output, as text (bounded).
    tail: str


@attrs.frozen
class SessionBlocked:
    session_id: str
    reason: str
    #: The last lines of the screen, so a person can see what is asked.
    preview: str


@attrs.frozen
class SessionCompleted:
    session_id: str
    state: SessionState
    exit_code: int | None
    error: str | None
    #: The task's output as the profile's extractor reads it (bounded).
    output: str
    transcript_path: Path
    duration_s: float


SessionEvent = (
    SessionCreated | SessionStateChanged | SessionOutputUpdated | SessionBlocked | SessionCompleted
)

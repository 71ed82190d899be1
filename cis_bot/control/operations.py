"""What one process holds (its sessions, the runs it drives) and the operations on them: list,
input, kill, the end of a transcript, cancel, approve.

The transports call these: the HTTP API on the process's unix socket (``api.py``) and the
requests posted in a run's room (``room.py``). An operation that cannot be done raises
OperationError, whose ``status`` says why in HTTP terms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import structlog

from cis_bot.dag.engine import RunCancelled, TaskApproved, TaskStatus
from cis_bot.dag.spec import LevelKind
from cis_bot.ids import SessionId
from cis_bot.run.driver import RunDriver
from cis_bot.session.manager import SessionManager
from cis_bot.session.session import AgentSession, SessionError

log = structlog.get_logger(__name__)

#: Enter, as a terminal sends it.
ENTER = b"\r"


class OperationError(Exception):
    """An operation that cannot be done; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class ControlSettings:
    #: ``input``: the Enter key goes this long after the text, as when a person types (a TUI
    #: reading the text and the Enter in one read may take it all for a paste).
    enter_delay_secs: float = 0.05
    #: A terminal that falls this far behind a session's output is disconnected.
    attach_backlog_bytes: int = 8 * 1024 * 1024
    #: What a newly attached terminal is shown of the output so far (at most).
    replay_bytes: int = 64 * 1024
    #: Largest input accepted in one request.
    max_input_bytes: int = 64 * 1024


@attrs.define
class RunHandle:
    """A run this process drives: operations on it become facts for its driver."""

    run_id: str
    room_id: str
    dag: str
    mode: str
    driver: RunDriver


@attrs.define(eq=False)
class _Holder:
    manager: SessionManager
    #: The room a session's run lives in (where room requests about it must come from).
    room_of: Callable[[str], str | None]


def session_info(session: AgentSession, node_id: str) -> dict[str, Any]:
    sid = SessionId.parse_or_none(session.session_id)
    completion = session.completion
    last = session.tail_text(8).rstrip().rsplit("\n", 1)[-1].strip()
    return {
        "session_id": session.session_id,
        "run_id": sid.run_id if sid else session.session_id,
        "task_id": sid.task_id if sid else "",
        "attempt": sid.attempt if sid else None,
        "agent": session.agent,
        "state": str(session.state),
        "node": node_id,
        "pid": session.pid,
        "started_at": session.started_at,
        "elapsed_s": round(session.duration_s, 3),
        "last_line": last,
        "blocked_reason": session.blocked_reason,
        "exit_code": completion.exit_code if completion else None,
        "error": completion.error if completion else None,
        "transcript": str(session.transcript_path),
    }


def tail_offset(path: Path, lines: int, end: int) -> int:
    """The offset in ``path`` where its last ``lines`` lines (up to ``end``) begin."""
    if lines <= 0:
        return end
    block = 64 * 1024
    with path.open("rb") as f:
        position = end
        found = 0
        # A final newline ends the last line; it does not start another.
        skip_last = True
        while position > 0:
            size = min(block, position)
            position -= size
            f.seek(position)
            data = f.read(size)
            index = len(data)
            while True:
                index = data.rfind(b"\n", 0, index)
                if index < 0:
                    break
                if skip_last and position + index == end - 1:
                    skip_last = False
                    continue
                skip_last = False
                found += 1
                if found == lines:
                    return position + index + 1
            skip_last = False
    return 0


def transcript_end(path: Path, lines: int, max_chars: int) -> str:
    """The last ``lines`` lines of a transcript as text, at most about ``max_chars`` of it once
    JSON-escaped (what fits in a room event)."""
    try:
        end = path.stat().st_size
        start = max(tail_offset(path, lines, end), end - max_chars)
        with path.open("rb") as f:
            f.seek(start)
            data: bytes = f.read(end - start)
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    # Escapes in JSON can make the text longer than its bytes: keep the event within bounds.
    while len(json.dumps(text)) > max_chars * 1.2:
        text = text[len(text) // 4 :]
    return text


class ControlPlane:
    """This process's sessions and runs, and what may be done to them (see the module
    docstring). ``close()`` stops the transports serving it (``on_close``)."""

    def __init__(self, *, node_id: str, settings: ControlSettings | None = None) -> None:
        self.node_id = node_id
        self.settings = settings or ControlSettings()
        self._holders: list[_Holder] = []
        self._runs: dict[str, RunHandle] = {}
        self._closed = False
        #: Called whenever a run is added or removed (the API rewrites its registry entry).
        self.on_runs_changed: list[Callable[[], None]] = []
        #: Run when the plane closes (the transports' close).
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for close in self.on_close:
            await close()

    # --- what this process holds -----------------------------------------------------------------

    def add_sessions(
        self, manager: SessionManager, room_of: Callable[[str], str | None]
    ) -> Callable[[], None]:
        holder = _Holder(manager, room_of)
        self._holders.append(holder)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._holders.remove(holder)

        return remove

    def add_run(self, run: RunHandle) -> Callable[[], None]:
        self._runs[run.run_id] = run
        self._runs_changed()

        def remove() -> None:
            if self._runs.get(run.run_id) is run:
                del self._runs[run.run_id]
                self._runs_changed()

        return remove

    def _runs_changed(self) -> None:
        for listener in self.on_runs_changed:
            listener()

    @property
    def run_handles(self) -> list[RunHandle]:
        return list(self._runs.values())

    def _all_sessions(self) -> dict[str, tuple[AgentSession, _Holder]]:
        found: dict[str, tuple[AgentSession, _Holder]] = {}
        for holder in self._holders:
            for session in holder.manager.list():
                known = found.get(session.session_id)
                # A session id on two managers: the live one counts.
                if known is None or known[0].state.is_terminal:
                    found[session.session_id] = (session, holder)
        return found

    def session(self, session_id: str) -> AgentSession:
        return self._find(session_id)[0]

    def _find(self, session_id: str) -> tuple[AgentSession, _Holder]:
        found = self._all_sessions().get(session_id)
        if found is None:
            raise OperationError(f"no session {session_id!r} in this process", 404)
        return found

    def session_room(self, session_id: str) -> str | None:
        _, holder = self._find(session_id)
        return holder.room_of(session_id)

    def run(self, run_id: str) -> RunHandle:
        handle = self._runs.get(run_id)
        if handle is None:
            raise OperationError(f"this process does not drive run {run_id!r}", 404)
        return handle

    # --- operations ------------------------------------------------------------------------------

    def sessions(self, *, include_ended: bool) -> list[dict[str, Any]]:
        return [
            session_info(session, self.node_id)
            for session, _ in self._all_sessions().values()
            if include_ended or not session.state.is_terminal
        ]

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for handle in self._runs.values():
            engine = handle.driver.engine
            out.append(
                {
                    "run_id": handle.run_id,
                    "dag": handle.dag,
                    "mode": handle.mode,
                    "room_id": handle.room_id,
                    "status": str(engine.status),
                    "tasks": {tid: str(r.status) for tid, r in engine.tasks.items()},
                }
            )
        return out

    async def send_input(self, session_id: str, text: str, *, newline: bool) -> dict[str, Any]:
        session = self.session(session_id)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise OperationError("the input is not valid Unicode (a lone surrogate)", 400) from None
        if len(data) > self.settings.max_input_bytes:
            raise OperationError(
                f"input of {len(data)} bytes is over the limit ({self.settings.max_input_bytes})",
                400,
            )
        try:
            if data:
                session.send_input(data)
            if newline:
                if data and self.settings.enter_delay_secs > 0:
                    await asyncio.sleep(self.settings.enter_delay_secs)
                session.send_input(ENTER)
        except SessionError as exc:
            raise OperationError(str(exc), 409) from None
        log.info("control.input", session_id=session_id, bytes=len(data), newline=newline)
        return {"session_id": session_id, "state": str(session.state)}

    async def kill(self, session_id: str, *, by: str | None) -> dict[str, Any]:
        session, holder = self._find(session_id)
        if session.state.is_terminal:
            raise OperationError(f"session {session_id} has already ended ({session.state})")
        reason = f"killed by {by}" if by else "killed on request"
        log.info("control.kill", session_id=session_id, by=by)
        completed = await holder.manager.kill(session_id, reason=reason)
        return {
            "session_id": session_id,
            "state": str(completed.state),
            "exit_code": completed.exit_code,
        }

    async def transcript_end(self, session_id: str, lines: int, max_chars: int) -> str:
        """The end of the session's transcript as text (bounded)."""
        path = self.session(session_id).transcript_path
        return await asyncio.to_thread(transcript_end, path, lines, max_chars)

    def cancel(self, run_id: str, *, by: str | None) -> dict[str, Any]:
        handle = self.run(run_id)
        engine = handle.driver.engine
        if engine.finished:
            raise OperationError(f"run {run_id} has already ended ({engine.status})")
        handle.driver.submit(RunCancelled(time.time(), by=by))
        log.info("control.cancel", run_id=run_id, by=by)
        return {"run_id": run_id, "cancelled": True}

    def approve(self, run_id: str, task_id: str, *, by: str | None) -> dict[str, Any]:
        handle = self.run(run_id)
        engine = handle.driver.engine
        record = engine.tasks.get(task_id)
        if record is None:
            raise OperationError(
                f"run {run_id} has no task {task_id!r}; tasks: {', '.join(engine.tasks)}", 404
            )
        waiting = [t for t, r in engine.tasks.items() if r.status is TaskStatus.AWAITING_APPROVAL]
        level = record.spec.level
        if record.held is not None and record.status in (
            TaskStatus.PENDING,
            TaskStatus.AWAITING_APPROVAL,
        ):
            # A lost attempt of a task that is not idempotent: whoever may control the run
            # decides whether it runs again.
            handle.driver.submit(TaskApproved(task_id, time.time(), by=by))
            log.info("control.approve", run_id=run_id, task_id=task_id, by=by, held=True)
            return {"run_id": run_id, "task_id": task_id, "approved": True, "waiting_for": []}
        if not level.needs_approval:
            raise OperationError(
                f"task {task_id} needs no approval (level {level.kind}); "
                f"awaiting approval: {', '.join(waiting) or 'none'}"
            )
        if record.approved or record.status not in (
            TaskStatus.PENDING,
            TaskStatus.AWAITING_APPROVAL,
        ):
            raise OperationError(f"task {task_id} is not awaiting approval ({record.status})")
        if level.kind is LevelKind.ARBITRATED and level.stakeholders:
            by = _stakeholder(by, level.stakeholders)
            if by not in level.stakeholders:
                raise OperationError(
                    f"task {task_id} is approved by its stakeholders only "
                    f"({', '.join(level.stakeholders)}); {by or 'anonymous'} is not one",
                    403,
                )
            if by in record.approvals:
                raise OperationError(f"{by} has already approved task {task_id}")
        handle.driver.submit(TaskApproved(task_id, time.time(), by=by))
        log.info("control.approve", run_id=run_id, task_id=task_id, by=by)
        missing = [s for s in level.stakeholders if s != by and s not in record.approvals]
        return {"run_id": run_id, "task_id": task_id, "approved": True, "waiting_for": missing}


def _stakeholder(by: str | None, stakeholders: tuple[str, ...]) -> str | None:
    """``by`` as the stakeholder it names: a user id, or (on this machine, ``--as NAME``) the
    name of exactly one stakeholder's user id."""
    if by is None or by.startswith("@"):
        return by
    named = [s for s in stakeholders if s[1:].partition(":")[0] == by]
    return named[0] if len(named) == 1 else by

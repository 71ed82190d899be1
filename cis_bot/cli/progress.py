"""Showing a run's progress as plain lines, for logs and pipes (on a terminal, ``live.py``'s
table: rich is loaded for it alone)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TextIO

from cis_bot.dag.engine import (
    ApprovalRequested,
    Outcome,
    RollbackStarted,
    RunEngine,
    RunEvent,
    RunFinished,
    TaskAborted,
    TaskCancelled,
    TaskDispatched,
    TaskFinished,
    TaskSkipped,
    TaskStarted,
    TaskStatus,
    TaskTimedOut,
)
from cis_bot.session.events import SessionBlocked, SessionEvent


class PlainProgress:
    """One line per thing that happened, for logs and pipes. A reader that goes away (``| head``)
    ends the lines, not the run."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.closed = False

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.stream.flush()

    def _line(self, task_id: str, text: str) -> None:
        if self.closed:
            return
        try:
            print(f"{time.strftime('%H:%M:%S')} {task_id}: {text}", file=self.stream, flush=True)
        except BrokenPipeError:
            self.closed = True

    def on_run_event(self, event: RunEvent, engine: RunEngine) -> None:
        match event:
            case TaskDispatched(task_id=tid, attempt=attempt):
                suffix = f" (attempt {attempt})" if attempt > 1 else ""
                self._line(tid, f"started{suffix}")
            case TaskFinished(task_id=tid, attempt=attempt, outcome=outcome, error=error):
                record = engine.tasks[tid]
                if record.rollback is not None and record.rollback.number == attempt:
                    ok = outcome is Outcome.COMPLETED
                    why = "" if ok or not error else f" ({error})"
                    self._line(tid, f"rollback {'completed' if ok else 'failed'}{why}")
                    return
                if record.held is not None:
                    return  # its approval request says why it waits
                detail = f" ({record.reason})" if record.reason else ""
                status = record.status
                if status is TaskStatus.READY:
                    self._line(tid, f"failed{detail}, retrying")
                else:
                    self._line(tid, f"{status}{detail}")
            case TaskTimedOut(task_id=tid):
                self._line(tid, f"timed out ({engine.tasks[tid].status})")
            case TaskSkipped(task_id=tid, reason=reason) | TaskAborted(task_id=tid, reason=reason):
                self._line(tid, f"{engine.tasks[tid].status} ({reason})")
            case TaskCancelled(task_id=tid, reason=reason):
                self._line(tid, f"cancelled ({reason})")
            case ApprovalRequested(task_id=tid, reason=reason):
                self._line(tid, f"awaiting approval ({reason})" if reason else "awaiting approval")
            case RollbackStarted(task_id=tid):
                self._line(tid, f"rolling back: {'; '.join(engine.spec.task(tid).rollback)}")
            case TaskStarted() | RunFinished():
                pass  # the start is shown at dispatch; the CLI prints the run's summary

    def on_session_event(self, event: SessionEvent, task_id: str, attempt: int) -> None:
        if isinstance(event, SessionBlocked):
            self._line(task_id, f"blocked: {event.reason}")

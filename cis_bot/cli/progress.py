"""Showing a run's progress: a live table on a terminal, plain lines otherwise."""

from __future__ import annotations

import collections
import contextlib
import sys
import time
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

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
from cis_bot.session.events import SessionBlocked, SessionEvent, SessionOutputUpdated

if TYPE_CHECKING:
    from types import TracebackType

_STYLES = {
    TaskStatus.COMPLETED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.TIMEOUT: "red",
    TaskStatus.RUNNING: "cyan",
    TaskStatus.DISPATCHED: "cyan",
    TaskStatus.SKIPPED: "dim",
    TaskStatus.CANCELLED: "yellow",
    TaskStatus.AWAITING_APPROVAL: "magenta",
}


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


class LiveProgress:
    """A table of tasks, redrawn in place on a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        #: Known from the first run event (the run starts after its room is ready).
        self.engine: RunEngine | None = None
        self.console = console or Console(stderr=False)
        self._last_line: dict[str, str] = {}
        self._blocked: dict[str, str] = {}
        # Live redraws from its own thread, reading engine state the loop writes: reads of attrs
        # fields and list ends are atomic enough for a display.
        self._live = Live(console=self.console, refresh_per_second=4, get_renderable=self._render)

    def __enter__(self) -> LiveProgress:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.refresh()
        self._live.__exit__(exc_type, exc, tb)

    def on_run_event(self, event: RunEvent, engine: RunEngine) -> None:
        self.engine = engine
        if isinstance(event, TaskFinished | TaskDispatched):
            self._blocked.pop(event.task_id, None)

    def on_session_event(self, event: SessionEvent, task_id: str, attempt: int) -> None:
        if isinstance(event, SessionOutputUpdated):
            lines = [line for line in event.tail.splitlines() if line.strip()]
            if lines:
                self._last_line[task_id] = lines[-1].strip()
            self._blocked.pop(task_id, None)
        elif isinstance(event, SessionBlocked):
            self._blocked[task_id] = event.reason

    def _render(self) -> Table | Text:
        engine = self.engine
        if engine is None:
            return Text("starting…", style="dim")
        records = engine.tasks
        # Rich lays out every row it is given, and Live crops to the terminal afterwards: with
        # thousands of tasks, give it only the rows that fit, those that need a look first.
        room = max(3, self.console.size.height - _TABLE_CHROME)
        shown = list(records) if len(records) <= room else self._worth_showing(room)
        counts = collections.Counter(r.status for r in records.values())
        summary = ", ".join(f"{n} {status}" for status, n in counts.most_common())
        table = Table(title=f"{engine.spec.name}", caption=summary, expand=False)
        for column in ("task", "status", "try", "time", "last output"):
            table.add_column(column, overflow="ellipsis", no_wrap=True)
        now = time.time()
        for task_id in shown:
            record = records[task_id]
            attempt = record.current
            elapsed = ""
            if attempt is not None:
                end = attempt.finished_at or now
                elapsed = f"{end - (attempt.started_at or attempt.dispatched_at):.1f}s"
            status = Text(str(record.status), style=_STYLES.get(record.status, ""))
            if task_id in self._blocked:
                status = Text("blocked", style="bold magenta")
            detail = self._blocked.get(task_id) or self._last_line.get(task_id, "")
            if record.status.is_terminal and record.reason:
                detail = record.reason
            table.add_row(task_id, status, str(len(record.attempts) or ""), elapsed, detail[:60])
        return table

    def _worth_showing(self, room: int) -> list[str]:
        """Up to ``room`` tasks in file order: blocked and waiting for approval first, then
        running, then failed, then whatever else has started."""
        assert self.engine is not None
        ranked: dict[int, list[str]] = collections.defaultdict(list)
        for task_id, record in self.engine.tasks.items():
            rank = 0 if task_id in self._blocked else _RANKS.get(record.status)
            if rank is not None and len(ranked[rank]) < room:
                ranked[rank].append(task_id)
        chosen = set([tid for rank in sorted(ranked) for tid in ranked[rank]][:room])
        return [tid for tid in self.engine.tasks if tid in chosen]


#: Title, header, rules and the summary caption around the rows.
_TABLE_CHROME = 7
_RANKS = {
    TaskStatus.AWAITING_APPROVAL: 0,
    TaskStatus.RUNNING: 1,
    TaskStatus.DISPATCHED: 1,
    TaskStatus.FAILED: 2,
    TaskStatus.TIMEOUT: 2,
    TaskStatus.READY: 3,
    TaskStatus.CANCELLED: 3,
}

"""Showing a run's progress: a live table on a terminal, plain lines otherwise."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TextIO

import structlog
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cis_bot.cli.keys import KeyReader
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
from cis_bot.errors import UserError
from cis_bot.ids import SessionId
from cis_bot.session.events import SessionBlocked, SessionEvent, SessionOutputUpdated

if TYPE_CHECKING:
    from types import TracebackType

    from cis_bot.session.manager import SessionManager

log = structlog.get_logger(__name__)

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


#: Attaches this terminal to a session (by id) until a detach or the session's end; says how
#: it went, in a line.
Attach = Callable[[str], Awaitable[str]]


class LiveProgress:
    """A table of tasks, redrawn in place on a terminal; under it, how to answer each blocked
    task. With ``attach`` (stdin is a terminal too), keys pick a running task and attach to it
    right there, Ctrl-B d coming back to the table."""

    def __init__(
        self,
        console: Console | None = None,
        *,
        where: str = "",
        attach: Attach | None = None,
    ) -> None:
        #: Known from the first run event (the run starts after its room is ready).
        self.engine: RunEngine | None = None
        self.run_id: str | None = None
        self.console = console or Console(stderr=False)
        #: The options another ``cis`` needs to find this run (`` --state-dir D``), or "".
        self.where = where
        self._manager: SessionManager | None = None
        self._last_line: dict[str, str] = {}
        self._blocked: dict[str, str] = {}
        self._attach = attach
        self._keys: KeyReader | None = None
        if attach is not None:
            self._keys = KeyReader(sys.stdin.fileno(), self._on_key)
        self._selected: str | None = None
        #: The running tasks on screen, in order, as last drawn: what the keys move over.
        self._choices: list[str] = []
        self._notice = ""
        self._attaching: asyncio.Task[None] | None = None
        # Live redraws from its own thread, reading engine state the loop writes: reads of attrs
        # fields and list ends are atomic enough for a display.
        self._live = Live(console=self.console, refresh_per_second=4, get_renderable=self._render)

    async def __aenter__(self) -> LiveProgress:
        self._live.start()
        if self._keys is not None:
            self._keys.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._attaching is not None:
            self._attaching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._attaching
        if self._keys is not None:
            self._keys.stop()
            self._keys = None  # the table left on the screen shows no keys that do nothing now
        self._live.refresh()
        self._live.stop()

    def started(self, run_id: str, manager: SessionManager) -> None:
        """The run is under way: its id, and where its sessions run here."""
        self.run_id = run_id
        self._manager = manager

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

    # --- keys --------------------------------------------------------------------------------

    def _target(self) -> str | None:
        """The task the keys act on: the one picked, else the first blocked one on screen."""
        choices = self._choices
        if self._selected in choices:
            return self._selected
        return next((tid for tid in choices if tid in self._blocked), None)

    def _on_key(self, key: str) -> None:
        if self._attaching is not None:
            return
        choices = self._choices
        target = self._target()
        if key in ("up", "down") and choices:
            at = choices.index(target) if target in choices else -1
            step = -1 if key == "up" else 1
            self._selected = choices[(at + step) % len(choices) if at >= 0 else 0]
            self._notice = ""
        elif key == "enter":
            session_id = self._session_of(target)
            if session_id is None:
                self._notice = "no running task to attach to"
            elif self._manager is None or self._manager.get(session_id) is None:
                self._notice = f"{target} runs on another node: attach there, or answer with input"
            else:
                self._attaching = asyncio.get_running_loop().create_task(
                    self._attach_to(session_id)
                )
        self._live.refresh()

    def _session_of(self, task_id: str | None) -> str | None:
        if task_id is None or self.engine is None or self.run_id is None:
            return None
        attempt = self.engine.tasks[task_id].current
        return str(SessionId(self.run_id, task_id, attempt.number)) if attempt else None

    async def _attach_to(self, session_id: str) -> None:
        """The table makes way for the session's terminal (on the alternate screen), and comes
        back when it detaches or ends."""
        assert self._attach is not None and self._keys is not None
        self._keys.stop()
        self._live.transient = True  # take the table off the screen, to draw it again after
        self._live.stop()
        self._live.transient = False
        self._write(_ALTERNATE_SCREEN)
        try:
            self._notice = await self._attach(session_id)
        except UserError as exc:
            self._notice = f"{session_id}: {exc}"
        except Exception as exc:  # the run goes on, whatever became of the attach
            log.warning("live.attach_failed", session_id=session_id, error=repr(exc))
            self._notice = f"{session_id}: cannot attach: {exc!r}"
        finally:
            self._write(_MAIN_SCREEN)
            self._live.start(refresh=True)
            self._live.vertical_overflow = "ellipsis"  # stop() let the last drawing overflow
            self._keys.start()
            self._attaching = None

    def _write(self, control: str) -> None:
        self.console.file.write(control)
        self.console.file.flush()

    # --- drawing -----------------------------------------------------------------------------

    def _render(self) -> RenderableType:
        engine = self.engine
        if engine is None:
            return Text("starting…", style="dim")
        records = engine.tasks
        below = [*self._hints(), *self._help()]
        # Rich lays out every row it is given, and Live crops to the terminal afterwards: with
        # thousands of tasks, give it only the rows that fit, those that need a look first.
        room = max(3, self.console.size.height - _TABLE_CHROME - len(below))
        shown = list(records) if len(records) <= room else self._worth_showing(room)
        self._choices = [tid for tid in shown if records[tid].status is TaskStatus.RUNNING]
        target = self._target() if self._keys is not None else None
        counts = collections.Counter(r.status for r in records.values())
        summary = ", ".join(f"{n} {status}" for status, n in counts.most_common())
        title = f"{engine.spec.name} · run {self.run_id}" if self.run_id else engine.spec.name
        table = Table(title=title, caption=summary, expand=False)
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
            name = task_id
            if self._keys is not None:
                name = f"› {task_id}" if task_id == target else f"  {task_id}"
            table.add_row(
                name,
                status,
                str(len(record.attempts) or ""),
                elapsed,
                detail[:60],
                style="reverse" if task_id == target else None,
            )
        return Group(table, *below)

    def _hints(self) -> list[Text]:
        """Under the table, for each blocked task (the first few, in file order), the commands
        that answer it: a line, or two when both do not fit in one."""
        if not self._blocked or self.run_id is None or self.engine is None:
            return []
        blocked = [task_id for task_id in self.engine.tasks if task_id in self._blocked]
        width = self.console.size.width
        lines = []
        for task_id in blocked[:_BLOCKED_SHOWN]:
            ref = shlex.quote(f"{self.run_id}:{task_id}")
            line = Text.assemble(("blocked ", "bold magenta"), (task_id, "bold"), ":")
            indent = line.cell_len - len("or")
            line.append(f" cis dag input {ref} TEXT{self.where}")
            session_id = self._session_of(task_id)
            if self._manager is not None and session_id and self._manager.get(session_id):
                attach = f"  cis dag attach {ref}{self.where}"
                if line.cell_len + len("  or") + len(attach) <= width:
                    line.append(f"  or{attach}")
                else:
                    lines.append(line)
                    line = Text(f"{' ' * indent}or{attach[1:]}")
            lines.append(line)
        if len(blocked) > _BLOCKED_SHOWN:
            more = len(blocked) - _BLOCKED_SHOWN
            lines.append(Text(f"… and {more} more blocked: cis dag sessions{self.where}"))
        return lines

    def _help(self) -> list[Text]:
        if self._keys is None:
            return []
        lines = [
            Text(
                "↑↓ pick a running task · Enter attach to it (Ctrl-B d comes back here) · "
                "Ctrl-C cancel the run",
                style="dim",
            )
        ]
        if self._notice:
            lines.append(Text(f"[cis: {self._notice}]"))
        return lines

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


#: Blocked tasks given a line of their own under the table.
_BLOCKED_SHOWN = 3
#: The terminal's second screen, cleared, for an attached session (full-screen programs use it
#: too); leaving it brings back the screen as it was.
_ALTERNATE_SCREEN = "\x1b[?1049h\x1b[H\x1b[2J"
_MAIN_SCREEN = "\x1b[?1049l"
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

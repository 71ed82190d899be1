"""AgentSession: one agent process in a real PTY, driven from the asyncio loop.

Everything here runs on the event loop without blocking it: the PTY master is non-blocking and
watched with ``loop.add_reader``; the exit status comes from a pidfd watched the same way, then
``waitpid(WNOHANG)``. No threads, no polling for output or exit. The only timers are the settle
check of blocked detection (and its backed-off tty-read re-checks while the agent is quiet), the
quiet-period rule, the kill grace period and the coalescing of output updates.

What the terminal means (ready for the prompt, waiting for a person, turn over) and how the
session ended are decided by the I/O-free rules in ``watcher.py``; this module does the I/O
and applies their decisions.

A kept agent (``keep``, for profiles that continue through the PTY): when its turn is over the
session completes with the turn's reply but its process stays, parked at its prompt, until a
later session takes it over (``continues``): that session types its own prompt into the same
PTY, with its own id, transcript and events. A parked agent that is not taken over is ended by
``release``; one whose process exits while parked is gone (``agent_ended`` says why).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import signal
import subprocess
import termios
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from cis_bot import private
from cis_bot.errors import UserError
from cis_bot.session import procfs
from cis_bot.session.detect import Blocked, ScreenView, TerminalView, TextView, find_idle
from cis_bot.session.events import (
    SessionBlocked,
    SessionCompleted,
    SessionCreated,
    SessionEvent,
    SessionOutputUpdated,
    SessionState,
    SessionStateChanged,
)
from cis_bot.session.launch import build_argv, resolve_executable, stdin_payload
from cis_bot.session.output import ExtractorInput, get_extractor, terminal_text
from cis_bot.session.procfs import TtyReadProbe
from cis_bot.session.profile import AgentProfile, ContinueVia, PromptVia
from cis_bot.session.profiles import escaped_prompt
from cis_bot.session.spawn import Pty, SpawnMethod, setsid_failure, spawn
from cis_bot.session.watcher import (
    Block,
    Decision,
    Screen,
    TurnOver,
    TypePrompt,
    Unblock,
    Watcher,
    exit_code_of,
    outcome,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

log = structlog.get_logger(__name__)

_BRACKETED_PASTE_ON = b"\x1b[?2004h"
_BRACKETED_PASTE_OFF = b"\x1b[?2004l"


class SessionError(UserError):
    """An operation on a session that cannot be done (unknown id, session already ended)."""


@attrs.frozen
class SessionSettings:
    """Timing and size knobs shared by every session of a manager (tests make them short)."""

    #: Output must be quiet this long before blocked patterns and the tty-read rule are checked.
    settle_secs: float = 0.3
    #: ... but no longer than this after the first unchecked output (spinners never settle).
    settle_max_secs: float = 2.0
    #: While quiet, the tty-read check is repeated with backoff up to this interval.
    tty_poll_max_secs: float = 2.0
    #: At most one SessionOutputUpdated per session per interval.
    output_interval: float = 0.5
    #: kill(): SIGTERM, then SIGKILL after this long.
    kill_grace_secs: float = 5.0
    #: Between two pieces of a prompt typed a few bytes at a time (``typed_chunk_bytes``).
    typing_interval_secs: float = 0.02
    #: A profile's exit_input was typed: if the agent is still running after this long, it is
    #: terminated (its turn is over, so the session still ends on what the agent produced).
    exit_grace_secs: float = 15.0
    #: After the agent exits, how long to wait for the PTY to deliver the rest of its output
    #: (only a process that escaped with the terminal still open makes this wait).
    drain_secs: float = 2.0
    #: The in-memory tail of raw output, per running session.
    tail_bytes: int = 256 * 1024
    #: What a finished session keeps of its tail (the transcript file has everything).
    finished_tail_bytes: int = 64 * 1024
    #: How to start agents in their PTYs (see spawn.py): the first of posix_spawn, vfork (with
    #: util-linux ``setsid``) and fork, from this one on, that this machine has.
    spawn_method: SpawnMethod = SpawnMethod.POSIX_SPAWN
    #: PTY size at spawn.
    rows: int = 40
    cols: int = 120
    #: Reads per wake-up of the PTY reader: bounds the time one busy session holds the loop.
    read_size: int = 64 * 1024
    reads_per_wakeup: int = 4


class AgentSession:
    """One agent process in a PTY. Create it with ``SessionManager.start`` (or call ``start``
    inside a running loop); all methods must be called from that loop."""

    def __init__(
        self,
        *,
        session_id: str,
        profile: AgentProfile,
        prompt: str,
        work_dir: Path,
        transcript_path: Path,
        env: Mapping[str, str],
        settings: SessionSettings,
        publish: Callable[[SessionEvent], None],
        options: Sequence[str] = (),
        conversation: str | None = None,
        keep: bool = False,
        continues: AgentSession | None = None,
        refuse: str | None = None,
        notice: str | None = None,
    ) -> None:
        self.session_id = session_id
        self.profile = profile
        self.prompt = prompt
        self.work_dir = work_dir
        self.transcript_path = transcript_path
        self.env = dict(env)
        self.settings = settings
        self._publish = publish
        #: Arguments the profile's argv gets before its ``--`` (agent_config, conversations).
        self.options = tuple(options)
        #: The session whose UUID names the agent's conversation (default: this one).
        self.conversation = conversation or session_id
        #: Keep the agent when its turn is over, for a later session.
        self.keep = keep
        self._continues = continues
        self._refuse = refuse
        self._notice = notice
        #: The turn is over and the agent waits, kept, for a later session to take it over.
        self.parked = False
        #: Why a kept agent is gone (it exited, it was released), once it is.
        self.agent_ended: str | None = None
        #: The session whose kept agent this one took over.
        self._took_over: str | None = None
        self._agent_gone: asyncio.Future[None] | None = None
        self._release_timer: asyncio.TimerHandle | None = None
        #: What is left to type of the prompt (profiles with ``typed_chunk_bytes``).
        self._typing: collections.deque[bytes] = collections.deque()
        self._typing_timer: asyncio.TimerHandle | None = None

        self.state = SessionState.SPAWNING
        self.pid: int | None = None
        self.blocked_reason: str | None = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.total_bytes = 0
        self.started_at = time.time()
        self.completion: SessionCompleted | None = None

        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._done: asyncio.Future[SessionCompleted] = self._loop.create_future()
        self._proc: Pty | None = None
        self._via_setsid = False
        self._fd = -1
        self._pidfd = -1
        self._transcript_fd = -1
        self._transcript_failed = False
        self._tail = bytearray()
        self._tail_truncated = False
        self._listeners: list[Callable[[bytes], None]] = []
        self._view: TerminalView | None = None
        self._probe: TtyReadProbe | None = None
        #: The detection rules (set by ``start``, which reports a profile's invalid pattern).
        self._watcher: Watcher
        self._exit_overdue = False
        #: The screen when the turn was seen to end, for the output extractor.
        self._turn_screen: list[str] | None = None
        self._exit_timer: asyncio.TimerHandle | None = None
        # The terminal emulator is slow (~1 MB/s): screen sessions take smaller bites per wake-up
        # so one busy TUI cannot hold the loop for long.
        self._reads_per_wakeup = 1 if profile.screen else settings.reads_per_wakeup
        self._read_size = min(settings.read_size, 8192) if profile.screen else settings.read_size
        self._wbuf = bytearray()
        self._writer_active = False
        self._bracketed_paste = False
        self._status: int | None = None
        self._exited = False
        self._eof = False
        self._finished = False
        self._kill_state: SessionState | None = None
        self._kill_reason: str | None = None

        self._settle_timer: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._exit_poll_timer: asyncio.TimerHandle | None = None
        self._output_timer: asyncio.TimerHandle | None = None
        self._output_dirty = False
        self._last_output_event = -1e9

    # ----------------------------------------------------------------- public API

    @property
    def duration_s(self) -> float:
        if self.completion is not None:
            return self.completion.duration_s
        return self._loop.time() - self._t0

    @property
    def agent(self) -> str:
        return self.profile.name

    async def wait(self) -> SessionCompleted:
        """Until the session has ended; its SessionCompleted."""
        return await asyncio.shield(self._done)

    def send_input(self, data: str | bytes) -> None:
        """Write to the PTY as if typed. A blocked session goes back to running."""
        if self.state.is_terminal or self._fd < 0 or self._exited:
            raise SessionError(f"session {self.session_id} has ended ({self.state})")
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._write(raw)
        unblocked = self._watcher.input(self._loop.time())
        self._arm_quiet()
        self._apply(unblocked)
        self._arm_poll(self.settings.settle_secs)

    async def kill(
        self,
        state: SessionState = SessionState.KILLED,
        reason: str | None = None,
        *,
        grace_secs: float | None = None,
    ) -> SessionCompleted:
        """End the session's whole process group: SIGTERM, SIGKILL after the grace period."""
        if state not in (SessionState.KILLED, SessionState.TIMEOUT):
            raise ValueError(f"kill state must be killed or timeout, not {state}")
        if not self._finished and self._kill_state is None:
            self._kill_state = state
            self._kill_reason = reason or (
                "timed out" if state is SessionState.TIMEOUT else "killed"
            )
            log.info("session.kill", session_id=self.session_id, state=str(state), reason=reason)
            if not self._exited:
                self._signal_session(signal.SIGTERM)
                self._signal_session(signal.SIGCONT)
                grace = self.settings.kill_grace_secs if grace_secs is None else grace_secs
                self._kill_timer = self._loop.call_later(grace, self._escalate_kill)
            else:
                self._finish()
        return await self.wait()

    def resize(self, rows: int, cols: int) -> None:
        """Set the PTY's window size (the agent gets SIGWINCH)."""
        if not all(isinstance(n, int) and 0 < n < 10000 for n in (rows, cols)):
            raise ValueError(f"invalid terminal size {rows}x{cols}")
        if self._proc is not None and not self._finished:
            with contextlib.suppress(OSError):
                self._proc.setwinsize(rows, cols)
        if self._view is not None:
            self._view.resize(rows, cols)

    def add_output_listener(self, listener: Callable[[bytes], None]) -> Callable[[], None]:
        """Call ``listener`` with every chunk of raw output; returns a function that removes it.

        ``tail_bytes()`` then ``add_output_listener()`` in the same loop step gives a gap-free
        stream (what a terminal attaching to a live session needs)."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def tail_bytes(self) -> bytes:
        """The end of the raw output (bounded)."""
        return bytes(self._tail)

    def tail_text(self, max_lines: int = 40) -> str:
        """The last lines of output as plain text (or of the screen, for screen profiles)."""
        if isinstance(self._view, ScreenView):
            return "\n".join(self._view.last_lines(max_lines))
        text = terminal_text(
            bytes(self._tail[-16384:]), truncated=self._tail_truncated or (len(self._tail) > 16384)
        )
        return "\n".join(text.rstrip("\n").split("\n")[-max_lines:])

    def screen_lines(self) -> list[str] | None:
        """The rendered screen, line by line (screen profiles only)."""
        return self._view.display() if isinstance(self._view, ScreenView) else None

    # ----------------------------------------------------------------- spawning

    def start(self) -> None:
        """Spawn the agent (or take over a kept one). Failures end the session as failed (with
        SessionCompleted)."""
        if self._refuse is not None:
            self._fail_to_start(self._refuse, cannot_execute=False)
            return
        if self._continues is not None:
            self._take_over(self._continues)
            return
        try:
            self._watcher = Watcher(
                self.profile,
                settle_secs=self.settings.settle_secs,
                settle_max_secs=self.settings.settle_max_secs,
                tty_poll_max_secs=self.settings.tty_poll_max_secs,
                now=self._t0,
            )
            argv = build_argv(
                self.profile,
                self.prompt,
                self.session_id,
                options=self.options,
                conversation=self.conversation,
            )
            if not self.work_dir.is_dir():
                raise FileNotFoundError(f"work_dir {self.work_dir} is not a directory")
            argv[0] = resolve_executable(argv[0], self.env, self.work_dir)
            if any("\0" in arg for arg in argv):
                raise ValueError("the command line contains a NUL character")
        except (OSError, ValueError) as e:
            self._fail_to_start(str(e))
            return
        try:
            private.make_dirs(self.transcript_path.parent)
            self._transcript_fd = private.open_file(
                self.transcript_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
            )
        except OSError as e:
            self._fail_to_start(f"cannot open transcript {self.transcript_path}: {e}")
            return
        try:
            spawned = spawn(
                argv,
                cwd=self.work_dir,
                env=self.env,
                rows=self.settings.rows,
                cols=self.settings.cols,
                echo=self.profile.prompt_via is not PromptVia.STDIN,
                method=self.settings.spawn_method,
                loop=self._loop,
            )
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            self._fail_to_start(_describe_spawn_error(e))
            return
        proc = spawned.pty
        self._proc = proc
        self._via_setsid = spawned.via_setsid
        self.pid = proc.pid
        self._fd = proc.fd
        os.set_blocking(self._fd, False)
        if self.profile.detect_tty_read and spawned.slave_path:
            probe = TtyReadProbe(proc.pid, self._fd, spawned.slave_path)
            self._probe = probe if probe.available else None
        self._watcher.tty_probe = self._probe is not None
        self._view = (
            ScreenView(self.settings.rows, self.settings.cols)
            if self.profile.screen
            else TextView()
        )
        self._loop.add_reader(self._fd, self._on_readable)
        self._watch_exit()
        log.debug("session.spawned", session_id=self.session_id, pid=proc.pid, argv0=argv[0])
        self._publish(
            SessionCreated(self.session_id, self.profile.name, proc.pid, self.transcript_path)
        )
        self._change_state(SessionState.RUNNING, self._notice)
        if self.profile.prompt_via is PromptVia.STDIN:
            self._write(stdin_payload(self.prompt, _termios_of(self._fd)))
        self._arm_quiet()
        if self._watcher.tty_probe or self._watcher.prompt_pending:
            self._arm_poll(self.settings.settle_secs)

    def _cannot_execute(self, detail: str) -> str:
        command = self.profile.argv[0] if self.profile.argv else ""
        return f"cannot execute {command!r}: {detail}"

    def _fail_to_start(self, detail: str, *, cannot_execute: bool = True) -> None:
        self.error = self._cannot_execute(detail) if cannot_execute else detail
        log.warning("session.spawn_failed", session_id=self.session_id, error=self.error)
        if self._transcript_fd >= 0:
            os.close(self._transcript_fd)
            self._transcript_fd = -1
        self._publish(
            SessionCreated(self.session_id, self.profile.name, None, self.transcript_path)
        )
        self._complete(SessionState.FAILED, None, self.error, "")

    def _watch_exit(self) -> None:
        assert self.pid is not None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:  # kernels before 5.3: fall back to polling waitpid with backoff
            self._exit_poll_timer = self._loop.call_later(0.005, self._poll_exit, 0.005)
            return
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _poll_exit(self, delay: float) -> None:
        self._exit_poll_timer = None
        if not self._reap():
            delay = min(delay * 2, 0.2)
            self._exit_poll_timer = self._loop.call_later(delay, self._poll_exit, delay)

    # ----------------------------------------------------------------- I/O

    def _on_readable(self) -> None:
        for _ in range(self._reads_per_wakeup):
            try:
                data = os.read(self._fd, self._read_size)
            except BlockingIOError:
                return
            except OSError as e:  # EIO: every process has closed the terminal
                if e.errno not in (errno.EIO, errno.EBADF):
                    log.warning("session.read_error", session_id=self.session_id, error=str(e))
                self._on_eof()
                return
            if not data:
                self._on_eof()
                return
            self._on_output(data)

    def _on_output(self, data: bytes) -> None:
        self.total_bytes += len(data)
        if self._transcript_fd >= 0:
            self._append_transcript(data)
        tail = self._tail
        tail += data
        if len(tail) > 2 * self.settings.tail_bytes:
            del tail[: -self.settings.tail_bytes]
            self._tail_truncated = True
        if self._view is not None:
            self._view.feed(data)
        if b"?2004" in data:
            self._track_bracketed_paste(data)
        for listener in tuple(self._listeners):
            try:
                listener(data)
            except Exception:
                log.exception("session.listener_failed", session_id=self.session_id)
        if self._finished:
            return
        now = self._loop.time()
        unblocked = self._watcher.output(now)
        if self._settle_timer is None:
            self._settle_timer = self._loop.call_at(
                now + self.settings.settle_secs, self._on_settle_timer
            )
        if self._quiet_timer is None:
            self._arm_quiet()
        self._apply(unblocked)
        self._output_dirty = True
        if self._output_timer is None:
            delay = max(0.0, self._last_output_event + self.settings.output_interval - now)
            self._output_timer = self._loop.call_later(delay, self._emit_output_updated)

    def _append_transcript(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._transcript_fd, view)
                view = view[written:]
        except OSError as e:
            if not self._transcript_failed:
                self._transcript_failed = True
                log.error(
                    "session.transcript_write_failed", session_id=self.session_id, error=str(e)
                )

    def _track_bracketed_paste(self, data: bytes) -> None:
        on, off = data.rfind(_BRACKETED_PASTE_ON), data.rfind(_BRACKETED_PASTE_OFF)
        if on >= 0 or off >= 0:
            self._bracketed_paste = on > off

    def _write(self, data: bytes) -> None:
        if self._writer_active:
            self._wbuf += data
            return
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError as e:
            log.warning("session.write_failed", session_id=self.session_id, error=str(e))
            return
        if written < len(data):
            self._wbuf += data[written:]
            self._writer_active = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            written = os.write(self._fd, self._wbuf)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("session.write_failed", session_id=self.session_id, error=str(e))
            written = len(self._wbuf)
        del self._wbuf[:written]
        if not self._wbuf:
            self._loop.remove_writer(self._fd)
            self._writer_active = False

    def _emit_output_updated(self) -> None:
        self._output_timer = None
        if not self._output_dirty:
            return
        self._output_dirty = False
        self._last_output_event = self._loop.time()
        self._publish(SessionOutputUpdated(self.session_id, self.total_bytes, self.tail_text(20)))

    # ----------------------------------------------------------------- blocked detection
    # The rules are the watcher's (watcher.py); here: its timers, what it is shown, and its
    # decisions carried out.

    def _on_settle_timer(self) -> None:
        self._settle_timer = None
        if self._finished or self._exited:
            return
        due = self._watcher.settle_check(self._loop.time())
        if due is not None:
            self._settle_timer = self._loop.call_at(due, self._on_settle_timer)
            return
        self._evaluate()

    def _arm_poll(self, delay: float) -> None:
        if self._poll_timer is not None:
            self._poll_timer.cancel()
        self._poll_timer = self._loop.call_later(delay, self._on_poll_timer)

    def _on_poll_timer(self) -> None:
        self._poll_timer = None
        if self._finished or self._exited:
            return
        delay = self._watcher.poll_check(self._loop.time())
        if delay is not None:
            self._arm_poll(delay)
            return
        self._evaluate()

    def _evaluate(self) -> None:
        """Show the watcher the terminal: is the agent ready, waiting for a person, done?"""
        watcher = self._watcher
        if self._finished or self._exited or watcher.turn_over:
            return
        lines = self._view.last_lines(watcher.pattern_lines) if self._view is not None else []
        reading = self._probe is not None and self._probe.reading_pid() is not None
        evaluation = watcher.evaluate(Screen(lines, reading_tty=reading), self._loop.time())
        self._apply(evaluation.decision)
        if evaluation.recheck_in is not None:
            self._arm_poll(evaluation.recheck_in)

    def _apply(self, decision: Decision | None) -> None:
        match decision:
            case TypePrompt():
                self._type_prompt()
            case Block(blocked=blocked):
                self._set_blocked(blocked)
            case Unblock(why=why):
                self._set_running(why)
            case TurnOver(shown=shown) if (
                self.keep and self.profile.continue_via is ContinueVia.PTY
            ):
                self._park(shown)
            case TurnOver(shown=shown):
                self._send_exit_input(shown)

    def _send_exit_input(self, shown: str) -> None:
        """The agent's turn is over: type the profile's exit input, once, and see that it exits."""
        if isinstance(self._view, ScreenView):
            self._turn_screen = self._view.display()
        log.info("session.turn_over", session_id=self.session_id, shown=shown[-200:])
        self._set_running("turn over")
        self._write(self.profile.exit_input.encode("utf-8"))
        self._exit_timer = self._loop.call_later(
            self.settings.exit_grace_secs, self._on_exit_overdue
        )

    def _on_exit_overdue(self) -> None:
        self._exit_timer = None
        if self._finished or self._exited:
            return
        log.warning(
            "session.exit_overdue",
            session_id=self.session_id,
            grace_secs=self.settings.exit_grace_secs,
            hint="the agent did not exit after its exit input; terminating it",
        )
        self._exit_overdue = True
        self._signal_session(signal.SIGTERM)
        self._signal_session(signal.SIGCONT)
        self._kill_timer = self._loop.call_later(self.settings.kill_grace_secs, self._escalate_kill)

    def _type_prompt(self) -> None:
        prompt = escaped_prompt(self.profile, self.prompt)
        newline = self.profile.typed_newline
        if not newline:
            text = prompt.encode("utf-8")
            if self._bracketed_paste:
                text = b"\x1b[200~" + text + b"\x1b[201~"
            self._write(text)
            self._press_enter(len(text))
            return
        # Typed as a person types: a line continuation for each newline, a few bytes at a time
        # (an agent that takes a burst of input for a paste marks it as pasted content), then
        # Enter once it has all gone in.
        lines = prompt.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        text = newline.join(lines).encode("utf-8")
        size = self.profile.typed_chunk_bytes or len(text) or 1
        self._typing = collections.deque(text[i : i + size] for i in range(0, len(text), size))
        self._type_next(len(text))

    def _type_next(self, size: int) -> None:
        self._typing_timer = None
        if self._finished or self._exited:
            return
        if self._typing:
            self._write(self._typing.popleft())
            delay = self.settings.typing_interval_secs
            if not self._typing:
                delay = max(delay, self.settings.settle_secs)  # all of it in before Enter
            self._typing_timer = self._loop.call_later(delay, self._type_next, size)
            return
        self._press_enter(size)

    def _press_enter(self, size: int) -> None:
        log.debug("session.prompt_typed", session_id=self.session_id, bytes=size)
        self._write(b"\r")
        recheck = self._watcher.prompt_typed(self._loop.time())
        if recheck is not None:
            self._arm_poll(recheck)

    def _arm_quiet(self) -> None:
        due = self._watcher.quiet_due()
        if due is None or self._finished:
            return
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
        self._quiet_timer = self._loop.call_at(due, self._on_quiet_timer)

    def _on_quiet_timer(self) -> None:
        self._quiet_timer = None
        due = self._watcher.quiet_due()
        if due is None or self._finished or self._exited:
            return
        if self._loop.time() < due:
            self._quiet_timer = self._loop.call_at(due, self._on_quiet_timer)
            return
        lines = self._view.last_lines(1) if self._view is not None else []
        self._apply(self._watcher.quiet(lines[-1] if lines else None))

    def _set_blocked(self, blocked: Blocked) -> None:
        self.blocked_reason = blocked.reason
        if self.state is not SessionState.BLOCKED:
            self._change_state(SessionState.BLOCKED, blocked.reason)
        preview = "\n".join(self._view.last_lines(10)) if self._view is not None else ""
        log.info("session.blocked", session_id=self.session_id, reason=blocked.reason)
        self._publish(SessionBlocked(self.session_id, blocked.reason, preview))

    def _set_running(self, why: str) -> None:
        self.blocked_reason = None
        if self.state is SessionState.BLOCKED:
            self._change_state(SessionState.RUNNING, why)

    # ----------------------------------------------------------------- kept agents

    def _park(self, shown: str) -> None:
        """The turn is over and a later session continues this agent: the task completes with
        the turn's reply; the process stays, reading nothing, at its prompt."""
        if isinstance(self._view, ScreenView):
            self._turn_screen = self._view.display()
        log.info("session.parked", session_id=self.session_id, shown=shown[-200:])
        self._set_running("turn over")
        for timer in (self._settle_timer, self._poll_timer, self._quiet_timer):
            if timer is not None:
                timer.cancel()
        self.parked = True
        self._agent_gone = self._loop.create_future()
        self._complete(SessionState.COMPLETED, None, None, None)

    def _take_over(self, parked: AgentSession) -> None:
        """Continue a parked agent: its process, terminal and screen become this session's, and
        this session's prompt is typed at its prompt."""
        if not parked.parked or parked._exited:
            why = parked.agent_ended or "its process has exited"
            self._fail_to_start(f"the kept agent is gone: {why}", cannot_execute=False)
            return
        try:
            self.transcript_path.parent.mkdir(parents=True, exist_ok=True)
            self._transcript_fd = os.open(
                self.transcript_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            self._fail_to_start(f"cannot open transcript {self.transcript_path}: {e}")
            return
        self._watcher = Watcher(
            self.profile,
            settle_secs=self.settings.settle_secs,
            settle_max_secs=self.settings.settle_max_secs,
            tty_poll_max_secs=self.settings.tty_poll_max_secs,
            now=self._t0,
        )
        view = parked._view
        screen = view.last_lines(self._watcher.pattern_lines) if view is not None else []
        idle = find_idle(self._watcher.idle_patterns, screen)
        # Until the agent has answered, the screen still shows the turn that was over.
        self._watcher.expect_new_turn(idle[1] if idle else None)
        self._proc, self.pid, self._fd, self._pidfd = parked._proc, parked.pid, parked._fd, -1
        self._via_setsid, self._view, self._probe = parked._via_setsid, view, parked._probe
        self._bracketed_paste = parked._bracketed_paste
        self.conversation = parked.conversation
        self._took_over = parked.session_id
        parked._hand_over()
        self._watcher.tty_probe = self._probe is not None
        self._loop.add_reader(self._fd, self._on_readable)
        self._watch_exit()
        log.debug("session.took_over", session_id=self.session_id, parked=parked.session_id)
        self._publish(
            SessionCreated(self.session_id, self.profile.name, self.pid, self.transcript_path)
        )
        notice = self._notice or f"continues the agent of {parked.session_id}"
        self._change_state(SessionState.RUNNING, notice)
        self._type_prompt()
        self._arm_quiet()

    def _hand_over(self) -> None:
        """Give this parked agent's process to the session taking it over."""
        self.parked = False
        self._loop.remove_reader(self._fd)
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._exit_poll_timer is not None:
            self._exit_poll_timer.cancel()
            self._exit_poll_timer = None
        if self._transcript_fd >= 0:
            os.close(self._transcript_fd)
            self._transcript_fd = -1
        self._proc = None
        self._fd = -1
        self.agent_ended = "taken over by a later session"
        if self._agent_gone is not None and not self._agent_gone.done():
            self._agent_gone.set_result(None)

    async def release(self, reason: str, *, grace_secs: float | None = None) -> None:
        """End a parked agent no later session needs: its exit input, then TERM and KILL after
        the grace periods. Returns once its process has exited."""
        if not self.parked or self._agent_gone is None:
            return
        if self.agent_ended is None:
            self.agent_ended = reason
            log.info("session.released", session_id=self.session_id, reason=reason)
            if self.profile.exit_input:
                self._write(self.profile.exit_input.encode("utf-8"))
            grace = self.settings.exit_grace_secs if grace_secs is None else grace_secs
            self._release_timer = self._loop.call_later(grace, self._terminate_parked)
        await asyncio.shield(self._agent_gone)

    def _terminate_parked(self) -> None:
        self._release_timer = None
        if self.parked:
            self._signal_session(signal.SIGTERM)
            self._signal_session(signal.SIGCONT)
            self._kill_timer = self._loop.call_later(
                self.settings.kill_grace_secs, self._escalate_kill_parked
            )

    def _escalate_kill_parked(self) -> None:
        self._kill_timer = None
        if self.parked:
            self._signal_session(signal.SIGKILL)

    def _end_parked(self) -> None:
        """A parked agent's process has exited (released, or on its own)."""
        self.parked = False
        if self._release_timer is not None:
            self._release_timer.cancel()
        if self.agent_ended is None:
            code = exit_code_of(self._status)
            self.agent_ended = f"its process exited while it waited (status {code})"
            log.warning("session.kept_agent_exited", session_id=self.session_id, exit_code=code)
        try:
            self._release_resources()
        except Exception:
            log.exception("session.cleanup_failed", session_id=self.session_id)
        if self._agent_gone is not None and not self._agent_gone.done():
            self._agent_gone.set_result(None)

    # ----------------------------------------------------------------- exit and kill

    def _on_exit(self) -> None:
        self._reap()

    def _reap(self) -> bool:
        """waitpid(WNOHANG); True once the agent's exit status is known."""
        assert self.pid is not None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, -1
        if pid == 0:
            return False
        self._status = status
        self._exited = True
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._eof or self._finished:
            self._finish()
        else:
            self._drain_timer = self._loop.call_later(self.settings.drain_secs, self._finish)
        return True

    def _on_eof(self) -> None:
        self._eof = True
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
        if self._exited:
            self._finish()

    def _escalate_kill(self) -> None:
        self._kill_timer = None
        if not self._finished:
            log.info("session.kill_escalated", session_id=self.session_id)
            self._signal_session(signal.SIGKILL)

    def _signal_session(self, sig: signal.Signals) -> None:
        """Signal the agent's process group and every other process of its session."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        for pid in procfs.session_members(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _finish(self) -> None:
        if self._finished:
            if self.parked:
                self._end_parked()
            return
        self._finished = True
        try:
            self._release_resources()
        except Exception:  # never let cleanup trouble cost the session its SessionCompleted
            log.exception("session.cleanup_failed", session_id=self.session_id)
        state, exit_code, error = self._verdict()
        self._complete(state, exit_code, error, None)

    def _release_resources(self) -> None:
        for timer in (
            self._settle_timer,
            self._poll_timer,
            self._quiet_timer,
            self._kill_timer,
            self._drain_timer,
            self._exit_poll_timer,
            self._output_timer,
            self._exit_timer,
            self._typing_timer,
        ):
            if timer is not None:
                timer.cancel()
        if self._fd >= 0:
            if not self._eof:
                self._loop.remove_reader(self._fd)
                self._drain_remaining()
            if self._writer_active:
                self._loop.remove_writer(self._fd)
        if self.pid is not None:
            # Whatever the agent left behind in its process group (a stray background job)
            # goes with it; if the terminal never closed, someone escaped the group: find them.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            if not self._eof:
                self._signal_session(signal.SIGKILL)
        if self._proc is not None:
            self._proc.release()
        self._fd = -1
        if self._transcript_fd >= 0:
            os.close(self._transcript_fd)
            self._transcript_fd = -1

    def _drain_remaining(self) -> None:
        """What is already in the PTY, bounded: a process that escaped may still be writing."""
        for _ in range(64):
            try:
                data = os.read(self._fd, self.settings.read_size)
            except OSError:
                return
            if not data:
                return
            self._on_output(data)

    def _verdict(self) -> tuple[SessionState, int | None, str | None]:
        exit_code = exit_code_of(self._status)
        spawn_failure = None
        if self._via_setsid and exit_code is not None:
            why = setsid_failure(exit_code, bytes(self._tail[:512]))
            spawn_failure = self._cannot_execute(why) if why is not None else None
        state, code, error = outcome(
            exit_code,
            killed=self._kill_state,
            kill_reason=self._kill_reason,
            spawn_failure=spawn_failure,
            exit_overdue=self._exit_overdue,
        )
        if self._took_over is not None and state is SessionState.FAILED:
            error = f"the kept agent of {self._took_over} {error}"
        return state, code, error

    def _complete(
        self, state: SessionState, exit_code: int | None, error: str | None, output: str | None
    ) -> None:
        """Publish the final OutputUpdated, StateChanged and SessionCompleted, exactly once."""
        self._finished = True
        if output is None:
            output, error, state = self._extract(state, error)
        if self._output_dirty:
            self._output_dirty = False
            self._publish(
                SessionOutputUpdated(self.session_id, self.total_bytes, self.tail_text(20))
            )
        self.exit_code = exit_code
        self.error = error
        self.blocked_reason = None
        self._change_state(state, error)
        completed = SessionCompleted(
            session_id=self.session_id,
            state=state,
            exit_code=exit_code,
            error=error,
            output=output,
            transcript_path=self.transcript_path,
            duration_s=self._loop.time() - self._t0,
        )
        self.completion = completed
        log.debug(
            "session.completed", session_id=self.session_id, state=str(state), exit_code=exit_code
        )
        # Free what a finished session no longer needs (the transcript file has everything).
        keep = self.settings.finished_tail_bytes
        if len(self._tail) > keep:
            del self._tail[:-keep]
            self._tail_truncated = True
        self._listeners.clear()
        self._publish(completed)
        self._done.set_result(completed)

    def _extract(
        self, state: SessionState, error: str | None
    ) -> tuple[str, str | None, SessionState]:
        try:
            extractor = get_extractor(self.profile.output)
            extracted = extractor(
                ExtractorInput(
                    raw_tail=bytes(self._tail),
                    complete=not self._tail_truncated,
                    transcript_path=self.transcript_path,
                    session_id=self.conversation,
                    env=self.env,
                    screen=self._turn_screen or self.screen_lines(),
                )
            )
        except Exception as e:
            log.exception("session.extractor_failed", session_id=self.session_id)
            fallback = terminal_text(bytes(self._tail[-65536:]), truncated=True)
            if state is SessionState.COMPLETED:
                return fallback, f"cannot read the agent's output: {e}", SessionState.FAILED
            return fallback, error, state
        if extracted.error is not None and state is SessionState.COMPLETED:
            return extracted.output, extracted.error, SessionState.FAILED
        if extracted.error is not None and state is SessionState.FAILED:
            # The agent's own account is worth more than its exit status alone.
            return extracted.output, f"{error} ({extracted.error})", state
        return extracted.output, error, state

    def _change_state(self, new: SessionState, reason: str | None) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        self._publish(SessionStateChanged(self.session_id, old, new, reason))


def _termios_of(fd: int) -> list[Any]:
    return termios.tcgetattr(fd)


def _describe_spawn_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)

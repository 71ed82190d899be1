"""Starting a process in a new PTY, as the session leader with the PTY as its controlling terminal.

Three ways, same result (a ``PtyProcess`` around the child's pid and the master fd), the first
this machine has (``SpawnMethod``):

- ``posix_spawn``: libc's, through ctypes (``posix_spawn.py``): libc sets the child up (new
  session, directory, the PTY opened as its controlling terminal, signals) and execs the agent
  itself, in one exec. About half the CPU of the ``vfork`` way per session, and an exec failure
  is an exception.
- ``vfork``: ``subprocess`` (which uses vfork on Linux) runs util-linux ``setsid --ctty``, which
  makes a new session, takes the PTY (its stdin) as controlling terminal and execs the agent.
  Cost does not grow with our process's size: about 0.3 ms whether we hold 10 MB or 300 MB.
- ``fork``: ``ptyprocess.PtyProcess.spawn`` (fork + login_tty). It copies our page tables, so it
  costs 3 ms in a small process and 15+ ms in a node process holding a few hundred MB. Used when
  there is no ``setsid`` binary.

Exec errors come back as exceptions every way, except one case: with ``vfork``, ``setsid``
itself execs the agent (through coreutils' ``env --default-signal`` when our process ignores
signals the agent must not), and if that exec fails it exits 126/127 after printing
``setsid: failed to execute ...`` (or ``env: ...``) on the terminal; ``setsid_failure``
recognises that.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import shutil
import signal
import struct
import subprocess
import termios
from typing import TYPE_CHECKING

import attrs
from ptyprocess import PtyProcess

from cis_bot.session import posix_spawn

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping, Sequence
    from pathlib import Path

SETSID = next(
    (path for path in ("/usr/bin/setsid", "/bin/setsid") if os.access(path, os.X_OK)),
    shutil.which("setsid"),
)
ENV = next((path for path in ("/usr/bin/env", "/bin/env") if os.access(path, os.X_OK)), None)
# How setsid (and env, when it resets signals) start what they say about the agent's exec.
_SETSID_FAILURE = b"setsid: "
_ENV_FAILURE = f"{ENV}: ".encode() if ENV else _SETSID_FAILURE
_TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int): the pts number of a PTY master
# Signals whose disposition the agent should start with at the default, whatever ours is:
# Python ignores SIGPIPE and SIGXFSZ, and a parent run under nohup ignores SIGHUP.
_DEFAULT_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


class SpawnMethod(enum.StrEnum):
    """How to start a process in a PTY (see the module docstring), fastest first."""

    POSIX_SPAWN = "posix_spawn"
    VFORK = "vfork"
    FORK = "fork"

    def usable(self) -> SpawnMethod:
        """This way, or the next one this machine has."""
        if self is SpawnMethod.POSIX_SPAWN and not posix_spawn.available():
            return SpawnMethod.VFORK.usable()
        if self is SpawnMethod.VFORK and SETSID is None:
            return SpawnMethod.FORK
        return self


class Pty(PtyProcess):  # type: ignore[misc]
    """PtyProcess whose child we reap ourselves (from a pidfd), so closing it never waits."""

    closed: bool

    def __init__(self, pid: int, fd: int) -> None:
        super().__init__(pid, fd)
        # ptyprocess sleeps this long in close(); we close only after reaping the child.
        self.delayafterclose = 0

    def release(self) -> None:
        """Close the master without ptyprocess's own wait-and-terminate logic (we reaped).

        Closed right here: with the child reaped first, close(2) takes 12 µs (median; 77 µs at
        p99 in a 1,000-task run), less than handing it to a thread costs the event loop (the
        hop, then the GIL going back and forth): a 200-task run took 7% longer that way."""
        self.terminated = True
        if not self.closed:
            self.fd = -1
            self.closed = True
            self.fileobj.close()


class _RememberingPty(Pty):
    """Remembers the last instance made, so a child whose exec failed (``spawn`` raises and
    returns nothing) can still be reaped instead of left as a zombie."""

    last_made: Pty | None = None

    def __init__(self, pid: int, fd: int) -> None:
        super().__init__(pid, fd)
        _RememberingPty.last_made = self

    @classmethod
    def take_last_made(cls) -> Pty | None:
        made, cls.last_made = cls.last_made, None
        return made


@attrs.frozen
class Spawned:
    pty: Pty
    #: The slave's path (``/dev/pts/N``), for the tty-read probe; "" if unknown.
    slave_path: str
    #: Started through ``setsid``: its own exec failure shows as an exit status (see module doc).
    via_setsid: bool


def spawn(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    rows: int,
    cols: int,
    echo: bool,
    method: SpawnMethod,
    loop: asyncio.AbstractEventLoop,
) -> Spawned:
    """Start ``argv`` (argv[0] an absolute path) in a new PTY. Raises OSError (or
    SubprocessError) when it cannot start."""
    method = method.usable()
    if method is SpawnMethod.POSIX_SPAWN:
        return _spawn_posix(argv, cwd=cwd, env=env, rows=rows, cols=cols, echo=echo)
    if method is SpawnMethod.VFORK:
        return _spawn_vfork(argv, cwd=cwd, env=env, rows=rows, cols=cols, echo=echo)
    return _spawn_fork(argv, cwd=cwd, env=env, rows=rows, cols=cols, echo=echo, loop=loop)


def _set_up_terminal(slave: int, rows: int, cols: int, echo: bool) -> str:
    """Size the PTY, echo off unless wanted; the slave's path."""
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    if not echo:
        mode = termios.tcgetattr(slave)
        mode[3] &= ~termios.ECHO
        termios.tcsetattr(slave, termios.TCSANOW, mode)
    return os.ttyname(slave)


def _spawn_posix(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], rows: int, cols: int, echo: bool
) -> Spawned:
    master, slave = os.openpty()  # both close-on-exec: the child opens the slave by its path
    try:
        slave_path = _set_up_terminal(slave, rows, cols, echo)
        pid = posix_spawn.Spawn(
            argv[0],
            argv,
            env=env,
            cwd=cwd,
            terminal=slave_path,
            default_signals=_DEFAULT_SIGNALS,
        ).run()
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return Spawned(Pty(pid, master), slave_path, via_setsid=False)


def _spawn_vfork(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], rows: int, cols: int, echo: bool
) -> Spawned:
    assert SETSID is not None
    master, slave = os.openpty()  # both close-on-exec; subprocess dup2s slave onto 0, 1, 2
    try:
        slave_path = _set_up_terminal(slave, rows, cols, echo)
        child = subprocess.Popen(
            [SETSID, "--ctty", *_reset_ignored_signals(), *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=dict(env),
            close_fds=True,
            restore_signals=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    # We reap the child ourselves; a returncode keeps subprocess from ever waiting for it (its
    # __del__ would otherwise queue the pid for subprocess's own zombie collection).
    child.returncode = 0
    return Spawned(Pty(child.pid, master), slave_path, via_setsid=True)


def _reset_ignored_signals() -> list[str]:
    """A prefix that resets the signals we ignore (and subprocess does not restore) to their
    defaults in the agent. A disposition of "ignore" survives exec, so a ``cis`` started under
    nohup, or as a background job of a non-interactive shell, would otherwise hand its agents
    an ignored SIGHUP/SIGINT/SIGQUIT. Only then does the agent go through coreutils' ``env``."""
    ignored = [
        sig.name.removeprefix("SIG")
        for sig in _DEFAULT_SIGNALS
        if sig not in (signal.SIGPIPE, signal.SIGXFSZ)  # restore_signals=True resets these
        and signal.getsignal(sig) is signal.SIG_IGN
    ]
    if not ignored or ENV is None:
        return []
    return [ENV, f"--default-signal={','.join(ignored)}", "--"]


def _spawn_fork(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    rows: int,
    cols: int,
    echo: bool,
    loop: asyncio.AbstractEventLoop,
) -> Spawned:
    _RememberingPty.take_last_made()
    try:
        pty = _RememberingPty.spawn(
            list(argv),
            env=dict(env),
            echo=echo,
            preexec_fn=lambda: _child_setup(str(cwd)),
            dimensions=(rows, cols),
        )
    except Exception:  # ptyprocess re-raises the child's exec error as it was
        failed = _RememberingPty.take_last_made()
        if failed is not None:
            failed.terminated = True
            with contextlib.suppress(OSError):
                failed.close(force=False)
            # The child exits right after reporting its exec error: reap it when it has.
            reap_when_exited(loop, failed.pid)
        raise
    _RememberingPty.take_last_made()
    return Spawned(pty, _slave_path(pty.fd), via_setsid=False)


def _child_setup(work_dir: str) -> None:
    """Runs in the forked child before exec (errors travel back to the parent as exceptions)."""
    for sig in _DEFAULT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    os.chdir(work_dir)


def _slave_path(master_fd: int) -> str:
    try:
        number = struct.unpack("I", fcntl.ioctl(master_fd, _TIOCGPTN, b"\0\0\0\0"))[0]
    except OSError:
        return ""
    return f"/dev/pts/{number}"


def setsid_failure(exit_code: int | None, output_head: bytes) -> str | None:
    """If ``setsid`` could not exec the agent, why (from its message on the terminal)."""
    if exit_code in (None, 0) or not output_head.startswith((_SETSID_FAILURE, _ENV_FAILURE)):
        return None
    line = output_head.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
    # "setsid: failed to execute /x: Exec format error",
    # "/usr/bin/env: '/x': No such file or directory"
    by_env = output_head.startswith(_ENV_FAILURE)
    why = line[len(_ENV_FAILURE) :] if by_env else line.partition(": ")[2]
    if by_env or why.startswith("failed to execute "):
        return why.rpartition(": ")[2] or why
    return why


def reap_when_exited(loop: asyncio.AbstractEventLoop, pid: int) -> None:
    """Reap a child that is about to exit, without blocking the loop."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] != 0:
            return
    except ChildProcessError:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        loop.call_later(0.05, reap_when_exited, loop, pid)
        return

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    loop.add_reader(pidfd, reap)

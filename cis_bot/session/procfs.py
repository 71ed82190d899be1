"""Small readers of Linux /proc: process trees, groups and sessions, and whether a terminal is
being read (the tty-read rule of blocked detection: ``/proc/PID/syscall`` gives the syscall
number, then the fd, which must point at our PTY's slave)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}/task").exists()


def all_pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def descendants(pid: int) -> Iterator[int]:
    """Children, grandchildren, ... of ``pid`` (via /proc/PID/task/TID/children)."""
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            yield from children
            stack.extend(children)


def thread_dirs(pid: int) -> list[Path]:
    """/proc/PID/task/TID for each thread of ``pid`` (empty once it has gone)."""
    try:
        return list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


def fd_target(pid: int, fd: int) -> str | None:
    try:
        return str(Path(f"/proc/{pid}/fd/{fd}").readlink())
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name: index 0 is field 3 (state)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def pgrp(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields and len(fields) > 3 else None


def session_members(sid: int) -> list[int]:
    """Every live process whose session id is ``sid``, whatever its process group."""
    members = []
    for pid in all_pids():
        fields = _stat_fields(pid)
        if fields and len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            members.append(pid)
    return members


# read(2) and its vectored/positional variants, by machine: syscall numbers from the kernel's
# syscall tables (x86_64: read 0, pread64 17, readv 19; asm-generic/arm64: readv 65, pread64 67).
_READ_SYSCALLS: dict[str, frozenset[int]] = {
    "x86_64": frozenset({0, 17, 19}),
    "aarch64": frozenset({63, 65, 67}),
    "arm64": frozenset({63, 65, 67}),
}


def read_syscalls() -> frozenset[int]:
    """The read syscall numbers on this machine (empty where unknown: the rule then never fires)."""
    return _READ_SYSCALLS.get(platform.machine(), frozenset())


class TtyReadProbe:
    """Asks /proc whether the PTY's foreground process group waits in a read on this PTY."""

    def __init__(self, leader_pid: int, master_fd: int, slave_path: str) -> None:
        self._leader = leader_pid
        self._master_fd = master_fd
        self._slave_path = slave_path
        self._syscalls = read_syscalls()

    @property
    def available(self) -> bool:
        return bool(self._syscalls) and bool(self._slave_path)

    def reading_pid(self) -> int | None:
        """A process of the foreground group blocked reading this PTY, or None."""
        if not self.available:
            return None
        try:
            pgid = os.tcgetpgrp(self._master_fd)
        except OSError:
            return None
        for pid in self._group_members(pgid):
            if self._reads_tty(pid):
                return pid
        return None

    def _group_members(self, pgid: int) -> Iterator[int]:
        # The group leader is the usual reader (a shell's `read`, or the agent itself); others
        # are found by walking our process tree, or all of /proc once our leader has gone.
        yield pgid
        pids = descendants(self._leader) if alive(self._leader) else all_pids()
        for pid in pids:
            if pid != pgid and pgrp(pid) == pgid:
                yield pid

    def _reads_tty(self, pid: int) -> bool:
        for task in thread_dirs(pid):
            try:
                fields = (task / "syscall").read_text().split()
            except OSError:
                continue
            # "NR ARG1 ..." while blocked in a syscall; "running", or "-1 ..." otherwise.
            if len(fields) < 2 or not fields[0].isdigit():
                continue
            if int(fields[0]) not in self._syscalls:
                continue
            try:
                fd = int(fields[1], 16)
            except ValueError:
                continue
            if fd_target(pid, fd) == self._slave_path:
                return True
        return False

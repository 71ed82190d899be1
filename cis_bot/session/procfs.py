"""Small readers of Linux /proc: process trees, groups and sessions."""

from __future__ import annotations

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

"""Where a process's control API is found: ``<state_dir>/control/<pid>.json`` and ``<pid>.sock``.

Each process that holds sessions or drives runs (``cis dag execute``, ``cis dag resume``,
``cis node``) serves its control API on a unix socket and describes itself in a JSON file next to
it: pid, node id, the runs it drives, when it started, and the socket's path. The directory is
0700, so only the owner can connect (the server also checks the peer's uid).

A unix socket path is limited to 107 bytes; when the state directory is too deep for that, the
socket lives under ``$XDG_RUNTIME_DIR`` (or ``/tmp/cis-<uid>``, checked to be ours and 0700)
and the JSON file names it.

An entry whose pid is gone (or was reused by another program: the start time tells) is stale: the
reader removes it and reports it, so a caller can say "the process that ran X died".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import structlog

from cis_bot import private
from cis_bot.errors import UserError

log = structlog.get_logger(__name__)

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
CONTROL_DIR = "control"


@attrs.frozen
class RunEntry:
    run_id: str
    dag: str = ""
    room_id: str = ""
    mode: str = ""


@attrs.frozen
class ProcessEntry:
    """One process's control API, as its JSON file describes it."""

    pid: int
    socket: Path
    node_id: str
    #: "execute", "resume" or "node".
    kind: str
    started: float
    runs: tuple[RunEntry, ...] = ()
    #: The process's start time in clock ticks since boot (/proc/PID/stat field 22).
    start_ticks: int | None = None
    file: Path | None = None

    def describe(self) -> str:
        runs = ", ".join(r.run_id for r in self.runs)
        what = f"`cis {'dag ' if self.kind != 'node' else ''}{self.kind}`"
        return f"{what} (pid {self.pid}, node {self.node_id}{', runs ' + runs if runs else ''})"

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "socket": str(self.socket),
            "node_id": self.node_id,
            "kind": self.kind,
            "started": self.started,
            "start_ticks": self.start_ticks,
            "runs": [attrs.asdict(r) for r in self.runs],
        }

    @classmethod
    def from_json(cls, data: Any, file: Path) -> ProcessEntry:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        runs = tuple(
            RunEntry(
                run_id=str(r["run_id"]),
                dag=str(r.get("dag", "")),
                room_id=str(r.get("room_id", "")),
                mode=str(r.get("mode", "")),
            )
            for r in data.get("runs", [])
            if isinstance(r, dict) and isinstance(r.get("run_id"), str)
        )
        ticks = data.get("start_ticks")
        return cls(
            pid=int(data["pid"]),
            socket=Path(str(data["socket"])),
            node_id=str(data.get("node_id", "")),
            kind=str(data.get("kind", "")),
            started=float(data.get("started", 0)),
            runs=runs,
            start_ticks=ticks if isinstance(ticks, int) else None,
            file=file,
        )


def control_dir(state_dir: Path) -> Path:
    return state_dir / CONTROL_DIR


def private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or check that an existing one is ours and private."""
    private.make_dirs(path)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise UserError(f"{path} belongs to another user: refusing to put a control socket there")
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def socket_path(state_dir: Path, pid: int) -> Path:
    """Where process ``pid`` listens: next to its JSON file when the path is short enough."""
    preferred = control_dir(state_dir) / f"{pid}.sock"
    if len(os.fsencode(preferred.absolute())) <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(os.fsencode(state_dir.absolute())).hexdigest()[:16]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = (
        Path(runtime) / "cis"
        if runtime and Path(runtime).is_dir()
        else Path(tempfile.gettempdir()) / f"cis-{os.getuid()}"
    )
    path = base / digest / f"{pid}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UserError(f"no place for a control socket: {path} is too long for a unix socket")
    return path


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), to tell a reused pid from the original."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = stat_line[stat_line.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process now: ours is gone
    if start_ticks is not None:
        now = process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False
    return True


class Registration:
    """This process's entry: written when the control API is up, rewritten as runs come and go,
    removed on close."""

    def __init__(self, state_dir: Path, *, node_id: str, kind: str, socket: Path) -> None:
        self.directory = private_dir(control_dir(state_dir))
        self.pid = os.getpid()
        self.file = self.directory / f"{self.pid}.json"
        self.entry = ProcessEntry(
            pid=self.pid,
            socket=socket,
            node_id=node_id,
            kind=kind,
            started=time.time(),
            start_ticks=process_start_ticks(self.pid),
        )

    def write(self, runs: tuple[RunEntry, ...]) -> None:
        self.entry = attrs.evolve(self.entry, runs=runs)
        temporary = self.file.with_suffix(".json.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.entry.to_json(), f)
        temporary.replace(self.file)

    def remove(self) -> None:
        for path in (self.file, self.entry.socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@attrs.frozen
class Discovery:
    live: list[ProcessEntry]
    #: Entries whose process is gone; their files have been removed.
    dead: list[ProcessEntry]


def discover(state_dir: Path, *, clean: bool = True) -> Discovery:
    """The processes serving a control API for ``state_dir``; stale entries are removed."""
    live: list[ProcessEntry] = []
    dead: list[ProcessEntry] = []
    directory = control_dir(state_dir)
    try:
        files = sorted(directory.glob("*.json"))
    except OSError:
        return Discovery([], [])
    for file in files:
        try:
            entry = ProcessEntry.from_json(json.loads(file.read_text(encoding="utf-8")), file)
        except FileNotFoundError:
            continue  # removed while we looked
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("control.bad_entry", file=str(file), error=str(exc))
            continue
        if pid_alive(entry.pid, entry.start_ticks):
            live.append(entry)
            continue
        dead.append(entry)
        if clean:
            for path in (file, entry.socket):
                with contextlib.suppress(OSError):
                    path.unlink()
    live.sort(key=lambda e: e.started)
    return Discovery(live, dead)

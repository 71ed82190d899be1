"""The cluster's processes, as children of the supervisor and as ``run/processes.json`` says
them to ``status`` and ``down`` in another process.

Each child runs in a session of its own: the terminal's Ctrl-C reaches the supervisor alone,
which stops them in order. The supervisor is a child subreaper (Linux), so what a child leaves
behind when it is killed (an agent's PTY session) comes back to it and is ended too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import attrs
import structlog

from cis_bot import private
from cis_bot.app.devcluster.errors import ClusterError
from cis_bot.control.registry import pid_alive, process_start_ticks
from cis_bot.session import procfs

log = structlog.get_logger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of our descendants come to us instead of init (so ``stop`` finds them)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@attrs.frozen
class ProcessRecord:
    """A process as ``processes.json`` holds it: its pid, and its start time to tell it from a
    later process that got the same pid."""

    name: str
    pid: int
    start_ticks: int | None
    started: float
    log: str

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_ticks)

    @classmethod
    def from_json(cls, data: Any) -> ProcessRecord:
        ticks = data.get("start_ticks")
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start_ticks=ticks if isinstance(ticks, int) else None,
            started=float(data["started"]),
            log=str(data.get("log") or ""),
        )


@attrs.frozen
class Running:
    """``run/processes.json``: the supervisor and its children, and whether it got ready."""

    supervisor: ProcessRecord
    processes: tuple[ProcessRecord, ...]
    ready: bool
    detached: bool

    def save(self, path: Path) -> None:
        data = {
            "supervisor": attrs.asdict(self.supervisor),
            "processes": [attrs.asdict(p) for p in self.processes],
            "ready": self.ready,
            "detached": self.detached,
        }
        private.write_file(path, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Running | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                supervisor=ProcessRecord.from_json(data["supervisor"]),
                processes=tuple(ProcessRecord.from_json(p) for p in data["processes"]),
                ready=bool(data.get("ready")),
                detached=bool(data.get("detached")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("devcluster.bad_processes_file", path=str(path), error=str(exc))
            return None


def self_record(name: str = "supervisor") -> ProcessRecord:
    pid = os.getpid()
    return ProcessRecord(name, pid, process_start_ticks(pid), time.time(), "")


class Child:
    """One process of the cluster, its output in its log file."""

    def __init__(
        self, name: str, argv: list[str], *, cwd: Path, log_file: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.log_file = log_file
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.record: ProcessRecord | None = None
        self.exited = asyncio.Event()

    async def start(self) -> None:
        with self.log_file.open("ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.name} starts\n".encode())
            out.flush()
            private.fix_mode(self.log_file)
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        pid = self.process.pid
        self.record = ProcessRecord(
            self.name, pid, process_start_ticks(pid), time.time(), str(self.log_file)
        )
        asyncio.create_task(self._watch())  # noqa: RUF006  (it ends with the process)

    async def _watch(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        log.info("devcluster.exited", process=self.name, code=code)
        self.exited.set()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def failure(self) -> ClusterError:
        """What to tell when it died before the cluster was ready."""
        tail = log_tail(self.log_file)
        return ClusterError(
            f"{self.name} exited with status {self.exit_code} while the cluster started; "
            f"its log is {self.log_file}:\n{tail}"
        )

    async def stop(self, grace: float) -> None:
        """SIGTERM to its process group; SIGKILL after ``grace`` seconds."""
        if self.process is None:
            return
        if self.running:
            signal_group(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), grace)
            except TimeoutError:
                log.warning("devcluster.kill", process=self.name, grace=grace)
                signal_group(self.process.pid, signal.SIGKILL)
                await self.exited.wait()
        # What it forked into its group goes with it.
        signal_group(self.process.pid, signal.SIGKILL)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def end_descendants() -> list[int]:
    """SIGKILL whatever still runs below this process (adopted orphans included) and reap it;
    the pids ended."""
    ended = []
    for pid in list(procfs.descendants(os.getpid())):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            ended.append(pid)
    for pid in ended:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    return ended


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])

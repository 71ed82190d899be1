"""``cis dev-cluster up | down | status``: a homeserver, a coordinator that answers chat
commands, N workers, a person and a room, as local processes (no Docker): the topology of
``docker-compose.yml`` (``synapse-dev/README.md``).

``up`` stays in the foreground with one status line per process (Ctrl-C stops everything), or
with ``--detach`` runs its supervisor in the background once the cluster is ready (``down``
stops it). Exit codes: 0 ready / stopped / up, 1 a process failed or the cluster is not (all)
up, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cis_bot.errors import UserError

if TYPE_CHECKING:
    from rich.live import Live

    from cis_bot.app.devcluster.layout import ClusterDir
    from cis_bot.app.devcluster.supervisor import ClusterInfo, ProcessRow, UpOptions

HOMESERVERS = ("embedded", "synapse")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "dev-cluster",
        help="a local cluster to try: homeserver, coordinator, workers, a room (no Docker)",
        description="A dev cluster as local processes: a homeserver (embedded or Synapse), a "
        "coordinator that answers `!cis` commands, N workers, a person's account and the room "
        "#cis-dev:cis.local. The topology of docker-compose.yml, without Docker.",
    )
    commands = parser.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    directory = argparse.ArgumentParser(add_help=False)
    directory.add_argument(
        "--dir",
        type=Path,
        metavar="D",
        help="the cluster's directory (default: $XDG_STATE_HOME/cis/dev-cluster); a second `up` "
        "on it reuses its tokens, account and room",
    )
    up = commands.add_parser(
        "up",
        parents=[directory],
        help="start the cluster; it runs until Ctrl-C (or `down` with --detach)",
        description="Start the cluster and print where to log in and what to type first. It "
        "stays in the foreground with a status line per process until Ctrl-C, or runs in the "
        "background with --detach until `cis dev-cluster down`.",
    )
    up.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="how many workers (1-26; default: as last time, 2 the first time)",
    )
    up.add_argument(
        "--homeserver",
        choices=HOMESERVERS,
        help="embedded (default) or synapse: Synapse from PyPI, found through "
        "$CIS_SYNAPSE_PYTHON, this Python, synapse_homeserver on PATH or ./.venv-synapse",
    )
    up.add_argument(
        "--port",
        type=_port,
        metavar="P",
        help="the homeserver's port on 127.0.0.1 (default: as last time, 8008 the first "
        "time; 0 picks a free one)",
    )
    up.add_argument(
        "--detach", action="store_true", help="run in the background once ready; `down` stops it"
    )
    up.add_argument("--grace", type=float, default=10.0, help=argparse.SUPPRESS)
    up.add_argument("--refresh", type=float, default=1.0, help=argparse.SUPPRESS)
    up.set_defaults(handler=_up)
    down = commands.add_parser(
        "down", parents=[directory], help="stop a cluster that runs (detached or not)"
    )
    down.set_defaults(handler=_down, parser=down)
    status = commands.add_parser(
        "status", parents=[directory], help="every process of the cluster and its heartbeat"
    )
    status.set_defaults(handler=_status, parser=status)


def _workers(value: str) -> int:
    from cis_bot.app.devcluster.topology import MAX_WORKERS
    from cis_bot.cli import whole_number

    count = whole_number(1)(value)
    if count > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_WORKERS} (worker-a to worker-z), got {count}"
        )
    return count


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _directory(args: argparse.Namespace) -> ClusterDir:
    from cis_bot.app.devcluster.layout import ClusterDir
    from cis_bot.config import default_state_dir

    path: Path = args.dir or default_state_dir() / "dev-cluster"
    return ClusterDir(path.absolute())


# --- up ----------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    from cis_bot.app.devcluster.supervisor import UpOptions

    options = UpOptions(
        homeserver=args.homeserver,
        workers=args.workers,
        port=args.port,
        detached=args.detach,
        grace=args.grace,
        refresh=args.refresh,
    )
    directory = _directory(args)
    if args.detach:
        return _detach(directory, options)
    return _supervise(directory, options, _view(sys.stdout))


def _supervise(directory: ClusterDir, options: UpOptions, view: Any) -> int:
    import asyncio

    from cis_bot.app.devcluster.supervisor import Supervisor

    asyncio.run(Supervisor(directory, options, view).run())
    return 0


def _detach(directory: ClusterDir, options: UpOptions) -> int:
    """Fork the supervisor into a session of its own, its output in logs/supervisor.log; print
    what it says once ready (or why it could not), then leave it running. A fork, not a new
    interpreter: nothing to import again, the cluster is ready sooner."""
    from cis_bot import private

    directory.ensure()
    log = private.open_file(directory.log("supervisor"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the supervisor
        os.close(read_end)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        os._exit(_supervise_detached(directory, options, write_end))
    os.close(write_end)
    os.close(log)
    try:
        with os.fdopen(read_end, encoding="utf-8") as said:
            text = said.read()
    except KeyboardInterrupt:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        return 130
    if text.startswith(READY):
        print(text[len(READY) :], end="", flush=True)
        return 0
    print(text, end="", file=sys.stderr, flush=True)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) or 1


def _supervise_detached(directory: ClusterDir, options: UpOptions, fd: int) -> int:
    """The forked supervisor's life; its exit status."""
    announce = os.fdopen(fd, "w", encoding="utf-8")
    view = DetachedView(announce, PlainView(sys.stdout))
    try:
        return _supervise(directory, options, view)
    except UserError as exc:
        print(f"cis: error: {exc}", flush=True)
        view.failed(str(exc))
        return exc.exit_code
    except BaseException:  # not a user's mistake: the whole story, to the log
        import traceback

        traceback.print_exc()
        view.failed(f"the supervisor failed; see {directory.log('supervisor')}")
        return 1
    finally:
        sys.stdout.flush()


READY = "ready\n"


def _view(stream: IO[str]) -> Any:
    return LiveView(stream) if stream.isatty() else PlainView(stream)


def ready_text(info: ClusterInfo, seconds: float) -> str:
    nodes = ", ".join(info.nodes[1:])
    stop = (
        f"cis dev-cluster down --dir {info.directory}"
        if info.detached
        else "Ctrl-C (or `cis dev-cluster down` from another terminal)"
    )
    return (
        f"dev cluster ready in {seconds:.1f}s: {info.homeserver} homeserver, "
        f"{info.nodes[0]} and {len(info.nodes) - 1} worker(s) ({nodes})\n"
        f"  homeserver  {info.base_url}   (point any Matrix client at it: Element, Hydrogen)\n"
        f"  log in as   {info.person_id.split(':')[0][1:]}   password: {info.password}"
        f"   ({info.person_id})\n"
        f"  room        {info.room_alias}   (you are in it, with the nodes)\n"
        f"  try         {info.first_command}   (then `!cis status`; `!cis help` lists all)\n"
        f"  files       {info.directory}   (logs/: each process's log)\n"
        f"  stop        {stop}\n"
    )


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def heartbeat_text(beat: Mapping[str, Any] | None, known: bool, now: float) -> str:
    if not known:
        return "heartbeat unknown (the room cannot be read)"
    if not beat:
        return "no heartbeat"
    try:
        age = now - int(beat["timestamp"]) / 1000
        ttl = int(beat["ttl_ms"]) / 1000
        load = f"load {int(beat['load'])}/{int(beat['max_workers'])}"
    except (KeyError, TypeError, ValueError):
        return "heartbeat unreadable"
    late = "  LATE" if age > ttl else ""
    return f"heartbeat {_age(age)} ago, {load}{late}"


def row_text(row: ProcessRow, known: bool, now: float) -> str:
    if row.pid is None:
        return f"{row.name:<12} not started"
    if not row.running:
        how = f" (status {row.exit_code})" if row.exit_code is not None else ""
        return f"{row.name:<12} pid {row.pid:<7} exited{how}"
    text = f"{row.name:<12} pid {row.pid:<7} up {_age(now - row.started):<7}"
    if row.is_node:
        text += " " + heartbeat_text(row.heartbeat, known, now)
    return text


class PlainView:
    """For logs and pipes: the ready text, then a line whenever a process changes."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._shown: dict[str, str] = {}

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def starting(self, directory: str, homeserver: str, workers: int) -> None:
        self._say(
            f"starting a dev cluster in {directory}: {homeserver} homeserver, {workers} worker(s)"
        )

    def ready(self, info: ClusterInfo, seconds: float) -> None:
        self._say(ready_text(info, seconds).rstrip("\n"))

    def update(self, rows: list[ProcessRow], heartbeats_known: bool) -> None:
        now = time.time()
        for row in rows:
            beat = heartbeat_text(row.heartbeat, heartbeats_known, now) if row.is_node else ""
            # A change of state, not of ages: up / exited, beating / not, late / not.
            key = f"{row.running}{row.exit_code}{beat.split(' ')[0:1]}{'LATE' in beat}"
            if self._shown.get(row.name) != key:
                self._shown[row.name] = key
                self._say(f"{time.strftime('%H:%M:%S')} {row_text(row, heartbeats_known, now)}")

    def stopping(self) -> None:
        self._say("stopping the dev cluster")

    def stopped(self) -> None:
        self._say("stopped")


class LiveView(PlainView):
    """On a terminal: the status lines redrawn in place."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._live: Live | None = None
        self._lines: list[str] = []

    def ready(self, info: ClusterInfo, seconds: float) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        super().ready(info, seconds)
        console = Console(file=self.stream)
        self._live = Live(
            get_renderable=lambda: Text("\n".join(self._lines)),
            console=console,
            auto_refresh=False,
        )
        self._live.start()

    def update(self, rows: list[ProcessRow], heartbeats_known: bool) -> None:
        now = time.time()
        self._lines = [row_text(row, heartbeats_known, now) for row in rows]
        if self._live is not None:
            self._live.refresh()

    def stopping(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        super().stopping()


class DetachedView:
    """The detached supervisor's: the ready text (or the failure) through the announcement
    descriptor, which it then closes; the rest to its log."""

    def __init__(self, announce: IO[str], log: PlainView) -> None:
        self.announce: IO[str] | None = announce
        self.log = log

    def _close(self, text: str) -> None:
        if self.announce is not None:
            try:
                self.announce.write(text)
                self.announce.close()
            except BrokenPipeError:
                pass
            self.announce = None

    def starting(self, directory: str, homeserver: str, workers: int) -> None:
        self.log.starting(directory, homeserver, workers)

    def ready(self, info: ClusterInfo, seconds: float) -> None:
        self.log.ready(info, seconds)
        self._close(READY + ready_text(info, seconds))

    def failed(self, message: str) -> None:
        self._close(f"cis: error: {message}\n")

    def update(self, rows: list[ProcessRow], heartbeats_known: bool) -> None:
        self.log.update(rows, heartbeats_known)

    def stopping(self) -> None:
        self.log.stopping()

    def stopped(self) -> None:
        self.log.stopped()


# --- down, status ------------------------------------------------------------------------


def _down(args: argparse.Namespace) -> int:
    from cis_bot.app.devcluster.control import down
    from cis_bot.app.devcluster.errors import NoCluster

    directory = _directory(args)
    try:
        stopped = down(directory)
    except NoCluster as exc:
        args.parser.error(str(exc))
    if stopped:
        print(f"stopped the dev cluster in {directory.path}")
    else:
        print(f"no dev cluster runs in {directory.path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from cis_bot.app.devcluster.control import run_status
    from cis_bot.app.devcluster.errors import NoCluster

    directory = _directory(args)
    try:
        status = run_status(directory)
    except NoCluster as exc:
        args.parser.error(str(exc))
    if status.running is None:
        print(f"not running (the cluster in {directory.path}; `cis dev-cluster up` starts it)")
        return 1
    supervisor = status.running.supervisor
    state = "ready" if status.running.ready else "starting"
    how = "detached" if status.running.detached else "in the foreground"
    if not supervisor.alive():
        state, how = "supervisor gone", "`cis dev-cluster down` ends what is left"
    print(f"dev cluster in {directory.path}: {state} (supervisor pid {supervisor.pid}, {how})")
    print(f"  homeserver {status.base_url}, room {status.room_alias}")
    now = time.time()
    for row in status.rows:
        print(row_text(row, status.heartbeats_known, now))
    return 0 if status.up else 1

"""The local homeserver in a process of its own, for a local run started from the command line.

``cis dag execute --local`` spends most of its start importing (mautrix, aiohttp, the engine),
one core busy and the other idle. Started first, before those imports, ``cis homeserver
--for-run`` loads on the other core and answers by the time the run connects; from then on it
serves the run's room there too, while the run's event loop spawns and watches tasks. (A
library caller of ``execute`` gets the homeserver inside its own process, as before.)

The run holds the directory's lock and the child shares it: it inherits the locked file, so the
directory stays held until both are gone. The child ends when its stdin closes (the run closed
it, or died) or on SIGTERM; it is in a session of its own, so Ctrl-C reaches only the run, which
then stops it after the run's last events are in. Should it end while the run goes on (killed,
crashed), the run starts it again at the same address: to the run's node and its outbox that is
a homeserver restart, which they ride out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import IO

import structlog

from cis_bot.app.localhs import InUse, LocalHomeserverDir, run_alias_prefix
from cis_bot.config import Config
from cis_bot.errors import UserError
from cis_bot.matrix.identity import NodeIdentity

log = structlog.get_logger(__name__)

#: What ``cis homeserver`` prints once it answers, then its base URL.
READY = "listening on "


class HomeserverProcess:
    """One ``cis homeserver --for-run`` child (again, should it end while the run goes on)."""

    def __init__(
        self,
        directory: LocalHomeserverDir,
        lock: IO[str],
        node: NodeIdentity,
        proc: subprocess.Popen[bytes],
    ) -> None:
        self.directory = directory
        self.lock = lock
        #: The local node, as the registration it loaded says.
        self.node = node
        self.base_url = ""
        self._proc = proc
        self._pidfd = -1
        self._stopping = False
        self._restarts_left = 0
        self._ready_timeout = 30.0
        self._restarting: asyncio.Task[None] | None = None

    @classmethod
    def start(
        cls, directory: LocalHomeserverDir, lock: IO[str], node: NodeIdentity
    ) -> HomeserverProcess:
        """Start it on ``directory`` (held by ``lock``), loading the registrations there now,
        ``node``'s among them."""
        proc = _spawn(directory, lock, node.server_name, port=0)
        return cls(directory, lock, node, proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def ready(self, timeout: float) -> str:
        """Its base URL once it answers. UserError when it ended or did not answer in time (what
        it said is on stderr, which it shares with the run)."""
        proc = self._proc
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise UserError(f"the local homeserver did not start within {timeout:g} s") from None
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith(READY):
            status = await asyncio.to_thread(proc.wait)
            raise UserError(f"the local homeserver did not start (exit status {status})")
        self.base_url = text.removeprefix(READY)
        return self.base_url

    def supervise(self, *, restarts: int = 3, ready_timeout: float = 30.0) -> None:
        """From now on, should it end while the run goes on (killed, crashed), start it again
        at the same address, up to ``restarts`` times: the run's node finds it there, and its
        outbox sends what queued meanwhile (the database keeps the rest)."""
        self._restarts_left = restarts
        self._ready_timeout = ready_timeout
        self._watch()

    def _watch(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self._proc.pid)
        except OSError:  # kernels before 5.3: not supervised
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _unwatch(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _on_exit(self) -> None:
        self._unwatch()
        status = self._proc.wait()  # it has ended: this reaps it
        self._close_pipes()
        if self._stopping:
            return
        log.warning("local.homeserver_ended", pid=self._proc.pid, status=status)
        self._restarting = asyncio.create_task(self._restart())

    async def _restart(self) -> None:
        if self._restarts_left <= 0:
            log.error(
                "local.homeserver_gone",
                hint="the run goes on; its room events wait in its outbox until it ends",
            )
            return
        self._restarts_left -= 1
        port = int(self.base_url.rsplit(":", 1)[1])
        self._proc = _spawn(self.directory, self.lock, self.node.server_name, port)
        self._watch()  # should this one end too, the next try
        try:
            await self.ready(self._ready_timeout)
        except UserError as exc:
            log.error("local.homeserver_restart_failed", error=str(exc))
            return
        log.info("local.homeserver_restarted", pid=self._proc.pid, base_url=self.base_url)

    async def stop(self, timeout: float = 10.0) -> None:
        """Tell it to stop (its stdin closes) and wait; killed if it takes longer."""
        self._stopping = True
        self._unwatch()
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        proc = self._proc
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(proc.wait)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _spawn(
    directory: LocalHomeserverDir, lock: IO[str], server_name: str, port: int
) -> subprocess.Popen[bytes]:
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    argv = [
        sys.executable,
        "-m",
        "cis_bot",
        "homeserver",
        "--for-run",
        "--state-dir",
        str(directory.path.parent),
        "--port",
        str(port),
        "--server-name",
        server_name,
        "--log-level",
        level,
    ]
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=(lock.fileno(),),
        start_new_session=True,
    )


def start_local(state_dir: Path, config: Config) -> HomeserverProcess | None:
    """Hold the local homeserver's directory and start its homeserver for a run. None when
    another process runs it (``connect_local`` then uses it, or says why it cannot)."""
    server_name, alias_prefix = config.dag.matrix.home_server, run_alias_prefix(config)
    directory = LocalHomeserverDir.of(state_dir)
    try:
        lock = directory.lock("cis")
    except InUse:
        return None
    try:
        node = directory.local_identity(server_name, alias_prefix)  # the registration it loads
        process = HomeserverProcess.start(directory, lock, node)
    except BaseException:
        lock.close()
        raise
    return process

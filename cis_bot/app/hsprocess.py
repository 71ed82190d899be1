"""The local homeserver in a process of its own, for a local run started from the command line.

``cis dag execute --local`` spends most of its start importing (mautrix, aiohttp, the engine),
one core busy and the other idle. Started first, before those imports, ``cis homeserver
--for-run`` loads on the other core and answers by the time the run connects; from then on it
serves the run's room there too, while the run's event loop spawns and watches tasks. (A
library caller of ``execute`` gets the homeserver inside its own process, as before.)

The run holds the directory's lock and the child shares it: it inherits the locked file, so the
directory stays held until both are gone. The child ends when its stdin closes (the run closed
it, or died) or on SIGTERM; it is in a session of its own, so Ctrl-C reaches only the run, which
then stops it after the run's last events are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from pathlib import Path
from typing import IO

import attrs

from cis_bot.app.localhs import InUse, LocalHomeserverDir, run_alias_prefix
from cis_bot.config import Config
from cis_bot.errors import UserError

#: What ``cis homeserver`` prints once it answers, then its base URL.
READY = "listening on "


class HomeserverProcess:
    """One ``cis homeserver --for-run`` child."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    @classmethod
    def start(
        cls, directory: LocalHomeserverDir, lock: IO[str], *, server_name: str
    ) -> HomeserverProcess:
        """Start it on ``directory`` (held by ``lock``), loading the registrations there now."""
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
            "0",
            "--server-name",
            server_name,
            "--log-level",
            level,
        ]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(lock.fileno(),),
            start_new_session=True,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def ready(self, timeout: float) -> str:
        """Its base URL once it answers. UserError when it ended or did not answer in time (what
        it said is on stderr, which it shares with the run)."""
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self._proc.stdout.readline), timeout)
        except TimeoutError:
            self.kill()
            raise UserError(f"the local homeserver did not start within {timeout:g} s") from None
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith(READY):
            status = await asyncio.to_thread(self._proc.wait)
            raise UserError(f"the local homeserver did not start (exit status {status})")
        return text.removeprefix(READY)

    async def stop(self, timeout: float = 10.0) -> None:
        """Tell it to stop (its stdin closes) and wait; killed if it takes longer."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._proc.wait), timeout)
        except TimeoutError:
            self.kill()
            await asyncio.to_thread(self._proc.wait)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()


@attrs.define
class LocalStart:
    """The local homeserver's directory, held by this process, and its homeserver starting."""

    directory: LocalHomeserverDir
    lock: IO[str]
    process: HomeserverProcess
    server_name: str


def start_local(state_dir: Path, config: Config) -> LocalStart | None:
    """Hold the local homeserver's directory and start its homeserver for a run. None when
    another process runs it (``connect_local`` then uses it, or says why it cannot)."""
    server_name, alias_prefix = config.dag.matrix.home_server, run_alias_prefix(config)
    directory = LocalHomeserverDir.of(state_dir)
    try:
        lock = directory.lock("cis")
    except InUse:
        return None
    try:
        directory.local_identity(server_name, alias_prefix)  # the registration it loads
        process = HomeserverProcess.start(directory, lock, server_name=server_name)
    except BaseException:
        lock.close()
        raise
    return LocalStart(directory, lock, process, server_name)

"""What every homeserver under test shares: a child process on a loopback port, its lifecycle
(start, stop, restart on the same port with the same data, kill -9) and user creation.

Lifecycle methods block (they wait for ``/versions`` with a deadline); async tests that must keep
their event loop running meanwhile call the ``a``-prefixed twins, which run them in a thread.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class HomeserverStartError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_json(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """A blocking JSON request for fixtures (tests use the async client in ``client.py``)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        raw = err.read()
        status = err.code
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def read_rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a live process in KiB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class HomeserverUnderTest(abc.ABC):
    """One homeserver process, Synapse or ours, with the same handle for both.

    ``kind`` is "synapse" or "embedded"; ``base_url`` has no trailing slash. ``start()`` records
    ``startup_seconds``: from spawning the process to the first 200 on ``/versions``.

    ``host`` is the address it binds and clients use (a network namespace's host-side address
    makes it reachable from inside that namespace, see ``netns.py``); ``command_prefix`` goes
    before its argv, e.g. ``NetworkNamespace.exec_prefix`` to run the server inside a namespace
    (then ``host`` is the namespace's address and ``port`` must be given: ``free_port`` can only
    probe this process's own namespace).
    """

    kind: str

    def __init__(
        self,
        *,
        workdir: Path,
        server_name: str,
        appservice_files: tuple[Path, ...],
        host: str = "127.0.0.1",
        port: int | None = None,
        command_prefix: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.server_name = server_name
        self.appservice_files = appservice_files
        self.host = host
        self.port = port or free_port(host)
        self.command_prefix = command_prefix
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.log_path = workdir / f"{self.kind}.out"
        self._passwords: dict[str, str] = {}
        workdir.mkdir(parents=True, exist_ok=True)

    # --- what each kind provides ---------------------------------------------------------

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """argv that runs the server in the foreground on ``self.port``."""

    @abc.abstractmethod
    def _register(self, localpart: str, password: str, admin: bool) -> str | None:
        """Create a local account (the server is running); its access token if that gave one."""

    def _log_files(self) -> list[Path]:
        return [self.log_path]

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"{self.kind} homeserver is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            raise RuntimeError(f"{self.kind} homeserver already running")
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            started = time.monotonic()
            self.process = subprocess.Popen(
                [*self.command_prefix, *self._command()],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        self._wait_ready(started, timeout)

    def _wait_ready(self, started: float, timeout: float) -> None:
        deadline = started + timeout
        url = f"{self.base_url}/_matrix/client/versions"
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise HomeserverStartError(
                    f"{self.kind} homeserver exited with {self.process.returncode} "
                    f"before serving /versions\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        self.startup_seconds = time.monotonic() - started
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise HomeserverStartError(
                    f"{self.kind} homeserver did not serve /versions within {timeout:.0f}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)  # polling a socket that is not listening yet: nothing to wait on

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout)
        self._reap_group(process.pid)

    def kill(self) -> None:
        """kill -9, no chance to flush anything."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
        self._reap_group(process.pid)

    @staticmethod
    def _reap_group(pgid: int) -> None:
        # Anything the server forked into its session dies with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Stop gracefully and start again on the same port with the same data."""
        self.stop()
        self.start(timeout)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> None:
        await asyncio.to_thread(self.restart)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in self._log_files():
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no log files for {self.kind})"

    # --- accounts -------------------------------------------------------------------------

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def create_user_sync(
        self, localpart: str, admin: bool = False, password: str | None = None
    ) -> tuple[str, str]:
        """Create a local account and log it in: (user_id, access_token)."""
        password = password or f"pw-{os.urandom(8).hex()}"
        token = self._register(localpart, password, admin)
        self._passwords[localpart] = password
        if token is not None:
            return self.user_id(localpart), token
        return self.login_sync(localpart)

    async def create_user(
        self, localpart: str, admin: bool = False, password: str | None = None
    ) -> tuple[str, str]:
        return await asyncio.to_thread(self.create_user_sync, localpart, admin, password)

    def password(self, localpart: str) -> str:
        return self._passwords[localpart]

    def login_sync(self, localpart: str, device_id: str | None = None) -> tuple[str, str]:
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": self._passwords[localpart],
        }
        if device_id is not None:
            body["device_id"] = device_id
        status, answer = http_json("POST", f"{self.base_url}/_matrix/client/v3/login", body)
        if status != 200:
            raise RuntimeError(f"login of {localpart} on {self.kind} failed: {status} {answer}")
        return str(answer["user_id"]), str(answer["access_token"])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.base_url} running={self.running}>"

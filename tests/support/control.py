"""Runs in background processes, and the `cis dag` session commands as subprocesses, for the
session-control tests."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cis_bot.control.client.process import ControlError, ProcessClient
from cis_bot.control.registry import discover
from tests.support.nodes import wait_for

REPO = Path(__file__).resolve().parents[2]
#: The fake agent, as a shell command.
AGENT = f"{shlex.quote(sys.executable)} -m cis_bot.testing.fake_agent"


def cis_env() -> dict[str, str]:
    return {**os.environ, "CIS_CONFIG": os.devnull, "PYTHONUNBUFFERED": "1"}


def cis_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cis_bot", *args]


async def cis(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A `cis` command in another process, from the test's event loop."""
    proc = await asyncio.to_thread(
        subprocess.run,
        cis_argv(*args),
        capture_output=True,
        text=True,
        env=cis_env(),
        cwd=REPO,
        timeout=timeout,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


class Background:
    """A `cis` command left running (a run, a follower); its output in files."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                cis_argv(*args),
                stdout=out,
                stderr=err,
                env=cis_env(),
                cwd=workdir,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait(self, timeout: float = 60) -> int:
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running after {timeout}s; stderr:\n{self.stderr[-3000:]}"
            ) from None

    def stop(self) -> None:
        """End it and whatever it started (its process group)."""
        if self.process.poll() is None:
            with _suppress_lookup():
                os.killpg(self.process.pid, signal.SIGCONT)
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        else:
            with _suppress_lookup():
                os.killpg(self.process.pid, signal.SIGKILL)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, ProcessLookupError | PermissionError)


class LocalRun(Background):
    """`cis dag execute --local` in the background."""

    def __init__(self, workdir: Path, dag_text: str, *, name: str = "run") -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        dag = workdir / f"{name}.toml"
        dag.write_text(dag_text)
        super().__init__(
            workdir, name, "dag", "execute", "--local", str(dag), "--state-dir",
            str(self.state), "--json",
        )  # fmt: skip
        self.run_id: str | None = None

    async def report(self, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        code = await self.wait(timeout)
        return code, json.loads(self.stdout)

    async def wait_for_run_id(self, timeout: float = 30) -> str:
        async def found() -> str | None:
            for entry in discover(self.state, clean=False).live:
                if entry.pid == self.pid and entry.runs:
                    return entry.runs[0].run_id
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended early:\n{self.stderr[-3000:]}")
            return None

        self.run_id = await wait_for(found, timeout=timeout, what="the run to register")
        return self.run_id

    async def sessions(self) -> list[dict[str, Any]]:
        for entry in discover(self.state, clean=False).live:
            if entry.pid == self.pid:
                async with ProcessClient(entry, timeout=10) as client:
                    try:
                        return await client.sessions(include_ended=True)
                    except ControlError:
                        return []
        return []

    async def session(self, task: str, state: str | None = None, timeout: float = 30) -> Any:
        async def found() -> dict[str, Any] | None:
            for s in await self.sessions():
                if s["task_id"] == task and (state is None or s["state"] == state):
                    return s
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended early:\n{self.stderr[-3000:]}")
            return None

        return await wait_for(found, timeout=timeout, what=f"session {task} ({state})")

    async def runs(self) -> list[dict[str, Any]]:
        for entry in discover(self.state, clean=False).live:
            if entry.pid == self.pid:
                async with ProcessClient(entry, timeout=10) as client:
                    data = await client.request("GET", "/v1/runs")
                    runs: list[dict[str, Any]] = data["runs"]
                    return runs
        return []

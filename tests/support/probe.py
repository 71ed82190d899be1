"""A client process that keeps asking one URL and reports every answer, for network tests.

``python -m tests.support.probe URL [--token T] [--timeout S] [--interval S]`` sends ``GET URL``
through one aiohttp session (keep-alive, as a node's Matrix client does) until stopped, waiting
``interval`` between requests, and prints one JSON line per request::

    {"start": 12.3, "end": 12.4, "status": 200, "error": null}

``start``/``end`` are ``time.monotonic()``: the system-wide CLOCK_MONOTONIC, so comparable with
the test's clock, also from inside a network namespace. ``status`` is null when the request
failed (``error`` then names why: a timeout after ``timeout`` seconds, a refused or unreachable
connection).

``Probe`` runs it (inside a ``NetworkNamespace`` or not) and collects its lines for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from tests.support.netns import NetworkNamespace

REPO = Path(__file__).resolve().parents[2]


@attrs.frozen
class Attempt:
    start: float
    end: float
    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == 200


class Probe:
    """The probe process and what it reported so far (``attempts``, in order)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 1.0,
        interval: float = 0.05,
        namespace: NetworkNamespace | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "tests.support.probe", url]
        argv += ["--timeout", str(timeout), "--interval", str(interval)]
        if token is not None:
            argv += ["--token", token]
        options: dict[str, Any] = {
            "stdout": subprocess.PIPE,
            "stderr": subprocess.STDOUT,
            "cwd": REPO,
            "text": True,
        }
        if namespace is not None:
            self.process = namespace.popen(argv, **options)
        else:
            self.process = subprocess.Popen(argv, start_new_session=True, **options)
        self.attempts: list[Attempt] = []
        self.other_output: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="probe-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                try:
                    self.attempts.append(Attempt(**json.loads(line)))
                except (ValueError, TypeError):
                    self.other_output.append(line.rstrip())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Attempt]], Any], timeout: float, what: str) -> Any:
        """Block until ``predicate(attempts)`` is truthy and return it; AssertionError with the
        last attempts if ``timeout`` passes or the probe exits first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = predicate(self.attempts)
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(
                        f"probe: no {what} within {timeout}s (exit {self.process.poll()}); "
                        f"last attempts {self.attempts[-5:]}; other output {self.other_output}"
                    )
                self._cond.wait(remaining)

    def first_after(self, moment: float, ok: bool, timeout: float) -> Attempt:
        """The first attempt started at or after ``moment`` that succeeded (``ok``) or failed."""

        def find(attempts: list[Attempt]) -> Attempt | None:
            return next((a for a in attempts if a.start >= moment and a.ok == ok), None)

        found: Attempt = self.wait_for(
            find, timeout, f"{'successful' if ok else 'failed'} attempt after {moment:.3f}"
        )
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._reader.join(5)


async def _probe(url: str, token: str | None, timeout: float, interval: float) -> None:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        while True:
            start = time.monotonic()
            status: int | None = None
            error: str | None = None
            try:
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    status = response.status
            except TimeoutError:
                error = f"timed out after {timeout}s"
            except aiohttp.ClientError as err:
                error = f"{type(err).__name__}: {err}"
            record = {"start": start, "end": time.monotonic(), "status": status, "error": error}
            print(json.dumps(record), flush=True)
            await asyncio.sleep(interval)  # pacing between requests, not waiting on anything


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.probe")
    parser.add_argument("url")
    parser.add_argument("--token")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_probe(args.url, args.token, args.timeout, args.interval))


if __name__ == "__main__":
    main()

"""A program in a real PTY, rendered by pyte, read from the asyncio loop: for tests of TUI agents.

The session layer (cis_bot.session) is the real driver; this is the minimum the Claude Code tests
and the fixture capture need before it exists: spawn, type, wait for a screen, wait for the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from typing import TYPE_CHECKING

import ptyprocess
import pyte

from cis_bot.testing.claude_screens import screen_text

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path


class PtyScreen:
    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        cols: int = 120,
        rows: int = 40,
        term: str = "xterm-256color",
    ) -> None:
        self.screen = pyte.Screen(cols, rows)
        self._stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.process = ptyprocess.PtyProcess.spawn(
            list(argv), env={**env, "TERM": term}, cwd=str(cwd), dimensions=(rows, cols)
        )
        self._fd = self.process.fd
        os.set_blocking(self._fd, False)
        self._changed = asyncio.Event()
        self.eof = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            self.eof = True
            self._loop.remove_reader(self._fd)
        else:
            self.raw += data
            self._stream.feed(data)
        self._changed.set()

    def text(self) -> str:
        return screen_text(self.screen.display)

    def write(self, data: str) -> None:
        self.process.write(data.encode())

    async def wait_for(self, test: str | Callable[[str], bool], timeout: float) -> str:
        """Wait until the screen matches ``test`` (a regex or a predicate); return the screen."""
        check = (lambda s: re.search(test, s) is not None) if isinstance(test, str) else test
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._changed.clear()
                    text = self.text()
                    if check(text):
                        return text
                    if self.eof:
                        raise AssertionError(f"the program ended before {test!r}; screen:\n{text}")
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{test!r} not seen within {timeout}s; screen:\n{self.text()}"
            ) from None

    async def wait_quiet(self, quiet: float, timeout: float) -> str:
        """Wait until no output came for ``quiet`` seconds (the screen has settled)."""
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                try:
                    async with asyncio.timeout(quiet):
                        await self._changed.wait()
                except TimeoutError:
                    return self.text()

    async def wait_exit(self, timeout: float) -> int | None:
        """Wait for the program to end; its exit status (None if a signal ended it)."""
        async with asyncio.timeout(timeout):
            while not self.eof:
                self._changed.clear()
                await self._changed.wait()
            await asyncio.to_thread(self.process.wait)
        status: int | None = self.process.exitstatus
        return status

    def close(self) -> None:
        if not self.eof:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._fd)
        if self.process.isalive():
            self.process.terminate(force=True)
        with contextlib.suppress(OSError):
            self.process.close(force=True)

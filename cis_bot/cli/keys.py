"""Keys typed at the live view: the terminal in cbreak mode (no echo, no line editing; Ctrl-C
still interrupts), read on the event loop, turned into the few names the view acts on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
import tty
from collections.abc import Callable
from typing import Any

#: Byte sequences and the key they are. Arrow keys come as CSI or, in application cursor mode,
#: SS3 sequences; j/k as in less and vi.
_SEQUENCES = {
    b"\x1b[A": "up",
    b"\x1bOA": "up",
    b"k": "up",
    b"\x1b[B": "down",
    b"\x1bOB": "down",
    b"j": "down",
    b"\r": "enter",
    b"\n": "enter",
}
_LONGEST = max(len(sequence) for sequence in _SEQUENCES)


def parse_keys(data: bytes) -> list[str]:
    """The keys in what the terminal sent; anything else is skipped."""
    keys = []
    at = 0
    while at < len(data):
        for length in range(_LONGEST, 0, -1):
            key = _SEQUENCES.get(data[at : at + length])
            if key is not None:
                keys.append(key)
                at += length
                break
        else:
            at += 1
    return keys


class KeyReader:
    """Calls ``on_key`` with each key typed, between ``start`` and ``stop``, the terminal's mode
    restored in between (so an attached session can set its own)."""

    def __init__(self, fd: int, on_key: Callable[[str], None]) -> None:
        self.fd = fd
        self.on_key = on_key
        self._saved: list[Any] | None = None

    def start(self) -> None:
        if self._saved is not None:
            return
        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def stop(self) -> None:
        if self._saved is None:
            return
        asyncio.get_running_loop().remove_reader(self.fd)
        with contextlib.suppress(termios.error):
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        self._saved = None

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 1024)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the terminal went away: keep showing, stop reading
            asyncio.get_running_loop().remove_reader(self.fd)
            return
        for key in parse_keys(data):
            self.on_key(key)

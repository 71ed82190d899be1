"""The terminal side of ``cis dag attach`` and ``cis dag logs``.

Attach: the local terminal in raw mode, every keystroke to the session's PTY and every byte of
its output to the screen, the window size forwarded on SIGWINCH; Ctrl-B then d detaches (as in
tmux, and as the seed's design has it; Ctrl-B Ctrl-B types one Ctrl-B). The session keeps
running after a detach. A read-only terminal only watches (Ctrl-C detaches it too).

Logs as text: raw terminal output rendered to plain lines (escape sequences out, carriage
returns applied), a line at a time, with a partial line (a prompt waiting for an answer) shown
when the output pauses; an agent's stream-json rendered as its conversation
(``cis_bot/session/readable.py``).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import re
import signal
import sys
import termios
import tty
from typing import Any

import aiohttp
import attrs

from cis_bot.session.output import normalise_newlines, strip_escapes, terminal_text
from cis_bot.session.readable import ReadableLines, is_stream_json_event

#: An escape sequence cut off at the end of what has arrived so far.
_UNFINISHED_ESCAPE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*|[PX^_][^\x1b]*|[ -/]*)?$")

CTRL_B = 0x02
CTRL_C = 0x03
#: What a detaching terminal is left with: main screen, cursor shown, the modes TUIs turn on
#: (bracketed paste, application cursor keys and keypad, mouse reporting) off, colours reset.
_TERMINAL_RESET = (
    b"\x1b[?1049l\x1b[?25h\x1b[?2004l\x1b[?1l\x1b>\x1b[?1000l\x1b[?1002l\x1b[?1006l\x1b[0m"
)


class DetachKeys:
    """Finds the detach sequence in typed bytes; what is left goes to the session."""

    def __init__(self, *, readonly: bool = False) -> None:
        self.readonly = readonly
        self._prefix = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(bytes to forward, whether to detach now)."""
        out = bytearray()
        for byte in data:
            if self._prefix:
                self._prefix = False
                if byte in (ord("d"), ord("D")):
                    return bytes(out), True
                if byte != CTRL_B:
                    out.append(CTRL_B)
                out.append(byte)
            elif byte == CTRL_B:
                self._prefix = True
            elif byte == CTRL_C and self.readonly:
                return bytes(out), True
            else:
                out.append(byte)
        return bytes(out), False


@attrs.frozen
class AttachResult:
    #: "detached", "ended", "lost" (the process went away) or "error".
    how: str
    message: str
    state: str | None = None
    exit_code: int | None = None


class _Terminal:
    """stdin in raw mode (when it is a terminal) for the duration."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.is_tty = os.isatty(fd)
        self._saved: list[Any] | None = None

    def __enter__(self) -> _Terminal:
        if self.is_tty:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def terminal_size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return (size.lines, size.columns) if size.lines > 0 and size.columns > 0 else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[written:]


async def run_attached(
    ws: aiohttp.ClientWebSocketResponse,
    *,
    readonly: bool,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
) -> AttachResult:
    """Pass the terminal through to the session until a detach, the session's end, or the
    connection's loss."""
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    loop = asyncio.get_running_loop()
    keys = DetachKeys(readonly=readonly)
    outgoing: asyncio.Queue[bytes | dict[str, Any] | None] = asyncio.Queue()
    detached = loop.create_future()
    writer = not readonly

    def on_stdin() -> None:
        try:
            data = os.read(stdin_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # end of input: keep watching, stop reading
            loop.remove_reader(stdin_fd)
            return
        forward, detach = keys.feed(data)
        if forward and writer:
            outgoing.put_nowait(forward)
        if detach and not detached.done():
            detached.set_result(None)

    def on_resize() -> None:
        size = terminal_size(stdout_fd)
        if size is not None and writer:
            outgoing.put_nowait({"type": "resize", "rows": size[0], "cols": size[1]})

    async def send() -> None:
        while True:
            item = await outgoing.get()
            if item is None:
                return
            if isinstance(item, bytes):
                await ws.send_bytes(item)
            else:
                await ws.send_str(json.dumps(item))

    async def receive() -> AttachResult:
        nonlocal writer
        async for message in ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                _write_all(stdout_fd, message.data)
                continue
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            try:
                notice = json.loads(message.data)
            except ValueError:
                continue
            kind = notice.get("type") if isinstance(notice, dict) else None
            if kind == "readonly":
                writer = False
                keys.readonly = True
                _notice(
                    f"{notice.get('reason', 'read-only now')}: you are read-only now "
                    "(Ctrl-B d or Ctrl-C detaches)"
                )
            elif kind == "ended":
                return AttachResult(
                    "ended",
                    f"the session ended ({notice.get('state')})",
                    state=notice.get("state"),
                    exit_code=notice.get("exit_code"),
                )
            elif kind == "error":
                return AttachResult("error", str(notice.get("message")))
        return AttachResult("lost", "the connection to the session's process was lost")

    with _Terminal(stdin_fd) as terminal:
        if terminal.is_tty:
            os.set_blocking(stdin_fd, False)
        loop.add_reader(stdin_fd, on_stdin)
        resizable = terminal.is_tty and writer
        if resizable:
            loop.add_signal_handler(signal.SIGWINCH, on_resize)
        sender = asyncio.create_task(send())
        receiver = asyncio.create_task(receive())
        try:
            await asyncio.wait([receiver, detached], return_when=asyncio.FIRST_COMPLETED)
            if receiver.done():
                result = receiver.result()
            else:
                result = AttachResult("detached", "detached; the session keeps running")
        finally:
            loop.remove_reader(stdin_fd)
            if resizable:
                loop.remove_signal_handler(signal.SIGWINCH)
            if terminal.is_tty:
                os.set_blocking(stdin_fd, True)
            outgoing.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, 2)
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver
            with contextlib.suppress(Exception):
                await ws.close()
            if os.isatty(stdout_fd):
                _write_all(stdout_fd, _TERMINAL_RESET)
    return result


def _notice(text: str) -> None:
    """A line from cis itself, on stderr, readable with the terminal in raw mode."""
    sys.stderr.write(f"\r\n[cis: {text}]\r\n")
    sys.stderr.flush()


class TextStream:
    """Raw terminal output in, plain text out (see the module docstring)."""

    def __init__(self) -> None:
        self._pending = b""
        #: What has been printed of the current (unfinished) line.
        self._shown = ""

    def feed(self, data: bytes) -> str:
        self._pending += data
        cut = self._pending.rfind(b"\n")
        if cut < 0:
            return ""
        complete, self._pending = self._pending[: cut + 1], self._pending[cut + 1 :]
        text = terminal_text(complete)
        shown, self._shown = self._shown, ""
        if not shown:
            return text
        if text.startswith(shown):
            return text[len(shown) :]
        return "\n" + text

    def pending_text(self) -> str:
        """The unfinished line's bytes so far, decoded (escapes and all)."""
        return self._pending.decode("utf-8", errors="replace")

    def flush(self) -> str:
        """The unfinished line, as far as it goes (call when the output pauses)."""
        if not self._pending:
            return ""
        pending = self._pending
        unfinished = _UNFINISHED_ESCAPE.search(pending)
        if unfinished is not None:
            pending = pending[: unfinished.start()]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        line = normalise_newlines(strip_escapes(decoder.decode(pending, final=False)))
        if line == self._shown:
            return ""
        out = line[len(self._shown) :] if line.startswith(self._shown) else "\n" + line
        self._shown = line
        return out


class ReadableStream:
    """Raw output in, readable text out (``cis dag logs --follow``): the terminal's text, or
    for an agent writing stream-json (its first line says so) the conversation it describes,
    rendered a complete line at a time (a half-written JSON line is never shown)."""

    def __init__(self) -> None:
        self._text = TextStream()
        self._lines = ReadableLines()
        #: None until the first non-empty line tells: True for stream-json.
        self._json: bool | None = None
        #: Complete lines held while the kind is unknown.
        self._held = ""

    def feed(self, data: bytes) -> str:
        text = self._text.feed(data)
        if self._json is None:
            self._held += text
            first = next((line for line in self._held.split("\n")[:-1] if line.strip()), None)
            if first is None:
                return ""
            self._json = is_stream_json_event(first) is not None
            text, self._held = self._held, ""
        if not self._json:
            return text
        lines = text.split("\n")[:-1]  # complete lines only (nothing was flushed)
        return "".join(f"{line}\n" for line in self._lines.feed_lines(lines))

    def flush(self) -> str:
        """The unfinished line, when it is text (call when the output pauses)."""
        if self._json or (self._json is None and self._held.strip()):
            return ""
        if self._json is None and self._text.pending_text().lstrip().startswith("{"):
            return ""  # likely the first stream-json line, still being written
        return self._text.flush()

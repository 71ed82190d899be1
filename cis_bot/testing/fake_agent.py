"""A scripted fake agent for tests and examples: a plain CLI or a small full-screen TUI.

Run ``python -m cis_bot.testing.fake_agent STEP...`` with steps as flags (run in the order given),
or ``--script "print hello; ask Continue?; exit 3"`` (steps separated by ``;`` or newlines).

Steps:
  print TEXT       a line of output (``\\n``, ``\\t``, ``\\r``, ``\\e`` escapes understood)
  write TEXT       output without a newline
  ask QUESTION     print ``QUESTION [y/N] `` and read a line: y/yes continues, anything else
                   prints ``answer: no`` and exits 1
  readline PROMPT  print PROMPT, read a line, print ``got: LINE``
  stdin            read stdin to end-of-file, print ``stdin: N bytes sha256=HEX``
  sleep SECS       sleep
  flood BYTES      print that many bytes (suffix K or M allowed) as numbered lines
  spinner SECS     redraw a spinner on one line (carriage returns) for SECS
  tui TITLE        switch to the alternate screen and draw a framed full-screen window
  tui-ask QUESTION draw the question with numbered options in the window, read one key in raw
                   mode: 1, y or Enter approve; 2, n or Esc refuse (exit 1)
  tui-input        show an input box (bracketed paste on, raw mode), read until Enter, then show
                   and print ``prompt: TEXT``
  ignore-term      ignore SIGTERM from here on
  exit CODE        exit now with CODE (the default at the end is 0)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import sys
import termios
import time
import tty
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

STEPS = (
    "print",
    "write",
    "ask",
    "readline",
    "stdin",
    "sleep",
    "flood",
    "spinner",
    "tui",
    "tui-ask",
    "tui-input",
    "ignore-term",
    "exit",
)
_NO_ARGUMENT = {"stdin", "tui-input", "ignore-term"}
_PASTE_ON = b"\x1b[200~"
_PASTE_OFF = b"\x1b[201~"
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "e": "\x1b", "\\": "\\"}


class ScriptError(ValueError):
    pass


def unescape(text: str) -> str:
    out = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "\\")
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
        else:
            out.append(ch)
    return "".join(out)


def parse_script(script: str) -> list[tuple[str, str]]:
    steps = []
    for raw in script.replace("\n", ";").split(";"):
        raw = raw.strip()
        if not raw:
            continue
        verb, _, arg = raw.partition(" ")
        if verb not in STEPS:
            raise ScriptError(f"unknown step {verb!r} (known: {', '.join(STEPS)})")
        steps.append((verb, arg.strip()))
    return steps


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024 * 1024}
    text = text.strip().upper()
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text)
    except ValueError:
        raise ScriptError(f"not a size: {text!r}") from None


def out(text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


@contextlib.contextmanager
def raw_mode() -> Iterator[None]:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def read_line() -> str | None:
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


class Tui:
    """A framed window drawn with absolute cursor movement, like a real TUI agent."""

    def __init__(self, title: str) -> None:
        size = shutil.get_terminal_size((80, 24))
        self.cols, self.rows = max(size.columns, 20), max(size.lines, 8)
        self.title = title
        self.active = True
        out("\x1b[?1049h\x1b[2J\x1b[H")
        self.frame()

    def at(self, row: int, col: int, text: str) -> None:
        out(f"\x1b[{row};{col}H{text}")

    def frame(self) -> None:
        inner = self.cols - 2
        self.at(1, 1, "┌" + f" {self.title} ".center(inner, "─")[:inner] + "┐")
        for row in range(2, self.rows - 1):
            self.at(row, 1, "│" + " " * inner + "│")
        self.at(self.rows - 1, 1, "└" + "─" * inner + "┘")
        self.status("working")

    def status(self, text: str) -> None:
        self.at(self.rows, 1, "\x1b[2K" + text[: self.cols - 1])

    def line(self, row: int, text: str) -> None:
        inner = self.cols - 4
        self.at(row, 3, text[:inner].ljust(inner))

    def close(self) -> None:
        if self.active:
            out("\x1b[?1049l")
            self.active = False


def run(steps: Sequence[tuple[str, str]]) -> int:
    tui: Tui | None = None
    try:
        for verb, arg in steps:
            if verb == "print":
                out(unescape(arg) + "\n")
            elif verb == "write":
                out(unescape(arg))
            elif verb == "ask":
                out(f"{unescape(arg)} [y/N] ")
                answer = read_line()
                if answer is None or answer.strip().lower() not in ("y", "yes"):
                    out("answer: no\n")
                    return 1
                out("answer: yes\n")
            elif verb == "readline":
                out(unescape(arg))
                line = read_line()
                out(f"got: {line if line is not None else '<eof>'}\n")
            elif verb == "stdin":
                data = sys.stdin.buffer.read()
                out(f"stdin: {len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}\n")
            elif verb == "sleep":
                time.sleep(float(arg))
            elif verb == "flood":
                flood(parse_size(arg))
            elif verb == "spinner":
                spin(float(arg))
            elif verb == "tui":
                tui = Tui(arg or "fake agent")
            elif verb == "tui-ask":
                tui = tui or Tui("fake agent")
                if not tui_ask(tui, unescape(arg)):
                    return 1
            elif verb == "tui-input":
                tui = tui or Tui("fake agent")
                tui_input(tui)
            elif verb == "ignore-term":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            elif verb == "exit":
                return int(arg)
        return 0
    finally:
        if tui is not None:
            tui.close()


def flood(total: int) -> None:
    block = bytearray()
    number = 0
    written = 0
    while written < total:
        while len(block) < 65536:
            block += f"{number:010d} {'x' * 88}\n".encode()
            number += 1
        chunk = bytes(block[: total - written])
        out(chunk)
        written += len(chunk)
        del block[: len(chunk)]


def spin(secs: float) -> None:
    frames = "|/-\\"
    end = time.monotonic() + secs
    i = 0
    while time.monotonic() < end:
        out(f"\rthinking {frames[i % 4]}")
        i += 1
        time.sleep(0.05)
    out("\rthinking done\n")


def tui_ask(tui: Tui, question: str) -> bool:
    row = tui.rows - 6
    # Raw mode first, as real TUIs do: keys typed once the question shows must not be flushed.
    with raw_mode():
        tui.line(row, question)
        tui.line(row + 1, "❯ 1. Yes")
        tui.line(row + 2, "  2. No")
        tui.status("waiting for approval")
        while True:
            key = os.read(0, 1)
            if key in (b"1", b"y", b"Y", b"\r", b"\n"):
                answer = True
                break
            if key in (b"2", b"n", b"N", b"\x1b", b"", b"\x03"):
                answer = False
                break
    for offset in range(3):
        tui.line(row + offset, "")
    tui.line(row, "✔ approved" if answer else "✘ refused")
    tui.status("working" if answer else "refused")
    return answer


def tui_input(tui: Tui) -> None:
    row = tui.rows - 3
    text = bytearray()
    pasting = False
    pending = b""
    done = False
    with raw_mode():
        out("\x1b[?2004h")
        tui.line(row, "> ")
        tui.status("? for shortcuts")
        while not done:
            chunk = os.read(0, 4096)
            if not chunk:
                break
            pending += chunk
            while pending and not done:
                if pending.startswith(_PASTE_ON):
                    pasting, pending = True, pending[len(_PASTE_ON) :]
                elif pending.startswith(_PASTE_OFF):
                    pasting, pending = False, pending[len(_PASTE_OFF) :]
                elif _PASTE_ON.startswith(pending) or _PASTE_OFF.startswith(pending):
                    break  # the start of a paste marker: wait for the rest
                elif pending[:1] == b"\r" and not pasting:
                    done = True
                else:
                    text += pending[:1]
                    pending = pending[1:]
            tui.line(row, "> " + text.decode(errors="replace").replace("\n", " ")[-60:])
    out("\x1b[?2004l")
    prompt = text.decode(errors="replace")
    tui.line(row, "")
    tui.line(2, f"prompt: {prompt}"[:200])
    tui.status("working")
    tui.close()
    out(f"prompt: {prompt}\n")


class _StepAction(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        steps = getattr(namespace, "steps", None) or []
        if self.dest == "script":
            try:
                steps.extend(parse_script(str(values)))
            except ScriptError as e:
                parser.error(str(e))
        else:
            steps.append((self.dest.replace("_", "-"), "" if values is None else str(values)))
        namespace.steps = steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cis_bot.testing.fake_agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--script", action=_StepAction, metavar="STEPS", help="steps, ';'-separated"
    )
    for verb in STEPS:
        dest = verb.replace("-", "_")
        if verb in _NO_ARGUMENT:
            parser.add_argument(f"--{verb}", dest=dest, action=_StepAction, nargs=0)
        else:
            parser.add_argument(f"--{verb}", dest=dest, action=_StepAction, metavar="ARG")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steps: list[tuple[str, str]] = getattr(args, "steps", None) or []
    try:
        for verb, arg in steps:
            if verb in ("sleep", "spinner"):
                float(arg)
            elif verb == "exit":
                int(arg)
            elif verb == "flood":
                parse_size(arg)
    except ValueError as e:
        print(f"fake_agent: bad argument: {e}", file=sys.stderr)
        return 2
    try:
        return run(steps)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

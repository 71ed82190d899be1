"""The ``cis`` command. Each subcommand group lives in its own module and registers itself here.

Exit codes: 0 success, 1 the work failed (a run did not complete), 2 bad input or usage.
Modules import their heavy dependencies inside the handler, so ``cis homeserver`` starts fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from cis_bot.errors import UserError


def _import_structlog_without_rich() -> None:
    """Import structlog as if rich were not installed. With rich there (the live table uses
    it), ``import structlog`` loads rich's console, traceback renderer and pygments for pretty
    exceptions in development logs: 35 ms, a tenth of what a local run takes to start. Our logs
    are plain key=value lines (``cis_bot/log.py``), so nothing is lost; rich itself stays
    importable for the table."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # what an absent package looks like
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()


class CommandModule(Protocol):
    def register(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


def _modules() -> list[CommandModule]:
    from cis_bot.cli import completion, dag, devcluster, homeserver, node

    return [dag, homeserver, node, devcluster, completion]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cis", description="Run DAGs of AI agent sessions, with a Matrix room as the bus."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _modules():
        module.register(subparsers)
    return parser


Handler = Callable[[argparse.Namespace], int]


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number at least ``minimum`` (else a usage error, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, last: int = 100) -> None:
    """Rows under a header, in columns two spaces apart; the last column (free text) cut to
    ``last`` characters and not padded."""
    lines = [list(header), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1][:last]]).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    from cis_bot.cli.completion import complete_if_asked

    parser = build_parser()
    complete_if_asked(parser)
    args = parser.parse_args(argv)
    from cis_bot import log

    log.configure(getattr(args, "log_level", "warning"))
    handler: Handler = args.handler
    try:
        return handler(args)
    except UserError as exc:
        print(f"cis: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except OSError as exc:  # the machine said no (a full disk, a vanished directory)
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"cis: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _reader_gone() -> int:
    """Whoever read our output went away (``cis dag status | head``): stop without a word, as
    Unix tools do when SIGPIPE ends them, and with their exit status."""
    # What is still buffered would fail again when Python flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE

"""``cis dag sessions / logs / attach / input / kill / cancel / approve``: live sessions and runs,
from another terminal.

Sessions held by processes on this machine are reached through their control sockets (found in
the state directory); sessions on other nodes, through their runs' rooms (when the config names a
homeserver). Exit codes: 0 done, 1 the operation failed (a process is gone or silent, a node
refused, the session has ended), 2 bad input (unknown or ambiguous id, bad flags).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cis_bot.cli import print_table, whole_number
from cis_bot.cli.completion import completes, run_ids, session_ids
from cis_bot.errors import UserError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from cis_bot.control.client.lookup import Lookup

#: Waiting for a process or a node to answer.
DEFAULT_TIMEOUT = 10.0
#: Text logs show a partial line (a prompt) once the output has paused this long.
PARTIAL_LINE_SECS = 0.3


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the session commands to ``cis dag``."""
    sessions = commands.add_parser("sessions", help="the agent sessions of running DAGs")
    completes(
        sessions.add_argument("--run", metavar="RUN", help="only this run (id or unique prefix)"),
        run_ids,
    )
    sessions.add_argument("--all", action="store_true", help="ended sessions too")
    _options(sessions)
    sessions.set_defaults(handler=_sessions)

    logs = commands.add_parser(
        "logs", help="a session's output, readable (live, or its transcript); --raw as written"
    )
    completes(
        logs.add_argument("id", metavar="ID", help="RUN:TASK[:ATTEMPT] (run id prefixes work)"),
        session_ids,
    )
    logs.add_argument("--tail", type=whole_number(0), metavar="N", help="only the last N lines")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing until the session ends"
    )
    logs.add_argument(
        "--raw",
        action="store_true",
        help="the transcript as the agent wrote it (escapes, stream-json) instead of rendered",
    )
    _options(logs)
    logs.set_defaults(handler=_logs)

    attach = commands.add_parser(
        "attach", help="work in a session's terminal (Ctrl-B d detaches; it keeps running)"
    )
    completes(attach.add_argument("id", metavar="ID", help="RUN:TASK[:ATTEMPT]"), session_ids)
    attach.add_argument(
        "--readonly", action="store_true", help="only watch (another writer is left alone)"
    )
    _options(attach)
    attach.set_defaults(handler=_attach)

    typing = commands.add_parser(
        "input",
        aliases=["unblock"],
        help="type into a session (then Enter); a blocked session goes back to running",
    )
    completes(typing.add_argument("id", metavar="ID", help="RUN:TASK[:ATTEMPT]"), session_ids)
    typing.add_argument("text", metavar="TEXT", help="what to type")
    typing.add_argument("--no-newline", action="store_true", help="do not press Enter")
    _options(typing)
    typing.set_defaults(handler=_input)

    kill = commands.add_parser("kill", help="end a session (its task fails, not retried)")
    completes(kill.add_argument("id", metavar="ID", help="RUN:TASK[:ATTEMPT]"), session_ids)
    _options(kill)
    kill.set_defaults(handler=_kill)

    cancel = commands.add_parser("cancel", help="cancel a run: its sessions are stopped")
    completes(cancel.add_argument("run", metavar="RUN", help="run id or unique prefix"), run_ids)
    _options(cancel)
    cancel.set_defaults(handler=_cancel)

    approve = commands.add_parser(
        "approve", help="approve a task that waits for it (confirmed, recommended, arbitrated)"
    )
    completes(approve.add_argument("run", metavar="RUN", help="run id or unique prefix"), run_ids)
    approve.add_argument("task", metavar="TASK")
    approve.add_argument(
        "--as",
        dest="as_user",
        metavar="USER",
        help="approve as this stakeholder (arbitrated tasks; this machine's runs only: "
        "through a room you approve as the config's bot user)",
    )
    _options(approve)
    approve.set_defaults(handler=_approve)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, metavar="D", help="where runs keep their files")
    parser.add_argument("--config", type=Path, metavar="F", help="config.toml to read")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--local",
        action="store_true",
        help="only this machine's processes and files (do not read the runs' rooms)",
    )
    parser.add_argument("--room", metavar="R", help="read only this room for other nodes' runs")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECS",
        help=f"how long to wait for a process or node to answer (default {DEFAULT_TIMEOUT:g})",
    )


def _run(args: argparse.Namespace, body: Any) -> int:
    """Run ``body`` with the lookup for the command's options."""

    async def main() -> int:
        from cis_bot.config import load_config, open_state_dir
        from cis_bot.control.client.lookup import Lookup

        lookup = Lookup(
            load_config(args.config),
            open_state_dir(args.state_dir),
            timeout=args.timeout,
            local_only=args.local,
            room=args.room,
        )
        try:
            result: int = await body(lookup)
            return result
        finally:
            await lookup.close()

    return asyncio.run(main())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _warn(message: str) -> None:
    print(f"cis: warning: {message}", file=sys.stderr)


# --- sessions ----------------------------------------------------------------------------------


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _sessions(args: argparse.Namespace) -> int:
    async def body(lookup: Lookup) -> int:
        from cis_bot.ids import match_run

        records = await lookup.records(disk=args.all, rooms=True)
        for warning in lookup.warnings(await lookup.local()):
            _warn(warning)
        if not args.all:
            records = [
                r for r in records if not r.ended and r.source != "disk" and r.state != "unknown"
            ]
        if args.run:
            run_id = match_run(args.run, {r.run_id for r in records})
            records = [r for r in records if r.run_id == run_id]
        records.sort(key=lambda r: (r.run_id, r.task_id, r.attempt or 0))
        if args.json:
            _print_json([r.to_json() for r in records])
            return 0
        if not records:
            print("no sessions" + ("" if args.all else " running (--all shows ended ones)"))
            return 0
        rows = [
            (
                r.session_id,
                r.agent or "-",
                r.state,
                _elapsed(r.elapsed_s),
                r.node or "-",
                (r.blocked_reason if r.state == "blocked" and r.blocked_reason else r.last_line),
            )
            for r in records
        ]
        print_table(("SESSION", "AGENT", "STATE", "ELAPSED", "NODE", "LAST LINE"), rows)
        return 0

    return _run(args, body)


# --- logs --------------------------------------------------------------------------------------


def _last_lines(data: bytes, count: int | None, *, raw: bool) -> bytes:
    from cis_bot.session.readable import readable

    if not raw:
        data = readable(data).encode("utf-8")
    if count is None:
        return data
    if count == 0:
        return b""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
        return b"\n".join(lines[-count:]) + b"\n"
    return b"\n".join(lines[-count:])


def _logs(args: argparse.Namespace) -> int:
    if args.json and args.follow:
        raise UserError("--json and --follow do not go together")

    async def body(lookup: Lookup) -> int:
        record = await lookup.find_session(args.id, live=False)
        if args.follow and record.source == "process" and record.process is not None:
            await _follow(lookup.follow(record, tail=args.tail), raw=args.raw)
            return 0
        data = await lookup.transcript(record, tail=args.tail, follow=args.follow)
        shown = _last_lines(data, args.tail, raw=args.raw)
        if args.json:
            _print_json(
                {
                    "session_id": record.session_id,
                    "state": record.state,
                    "text": shown.decode("utf-8", errors="replace"),
                }
            )
        else:
            sys.stdout.buffer.write(shown)
            sys.stdout.buffer.flush()
        return 0

    return _run(args, body)


async def _follow(stream: AsyncIterator[bytes], *, raw: bool) -> None:
    """Print the stream as it comes; as text, a partial line once the output pauses."""
    from cis_bot.control.client.terminal import ReadableStream

    out = sys.stdout.buffer
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    failure: list[BaseException] = []

    async def pump() -> None:
        try:
            async for chunk in stream:
                queue.put_nowait(chunk)
        except Exception as exc:
            failure.append(exc)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(pump())
    text = ReadableStream()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), None if raw else PARTIAL_LINE_SECS)
            except TimeoutError:
                out.write(text.flush().encode("utf-8"))
                out.flush()
                continue
            if chunk is None:
                break
            out.write(chunk if raw else text.feed(chunk).encode("utf-8"))
            out.flush()
        if not raw:
            rest = text.flush()
            out.write(rest.encode("utf-8"))
            out.flush()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if failure:
        raise failure[0]


# --- attach ------------------------------------------------------------------------------------


def _attach(args: argparse.Namespace) -> int:
    async def body(lookup: Lookup) -> int:
        record = await lookup.find_session(args.id, live=True)
        result = await lookup.attach(record, readonly=args.readonly)
        print(f"[cis: {record.session_id}: {result.message}]", file=sys.stderr)
        if args.json:
            _print_json(
                {
                    "session_id": record.session_id,
                    "how": result.how,
                    "state": result.state,
                    "exit_code": result.exit_code,
                }
            )
        return 0 if result.how in ("detached", "ended") else 1

    return _run(args, body)


# --- input / kill ------------------------------------------------------------------------------


def _input(args: argparse.Namespace) -> int:
    newline = not args.no_newline

    async def body(lookup: Lookup) -> int:
        record = await lookup.find_session(args.id, live=True)
        state = await lookup.send_input(record, args.text, newline=newline)
        if args.json:
            _print_json({"session_id": record.session_id, "sent": True, "state": state})
        else:
            enter = " and Enter" if newline else ""
            print(f"{record.session_id}: typed {len(args.text)} characters{enter} ({state})")
        return 0

    return _run(args, body)


def _kill(args: argparse.Namespace) -> int:
    async def body(lookup: Lookup) -> int:
        record = await lookup.find_session(args.id, live=True)
        state = await lookup.kill(record, by=_user())
        if args.json:
            _print_json({"session_id": record.session_id, "state": state})
        else:
            print(f"{record.session_id}: {state}")
        return 0

    return _run(args, body)


# --- runs: cancel / approve --------------------------------------------------------------------


def _cancel(args: argparse.Namespace) -> int:
    async def body(lookup: Lookup) -> int:
        target = await lookup.find_run(args.run)
        answer = await lookup.run_request(target, "cancel", {"by": _user()})
        if args.json:
            _print_json({"run_id": target.run_id, "cancelled": True, **answer})
        else:
            print(f"run {target.run_id}: cancelled (its sessions are being stopped)")
        return 0

    return _run(args, body)


def _approve(args: argparse.Namespace) -> int:
    async def body(lookup: Lookup) -> int:
        target = await lookup.find_run(args.run)
        if target.process is None and args.as_user:
            print(
                "cis: note: --as applies to this machine's runs only; through the room you "
                "approve as the config's bot user",
                file=sys.stderr,
            )
        by = args.as_user or _user()
        answer = await lookup.run_request(target, "approve", {"task": args.task, "by": by})
        if args.json:
            _print_json({"run_id": target.run_id, "task_id": args.task, "approved": True, **answer})
        else:
            waiting = answer.get("waiting_for") or []
            more = f" (still waiting for: {', '.join(waiting)})" if waiting else ""
            print(f"run {target.run_id}: approved {args.task}{more}")
        return 0

    return _run(args, body)

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

from cis_bot.cli import whole_number
from cis_bot.errors import UserError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from cis_bot.app.connect import Connection
    from cis_bot.config import Config
    from cis_bot.control.client import ProcessClient
    from cis_bot.control.finder import LocalScan, SessionRecord
    from cis_bot.control.registry import Discovery, ProcessEntry
    from cis_bot.control.room import RoomRequester
    from cis_bot.matrix import events as ev
    from cis_bot.matrix.node import Node
    from cis_bot.matrix.runs import RoomRun

#: Waiting for a process or a node to answer.
DEFAULT_TIMEOUT = 10.0
#: A kill answers once the session has ended: the agent's grace period on top.
KILL_EXTRA_SECS = 10.0
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
    sessions.add_argument("--run", metavar="RUN", help="only this run (id or unique prefix)")
    sessions.add_argument("--all", action="store_true", help="ended sessions too")
    _options(sessions)
    sessions.set_defaults(handler=_sessions)

    logs = commands.add_parser("logs", help="a session's output (live, or its transcript)")
    logs.add_argument("id", metavar="ID", help="RUN:TASK[:ATTEMPT] (run id prefixes work)")
    logs.add_argument("--tail", type=whole_number(0), metavar="N", help="only the last N lines")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing until the session ends"
    )
    logs.add_argument("--raw", action="store_true", help="the bytes as the agent wrote them")
    _options(logs)
    logs.set_defaults(handler=_logs)

    attach = commands.add_parser(
        "attach", help="work in a session's terminal (Ctrl-B d detaches; it keeps running)"
    )
    attach.add_argument("id", metavar="ID", help="RUN:TASK[:ATTEMPT]")
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
    typing.add_argument("id", metavar="ID", help="RUN:TASK[:ATTEMPT]")
    typing.add_argument("text", metavar="TEXT", help="what to type")
    typing.add_argument("--no-newline", action="store_true", help="do not press Enter")
    _options(typing)
    typing.set_defaults(handler=_input)

    kill = commands.add_parser("kill", help="end a session (its task fails, not retried)")
    kill.add_argument("id", metavar="ID", help="RUN:TASK[:ATTEMPT]")
    _options(kill)
    kill.set_defaults(handler=_kill)

    cancel = commands.add_parser("cancel", help="cancel a run: its sessions are stopped")
    cancel.add_argument("run", metavar="RUN", help="run id or unique prefix")
    _options(cancel)
    cancel.set_defaults(handler=_cancel)

    approve = commands.add_parser(
        "approve", help="approve a task that waits for it (confirmed, recommended, arbitrated)"
    )
    approve.add_argument("run", metavar="RUN", help="run id or unique prefix")
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


# --- finding things ----------------------------------------------------------------------------


class Context:
    """What one command knows: this machine's processes, and (lazily) the rooms."""

    def __init__(self, args: argparse.Namespace) -> None:
        from cis_bot.config import default_state_dir, load_config
        from cis_bot.control.registry import discover

        self.config: Config = load_config(args.config)
        self.state_dir: Path = args.state_dir or default_state_dir()
        self.timeout: float = args.timeout
        configured = bool(self.config.node.homeserver)
        if args.room and not configured:
            raise UserError("--room needs a config whose [node] section names a homeserver")
        self.remote = configured and not args.local
        self.room: str | None = args.room
        self.discovery: Discovery = discover(self.state_dir)
        self._scan: LocalScan | None = None
        self._connection: Connection | None = None
        self._runs: list[RoomRun] | None = None

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def warn_about_processes(self, scan: LocalScan) -> None:
        for entry in self.discovery.dead:
            print(
                f"cis: warning: {entry.describe()} is gone (it stopped without cleaning up)",
                file=sys.stderr,
            )
        for _, error in scan.silent:
            print(f"cis: warning: {error}", file=sys.stderr)

    async def local(self) -> LocalScan:
        from cis_bot.control.finder import scan_processes

        if self._scan is None:
            self._scan = await scan_processes(
                self.discovery.live, include_ended=True, timeout=self.timeout
            )
        return self._scan

    async def node(self) -> Node:
        from cis_bot.app.connect import connect_configured

        if self._connection is None:
            self._connection = await connect_configured(self.config, serve=False)
        return self._connection.node

    async def room_runs(self) -> list[RoomRun]:
        from cis_bot.matrix.runs import joined_rooms, read_runs

        if self._runs is None:
            node = await self.node()
            self._runs = await read_runs(node, await joined_rooms(node, self.room))
        return self._runs

    async def records(self, *, disk: bool, rooms: bool) -> list[SessionRecord]:
        """Every session known: processes first, then rooms, then transcripts left on disk."""
        from cis_bot.control.finder import scan_disk, scan_room

        found = {r.session_id: r for r in (await self.local()).records}
        if rooms and self.remote:
            for run in await self.room_runs():
                for record in scan_room(run.room_id, run.log):
                    found.setdefault(record.session_id, record)
        if disk:
            for record in scan_disk(self.state_dir):
                known = found.get(record.session_id)
                if known is None:
                    found[record.session_id] = record
                elif known.source == "room" and known.ended:
                    known.transcript = record.transcript  # the local copy beats a download
                    known.source = "disk"
        return list(found.values())

    def gone(self, run_id: str) -> str | None:
        """Why a run's sessions cannot be reached: its process died."""
        for entry in self.discovery.dead:
            if any(r.run_id == run_id for r in entry.runs):
                return f"{entry.describe()} is gone (it stopped without cleaning up)"
        return None

    async def find_session(self, text: str, *, live: bool) -> SessionRecord:
        from cis_bot.control.client import ControlError
        from cis_bot.control.finder import SessionId, UnknownSession, resolve_session

        scan = await self.local()
        try:
            record = resolve_session(text, scan.records)
        except UnknownSession:
            try:
                record = resolve_session(text, await self.records(disk=True, rooms=True))
            except UnknownSession as exc:
                wanted = SessionId.parse(text)
                for entry in self.discovery.dead:
                    if any(wanted.matches_run(r.run_id) for r in entry.runs):
                        raise ControlError(f"{exc}; {self.gone_entry(entry)}") from None
                if scan.silent:
                    silent = "; ".join(error for _, error in scan.silent)
                    raise ControlError(f"{exc}; and {silent}") from None
                raise
        if record.source != "process":
            for entry, error in scan.silent:
                if any(r.run_id == record.run_id for r in entry.runs):
                    raise ControlError(f"session {record.session_id}: {error}")
        if live:
            if record.source != "process" and (why := self.gone(record.run_id)):
                raise ControlError(f"session {record.session_id}: {why}")
            if record.source == "disk" and not record.ended:
                raise ControlError(
                    f"session {record.session_id} is held by no process here (only its "
                    f"transcript is left); `cis dag logs {record.session_id}` shows its output"
                )
            if record.ended:
                raise ControlError(
                    f"session {record.session_id} has ended ({record.state}); "
                    f"`cis dag logs {record.session_id}` shows its output"
                )
        return record

    @staticmethod
    def gone_entry(entry: ProcessEntry) -> str:
        return f"{entry.describe()} is gone (it stopped without cleaning up)"

    async def check_node(self, room_id: str, node_id: str) -> None:
        """Fail at once when the room says the node is down (its heartbeat has lapsed), rather
        than wait out the timeout. A node that does not heartbeat (a coordinator) is asked."""
        from mautrix.errors import MatrixError

        from cis_bot.control.client import ControlError
        from cis_bot.matrix import events as ev

        node = await self.node()
        try:
            state = await node.room_state(room_id)
        except MatrixError:
            return
        for raw in state:
            if raw.get("type") != ev.NodeHeartbeatContent.TYPE or raw.get("state_key") != node_id:
                continue
            try:
                beat = ev.decode(ev.NodeHeartbeatContent.TYPE, raw.get("content"))
            except ev.InvalidEvent:
                return
            assert isinstance(beat, ev.NodeHeartbeatContent)
            now = ev.now_ms()
            if not beat.alive_at(now):
                age = (now - beat.timestamp) / 1000
                raise ControlError(
                    f"node {node_id} looks down: its last heartbeat was {age:.0f}s ago (a "
                    f"running node renews it within {beat.ttl_ms / 1000:g}s)"
                )

    async def requester(self) -> RoomRequester:
        from cis_bot.control.room import RoomRequester

        return RoomRequester(await self.node(), timeout=self.timeout)

    async def remote_session_request(
        self, record: SessionRecord, *, extra_secs: float = 0, **fields: Any
    ) -> ev.ControlReplyContent:
        """Ask the session's node, through the room, to act on it."""
        if record.room_id is None or record.node is None:
            raise UserError(f"session {record.session_id}: its node is not known")
        await self.check_node(record.room_id, record.node)
        requester = await self.requester()
        requester.timeout += extra_secs
        reply: ev.ControlReplyContent = await requester.request(
            record.room_id,
            node=record.node,
            node_user=record.node_user,
            run_id=record.run_id,
            session_id=record.session_id,
            **fields,
        )
        return reply


def _client(entry: ProcessEntry, timeout: float) -> ProcessClient:
    from cis_bot.control.client import ProcessClient

    return ProcessClient(entry, timeout=timeout)


def _run(args: argparse.Namespace, body: Any) -> int:
    async def main() -> int:
        context = Context(args)
        try:
            result: int = await body(context)
            return result
        finally:
            await context.close()

    return asyncio.run(main())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


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
    async def body(context: Context) -> int:
        from cis_bot.control.finder import resolve_run

        records = await context.records(disk=args.all, rooms=True)
        context.warn_about_processes(await context.local())
        if not args.all:
            records = [
                r for r in records if not r.ended and r.source != "disk" and r.state != "unknown"
            ]
        if args.run:
            run_id = resolve_run(args.run, {r.run_id for r in records})
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
        header = ("SESSION", "AGENT", "STATE", "ELAPSED", "NODE", "LAST LINE")
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
        for row in [header, *rows]:
            cells = [str(row[i]).ljust(widths[i]) for i in range(5)]
            print("  ".join([*cells, str(row[5])[:100]]).rstrip())
        return 0

    return _run(args, body)


# --- logs --------------------------------------------------------------------------------------


def _last_lines(data: bytes, count: int | None, *, raw: bool) -> bytes:
    from cis_bot.session.output import terminal_text

    if not raw:
        data = terminal_text(data).encode("utf-8")
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

    async def body(context: Context) -> int:
        record = await context.find_session(args.id, live=False)
        out = sys.stdout.buffer
        if record.source == "process" and record.process is not None:
            async with _client(record.process, context.timeout) as client:
                stream = client.logs(record.session_id, tail=args.tail, follow=args.follow)
                if args.follow:
                    await _follow(stream, raw=args.raw)
                    return 0
                data = b"".join([chunk async for chunk in stream])
        elif record.source == "disk" and record.transcript:
            data = await asyncio.to_thread(Path(record.transcript).read_bytes)
        elif record.ended:
            if not record.transcript:
                raise UserError(f"session {record.session_id} left no transcript in its room")
            node = await context.node()
            data = await node.download(record.transcript)
        else:
            if args.follow:
                raise UserError(
                    f"session {record.session_id} runs on node {record.node}: following its "
                    "output works on that node's machine; from here, logs without --follow "
                    "shows its latest output"
                )
            reply = await context.remote_session_request(record, action="logs", tail=args.tail)
            data = (reply.text or "").encode("utf-8")
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
            out.write(shown)
            out.flush()
        return 0

    return _run(args, body)


async def _follow(stream: AsyncIterator[bytes], *, raw: bool) -> None:
    """Print the stream as it comes; as text, a partial line once the output pauses."""
    from cis_bot.control.terminal import TextStream

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
    text = TextStream()
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
    async def body(context: Context) -> int:
        from cis_bot.control.terminal import run_attached, terminal_size

        record = await context.find_session(args.id, live=True)
        if record.source != "process" or record.process is None:
            raise UserError(
                f"session {record.session_id} runs on node {record.node}: attach works on "
                "that node's machine; from here: logs, input, kill"
            )
        async with _client(record.process, context.timeout) as client:
            size = None if args.readonly else terminal_size(sys.stdout.fileno())
            ws = await client.attach(record.session_id, readonly=args.readonly, size=size)
            result = await run_attached(ws, readonly=args.readonly)
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

    async def body(context: Context) -> int:
        record = await context.find_session(args.id, live=True)
        if record.source == "process" and record.process is not None:
            async with _client(record.process, context.timeout) as client:
                answer = await client.request(
                    "POST",
                    client.session_path(record.session_id, "input"),
                    body={"text": args.text, "newline": newline},
                )
            state = answer.get("state") if isinstance(answer, dict) else None
        else:
            reply = await context.remote_session_request(
                record, action="input", text=args.text, newline=newline
            )
            state = reply.state
        if args.json:
            _print_json({"session_id": record.session_id, "sent": True, "state": state})
        else:
            enter = " and Enter" if newline else ""
            print(f"{record.session_id}: typed {len(args.text)} characters{enter} ({state})")
        return 0

    return _run(args, body)


def _kill(args: argparse.Namespace) -> int:
    async def body(context: Context) -> int:
        record = await context.find_session(args.id, live=True)
        if record.source == "process" and record.process is not None:
            async with _client(record.process, context.timeout) as client:
                answer = await client.request(
                    "POST",
                    client.session_path(record.session_id, "kill"),
                    body={"by": _user()},
                    timeout=context.timeout + KILL_EXTRA_SECS,
                )
            state = answer.get("state") if isinstance(answer, dict) else None
        else:
            reply = await context.remote_session_request(
                record, action="kill", extra_secs=KILL_EXTRA_SECS
            )
            state = reply.state
        if args.json:
            _print_json({"session_id": record.session_id, "state": state})
        else:
            print(f"{record.session_id}: {state}")
        return 0

    return _run(args, body)


# --- runs: cancel / approve --------------------------------------------------------------------


class _RunTarget:
    def __init__(
        self,
        run_id: str,
        *,
        process: ProcessEntry | None = None,
        room_id: str | None = None,
        node: str | None = None,
        node_user: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.process = process
        self.room_id = room_id
        self.node = node
        self.node_user = node_user


async def _find_run(context: Context, text: str) -> _RunTarget:
    from cis_bot.control.client import ControlError
    from cis_bot.control.finder import UnknownRun, resolve_run

    local = {run.run_id: entry for entry in context.discovery.live for run in entry.runs}
    try:
        run_id = resolve_run(text, local)
        return _RunTarget(run_id, process=local[run_id])
    except UnknownRun as exc:
        unknown = exc
    for entry in context.discovery.dead:
        if any(r.run_id.startswith(text) for r in entry.runs):
            raise ControlError(f"run {text!r}: {context.gone_entry(entry)}")
    if not context.remote:
        raise unknown
    found = await context.room_runs()
    try:
        run_id = resolve_run(text, [run.run_id for run in found])
    except UnknownRun:
        raise UserError(f"{unknown} (and none in the rooms either)") from None
    run = next(run for run in found if run.run_id == run_id)
    engine = run.replay()
    if engine.finished:
        raise ControlError(f"run {run_id} has already ended ({engine.status})")
    return _RunTarget(
        run_id,
        room_id=run.room_id,
        node=run.created.coordinator,
        node_user=run.log.coordinator_user,
    )


async def _run_request(
    context: Context, target: _RunTarget, action: str, body: dict[str, Any]
) -> dict[str, Any]:
    if target.process is not None:
        async with _client(target.process, context.timeout) as client:
            answer = await client.request("POST", client.run_path(target.run_id, action), body=body)
        return answer if isinstance(answer, dict) else {}
    assert target.room_id is not None and target.node is not None
    await context.check_node(target.room_id, target.node)
    requester = await context.requester()
    fields = {"task_id": body["task"]} if "task" in body else {}
    await requester.request(
        target.room_id,
        node=target.node,
        node_user=target.node_user,
        action=action,
        run_id=target.run_id,
        **fields,
    )
    return {"run_id": target.run_id, "via": target.room_id}


def _cancel(args: argparse.Namespace) -> int:
    async def body(context: Context) -> int:
        target = await _find_run(context, args.run)
        answer = await _run_request(context, target, "cancel", {"by": _user()})
        if args.json:
            _print_json({"run_id": target.run_id, "cancelled": True, **answer})
        else:
            print(f"run {target.run_id}: cancelled (its sessions are being stopped)")
        return 0

    return _run(args, body)


def _approve(args: argparse.Namespace) -> int:
    async def body(context: Context) -> int:
        target = await _find_run(context, args.run)
        if target.process is None and args.as_user:
            print(
                "cis: note: --as applies to this machine's runs only; through the room you "
                "approve as the config's bot user",
                file=sys.stderr,
            )
        by = args.as_user or _user()
        answer = await _run_request(context, target, "approve", {"task": args.task, "by": by})
        if args.json:
            _print_json({"run_id": target.run_id, "task_id": args.task, "approved": True, **answer})
        else:
            waiting = answer.get("waiting_for") or []
            more = f" (still waiting for: {', '.join(waiting)})" if waiting else ""
            print(f"run {target.run_id}: approved {args.task}{more}")
        return 0

    return _run(args, body)

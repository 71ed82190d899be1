"""What each chat command does, through the operations the CLI uses: this process's
``ControlPlane`` for its own sessions and runs, the room's run log for what others drive, and
room-level control requests (``control/client/room.py``) for sessions on other nodes and runs
coordinated elsewhere.

Every command answers with an :class:`Answer` (a text, and files for a long log) or raises a
``UserError`` whose message is the answer. Starting and resuming runs belong to a node
(``RunStarter``, given by ``cis node``); a run process answers those with where to go instead.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Protocol

import attrs
import structlog

from cis_bot.app.chat.rooms import RoomFacts
from cis_bot.app.chat.view import RoomView
from cis_bot.chat.commands import BY_NAME, Command
from cis_bot.chat.compose import Text, code, code_block, help_text, para, table
from cis_bot.chat.incoming import FileRef, Message
from cis_bot.config import Config
from cis_bot.control.client.finder import (
    SessionRecord,
    UnknownSession,
    resolve_session,
    scan_room,
)
from cis_bot.control.client.room import RoomRequester
from cis_bot.control.operations import ControlPlane, OperationError
from cis_bot.dag.report import build_report
from cis_bot.errors import UserError
from cis_bot.ids import SessionRef, UnknownRun
from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Node
from cis_bot.matrix.runs import RoomRun
from cis_bot.session.readable import readable

log = structlog.get_logger(__name__)

#: A log shown in the room is cut to this many characters (a longer one comes as a file).
LOG_CHARS = 6_000
#: Transcripts read for a log are cut to their last this-many bytes.
TRANSCRIPT_BYTES = 4 * 1024 * 1024
#: The last line of a session shown in ``sessions``.
LAST_LINE_CHARS = 80

_ICONS = {
    "completed": "✅",
    "failed": "❌",
    "timeout": "⏱️",
    "skipped": "⏭️",
    "cancelled": "🚫",
    "running": "🔄",
    "dispatched": "📤",
    "awaiting_approval": "✋",
    "blocked": "⛔",
    "killed": "🛑",
}


@attrs.frozen
class Request:
    room_id: str
    sender: str
    #: The message answered (for a reaction: the notice reacted to).
    message: Message
    command: Command
    #: A DAG file that came with the command (its caption) or that the command replies to.
    file: FileRef | None = None


@attrs.frozen
class Attachment:
    filename: str
    data: bytes
    mimetype: str = "text/plain; charset=utf-8"


@attrs.frozen
class Answer:
    text: Text
    files: tuple[Attachment, ...] = ()


class RunStarter(Protocol):
    """A node's way to start and resume runs from the chat (``starter.py``)."""

    async def run(self, request: Request, view: RoomView) -> Answer: ...

    async def resume(self, request: Request, view: RoomView) -> Answer: ...


class ChatActions:
    def __init__(
        self,
        node: Node,
        plane: ControlPlane,
        config: Config,
        facts: RoomFacts,
        *,
        starter: RunStarter | None,
        timeout: float = 10.0,
    ) -> None:
        self.node = node
        self.plane = plane
        self.config = config
        self.facts = facts
        self.starter = starter
        self.timeout = timeout

    @property
    def prefix(self) -> str:
        return self.config.chat.prefix

    async def answer(self, request: Request, view: RoomView) -> Answer:
        """The command's answer; UserError (and OperationError) for what cannot be done."""
        name = request.command.name
        try:
            match name:
                case "help":
                    return self._help(request)
                case "run":
                    return await self._started(request, view, resume=False)
                case "resume":
                    return await self._started(request, view, resume=True)
                case "list":
                    return await self._list(view)
                case "status":
                    return await self._status(request, view)
                case "nodes":
                    return await self._nodes(request)
                case "sessions":
                    return await self._sessions(request, view)
                case "logs":
                    return await self._logs(request, view)
                case "input":
                    return await self._input(request, view)
                case "kill":
                    return await self._kill(request, view)
                case "approve":
                    return await self._approve(request, view)
                case "cancel":
                    return await self._cancel(request, view)
        except OperationError as exc:
            raise UserError(str(exc)) from None
        raise UserError(f"{name}: not a command")

    # --- reading -------------------------------------------------------------------------------

    def _help(self, request: Request) -> Answer:
        spec = BY_NAME.get(request.command.arg("COMMAND") or "")
        level = self.config.chat.command_power_level
        return Answer(help_text(self.prefix, spec, level=level))

    async def _list(self, view: RoomView) -> Answer:
        runs = sorted(await view.runs(), key=lambda run: run.created.timestamp)
        if not runs:
            return Answer(Text.of(f"No runs in this room yet ({self.prefix} help run)."))
        rows: list[list[str | Text]] = []
        for run in runs:
            summary = self._summary(run)
            done = sum(1 for t in summary["tasks"].values() if t["status"] == "completed")
            rows.append(
                [
                    code(run.run_id),
                    run.spec.name,
                    f"{_ICONS.get(summary['status'], '')} {summary['status']}".strip(),
                    f"{done}/{len(summary['tasks'])}",
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(run.created.timestamp / 1000)),
                ]
            )
        return Answer(
            Text.join(
                [
                    para(f"{len(runs)} run{'s' if len(runs) != 1 else ''} in this room:"),
                    table(["run", "DAG", "status", "done", "created"], rows),
                ]
            )
        )

    def _summary(self, run: RoomRun) -> dict[str, Any]:
        """The run's report: from its driver when this process drives it (the freshest), else
        from its room."""
        for handle in self.plane.run_handles:
            if handle.run_id == run.run_id:
                return build_report(
                    handle.driver.engine,
                    run_id=run.run_id,
                    mode=run.created.mode,
                    coordinator=run.created.coordinator,
                )
        return run.summary()

    async def _status(self, request: Request, view: RoomView) -> Answer:
        run = await view.pick(request.command.arg("RUN"))
        summary = self._summary(run)
        blocked = {
            r.task_id: r.blocked_reason or "blocked"
            for r in await self._records(view)
            if r.run_id == run.run_id and r.state == "blocked"
        }
        rows: list[list[str | Text]] = []
        for task_id, task in summary["tasks"].items():
            status = (
                "blocked" if task_id in blocked and task["status"] == "running" else task["status"]
            )
            detail = blocked.get(task_id) if status == "blocked" else task["reason"]
            rows.append(
                [
                    _ICONS.get(status, "⏳"),
                    code(task_id),
                    status,
                    str(task["attempts"]),
                    task["node"] or "",
                    _cut(detail or "", 120),
                ]
            )
        head = f"Run {run.run_id} — DAG {run.spec.name} ({run.created.mode}): {summary['status']}"
        return Answer(
            Text.join(
                [para(head), table(["", "task", "status", "attempts", "node", "detail"], rows)]
            )
        )

    async def _nodes(self, request: Request) -> Answer:
        beats = await self.facts.heartbeats(request.room_id)
        if not beats:
            return Answer(Text.of("No node heartbeats in this room."))
        now = ev.now_ms()
        rows: list[list[str | Text]] = []
        for sender, beat in sorted(beats, key=lambda b: b[1].node_id):
            alive = beat.alive_at(now)
            age = max(0, now - beat.timestamp) / 1000
            rows.append(
                [
                    code(beat.node_id),
                    sender,
                    "🟢 up" if alive else "🔴 down",
                    ", ".join(beat.agents) or "-",
                    f"{beat.load}/{beat.max_workers}",
                    f"{_duration(age)} ago",
                ]
            )
        return Answer(table(["node", "user", "state", "agents", "load", "last beat"], rows))

    async def _records(self, view: RoomView) -> list[SessionRecord]:
        """Every session known in the room: this process's (live), then the room's."""
        found: dict[str, SessionRecord] = {}
        for info in self.plane.sessions(include_ended=True):
            record = _record_here(info, view.room_id)
            room = self._session_room(record.session_id)
            if room in (None, view.room_id):
                found[record.session_id] = record
        for run in await view.runs():
            for record in scan_room(view.room_id, run.log):
                found.setdefault(record.session_id, record)
        return list(found.values())

    def _session_room(self, session_id: str) -> str | None:
        try:
            return self.plane.session_room(session_id)
        except OperationError:
            return None

    async def _sessions(self, request: Request, view: RoomView) -> Answer:
        records = await self._records(view)
        wanted = request.command.arg("RUN")
        if wanted is not None:
            run = await view.pick(wanted)
            records = [r for r in records if r.run_id == run.run_id]
        else:
            records = [r for r in records if not r.ended and r.state != "unknown"]
        if not records:
            what = "" if wanted is not None else " running"
            return Answer(Text.of(f"No sessions{what}."))
        records.sort(key=lambda r: (r.run_id, r.task_id, r.attempt or 0))
        rows: list[list[str | Text]] = [
            [
                code(r.session_id),
                r.agent or "-",
                f"{_ICONS.get(r.state, '')} {r.state}".strip(),
                r.node or "-",
                _duration(r.elapsed_s) if r.elapsed_s is not None else "-",
                _cut(
                    (r.blocked_reason if r.state == "blocked" and r.blocked_reason else None)
                    or r.last_line,
                    LAST_LINE_CHARS,
                ),
            ]
            for r in records
        ]
        return Answer(table(["session", "agent", "state", "node", "time", "last line"], rows))

    async def _find_session(self, view: RoomView, text: str, *, live: bool) -> SessionRecord:
        records = await self._records(view)
        try:
            record = resolve_session(text, records)
        except UnknownSession as exc:
            raise UserError(str(exc)) from None
        if live and record.ended:
            raise UserError(
                f"session {record.session_id} has ended ({record.state}); "
                f"`{self.prefix} logs {record.session_id}` shows its output"
            )
        return record

    def _here(self, record: SessionRecord) -> bool:
        return record.source == "here"

    async def _logs(self, request: Request, view: RoomView) -> Answer:
        text = request.command.arg("RUN:TASK")
        assert text is not None
        lines = int(request.command.arg("LINES") or self.config.chat.log_lines)
        record = await self._find_session(view, text, live=False)
        raw = await self._transcript(record, lines)
        prompt = await self._prompt(view, record)
        rendered = readable(raw, prompt=prompt).rstrip("\n")
        all_lines = rendered.split("\n") if rendered else []
        shown = "\n".join(all_lines[-lines:])
        cut = len(shown) > LOG_CHARS
        if cut:
            shown = "…" + shown[-(LOG_CHARS - 1) :]
        head = para(
            code(record.session_id),
            f" ({record.state}): ",
            f"the last {min(lines, len(all_lines))} of {len(all_lines)} lines"
            if all_lines
            else "no output yet",
        )
        parts = [head]
        if all_lines:
            parts.append(code_block(shown))
        files: tuple[Attachment, ...] = ()
        if len(all_lines) > lines or cut:
            name = f"{record.session_id.replace(':', '_')}.log"
            files = (Attachment(name, (rendered + "\n").encode("utf-8")),)
            parts.append(para(f"The whole log ({len(all_lines)} lines) is attached: {name}."))
        return Answer(Text.join(parts), files)

    async def _prompt(self, view: RoomView, record: SessionRecord) -> str | None:
        for run in await view.runs():
            if run.run_id == record.run_id:
                for task in run.spec.tasks:
                    if task.id == record.task_id and task.agent != "shell":
                        return task.prompt
        return None

    async def _transcript(self, record: SessionRecord, lines: int) -> bytes:
        """The session's raw transcript (its end): read here, downloaded from the room, or its
        end asked of the node that runs it."""
        if self._here(record) and record.transcript:
            path = Path(record.transcript)
            return await asyncio.to_thread(_read_end, path, TRANSCRIPT_BYTES)
        if record.ended:
            if not record.transcript:
                raise UserError(f"session {record.session_id} left no transcript in this room")
            return (await self.node.download(record.transcript))[-TRANSCRIPT_BYTES:]
        reply = await self._ask_node(record, action="logs", tail=max(lines * 4, 200))
        return (reply.text or "").encode("utf-8")

    # --- acting ----------------------------------------------------------------------------------

    async def _input(self, request: Request, view: RoomView) -> Answer:
        ref = request.command.arg("RUN:TASK")
        typed = request.command.arg("TEXT") or ""
        assert ref is not None
        record = await self._find_session(view, ref, live=True)
        if self._here(record):
            done = await self.plane.send_input(record.session_id, typed, newline=True)
            state = done["state"]
        else:
            state = (await self._ask_node(record, action="input", text=typed, newline=True)).state
        count = len(typed)
        return Answer(
            para(
                "⌨️ Typed ",
                f"{count} character{'s' if count != 1 else ''} and Enter into ",
                code(record.session_id),
                f" ({state}).",
            )
        )

    async def _kill(self, request: Request, view: RoomView) -> Answer:
        ref = request.command.arg("RUN:TASK")
        assert ref is not None
        record = await self._find_session(view, ref, live=True)
        if self._here(record):
            state = (await self.plane.kill(record.session_id, by=request.sender))["state"]
        else:
            state = (await self._ask_node(record, action="kill", extra_secs=10.0)).state
        return Answer(para("🛑 ", code(record.session_id), f": {state}."))

    async def _approve(self, request: Request, view: RoomView) -> Answer:
        run, task_id = await self._live_run(request, view), request.command.arg("TASK")
        assert task_id is not None
        if run.run_id in {h.run_id for h in self.plane.run_handles}:
            done = self.plane.approve(run.run_id, task_id, by=request.sender)
            waiting = done.get("waiting_for") or []
        else:
            await self._ask_coordinator(run, action="approve", task_id=task_id)
            waiting = []
        more = f" (still waiting for: {', '.join(waiting)})" if waiting else ""
        return Answer(para("✅ Approved ", code(task_id), f" of run {run.run_id}{more}."))

    async def _cancel(self, request: Request, view: RoomView) -> Answer:
        run = await self._live_run(request, view)
        if run.run_id in {h.run_id for h in self.plane.run_handles}:
            self.plane.cancel(run.run_id, by=request.sender)
        else:
            await self._ask_coordinator(run, action="cancel")
        return Answer(para(f"🚫 Run {run.run_id} cancelled: its sessions are being stopped."))

    async def _live_run(self, request: Request, view: RoomView) -> RoomRun:
        wanted = request.command.arg("RUN")
        assert wanted is not None
        try:
            run = await view.pick(wanted)
        except UnknownRun as exc:
            raise UserError(str(exc)) from None
        if run.log.completed is not None or run.replay().finished:
            raise UserError(f"run {run.run_id} has already ended ({run.replay().status})")
        return run

    async def _started(self, request: Request, view: RoomView, *, resume: bool) -> Answer:
        if self.starter is None:
            runs = self.plane.run_handles
            mine = f"it drives run {runs[0].run_id} only" if runs else "it drives one run only"
            raise UserError(
                f"this process does not start runs ({mine}): start them from a coordinator node "
                "(`cis node --coordinator`) in a room it is in"
            )
        if resume:
            return await self.starter.resume(request, view)
        return await self.starter.run(request, view)

    # --- other nodes, through the room ---------------------------------------------------------

    async def _ask_node(
        self, record: SessionRecord, *, extra_secs: float = 0, **fields: object
    ) -> ev.ControlReplyContent:
        if record.node is None or record.node_user is None or record.room_id is None:
            raise UserError(f"session {record.session_id}: its node is not known")
        requester = RoomRequester(self.node, timeout=self.timeout + extra_secs)
        return await requester.request(
            record.room_id,
            node=record.node,
            node_user=record.node_user,
            run_id=record.run_id,
            session_id=record.session_id,
            **fields,
        )

    async def _ask_coordinator(self, run: RoomRun, **fields: object) -> ev.ControlReplyContent:
        user = run.log.coordinator_user
        if user is None:
            raise UserError(f"run {run.run_id}: its coordinator is not known")
        requester = RoomRequester(self.node, timeout=self.timeout)
        return await requester.request(
            run.room_id, node=run.created.coordinator, node_user=user, run_id=run.run_id, **fields
        )


def _record_here(info: dict[str, object], room_id: str) -> SessionRecord:
    """A session this process holds, as a SessionRecord (source ``here``)."""
    sid = str(info["session_id"])
    ref = SessionRef.parse(sid)
    elapsed = info.get("elapsed_s")
    pid = info.get("pid")
    exit_code = info.get("exit_code")
    return SessionRecord(
        session_id=sid,
        run_id=ref.run or "",
        task_id=ref.task,
        attempt=ref.attempt,
        state=str(info.get("state", "unknown")),
        source="here",
        agent=str(info["agent"]) if info.get("agent") else None,
        node=str(info.get("node") or ""),
        elapsed_s=float(elapsed) if isinstance(elapsed, int | float) else None,
        last_line=str(info.get("last_line") or ""),
        blocked_reason=str(info["blocked_reason"]) if info.get("blocked_reason") else None,
        exit_code=exit_code if isinstance(exit_code, int) else None,
        pid=pid if isinstance(pid, int) else None,
        transcript=str(info["transcript"]) if info.get("transcript") else None,
        room_id=room_id,
    )


def _read_end(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - limit))
            return f.read()
    except OSError:
        return b""


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

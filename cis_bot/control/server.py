"""The control API of one process: every session it holds and every run it drives.

One ``ControlPlane`` per process, served over a unix socket found from the state directory (see
``registry.py``). ``cis dag execute`` / ``resume`` start one around their run; ``cis node``
starts one for its worker and the runs it resumes. The same operations serve the room path
(``room.py``): a request posted in a run's room by an authorised user.

HTTP API (JSON unless said otherwise; errors are ``{"error": message}`` with 4xx):

- ``GET  /v1/info``                             the process: pid, node id, kind, runs
- ``GET  /v1/sessions[?all=1]``                 live sessions (with ``all``: ended ones it keeps)
- ``GET  /v1/runs``                             the runs it drives, with task statuses
- ``POST /v1/sessions/{id}/input``              ``{"text": str, "newline": bool}``
- ``POST /v1/sessions/{id}/kill``               ``{"by": str}``; answers once the session ended
- ``GET  /v1/sessions/{id}/logs[?tail=N][&follow=1]``  the raw transcript as a byte stream;
  with ``follow`` it goes on with live output and ends when the session ends
- ``GET  /v1/sessions/{id}/attach[?readonly=1][&rows=R&cols=C]``  WebSocket: binary frames are
  raw PTY bytes both ways; text frames are JSON: from the client ``{"type": "resize", "rows",
  "cols"}``; from the server ``attached``, ``readonly`` (another terminal took over), ``ended``
- ``POST /v1/runs/{run}/cancel``                ``{"by": str}``
- ``POST /v1/runs/{run}/approve``               ``{"task": str, "by": str}``

Two terminals attached to one session: the newest writer takes over. The one it replaced is
told (``{"type": "readonly"}``) and from then on only watches; read-only attaches never take
over. Only the writer's keystrokes and window size reach the PTY.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import structlog
from aiohttp import WSMsgType, web

from cis_bot.control import registry
from cis_bot.dag.engine import RunCancelled, TaskApproved, TaskStatus
from cis_bot.dag.spec import LevelKind
from cis_bot.errors import UserError
from cis_bot.run.driver import RunDriver
from cis_bot.session.manager import SessionManager
from cis_bot.session.session import AgentSession, SessionError

log = structlog.get_logger(__name__)

API = "/v1"
#: Enter, as a terminal sends it.
ENTER = b"\r"
#: Screen-clearing sequences: a replay for a new terminal starts at the last of them.
_SCREEN_STARTS = (b"\x1b[?1049h", b"\x1b[?47h", b"\x1b[2J", b"\x1bc")


class OperationError(Exception):
    """An operation that cannot be done; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class ControlSettings:
    #: ``input``: the Enter key goes this long after the text, as when a person types (a TUI
    #: reading the text and the Enter in one read may take it all for a paste).
    enter_delay_secs: float = 0.05
    #: A terminal that falls this far behind a session's output is disconnected.
    attach_backlog_bytes: int = 8 * 1024 * 1024
    #: What a newly attached terminal is shown of the output so far (at most).
    replay_bytes: int = 64 * 1024
    #: Largest input accepted in one request.
    max_input_bytes: int = 64 * 1024


@attrs.define
class RunHandle:
    """A run this process drives: operations on it become facts for its driver."""

    run_id: str
    room_id: str
    dag: str
    mode: str
    driver: RunDriver


@attrs.define(eq=False)
class _Holder:
    manager: SessionManager
    #: The room a session's run lives in (where room requests about it must come from).
    room_of: Callable[[str], str | None]


def split_session_id(session_id: str) -> tuple[str, str, int | None]:
    """(run, task, attempt) of ``run:task:attempt`` (run ids and task ids hold no ':')."""
    run_id, _, rest = session_id.partition(":")
    task_id, _, attempt = rest.rpartition(":")
    if not task_id:
        return run_id, rest, None
    return run_id, task_id, int(attempt) if attempt.isdigit() else None


def session_info(session: AgentSession, node_id: str) -> dict[str, Any]:
    run_id, task_id, attempt = split_session_id(session.session_id)
    completion = session.completion
    last = session.tail_text(8).rstrip().rsplit("\n", 1)[-1].strip()
    return {
        "session_id": session.session_id,
        "run_id": run_id,
        "task_id": task_id,
        "attempt": attempt,
        "agent": session.agent,
        "state": str(session.state),
        "node": node_id,
        "pid": session.pid,
        "started_at": session.started_at,
        "elapsed_s": round(session.duration_s, 3),
        "last_line": last,
        "blocked_reason": session.blocked_reason,
        "exit_code": completion.exit_code if completion else None,
        "error": completion.error if completion else None,
        "transcript": str(session.transcript_path),
    }


def replay_of(tail: bytes, limit: int) -> bytes:
    """What to show a terminal attaching mid-session: from the last screen clear if a full-screen
    program drew one recently, else the last ``limit`` bytes from a line start."""
    start = max(tail.rfind(marker) for marker in _SCREEN_STARTS)
    if start >= 0 and len(tail) - start <= 4 * limit:
        return tail[start:]
    if len(tail) <= limit:
        return tail
    cut = tail.find(b"\n", len(tail) - limit)
    return tail[cut + 1 :] if cut >= 0 else tail[-limit:]


def tail_offset(path: Path, lines: int, end: int) -> int:
    """The offset in ``path`` where its last ``lines`` lines (up to ``end``) begin."""
    if lines <= 0:
        return end
    block = 64 * 1024
    with path.open("rb") as f:
        position = end
        found = 0
        # A final newline ends the last line; it does not start another.
        skip_last = True
        while position > 0:
            size = min(block, position)
            position -= size
            f.seek(position)
            data = f.read(size)
            index = len(data)
            while True:
                index = data.rfind(b"\n", 0, index)
                if index < 0:
                    break
                if skip_last and position + index == end - 1:
                    skip_last = False
                    continue
                skip_last = False
                found += 1
                if found == lines:
                    return position + index + 1
            skip_last = False
    return 0


class _Attached:
    """One terminal attached to a session (a WebSocket)."""

    def __init__(self, ws: web.WebSocketResponse, *, writer: bool, backlog: int) -> None:
        self.ws = ws
        self.writer = writer
        self.backlog_limit = backlog
        self.pending = bytearray()
        self.notices: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.overflowed = False

    def feed(self, data: bytes) -> None:
        if len(self.pending) + len(data) > self.backlog_limit:
            self.overflowed = True
        else:
            self.pending += data
        self.wake.set()

    def notify(self, message: dict[str, Any]) -> None:
        self.notices.append(message)
        self.wake.set()


class ControlPlane:
    """This process's control API (see the module docstring)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        node_id: str,
        kind: str,
        settings: ControlSettings | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.node_id = node_id
        self.kind = kind
        self.settings = settings or ControlSettings()
        self._holders: list[_Holder] = []
        self._runs: dict[str, RunHandle] = {}
        self._attached: dict[str, list[_Attached]] = {}
        self._streams: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._registration: registry.Registration | None = None
        self._closed = False
        #: Run first when the plane closes (the room handler's close).
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the socket and write this process's entry."""
        socket_path = registry.socket_path(self.state_dir, os.getpid())
        self._registration = registry.Registration(
            self.state_dir, node_id=self.node_id, kind=self.kind, socket=socket_path
        )
        if socket_path.parent != self._registration.directory:
            registry.private_dir(socket_path.parent)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()  # left by a dead process with our pid
        app = web.Application(middlewares=[_same_user_only, _errors_as_json])
        app.add_routes(
            [
                web.get(f"{API}/info", self._get_info),
                web.get(f"{API}/sessions", self._get_sessions),
                web.get(f"{API}/runs", self._get_runs),
                web.post(f"{API}/sessions/{{sid}}/input", self._post_input),
                web.post(f"{API}/sessions/{{sid}}/kill", self._post_kill),
                web.get(f"{API}/sessions/{{sid}}/logs", self._get_logs),
                web.get(f"{API}/sessions/{{sid}}/attach", self._attach),
                web.post(f"{API}/runs/{{run}}/cancel", self._post_cancel),
                web.post(f"{API}/runs/{{run}}/approve", self._post_approve),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        previous = os.umask(0o077)
        try:
            await web.UnixSite(self._runner, str(socket_path)).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise UserError(f"cannot serve the control API on {socket_path}: {exc}") from None
        finally:
            os.umask(previous)
        self._write_entry()
        log.info("control.listening", socket=str(socket_path))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for close in self.on_close:
            await close()
        # Attached terminals normally saw their sessions end already (the manager closes
        # first); any left are cut off, and say the connection was lost.
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._registration is not None:
            self._registration.remove()

    def _write_entry(self) -> None:
        if self._registration is None or self._closed:
            return
        runs = tuple(
            registry.RunEntry(run_id=r.run_id, dag=r.dag, room_id=r.room_id, mode=r.mode)
            for r in self._runs.values()
        )
        try:
            self._registration.write(runs)
        except OSError as exc:
            log.warning("control.entry_write_failed", error=str(exc))

    # --- what this process holds -----------------------------------------------------------------

    def add_sessions(
        self, manager: SessionManager, room_of: Callable[[str], str | None]
    ) -> Callable[[], None]:
        holder = _Holder(manager, room_of)
        self._holders.append(holder)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._holders.remove(holder)

        return remove

    def add_run(self, run: RunHandle) -> Callable[[], None]:
        self._runs[run.run_id] = run
        self._write_entry()

        def remove() -> None:
            if self._runs.get(run.run_id) is run:
                del self._runs[run.run_id]
                self._write_entry()

        return remove

    def _all_sessions(self) -> dict[str, tuple[AgentSession, _Holder]]:
        found: dict[str, tuple[AgentSession, _Holder]] = {}
        for holder in self._holders:
            for session in holder.manager.list():
                known = found.get(session.session_id)
                # A session id on two managers: the live one counts.
                if known is None or known[0].state.is_terminal:
                    found[session.session_id] = (session, holder)
        return found

    def session(self, session_id: str) -> tuple[AgentSession, _Holder]:
        found = self._all_sessions().get(session_id)
        if found is None:
            raise OperationError(f"no session {session_id!r} in this process", 404)
        return found

    def session_room(self, session_id: str) -> str | None:
        _, holder = self.session(session_id)
        return holder.room_of(session_id)

    def run(self, run_id: str) -> RunHandle:
        handle = self._runs.get(run_id)
        if handle is None:
            raise OperationError(f"this process does not drive run {run_id!r}", 404)
        return handle

    # --- operations (the HTTP API and room requests share these) ---------------------------------

    def sessions(self, *, include_ended: bool) -> list[dict[str, Any]]:
        return [
            session_info(session, self.node_id)
            for session, _ in self._all_sessions().values()
            if include_ended or not session.state.is_terminal
        ]

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for handle in self._runs.values():
            engine = handle.driver.engine
            out.append(
                {
                    "run_id": handle.run_id,
                    "dag": handle.dag,
                    "mode": handle.mode,
                    "room_id": handle.room_id,
                    "status": str(engine.status),
                    "tasks": {tid: str(r.status) for tid, r in engine.tasks.items()},
                }
            )
        return out

    async def send_input(self, session_id: str, text: str, *, newline: bool) -> dict[str, Any]:
        session, _ = self.session(session_id)
        data = text.encode("utf-8")
        if len(data) > self.settings.max_input_bytes:
            raise OperationError(
                f"input of {len(data)} bytes is over the limit ({self.settings.max_input_bytes})",
                400,
            )
        try:
            if data:
                session.send_input(data)
            if newline:
                if data and self.settings.enter_delay_secs > 0:
                    await asyncio.sleep(self.settings.enter_delay_secs)
                session.send_input(ENTER)
        except SessionError as exc:
            raise OperationError(str(exc), 409) from None
        log.info("control.input", session_id=session_id, bytes=len(data), newline=newline)
        return {"session_id": session_id, "state": str(session.state)}

    async def kill(self, session_id: str, *, by: str | None) -> dict[str, Any]:
        session, holder = self.session(session_id)
        if session.state.is_terminal:
            raise OperationError(f"session {session_id} has already ended ({session.state})")
        reason = f"killed by {by}" if by else "killed on request"
        log.info("control.kill", session_id=session_id, by=by)
        completed = await holder.manager.kill(session_id, reason=reason)
        return {
            "session_id": session_id,
            "state": str(completed.state),
            "exit_code": completed.exit_code,
        }

    def cancel(self, run_id: str, *, by: str | None) -> dict[str, Any]:
        handle = self.run(run_id)
        engine = handle.driver.engine
        if engine.finished:
            raise OperationError(f"run {run_id} has already ended ({engine.status})")
        handle.driver.submit(RunCancelled(time.time(), by=by))
        log.info("control.cancel", run_id=run_id, by=by)
        return {"run_id": run_id, "cancelled": True}

    def approve(self, run_id: str, task_id: str, *, by: str | None) -> dict[str, Any]:
        handle = self.run(run_id)
        engine = handle.driver.engine
        record = engine.tasks.get(task_id)
        if record is None:
            raise OperationError(
                f"run {run_id} has no task {task_id!r}; tasks: {', '.join(engine.tasks)}", 404
            )
        waiting = [t for t, r in engine.tasks.items() if r.status is TaskStatus.AWAITING_APPROVAL]
        level = record.spec.level
        if not level.needs_approval:
            raise OperationError(
                f"task {task_id} needs no approval (level {level.kind}); "
                f"awaiting approval: {', '.join(waiting) or 'none'}"
            )
        if record.approved or record.status not in (
            TaskStatus.PENDING,
            TaskStatus.AWAITING_APPROVAL,
        ):
            raise OperationError(f"task {task_id} is not awaiting approval ({record.status})")
        if level.kind is LevelKind.ARBITRATED:
            if by not in level.stakeholders:
                raise OperationError(
                    f"task {task_id} is approved by its stakeholders only "
                    f"({', '.join(level.stakeholders)}); {by or 'anonymous'} is not one",
                    403,
                )
            if by in record.approvals:
                raise OperationError(f"{by} has already approved task {task_id}")
        handle.driver.submit(TaskApproved(task_id, time.time(), by=by))
        log.info("control.approve", run_id=run_id, task_id=task_id, by=by)
        missing = [s for s in level.stakeholders if s != by and s not in record.approvals]
        return {"run_id": run_id, "task_id": task_id, "approved": True, "waiting_for": missing}

    # --- HTTP handlers ---------------------------------------------------------------------------

    async def _get_info(self, request: web.Request) -> web.Response:
        entry = self._registration.entry if self._registration else None
        return web.json_response(
            {
                "pid": os.getpid(),
                "node_id": self.node_id,
                "kind": self.kind,
                "started": entry.started if entry else None,
                "runs": [r.run_id for r in self._runs.values()],
            }
        )

    async def _get_sessions(self, request: web.Request) -> web.Response:
        include_ended = request.query.get("all", "") not in ("", "0", "false")
        return web.json_response({"sessions": self.sessions(include_ended=include_ended)})

    async def _get_runs(self, request: web.Request) -> web.Response:
        return web.json_response({"runs": self.runs()})

    async def _post_input(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        text = body.get("text", "")
        newline = body.get("newline", True)
        if not isinstance(text, str) or not isinstance(newline, bool):
            raise OperationError("expected {'text': string, 'newline': boolean}", 400)
        return web.json_response(
            await self.send_input(request.match_info["sid"], text, newline=newline)
        )

    async def _post_kill(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        return web.json_response(
            await self.kill(request.match_info["sid"], by=_optional_str(body, "by"))
        )

    async def _post_cancel(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        return web.json_response(
            self.cancel(request.match_info["run"], by=_optional_str(body, "by"))
        )

    async def _post_approve(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        task = body.get("task")
        if not isinstance(task, str) or not task:
            raise OperationError("expected {'task': task id}", 400)
        return web.json_response(
            self.approve(request.match_info["run"], task, by=_optional_str(body, "by"))
        )

    async def _get_logs(self, request: web.Request) -> web.StreamResponse:
        session, _ = self.session(request.match_info["sid"])
        follow = request.query.get("follow", "") not in ("", "0", "false")
        lines = _query_int(request, "tail")
        path = session.transcript_path
        # The transcript is written before listeners are called: its size now and a listener
        # added in the same step give every byte exactly once.
        live = follow and not session.state.is_terminal
        chunks: list[bytes] = []
        wake = asyncio.Event()

        def on_output(data: bytes) -> None:
            chunks.append(data)
            wake.set()

        remove = session.add_output_listener(on_output) if live else None
        try:
            try:
                end = path.stat().st_size
            except FileNotFoundError:
                end = 0
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            if end:
                start = (
                    0 if lines is None else await asyncio.to_thread(tail_offset, path, lines, end)
                )
                await _send_file(response, path, start, end)
            if live:
                await _stream_until_ended(response, session, chunks, wake)
            await response.write_eof()
            return response
        finally:
            if remove is not None:
                remove()

    async def _attach(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        session, _ = self.session(sid)
        if session.state.is_terminal:
            raise OperationError(
                f"session {sid} has ended ({session.state}); `cis dag logs {sid}` shows its output"
            )
        readonly = request.query.get("readonly", "") not in ("", "0", "false")
        rows, cols = _query_int(request, "rows"), _query_int(request, "cols")
        ws = web.WebSocketResponse(max_msg_size=1024 * 1024)
        await ws.prepare(request)
        client = _Attached(ws, writer=not readonly, backlog=self.settings.attach_backlog_bytes)
        if _ended(session):  # while the WebSocket was set up
            await ws.send_json({"type": "ended", "state": str(session.state)})
            await ws.close()
            return ws
        clients = self._attached.setdefault(sid, [])
        # Same loop step: what was shown so far, then every byte after it.
        client.pending += replay_of(session.tail_bytes(), self.settings.replay_bytes)
        remove = session.add_output_listener(client.feed)
        if client.writer:
            for other in clients:
                if other.writer:
                    other.writer = False
                    other.notify(
                        {"type": "readonly", "reason": "another terminal attached and took over"}
                    )
        clients.append(client)
        if client.writer:
            if rows and cols:
                with contextlib.suppress(ValueError):
                    session.resize(rows, cols)
            if session.profile.screen and session.pid:
                # A full-screen program redraws on SIGWINCH; the replay alone may not show its
                # screen whole. (tmux does the same on attach; a resize to the same size sends
                # no signal.)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(session.pid, signal.SIGWINCH)
        log.info("control.attached", session_id=sid, writer=client.writer, attached=len(clients))
        await ws.send_json(
            {"type": "attached", "session_id": sid, "writer": client.writer, "node": self.node_id}
        )
        sender = asyncio.create_task(self._attach_output(session, client))
        self._streams.add(sender)
        try:
            async for message in ws:
                if message.type is WSMsgType.BINARY:
                    if client.writer and not session.state.is_terminal:
                        with contextlib.suppress(SessionError):
                            session.send_input(message.data)
                elif message.type is WSMsgType.TEXT:
                    self._attach_command(session, client, message.data)
                elif message.type is WSMsgType.ERROR:
                    break
        finally:
            remove()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            self._streams.discard(sender)
            with contextlib.suppress(ValueError):
                clients.remove(client)
            if not clients:
                self._attached.pop(sid, None)
            log.info("control.detached", session_id=sid)
        return ws

    def _attach_command(self, session: AgentSession, client: _Attached, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("type") == "resize" and client.writer:
            rows, cols = message.get("rows"), message.get("cols")
            if isinstance(rows, int) and isinstance(cols, int):
                with contextlib.suppress(ValueError):
                    session.resize(rows, cols)

    async def _attach_output(self, session: AgentSession, client: _Attached) -> None:
        """Output and notices to one terminal, in order; the end of the session ends it."""
        ws = client.ws
        ended = asyncio.ensure_future(session.wait())
        try:
            while True:
                if client.pending:
                    data = bytes(client.pending)
                    client.pending.clear()
                    await ws.send_bytes(data)
                if client.overflowed:
                    await ws.send_json(
                        {"type": "error", "message": "the terminal fell too far behind the output"}
                    )
                    break
                while client.notices:
                    await ws.send_json(client.notices.pop(0))
                if ended.done() and not client.pending:
                    completed = ended.result()
                    await ws.send_json(
                        {
                            "type": "ended",
                            "state": str(completed.state),
                            "exit_code": completed.exit_code,
                        }
                    )
                    break
                client.wake.clear()
                waiter = asyncio.ensure_future(client.wake.wait())
                try:
                    await asyncio.wait([ended, waiter], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
            await ws.close()
        except (ConnectionResetError, RuntimeError):
            pass  # the terminal went away
        finally:
            ended.cancel()


def _ended(session: AgentSession) -> bool:
    return session.state.is_terminal


async def _stream_until_ended(
    response: web.StreamResponse, session: AgentSession, chunks: list[bytes], wake: asyncio.Event
) -> None:
    ended = asyncio.ensure_future(session.wait())
    try:
        while True:
            while chunks:
                data = b"".join(chunks)
                chunks.clear()
                await response.write(data)
            if ended.done():
                return
            wake.clear()
            waiter = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait([ended, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
    finally:
        ended.cancel()


async def _send_file(response: web.StreamResponse, path: Path, start: int, end: int) -> None:
    with path.open("rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            data = await asyncio.to_thread(f.read, min(remaining, 256 * 1024))
            if not data:
                break
            remaining -= len(data)
            await response.write(data)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise OperationError("the request body is not JSON", 400) from None
    if not isinstance(body, dict):
        raise OperationError("the request body is not a JSON object", 400)
    return body


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise OperationError(f"{key!r} must be a string", 400)
    return value or None


def _query_int(request: web.Request, key: str) -> int | None:
    text = request.query.get(key)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise OperationError(f"{key} must be a whole number, not {text!r}", 400) from None
    if value < 0:
        raise OperationError(f"{key} must not be negative", 400)
    return value


_PEERCRED = struct.Struct("3i")


@web.middleware
async def _same_user_only(request: web.Request, handler: Any) -> web.StreamResponse:
    """Defence in depth behind the 0700 directory: only our own user (or root) gets in."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        _, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid not in (os.getuid(), 0):
            return web.json_response({"error": "not your process"}, status=403)
    result: web.StreamResponse = await handler(request)
    return result


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        result: web.StreamResponse = await handler(request)
    except OperationError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return web.json_response({"error": exc.reason}, status=exc.status)
        raise
    return result

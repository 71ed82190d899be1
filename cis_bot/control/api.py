"""The HTTP/WebSocket transport of one process's control plane (``operations.py``), on a unix
socket found from the state directory (see ``registry.py``). ``cis dag execute`` / ``resume``
serve one around their run; ``cis node`` serves one for its worker and the runs it resumes.

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
from pathlib import Path
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from cis_bot.control import registry
from cis_bot.control.operations import ControlPlane, ControlSettings, OperationError, tail_offset
from cis_bot.errors import UserError
from cis_bot.session.session import AgentSession, SessionError
from cis_bot.validation import check_text

log = structlog.get_logger(__name__)

API = "/v1"
#: Screen-clearing sequences: a replay for a new terminal starts at the last of them.
_SCREEN_STARTS = (b"\x1b[?1049h", b"\x1b[?47h", b"\x1b[2J", b"\x1bc")


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


class ControlApi:
    """Serves a ControlPlane on this process's socket and keeps its registry entry."""

    def __init__(self, plane: ControlPlane, state_dir: Path, *, kind: str) -> None:
        self.plane = plane
        self.state_dir = state_dir
        self.kind = kind
        self._attached: dict[str, list[_Attached]] = {}
        self._streams: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._registration: registry.Registration | None = None
        self._closed = False

    @property
    def settings(self) -> ControlSettings:
        return self.plane.settings

    async def start(self) -> None:
        """Listen on the socket and write this process's entry; the plane's close stops it."""
        socket_path = registry.socket_path(self.state_dir, os.getpid())
        self._registration = registry.Registration(
            self.state_dir, node_id=self.plane.node_id, kind=self.kind, socket=socket_path
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
        self.plane.on_runs_changed.append(self._write_entry)
        self.plane.on_close.append(self.close)
        self._write_entry()
        log.info("control.listening", socket=str(socket_path))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
            for r in self.plane.run_handles
        )
        try:
            self._registration.write(runs)
        except OSError as exc:
            log.warning("control.entry_write_failed", error=str(exc))

    # --- HTTP handlers ---------------------------------------------------------------------------

    async def _get_info(self, request: web.Request) -> web.Response:
        entry = self._registration.entry if self._registration else None
        return web.json_response(
            {
                "pid": os.getpid(),
                "node_id": self.plane.node_id,
                "kind": self.kind,
                "started": entry.started if entry else None,
                "runs": [r.run_id for r in self.plane.run_handles],
            }
        )

    async def _get_sessions(self, request: web.Request) -> web.Response:
        include_ended = request.query.get("all", "") not in ("", "0", "false")
        return web.json_response({"sessions": self.plane.sessions(include_ended=include_ended)})

    async def _get_runs(self, request: web.Request) -> web.Response:
        return web.json_response({"runs": self.plane.runs()})

    async def _post_input(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        text = body.get("text", "")
        newline = body.get("newline", True)
        if not isinstance(text, str) or not isinstance(newline, bool):
            raise OperationError("expected {'text': string, 'newline': boolean}", 400)
        return web.json_response(
            await self.plane.send_input(request.match_info["sid"], text, newline=newline)
        )

    async def _post_kill(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        return web.json_response(
            await self.plane.kill(request.match_info["sid"], by=_optional_str(body, "by"))
        )

    async def _post_cancel(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        return web.json_response(
            self.plane.cancel(request.match_info["run"], by=_optional_str(body, "by"))
        )

    async def _post_approve(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        task = body.get("task")
        if not isinstance(task, str) or not task:
            raise OperationError("expected {'task': task id}", 400)
        return web.json_response(
            self.plane.approve(request.match_info["run"], task, by=_optional_str(body, "by"))
        )

    async def _get_logs(self, request: web.Request) -> web.StreamResponse:
        session = self.plane.session(request.match_info["sid"])
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
        session = self.plane.session(sid)
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
            {
                "type": "attached",
                "session_id": sid,
                "writer": client.writer,
                "node": self.plane.node_id,
            }
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
    problem = _unicode_problem(body)
    if problem:
        raise OperationError(f"the request body {problem}", 400)
    return body


def _unicode_problem(value: object) -> str | None:
    """Why a parsed JSON value cannot be used as text (JSON escapes can spell a lone surrogate,
    which no text encoding takes), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            problem = check_text(item)
            if problem:
                return problem
    return None


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

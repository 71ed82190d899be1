"""Finding sessions and runs for the CLI: in the processes on this machine, in the state
directory's transcripts, and in the runs' rooms (sessions on other nodes).

Ids (see ``cis_bot/ids.py``): ``run:task[:attempt]`` with a run id or a unique prefix of one
(without an attempt, the latest); a bare ``task`` works when only one run has it. An unknown or
ambiguous id is a UserError that lists the candidates.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from cis_bot.control.client.process import ControlError, ProcessClient
from cis_bot.control.registry import ProcessEntry
from cis_bot.errors import UserError
from cis_bot.ids import SHOWN_CANDIDATES, SessionId, SessionRef
from cis_bot.matrix import events as ev
from cis_bot.matrix.runlog import RunLog
from cis_bot.run.attempt import RunPaths

_TERMINAL = frozenset({"completed", "failed", "killed", "timeout"})


def is_terminal(state: str) -> bool:
    return state in _TERMINAL


@attrs.define
class SessionRecord:
    session_id: str
    run_id: str
    task_id: str
    attempt: int | None
    state: str
    #: "process" (a live process on this machine holds it), "disk" (only its transcript is
    #: left here), "room" (the run's room tells of it: another node's session).
    source: str
    agent: str | None = None
    node: str | None = None
    elapsed_s: float | None = None
    last_line: str = ""
    blocked_reason: str | None = None
    exit_code: int | None = None
    pid: int | None = None
    #: A file path (process, disk) or an mxc:// URI (room).
    transcript: str | None = None
    process: ProcessEntry | None = None
    room_id: str | None = None
    #: The Matrix user that speaks for the session's node (room).
    node_user: str | None = None

    @property
    def ended(self) -> bool:
        return is_terminal(self.state)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "attempt": self.attempt,
            "agent": self.agent,
            "state": self.state,
            "node": self.node,
            "elapsed_s": None if self.elapsed_s is None else round(self.elapsed_s, 3),
            "last_line": self.last_line,
            "blocked_reason": self.blocked_reason,
            "exit_code": self.exit_code,
            "pid": self.pid,
            "transcript": self.transcript,
            "source": self.source,
            "process": self.process.pid if self.process else None,
            "room_id": self.room_id,
        }


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def record_from_process(data: dict[str, Any], entry: ProcessEntry) -> SessionRecord | None:
    sid = data.get("session_id")
    if not isinstance(sid, str):
        return None
    elapsed = data.get("elapsed_s")
    return SessionRecord(
        session_id=sid,
        run_id=str(data.get("run_id", "")),
        task_id=str(data.get("task_id", "")),
        attempt=_int_or_none(data.get("attempt")),
        state=str(data.get("state", "unknown")),
        source="process",
        agent=data.get("agent") if isinstance(data.get("agent"), str) else None,
        node=data.get("node") if isinstance(data.get("node"), str) else entry.node_id,
        elapsed_s=float(elapsed) if isinstance(elapsed, int | float) else None,
        last_line=str(data.get("last_line") or ""),
        blocked_reason=data.get("blocked_reason")
        if isinstance(data.get("blocked_reason"), str)
        else None,
        exit_code=_int_or_none(data.get("exit_code")),
        pid=_int_or_none(data.get("pid")),
        transcript=data.get("transcript") if isinstance(data.get("transcript"), str) else None,
        process=entry,
    )


@attrs.frozen
class LocalScan:
    records: list[SessionRecord]
    #: Live processes that did not answer, with what went wrong.
    silent: list[tuple[ProcessEntry, str]]


async def scan_processes(
    entries: Sequence[ProcessEntry], *, include_ended: bool, timeout: float
) -> LocalScan:
    """Every session the processes hold (asked all at once)."""

    async def ask(entry: ProcessEntry) -> list[dict[str, Any]] | str:
        async with ProcessClient(entry, timeout=timeout) as client:
            try:
                return await client.sessions(include_ended=include_ended)
            except ControlError as exc:
                return str(exc)

    answers = await asyncio.gather(*(ask(e) for e in entries))
    records: dict[str, SessionRecord] = {}
    silent: list[tuple[ProcessEntry, str]] = []
    for entry, answer in zip(entries, answers, strict=True):
        if isinstance(answer, str):
            silent.append((entry, answer))
            continue
        for data in answer:
            record = record_from_process(data, entry)
            if record is None:
                continue
            known = records.get(record.session_id)
            if known is None or (known.ended and not record.ended):
                records[record.session_id] = record
    return LocalScan(list(records.values()), silent)


def scan_disk(state_dir: Path) -> list[SessionRecord]:
    """Sessions that left a transcript in ``<state_dir>/runs/<run>/sessions/<task>.<n>.log``;
    their state is the run report's, when the run finished here."""
    records = []
    for sid, transcript in RunPaths.every_transcript(state_dir):
        task_id = sid.task_id
        # Without the run's report (written when it ends), a process may still hold it.
        state, exit_code = "unknown", None
        report = RunPaths.of(state_dir, sid.run_id).report
        try:
            task = json.loads(report.read_text(encoding="utf-8"))["tasks"][task_id]
            state = str(task["status"])
            exit_code = _int_or_none(task.get("exit_code"))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        records.append(
            SessionRecord(
                session_id=str(sid),
                run_id=sid.run_id,
                task_id=task_id,
                attempt=sid.attempt,
                state=state if is_terminal(state) else "unknown",
                source="disk",
                exit_code=exit_code,
                transcript=str(transcript),
                last_line=_last_line_of(transcript),
            )
        )
    return records


def _last_line_of(path: Path) -> str:
    from cis_bot.session.output import terminal_text

    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 4096))
            data = f.read()
    except OSError:
        return ""
    lines = [line for line in terminal_text(data).split("\n") if line.strip()]
    return lines[-1].strip() if lines else ""


def scan_room(room_id: str, run: RunLog, *, now: float | None = None) -> list[SessionRecord]:
    """A run's sessions as its room tells them."""
    now = time.time() if now is None else now
    records: dict[str, SessionRecord] = {}
    started: dict[str, float] = {}
    for event in run.sessions:
        p = event.content
        if not isinstance(p, ev.SessionContent | ev.TaskClaimedContent):
            continue
        record = records.get(p.session_id)
        if record is None:
            parsed = SessionId.parse_or_none(p.session_id)
            record = records[p.session_id] = SessionRecord(
                session_id=p.session_id,
                run_id=run.run_id,
                task_id=parsed.task_id if parsed else "",
                attempt=parsed.attempt if parsed else None,
                state="running",
                source="room",
                room_id=room_id,
                node_user=event.sender,
            )
            started[p.session_id] = p.timestamp / 1000
        match p:
            case ev.TaskClaimedContent():
                record.node = p.claimed_by
                record.task_id, record.attempt = p.task_id, p.attempt
            case ev.SessionCreatedContent():
                record.node, record.agent = p.node, p.agent
                record.task_id, record.attempt = p.task_id, p.attempt
            case ev.SessionStateContent():
                record.state = p.new_state
                if p.new_state != "blocked":
                    record.blocked_reason = None
            case ev.SessionBlockedContent():
                record.state, record.blocked_reason = "blocked", p.reason
                record.last_line = _last_nonempty(p.output_preview) or record.last_line
            case ev.SessionOutputContent():
                record.last_line = _last_nonempty(p.tail) or record.last_line
            case ev.SessionCompletedContent():
                record.state, record.exit_code = p.status, p.exit_code
                record.task_id, record.attempt = p.task_id, p.attempt
                record.transcript = p.transcript
                record.blocked_reason = None
                record.last_line = _last_nonempty(p.output) or p.error or record.last_line
                if p.duration_ms is not None:
                    record.elapsed_s = p.duration_ms / 1000
    for session_id, record in records.items():
        if record.elapsed_s is None and not record.ended:
            record.elapsed_s = max(0.0, now - started[session_id])
        if not record.ended and run.completed is not None:
            record.state = "unknown"  # the run ended without this session's word on it
    return list(records.values())


def _last_nonempty(text: str | None) -> str:
    lines = [line for line in (text or "").split("\n") if line.strip()]
    return lines[-1].strip() if lines else ""


# --- resolving ids -----------------------------------------------------------------------------


def _listing(records: Iterable[SessionRecord]) -> str:
    shown = sorted(records, key=lambda r: (r.ended, r.session_id))[:SHOWN_CANDIDATES]
    return ", ".join(f"{r.session_id} ({r.state})" for r in shown)


class UnknownSession(UserError):
    """No session matches (as opposed to several)."""


def resolve_session(text: str, records: Sequence[SessionRecord]) -> SessionRecord:
    """The one session ``text`` names (see the module docstring)."""
    wanted = SessionRef.parse(text)
    matches = [
        r
        for r in records
        if r.task_id == wanted.task
        and wanted.matches_run(r.run_id)
        and (wanted.attempt is None or r.attempt == wanted.attempt)
    ]
    # An exact run id beats longer ids it is a prefix of.
    if wanted.run is not None and any(r.run_id == wanted.run for r in matches):
        matches = [r for r in matches if r.run_id == wanted.run]
    runs = sorted({r.run_id for r in matches})
    if len(runs) > 1:
        raise UserError(f"{text!r} is ambiguous: {_listing(matches)}; give more of the run id")
    if not matches:
        related = [
            r for r in records if r.task_id == wanted.task or wanted.matches_run(r.run_id)
        ] or list(records)
        known = f"; sessions: {_listing(related)}" if related else "; no sessions found"
        raise UnknownSession(f"no session {text!r}{known}")
    # Without an attempt: the latest one (the live one, if any).
    return max(matches, key=lambda r: (r.attempt or 0, not r.ended))

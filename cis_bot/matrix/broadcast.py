"""Turning what happens on a node into room events.

``SessionReporter``: SessionEvents -> ``cis.dag.session.*`` (state changes batched per
``broadcast_interval_ms``, output samples only with ``broadcast_output``, the transcript uploaded
as media when the session ends). Used by the worker and by local execution alike.

``RunRecorder``: the engine's events -> the run log (assignments, claims, decisions, the run's
end), plus one human-readable ``m.notice`` table per run, edited in place with ``m.replace`` so a
person in Element sees progress. A large run's table is summarised in the notice (counts per
status, the tasks that need a look first); at its end the full table follows as a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import attrs
import structlog
from mautrix.errors import MatrixRequestError

from cis_bot.dag.document import task_to_document
from cis_bot.dag.engine import (
    RollbackStarted,
    RunEngine,
    RunEvent,
    RunFinished,
    TaskDispatched,
    TaskStatus,
)
from cis_bot.dag.spec import TaskSpec
from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Upload, outgoing
from cis_bot.matrix.outbox import Outbox, Outgoing
from cis_bot.matrix.runlog import decision_content, ms
from cis_bot.run.attempt import rollback_task
from cis_bot.session.events import (
    SessionBlocked,
    SessionCompleted,
    SessionCreated,
    SessionEvent,
    SessionOutputUpdated,
    SessionStateChanged,
)

log = structlog.get_logger(__name__)

#: Transcripts larger than this are uploaded by their end only.
TRANSCRIPT_UPLOAD_LIMIT = 8 * 1024 * 1024
#: Transcripts up to this size are read on the event loop (see _read_transcript_end).
_READ_HERE_BYTES = 64 * 1024


class SessionReporter:
    """Session events -> ``cis.dag.session.*``, batched: a session's creation and state changes
    wait up to ``interval_ms`` and go out together; those of a session that ends within that
    time are never sent (its ``session.completed`` says all of it). Terminal states are told by
    ``session.completed`` alone. Blocked, and output samples, flush the session's batch first.

    ``session.completed`` is part of the run log and always sent; creations, state changes and
    blocked notices only with ``broadcast_status``, output samples only with ``broadcast_output``.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        node_id: str,
        upload: Upload | None,
        interval_ms: int = 500,
        broadcast_status: bool = True,
        broadcast_output: bool = False,
    ) -> None:
        self.outbox = outbox
        self.node_id = node_id
        self.upload = upload
        self.interval_s = interval_ms / 1000
        self.broadcast_status = broadcast_status
        self.broadcast_output = broadcast_output
        self._pending: dict[str, list[ev.EventContent]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._output_seq: dict[str, int] = {}
        self._last_output: dict[str, float] = {}

    def report(self, event: SessionEvent, run_id: str, task_id: str, attempt: int) -> None:
        sid = event.session_id
        if not self.broadcast_status and not isinstance(
            event, SessionCompleted | SessionOutputUpdated
        ):
            return
        match event:
            case SessionCreated(agent=agent):
                self._batch(
                    ev.SessionCreatedContent(
                        run_id=run_id,
                        session_id=sid,
                        task_id=task_id,
                        attempt=attempt,
                        node=self.node_id,
                        agent=agent,
                    )
                )
            case SessionStateChanged(old=old, new=new, reason=reason):
                if not new.is_terminal:
                    self._batch(
                        ev.SessionStateContent(
                            run_id=run_id,
                            session_id=sid,
                            old_state=str(old),
                            new_state=str(new),
                            reason=ev.clip(reason, ev.REASON_CHARS),
                        )
                    )
            case SessionOutputUpdated(tail=tail):
                now = time.monotonic()
                if self.broadcast_output and now - self._last_output.get(sid, 0) >= self.interval_s:
                    self._last_output[sid] = now
                    seq = self._output_seq[sid] = self._output_seq.get(sid, 0) + 1
                    self._flush_session(sid)
                    sample = ev.SessionOutputContent(
                        run_id=run_id,
                        session_id=sid,
                        tail=ev.clip(tail, ev.PREVIEW_CHARS) or "",
                        seq=seq,
                    )
                    self._post(sample, droppable=True)
            case SessionBlocked(reason=reason, preview=preview):
                self._flush_session(sid)
                self._post(
                    ev.SessionBlockedContent(
                        run_id=run_id,
                        session_id=sid,
                        reason=ev.clip(reason, ev.REASON_CHARS) or "",
                        output_preview=ev.clip(preview, ev.PREVIEW_CHARS) or "",
                    )
                )
            case SessionCompleted():
                self._pending.pop(sid, None)
                self._output_seq.pop(sid, None)
                self._last_output.pop(sid, None)
                self._post_completed(event, run_id, task_id, attempt)

    def flush(self) -> None:
        """Send every batched event now."""
        if self._flush_handle:
            self._flush_handle.cancel()
            self._flush_handle = None
        for sid in list(self._pending):
            self._flush_session(sid)

    def _flush_session(self, sid: str) -> None:
        for payload in self._pending.pop(sid, []):
            self._post(payload)

    def _batch(self, payload: ev.SessionContent) -> None:
        self._pending.setdefault(payload.session_id, []).append(payload)
        if self.interval_s <= 0:
            self.flush()
        elif self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self.interval_s, self.flush)

    def _post(self, payload: ev.EventContent, *, droppable: bool = False) -> None:
        self.outbox.post(outgoing(payload, droppable=droppable, upload=self.upload))

    def _post_completed(
        self, event: SessionCompleted, run_id: str, task_id: str, attempt: int
    ) -> None:
        payload = ev.SessionCompletedContent(
            run_id=run_id,
            session_id=event.session_id,
            task_id=task_id,
            attempt=attempt,
            status=str(event.state),
            exit_code=event.exit_code,
            error=ev.clip(event.error, ev.REASON_CHARS),
            output=ev.clip(event.output, ev.OUTPUT_SUMMARY_CHARS, max_bytes=ev.OUTPUT_SUMMARY_BYTES)
            or "",
            duration_ms=round(event.duration_s * 1000),
        )
        upload = self.upload
        item = outgoing(payload, upload=upload)
        if upload is not None:
            transcript = event.transcript_path

            async def attach_transcript(item: Outgoing) -> None:
                mxc = await _upload_transcript(upload, transcript, event.session_id)
                if mxc:
                    item.content["transcript"] = mxc

            item.prepare = attach_transcript
        self.outbox.post(item)


def _read_end(path: Path, limit: int) -> bytes | None:
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - limit))
            return f.read()
    except OSError:
        return None


async def _read_transcript_end(path: Path) -> bytes | None:
    """What of the transcript to upload. Most are small and read here: a hop to a thread costs
    the event loop more than such a read (each task's completion went through one, 5% of a
    200-task run). A large one is read off the loop."""
    if _size_of(path) <= _READ_HERE_BYTES:
        return _read_end(path, TRANSCRIPT_UPLOAD_LIMIT)
    return await asyncio.to_thread(_read_end, path, TRANSCRIPT_UPLOAD_LIMIT)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # read as missing, right away


async def _upload_transcript(upload: Upload, path: Path, session_id: str) -> str | None:
    """The transcript's mxc URI, or None when there is none to upload or it is refused (a missing
    transcript must not hold back the completion event)."""
    data = await _read_transcript_end(path)
    if not data:
        return None  # nothing to keep: spare the homeserver a request
    filename = f"{session_id.replace(':', '_')}.log"
    try:
        return await upload(data, "text/plain; charset=utf-8", filename)
    except MatrixRequestError as exc:
        if exc.http_status >= 500 or exc.http_status == 429:
            raise  # the outbox retries while the homeserver is away
        log.warning("transcript.upload_refused", session_id=session_id, error=exc.message)
        return None


class RunRecorder:
    """Writes a run's log into its room as the engine moves (local, hybrid and matrix modes)."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        run_id: str,
        node_id: str,
        user_id: str,
        record_local_dispatch: bool,
        upload: Upload | None = None,
        reporter: SessionReporter | None = None,
        lease_ms: int = 60_000,
        notice_interval_s: float = 2.0,
        epoch: int = 1,
    ) -> None:
        self.outbox = outbox
        #: Where documents too large for an event go (a long prompt, a large run's table).
        self.upload = upload
        self.run_id = run_id
        self.node_id = node_id
        self.user_id = user_id
        #: Local execution: a dispatch is this node assigning to itself, and a start its claim.
        self.record_local_dispatch = record_local_dispatch
        #: Reports this node's own sessions (local execution).
        self.reporter = reporter
        self.lease_ms = lease_ms
        #: The epoch this coordinator holds the run at (above 1 after a takeover): its
        #: decisions carry it, so those of the coordinator it superseded do not count.
        self.epoch = epoch
        self.notice = StatusNotice(
            outbox, run_id=run_id, interval_s=notice_interval_s, upload=upload
        )

    def on_run_event(self, event: RunEvent, engine: RunEngine) -> None:
        rid = self.run_id
        payload = decision_content(rid, event, engine)
        if payload is not None:
            self._post(payload)
        if self.record_local_dispatch:
            match event:
                case TaskDispatched(task_id=tid, attempt=attempt, at=at):
                    self._assigned(engine.spec.task(tid), attempt, at)
                case RollbackStarted(task_id=tid, attempt=attempt, at=at):
                    self._assigned(rollback_task(engine.spec.task(tid)), attempt, at)
        self.notice.update(engine, final=isinstance(event, RunFinished))

    def _assigned(self, task: TaskSpec, attempt: int, at: float) -> None:
        """Local execution: this node assigning an attempt to itself."""
        self._post(
            ev.TaskAssignedContent(
                run_id=self.run_id,
                task_id=task.id,
                attempt=attempt,
                assigned_to=self.node_id,
                assigned_user=self.user_id,
                assigned_by=self.user_id,
                agent=task.agent,
                lease_ms=self.lease_ms,
                upstream_tasks=task.deps,
                task=json.dumps(task_to_document(task)),
                timestamp=ms(at),
                local=True,
            )
        )

    def on_session_event(self, event: SessionEvent, task_id: str, attempt: int) -> None:
        if self.record_local_dispatch and isinstance(event, SessionCreated):
            # Claimed here, not when the engine folds the start: the session's own events
            # follow at once and must come after the claim in the log.
            self._post(
                ev.TaskClaimedContent(
                    run_id=self.run_id,
                    task_id=task_id,
                    attempt=attempt,
                    claimed_by=self.node_id,
                    session_id=event.session_id,
                )
            )
        if self.reporter:
            self.reporter.report(event, self.run_id, task_id, attempt)
        if isinstance(event, SessionBlocked):
            self.notice.blocked[task_id] = event.reason
        elif isinstance(event, SessionStateChanged | SessionCompleted):
            self.notice.blocked.pop(task_id, None)

    def _post(self, payload: ev.EventContent) -> None:
        if self.epoch > 1 and isinstance(payload, ev.RunContent):
            payload = attrs.evolve(payload, epoch=self.epoch)
        self.outbox.post(outgoing(payload, upload=self.upload))


_ICONS = {
    TaskStatus.COMPLETED: "✅",
    TaskStatus.FAILED: "❌",
    TaskStatus.TIMEOUT: "⏱️",
    TaskStatus.SKIPPED: "⏭️",
    TaskStatus.CANCELLED: "🚫",
    TaskStatus.RUNNING: "🔄",
    TaskStatus.DISPATCHED: "📤",
    TaskStatus.AWAITING_APPROVAL: "✋",
}


#: A notice lists every task up to this many; a larger run's lists the first ones (those that
#: need a look first) and counts the rest. With the detail's bound, the notice stays far below
#: the event size limit, even as an edit (which carries it twice).
NOTICE_ROWS = 30
NOTICE_DETAIL_CHARS = 100


def status_table(
    engine: RunEngine, run_id: str, blocked: dict[str, str], *, rows: int = NOTICE_ROWS
) -> tuple[str, str]:
    """(plain text, HTML) of a run's status, for people reading the room: every task, or for a
    run of more than ``rows`` tasks, the counts per status and the first ``rows`` tasks, the
    blocked, failed and unfinished first."""
    head = f"DAG {ev.clip(engine.spec.name, 200)} — run {run_id}: {engine.status}"
    tasks = list(engine.tasks.items())
    lines, cells = [head], []
    if len(tasks) > rows:
        counts: dict[str, int] = {}
        for tid, record in tasks:
            status = "blocked" if tid in blocked else str(record.status)
            counts[status] = counts.get(status, 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        lines.append(f"{len(tasks)} tasks: {summary}")
        tasks = sorted(tasks, key=lambda item: _look_first(item[0], item[1].status, blocked))
    for tid, record in tasks[:rows]:
        status = "blocked" if tid in blocked else str(record.status)
        icon = "⛔" if tid in blocked else _ICONS.get(record.status, "⏳")
        detail = ev.clip(blocked.get(tid) or record.reason or "", NOTICE_DETAIL_CHARS) or ""
        attempts = len(record.attempts)
        lines.append(f"{icon} {tid}: {status} (attempt {attempts}) {detail}".rstrip())
        cells.append(
            f"<tr><td>{icon}</td><td><code>{_html(tid)}</code></td><td>{status}</td>"
            f"<td>{attempts}</td><td>{_html(detail)}</td></tr>"
        )
    more = ""
    if len(tasks) > rows:
        more = f"… and {len(tasks) - rows} more tasks"
        lines.append(more)
        more = f"<p>{more}</p>"
    intro = "".join(f"<p>{_html(line)}</p>" for line in lines[1:2] if len(engine.tasks) > rows)
    html = (
        f"<p><b>{_html(head)}</b></p>{intro}<table><tr><th></th><th>task</th><th>status</th>"
        f"<th>attempts</th><th>detail</th></tr>{''.join(cells)}</table>{more}"
    )
    return "\n".join(lines), html


def _look_first(task_id: str, status: TaskStatus, blocked: dict[str, str]) -> int:
    if task_id in blocked:
        return 0
    if status.is_failure or status is TaskStatus.CANCELLED:
        return 1
    if not status.is_terminal:
        return 2
    return 3 if status is TaskStatus.SKIPPED else 4


def full_table(engine: RunEngine, run_id: str) -> str:
    """Every task's line, as text (a large run's notice links it as a file)."""
    return status_table(engine, run_id, {}, rows=len(engine.tasks))[0] + "\n"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class StatusNotice:
    """One m.notice per run, sent once and then edited in place (throttled). At the end of a run
    too large for the notice to list every task, the full table follows as a file."""

    def __init__(
        self, outbox: Outbox, *, run_id: str, interval_s: float, upload: Upload | None = None
    ) -> None:
        self.outbox = outbox
        self.run_id = run_id
        self.interval_s = interval_s
        self.upload = upload
        self.blocked: dict[str, str] = {}
        self._event_id: str | None = None
        self._in_flight = False
        self._engine: RunEngine | None = None
        self._dirty = False
        self._last_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def update(self, engine: RunEngine, *, final: bool = False) -> None:
        self._engine = engine
        self._dirty = True
        if final:
            if self._timer:
                self._timer.cancel()
                self._timer = None
            self._last_sent = 0.0
        self._maybe_send()
        if final and len(engine.tasks) > NOTICE_ROWS and self.upload is not None:
            self._post_full_table(engine, self.upload)

    def _post_full_table(self, engine: RunEngine, upload: Upload) -> None:
        data = full_table(engine, self.run_id).encode()
        filename = f"run-{self.run_id}.tasks.txt"
        content: dict[str, object] = {
            "msgtype": "m.file",
            "body": filename,
            "filename": filename,
            "info": {"mimetype": "text/plain", "size": len(data)},
        }

        async def attach(item: Outgoing) -> None:
            item.content["url"] = await upload(data, "text/plain; charset=utf-8", filename)

        # After the final notice (same key), which says the file follows.
        self.outbox.post(
            Outgoing("m.room.message", content, prepare=attach, key=f"notice:{self.run_id}")
        )

    def _maybe_send(self) -> None:
        if not self._dirty or self._in_flight or self._engine is None:
            return
        wait = self._last_sent + self.interval_s - time.monotonic()
        if wait > 0:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(wait, self._on_timer)
            return
        text, html = status_table(self._engine, self.run_id, self.blocked)
        if self._engine.finished and len(self._engine.tasks) > NOTICE_ROWS and self.upload:
            text += f"\nEvery task: run-{self.run_id}.tasks.txt, next in the room."
            html += (
                f"<p>Every task: <code>run-{self.run_id}.tasks.txt</code>, next in the room.</p>"
            )
        content: dict[str, object] = {
            "msgtype": "m.notice",
            "body": text,
            "format": "org.matrix.custom.html",
            "formatted_body": html,
        }
        if self._event_id is not None:
            content = {
                "msgtype": "m.notice",
                "body": f"* {text}",
                "m.new_content": dict(content),
                "m.relates_to": {"rel_type": "m.replace", "event_id": self._event_id},
            }
        self._dirty = False
        self._in_flight = True
        self._last_sent = time.monotonic()
        self.outbox.post(
            Outgoing("m.room.message", content, on_sent=self._on_sent, key=f"notice:{self.run_id}")
        )

    def _on_timer(self) -> None:
        self._timer = None
        self._maybe_send()

    def _on_sent(self, event_id: str) -> None:
        if self._event_id is None:
            self._event_id = event_id
        self._in_flight = False
        with contextlib.suppress(RuntimeError):  # no loop: the run is over
            self._maybe_send()

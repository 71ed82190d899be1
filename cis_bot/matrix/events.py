"""The ``cis.*`` event catalogue: one content class per event type, validated both ways.

docs/matrix.md's catalogue is the truth this module implements; keep the two together.

Naming: each class is its event type's name with ``Content`` appended (as mautrix names its
content classes): ``cis.dag.task.cancelled`` is ``TaskCancelledContent``. The engine's facts and
decisions (``dag/engine.py``) and the session events (``session/events.py``) have names of
their own, so a name says which layer it belongs to.

Every content carries ``"v": 1``, ``run_id`` (except the node heartbeat, the control
requests and replies and batches, which belong to no run's log) and ``timestamp`` (ms).
``decode(event_type, content)`` turns a room event's content into its class or raises
:class:`InvalidEvent` naming the type and the key; handlers log and drop those, never crash.
``content.content()`` is what goes on the wire. No event may near Matrix's 65,536-byte limit:
long texts are cut (keeping their end, within a budget of encoded bytes) before they are sent;
a content whose documents make it too large moves them to media (``fit``: the run's spec, a
task's document and upstream outputs, a run's full task table); ``encode`` refuses anything
still over ``MAX_CONTENT_BYTES`` with :class:`ContentTooLarge`, whatever its type.

The first block is the run's own story (creation, assignments, claims, sessions, its end) and
the workers' heartbeats; the second holds the coordinator's decisions, so that the room alone
replays to the run's exact state (see ``matrix/runlog.py``).
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import attrs

from cis_bot.dag.placement import NodeFacts
from cis_bot.errors import InputError
from cis_bot.validation import Table

VERSION = 1
#: Largest content we send or accept (Matrix caps a whole event at 65,536 bytes).
MAX_CONTENT_BYTES = 48 * 1024
#: Bounds on the free texts inside events.
OUTPUT_SUMMARY_CHARS = 10_000
PREVIEW_CHARS = 2_000
REASON_CHARS = 500


#: A task's output in an event, as JSON-encoded bytes (it reaches downstream tasks).
OUTPUT_SUMMARY_BYTES = 24 * 1024
#: How many tasks a summarised run.completed lists.
SUMMARY_TASKS = 100


class InvalidEvent(Exception):
    """A ``cis.*`` event whose content does not match the catalogue."""


class ContentTooLarge(ValueError):
    """A content that cannot be sent: over ``MAX_CONTENT_BYTES`` even with its documents in
    media."""


def now_ms() -> int:
    return int(time.time() * 1000)


def clip(text: str | None, limit: int, *, max_bytes: int | None = None) -> str | None:
    """Keep the end of a long text (the end of an output is where conclusions and errors are):
    at most ``limit`` characters and, with ``max_bytes``, at most that many bytes once JSON-encoded
    (a control character takes six)."""
    if text is None:
        return None
    if len(text) > limit:
        text = "…" + text[-(limit - 1) :]
    if max_bytes is None or _json_bytes(text) <= max_bytes:
        return text
    kept, size = 0, len("…".encode())
    for ch in reversed(text):
        size += _json_char_bytes(ch)
        if size > max_bytes:
            break
        kept += 1
    return "…" + text[len(text) - kept :]


def _json_bytes(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")) - 2


def _json_char_bytes(ch: str) -> int:
    if ch in '"\\\b\f\n\r\t':
        return 2
    if ch < " " or "\ud800" <= ch <= "\udfff":
        return 6
    return len(ch.encode())


#: What ``fit`` moves out of a content: the field that will hold the upload's mxc URI, and the
#: document (its bytes, a file name).
Media = dict[str, tuple[bytes, str]]


P = TypeVar("P", bound="EventContent")


@attrs.frozen(kw_only=True)
class EventContent(abc.ABC):
    TYPE: ClassVar[str] = ""
    #: A state event type: sent with a state key (the sender's own user id, see
    #: NodeHeartbeatContent), which the content does not carry.
    IS_STATE: ClassVar[bool] = False

    timestamp: int = attrs.field(factory=now_ms)

    def content(self) -> dict[str, Any]:
        body = attrs.asdict(self, recurse=False)
        return {
            "v": VERSION,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in body.items() if v is not None},
        }

    def fit(self) -> tuple[EventContent, Media]:
        """This content with its documents moved to media, for when it is too large to send
        (the caller uploads each and sets its field); as it is for types without documents."""
        return self, {}

    @classmethod
    @abc.abstractmethod
    def from_table(cls: type[P], t: Table) -> P:
        """Read and check the content (``t`` raises InputError on the first problem)."""

    @classmethod
    def fields_of(cls, t: Table) -> dict[str, Any]:
        return {"timestamp": t.integer("timestamp", 0, minimum=0)}


@attrs.frozen(kw_only=True)
class RunContent(EventContent):
    run_id: str
    #: The coordinator's epoch when it decided this: a coordinator that took the run over
    #: (``cis.dag.run.takeover``) decides at a higher one. Absent: 1. Workers' events carry none.
    epoch: int | None = None

    @classmethod
    def fields_of(cls, t: Table) -> dict[str, Any]:
        return {
            **super().fields_of(t),
            "run_id": _required_string(t, "run_id"),
            "epoch": t.opt_integer("epoch", minimum=1),
        }


# --- the catalogue ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RunCreatedContent(RunContent):
    TYPE = "cis.dag.run.created"

    dag_name: str
    #: The DAG as JSON text in dag.json's layout, every task resolved (see dag/spec.py). Text,
    #: because Matrix event JSON admits no floats and a DAG has some (timeouts, backoff).
    spec: str | None = None
    #: Set instead of ``spec`` when the document is too large for an event.
    spec_mxc: str | None = None
    mode: str
    max_workers: int
    #: Node id of the coordinator.
    coordinator: str
    #: The run this one resumes (its completed tasks are carried over).
    resumed_from: str | None = None
    #: Its coordinator answers chat commands about it in the room while it runs (docs/chat.md).
    chat: bool | None = None
    #: Federation mode: the workers (node ids or user ids) the run may use; absent: any
    #: trusted live worker in the room.
    workers: tuple[str, ...] | None = None

    def fit(self) -> tuple[RunCreatedContent, Media]:
        if self.spec is None:
            return self, {}
        media = {"spec_mxc": (self.spec.encode(), f"{self.run_id}.dag.json")}
        return attrs.evolve(self, spec=None), media

    @classmethod
    def from_table(cls, t: Table) -> RunCreatedContent:
        spec = _json_object_text(t, "spec", required=False)
        spec_mxc = t.opt_string("spec_mxc", nonempty=True)
        if spec is None and spec_mxc is None:
            t.fail("needs 'spec' or 'spec_mxc'", "spec")
        return cls(
            **cls.fields_of(t),
            dag_name=_required_string(t, "dag_name"),
            spec=spec,
            spec_mxc=spec_mxc,
            mode=_required_string(t, "mode"),
            max_workers=_required_int(t, "max_workers", minimum=1),
            coordinator=_required_string(t, "coordinator"),
            resumed_from=t.opt_string("resumed_from", nonempty=True),
            chat=t.opt_boolean("chat"),
            workers=t.string_list("workers"),
        )


@attrs.frozen(kw_only=True)
class TaskAssignedContent(RunContent):
    TYPE = "cis.dag.task.assigned"

    task_id: str
    attempt: int
    #: Node id of the worker that should claim it.
    assigned_to: str
    #: Matrix user id of that worker node: only its answers count.
    assigned_user: str
    #: Matrix user id of the coordinator.
    assigned_by: str
    agent: str
    #: The worker must report within this long or the coordinator may reassign.
    lease_ms: int
    upstream_tasks: tuple[str, ...] = ()
    #: The task as JSON text (see RunCreatedContent.spec) of a table in dag.json's layout,
    #: resolved (its agent and prompt explicit); in a media upload (``task_mxc``) when large.
    task: str | None = "{}"
    task_mxc: str | None = None
    #: Upstream outputs inline when small, else in a JSON media upload.
    upstream: dict[str, str] | None = None
    upstream_mxc: str | None = None
    #: The coordinator runs the attempt itself (local and hybrid execution): a record of the
    #: dispatch for the log, not an order; no worker claims it (not even the coordinator's own).
    local: bool | None = None

    def fit(self) -> tuple[TaskAssignedContent, Media]:
        """Upstream outputs first, then the task's document (its prompt may be long), go to
        media; ``upstream_tasks``, which the document repeats, goes."""
        sid = f"{self.run_id}_{self.task_id}_{self.attempt}"
        media: Media = {}
        fitted = self
        if self.upstream:
            media["upstream_mxc"] = (json.dumps(self.upstream).encode(), f"{sid}.upstream.json")
            fitted = attrs.evolve(fitted, upstream=None)
        if _size(fitted.content()) > MAX_CONTENT_BYTES and self.task is not None:
            media["task_mxc"] = (self.task.encode(), f"{sid}.task.json")
            fitted = attrs.evolve(fitted, task=None, upstream_tasks=())
        return fitted, media

    @classmethod
    def from_table(cls, t: Table) -> TaskAssignedContent:
        fields = cls.fields_of(t)
        task_mxc = t.opt_string("task_mxc", nonempty=True)
        task = _json_object_text(t, "task", required=task_mxc is None)
        return cls(
            **fields,
            task_id=_required_string(t, "task_id"),
            attempt=_required_int(t, "attempt", minimum=1),
            assigned_to=_required_string(t, "assigned_to"),
            assigned_user=_required_string(t, "assigned_user"),
            assigned_by=_required_string(t, "assigned_by"),
            agent=_required_string(t, "agent"),
            lease_ms=_required_int(t, "lease_ms", minimum=1),
            upstream_tasks=t.string_list("upstream_tasks") or (),
            task=task,
            task_mxc=task_mxc,
            upstream=t.string_map("upstream"),
            upstream_mxc=t.opt_string("upstream_mxc", nonempty=True),
            local=t.opt_boolean("local"),
        )


@attrs.frozen(kw_only=True)
class TaskClaimedContent(RunContent):
    TYPE = "cis.dag.task.claimed"

    task_id: str
    attempt: int
    claimed_by: str
    session_id: str

    @classmethod
    def from_table(cls, t: Table) -> TaskClaimedContent:
        return cls(
            **cls.fields_of(t),
            task_id=_required_string(t, "task_id"),
            attempt=_required_int(t, "attempt", minimum=1),
            claimed_by=_required_string(t, "claimed_by"),
            session_id=_required_string(t, "session_id"),
        )


@attrs.frozen(kw_only=True)
class SessionContent(RunContent):
    #: ``run:task:attempt``
    session_id: str

    @classmethod
    def fields_of(cls, t: Table) -> dict[str, Any]:
        return {**super().fields_of(t), "session_id": _required_string(t, "session_id")}


@attrs.frozen(kw_only=True)
class SessionCreatedContent(SessionContent):
    TYPE = "cis.dag.session.created"

    task_id: str
    attempt: int
    node: str
    agent: str | None = None

    @classmethod
    def from_table(cls, t: Table) -> SessionCreatedContent:
        return cls(
            **cls.fields_of(t),
            task_id=_required_string(t, "task_id"),
            attempt=_required_int(t, "attempt", minimum=1),
            node=_required_string(t, "node"),
            agent=t.opt_string("agent"),
        )


@attrs.frozen(kw_only=True)
class SessionStateContent(SessionContent):
    TYPE = "cis.dag.session.state"

    old_state: str
    new_state: str
    reason: str | None = None

    @classmethod
    def from_table(cls, t: Table) -> SessionStateContent:
        return cls(
            **cls.fields_of(t),
            old_state=_required_string(t, "old_state"),
            new_state=_required_string(t, "new_state"),
            reason=t.opt_string("reason"),
        )


@attrs.frozen(kw_only=True)
class SessionOutputContent(SessionContent):
    TYPE = "cis.dag.session.output"

    #: The last lines of output (bounded).
    tail: str
    seq: int

    @classmethod
    def from_table(cls, t: Table) -> SessionOutputContent:
        return cls(
            **cls.fields_of(t),
            tail=t.string("tail", ""),
            seq=_required_int(t, "seq", minimum=0),
        )


@attrs.frozen(kw_only=True)
class SessionBlockedContent(SessionContent):
    TYPE = "cis.dag.session.blocked"

    reason: str
    output_preview: str = ""

    @classmethod
    def from_table(cls, t: Table) -> SessionBlockedContent:
        return cls(
            **cls.fields_of(t),
            reason=_required_string(t, "reason"),
            output_preview=t.string("output_preview", ""),
        )


@attrs.frozen(kw_only=True)
class SessionCompletedContent(SessionContent):
    TYPE = "cis.dag.session.completed"

    task_id: str
    attempt: int
    #: completed / failed / killed / timeout
    status: str
    exit_code: int | None = None
    error: str | None = None
    #: The task's output, bounded (it reaches downstream tasks).
    output: str = ""
    transcript: str | None = None
    duration_ms: int | None = None

    @classmethod
    def from_table(cls, t: Table) -> SessionCompletedContent:
        status = _required_string(t, "status")
        if status not in ("completed", "failed", "killed", "timeout"):
            t.fail(f"unknown status {status!r}", "status")
        exit_code = t.data.get("exit_code")
        if exit_code is not None and (
            isinstance(exit_code, bool) or not isinstance(exit_code, int)
        ):
            t.fail("expected an integer or null", "exit_code")
        return cls(
            **cls.fields_of(t),
            task_id=_required_string(t, "task_id"),
            attempt=_required_int(t, "attempt", minimum=1),
            status=status,
            exit_code=exit_code,
            error=t.opt_string("error"),
            output=t.string("output", ""),
            transcript=t.opt_string("transcript", nonempty=True),
            duration_ms=t.opt_integer("duration_ms", minimum=0),
        )


@attrs.frozen(kw_only=True)
class RunCompletedContent(RunContent):
    TYPE = "cis.dag.run.completed"

    status: str
    #: task id -> final status: every task, or (``counts`` set) the first ones of a large run,
    #: the failed and unfinished first.
    tasks: dict[str, str] = attrs.field(factory=dict)
    #: A large run's summary: how many tasks ended in each status...
    counts: dict[str, int] | None = None
    #: ... and every task's status (a JSON object, as ``tasks``) in a media upload.
    tasks_mxc: str | None = None

    def fit(self) -> tuple[RunCompletedContent, Media]:
        counts: dict[str, int] = {}
        for status in self.tasks.values():
            counts[status] = counts.get(status, 0) + 1
        first = sorted(self.tasks.items(), key=lambda item: _SUMMARY_ORDER.get(item[1], 0))
        shown: dict[str, str] = {}
        budget = MAX_CONTENT_BYTES // 2
        for task_id, status in first[:SUMMARY_TASKS]:
            budget -= len(task_id.encode()) + len(status) + 8
            if budget < 0:
                break
            shown[task_id] = status
        media = {"tasks_mxc": (json.dumps(self.tasks).encode(), f"{self.run_id}.tasks.json")}
        return attrs.evolve(self, tasks=shown, counts=counts), media

    @classmethod
    def from_table(cls, t: Table) -> RunCompletedContent:
        status = _required_string(t, "status")
        if status not in ("completed", "failed", "cancelled"):
            t.fail(f"unknown status {status!r}", "status")
        return cls(
            **cls.fields_of(t),
            status=status,
            tasks=t.string_map("tasks") or {},
            counts=_count_map(t, "counts"),
            tasks_mxc=t.opt_string("tasks_mxc", nonempty=True),
        )


#: A summary lists the tasks that need a look first: failed, then unfinished, then the rest.
_SUMMARY_ORDER = {
    "failed": -9,
    "timeout": -8,
    "cancelled": -7,
    "running": -6,
    "dispatched": -5,
    "awaiting_approval": -4,
    "ready": -3,
    "pending": -2,
    "skipped": -1,
}


@attrs.frozen(kw_only=True)
class NodeHeartbeatContent(EventContent):
    """A worker's presence, as a state event whose key is the worker's own Matrix user id: the
    Matrix auth rules (every room version) let only that user set a state key that starts with
    its ``@user``, so a heartbeat cannot be forged for another user. The user is the worker's
    identity; ``node_id`` is its name, for display and for people to address it."""

    TYPE = "cis.node.heartbeat"
    IS_STATE = True

    node_id: str
    #: Agent profiles this node will run.
    agents: tuple[str, ...]
    max_workers: int
    #: Sessions running now (for every room and run).
    load: int
    #: A node whose last heartbeat is older than this is presumed gone.
    ttl_ms: int
    #: The node's lease: an attempt it holds that no heartbeat of it renews for this long is
    #: lost, and the node stops it itself if it could not renew for this long. Absent (nodes
    #: older than leases): ``ttl_ms``.
    lease_ms: int | None = None
    #: The attempts it holds in this room, which this heartbeat renews: run id -> task id ->
    #: attempt. Absent (nodes older than leases): every attempt assigned to it is renewed.
    holds: dict[str, dict[str, int]] | None = None
    #: It answers chat commands in the room (docs/chat.md: who answers).
    chat: bool | None = None
    #: What it is (arch, os, cores, memory, disk, features, labels, GPU), matched against
    #: tasks' ``node_selector``. Absent: a node older than placement.
    facts: NodeFacts | None = None

    def content(self) -> dict[str, Any]:
        body = super().content()
        if self.facts is not None:
            body["facts"] = self.facts.to_document()
        return body

    @property
    def expires_at(self) -> int:
        """When (ms) the node is presumed gone unless it beats again."""
        return self.timestamp + self.ttl_ms

    @property
    def lease_period_ms(self) -> int:
        return self.lease_ms if self.lease_ms is not None else self.ttl_ms

    def alive_at(self, now_ms: int) -> bool:
        return now_ms < self.expires_at

    def renews(self, run_id: str, task_id: str, attempt: int) -> bool:
        """Whether this heartbeat renews the lease of that attempt."""
        if self.holds is None:
            return True
        return self.holds.get(run_id, {}).get(task_id) == attempt

    @classmethod
    def from_table(cls, t: Table) -> NodeHeartbeatContent:
        return cls(
            **cls.fields_of(t),
            node_id=_required_string(t, "node_id"),
            agents=t.string_list("agents") or (),
            max_workers=_required_int(t, "max_workers", minimum=1),
            load=_required_int(t, "load", minimum=0),
            ttl_ms=_required_int(t, "ttl_ms", minimum=1),
            lease_ms=t.opt_integer("lease_ms", minimum=1),
            holds=_holds(t, "holds"),
            chat=t.opt_boolean("chat"),
            facts=_facts(t, "facts"),
        )


@attrs.frozen(kw_only=True)
class RunLeaseContent(EventContent):
    """A coordinator's lease on the runs it drives in the room, as a state event keyed by its
    own user id (so no one can renew it for another), renewed like a heartbeat. A standby takes
    over a run whose coordinator's lease lapsed (docs/federation.md)."""

    TYPE = "cis.dag.run.lease"
    IS_STATE = True

    node_id: str
    #: The runs it holds: run id -> the epoch it coordinates it at.
    runs: dict[str, int]
    #: A run this lease no longer renews is free to take over this long after its last renewal.
    ttl_ms: int

    @classmethod
    def from_table(cls, t: Table) -> RunLeaseContent:
        runs = t.table("runs")
        return cls(
            **cls.fields_of(t),
            node_id=_required_string(t, "node_id"),
            runs={} if runs is None else {r: _required_int(runs, r, minimum=1) for r in runs.data},
            ttl_ms=_required_int(t, "ttl_ms", minimum=1),
        )


# --- the coordinator's decisions -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RunTakeoverContent(RunContent):
    """Another coordinator (or the same one, restarted) takes the run over from its log, at
    ``epoch`` (one more than the run's): from here on only its decisions count, and only those
    carrying that epoch."""

    TYPE = "cis.dag.run.takeover"

    #: Node id of the coordinator taking over.
    coordinator: str
    #: User id of the coordinator it takes over from.
    previous: str
    reason: str | None = None

    @classmethod
    def from_table(cls, t: Table) -> RunTakeoverContent:
        fields = cls.fields_of(t)
        if fields["epoch"] is None or fields["epoch"] < 2:
            t.fail("a takeover needs an epoch of at least 2", "epoch")
        return cls(
            **fields,
            coordinator=_required_string(t, "coordinator"),
            previous=_required_string(t, "previous"),
            reason=t.opt_string("reason"),
        )


@attrs.frozen(kw_only=True)
class TaskDecisionContent(RunContent):
    """A decision about one task: skipped, cancelled, timed out, approval asked/given, aborted."""

    task_id: str
    attempt: int | None = None
    reason: str | None = None

    @classmethod
    def from_table(cls: type[_D], t: Table) -> _D:
        attempt = t.opt_integer("attempt", minimum=1)
        return cls(
            **cls.fields_of(t),
            task_id=_required_string(t, "task_id"),
            attempt=attempt,
            reason=t.opt_string("reason"),
        )


_D = TypeVar("_D", bound=TaskDecisionContent)


@attrs.frozen(kw_only=True)
class TaskSkippedContent(TaskDecisionContent):
    TYPE = "cis.dag.task.skipped"


@attrs.frozen(kw_only=True)
class TaskCancelledContent(TaskDecisionContent):
    TYPE = "cis.dag.task.cancelled"


@attrs.frozen(kw_only=True)
class TaskTimedOutContent(TaskDecisionContent):
    TYPE = "cis.dag.task.timed_out"


@attrs.frozen(kw_only=True)
class TaskAbortedContent(TaskDecisionContent):
    TYPE = "cis.dag.task.aborted"


@attrs.frozen(kw_only=True)
class TaskLostContent(TaskDecisionContent):
    """The attempt will never report (its node stopped): the coordinator dispatches again."""

    TYPE = "cis.dag.task.lost"


@attrs.frozen(kw_only=True)
class WorkerCooldownContent(RunContent):
    """The coordinator gives a worker no more of the run's tasks for a while: it lost or failed
    ``failures`` attempts in a row (the circuit breaker, docs/federation.md)."""

    TYPE = "cis.dag.worker.cooldown"

    worker: str
    worker_user: str
    failures: int
    cooldown_ms: int
    reason: str | None = None

    @classmethod
    def from_table(cls, t: Table) -> WorkerCooldownContent:
        return cls(
            **cls.fields_of(t),
            worker=_required_string(t, "worker"),
            worker_user=_required_string(t, "worker_user"),
            failures=_required_int(t, "failures", minimum=1),
            cooldown_ms=_required_int(t, "cooldown_ms", minimum=0),
            reason=clip(t.opt_string("reason"), REASON_CHARS),
        )


@attrs.frozen(kw_only=True)
class TaskRollbackContent(RunContent):
    """The run is rolled back: this completed task's rollback commands run as ``attempt`` (its
    assignment, claim and session.completed follow, like any attempt's)."""

    TYPE = "cis.dag.task.rollback"

    task_id: str
    attempt: int
    commands: tuple[str, ...] = ()

    @classmethod
    def from_table(cls, t: Table) -> TaskRollbackContent:
        return cls(
            **cls.fields_of(t),
            task_id=_required_string(t, "task_id"),
            attempt=_required_int(t, "attempt", minimum=1),
            commands=t.string_list("commands") or (),
        )


@attrs.frozen(kw_only=True)
class TaskCarriedContent(RunContent):
    """A resumed run keeps this task's result from an earlier run."""

    TYPE = "cis.dag.task.carried"

    task_id: str
    from_run: str
    output: str = ""

    @classmethod
    def from_table(cls, t: Table) -> TaskCarriedContent:
        return cls(
            **cls.fields_of(t),
            task_id=_required_string(t, "task_id"),
            from_run=_required_string(t, "from_run"),
            output=t.string("output", ""),
        )


@attrs.frozen(kw_only=True)
class TaskApprovalRequestedContent(RunContent):
    TYPE = "cis.dag.task.approval_requested"

    task_id: str
    stakeholders: tuple[str, ...] = ()
    #: When a ``recommended`` task applies its default action (ms).
    deadline: int | None = None
    #: Why a task its level does not hold back waits (its lost attempt may have half-happened).
    reason: str | None = None

    @classmethod
    def from_table(cls, t: Table) -> TaskApprovalRequestedContent:
        return cls(
            **cls.fields_of(t),
            task_id=_required_string(t, "task_id"),
            stakeholders=t.string_list("stakeholders") or (),
            deadline=t.opt_integer("deadline", minimum=0),
            reason=t.opt_string("reason"),
        )


@attrs.frozen(kw_only=True)
class TaskApprovedContent(RunContent):
    """An approval: by a person (``by`` set), or by an expired countdown (``by`` absent)."""

    TYPE = "cis.dag.task.approved"

    task_id: str
    by: str | None = None

    @classmethod
    def from_table(cls, t: Table) -> TaskApprovedContent:
        return cls(
            **cls.fields_of(t),
            task_id=_required_string(t, "task_id"),
            by=t.opt_string("by", nonempty=True),
        )


@attrs.frozen(kw_only=True)
class RunCancelledContent(RunContent):
    TYPE = "cis.dag.run.cancelled"

    by: str | None = None

    @classmethod
    def from_table(cls, t: Table) -> RunCancelledContent:
        return cls(**cls.fields_of(t), by=t.opt_string("by", nonempty=True))


# --- several run-log events in one room event (``cis_bot/matrix/batch.py``) --------------------


@attrs.frozen(kw_only=True)
class BatchContent(EventContent):
    """Run-log events of one sender, in order, as one room event: an outbox under load sends
    what has queued up together (one request, one event for the homeserver to store and push).
    Readers unpack it at one place (the node's intake and history) and see each event as if it
    had been sent alone, by the batch's sender. It carries only the run log's message types
    (``RUN_LOG_TYPES``): never a state event, a control request or reply, another batch, or
    anything outside ``cis.dag.*``. Not part of any run's log itself."""

    TYPE = "cis.dag.batch"

    #: (type, content) of each event, in the order they were posted.
    events: tuple[tuple[str, Mapping[str, Any]], ...]

    def content(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "timestamp": self.timestamp,
            "events": [{"type": t, "content": dict(c)} for t, c in self.events],
        }

    @classmethod
    def from_table(cls, t: Table) -> BatchContent:
        entries = t.data.get("events")
        if not isinstance(entries, list) or not entries:
            t.fail("expected a non-empty array of events", "events")
        events: list[tuple[str, Mapping[str, Any]]] = []
        for index, entry in enumerate(entries):
            where = f"events[{index}]"
            if not isinstance(entry, Mapping):
                t.fail("expected an object", where)
            event_type, content = entry.get("type"), entry.get("content")
            if not isinstance(event_type, str) or event_type not in RUN_LOG_TYPES:
                t.fail(
                    f"{event_type!r} cannot travel in a batch (only the run log's message types "
                    "can)",
                    f"{where}.type",
                )
            if not isinstance(content, Mapping):
                t.fail("expected an object", f"{where}.content")
            events.append((event_type, content))
        return cls(**cls.fields_of(t), events=tuple(events))


# --- session control through the room (``cis_bot/control/room.py``) ----------------------------

#: What a control request may ask for.
CONTROL_ACTIONS = ("input", "kill", "logs", "cancel", "approve")
#: Bounds on what a control request carries and a reply returns.
CONTROL_TEXT_CHARS = 16_000
CONTROL_LOG_CHARS = 32_000


@attrs.frozen(kw_only=True)
class ControlRequestContent(EventContent):
    """A person (through ``cis dag input/kill/logs/cancel/approve``) asks node ``node`` to act
    on one of its sessions, or on a run it coordinates. Not part of any run's log."""

    TYPE = "cis.dag.control.request"

    request_id: str
    action: str
    #: Node id that should act: the session's node, or the run's coordinator.
    node: str
    run_id: str | None = None
    session_id: str | None = None
    task_id: str | None = None
    #: input: what to type; newline: then press Enter.
    text: str | None = None
    newline: bool | None = None
    #: logs: how many lines of the end of the transcript.
    tail: int | None = None
    #: The requester gives up then (ms); a node ignores a request it gets later (a backlog the
    #: homeserver delivers after an outage must not replay old orders).
    expires: int

    @classmethod
    def from_table(cls, t: Table) -> ControlRequestContent:
        action = _required_string(t, "action")
        if action not in CONTROL_ACTIONS:
            t.fail(f"unknown action {action!r} (one of {', '.join(CONTROL_ACTIONS)})", "action")
        text = t.opt_string("text")
        if text is not None and len(text) > CONTROL_TEXT_CHARS:
            t.fail(f"longer than {CONTROL_TEXT_CHARS} characters", "text")
        request = cls(
            **cls.fields_of(t),
            request_id=_required_string(t, "request_id"),
            action=action,
            node=_required_string(t, "node"),
            run_id=t.opt_string("run_id", nonempty=True),
            session_id=t.opt_string("session_id", nonempty=True),
            task_id=t.opt_string("task_id", nonempty=True),
            text=text,
            newline=t.opt_boolean("newline"),
            tail=t.opt_integer("tail", minimum=0),
            expires=_required_int(t, "expires", minimum=0),
        )
        if action in ("input", "kill", "logs") and request.session_id is None:
            t.fail(f"action {action!r} needs a session_id", "session_id")
        if action in ("cancel", "approve") and request.run_id is None:
            t.fail(f"action {action!r} needs a run_id", "run_id")
        if action == "approve" and request.task_id is None:
            t.fail("action 'approve' needs a task_id", "task_id")
        return request


@attrs.frozen(kw_only=True)
class ControlReplyContent(EventContent):
    """The acting node's answer to a ControlRequestContent."""

    TYPE = "cis.dag.control.reply"

    request_id: str
    node: str
    ok: bool
    error: str | None = None
    #: The session's state after the action (input, kill, logs).
    state: str | None = None
    exit_code: int | None = None
    #: logs: the end of the raw transcript.
    text: str | None = None

    @classmethod
    def from_table(cls, t: Table) -> ControlReplyContent:
        ok = t.opt_boolean("ok")
        if ok is None:
            t.fail("missing required key", "ok")
        exit_code = t.data.get("exit_code")
        if exit_code is not None and (
            isinstance(exit_code, bool) or not isinstance(exit_code, int)
        ):
            t.fail("expected an integer or null", "exit_code")
        return cls(
            **cls.fields_of(t),
            request_id=_required_string(t, "request_id"),
            node=_required_string(t, "node"),
            ok=ok,
            error=t.opt_string("error"),
            state=t.opt_string("state"),
            exit_code=exit_code,
            text=t.opt_string("text"),
        )


CATALOGUE: Mapping[str, type[EventContent]] = {
    cls.TYPE: cls
    for cls in (
        RunCreatedContent,
        TaskAssignedContent,
        TaskClaimedContent,
        SessionCreatedContent,
        SessionStateContent,
        SessionOutputContent,
        SessionBlockedContent,
        SessionCompletedContent,
        RunCompletedContent,
        NodeHeartbeatContent,
        TaskSkippedContent,
        TaskCancelledContent,
        TaskTimedOutContent,
        TaskAbortedContent,
        TaskLostContent,
        TaskRollbackContent,
        TaskCarriedContent,
        WorkerCooldownContent,
        TaskApprovalRequestedContent,
        TaskApprovedContent,
        RunCancelledContent,
        RunLeaseContent,
        RunTakeoverContent,
        ControlRequestContent,
        ControlReplyContent,
        BatchContent,
    )
}

#: The run log's message types: every ``cis.dag.*`` type but the control requests and replies
#: and the batch itself. In rooms a node creates, they need power level 50 (as the batch does);
#: only they may travel in a batch.
RUN_LOG_TYPES: frozenset[str] = frozenset(
    event_type
    for event_type, cls in CATALOGUE.items()
    if not cls.IS_STATE and cls not in (ControlRequestContent, ControlReplyContent, BatchContent)
)


def decode(event_type: str, content: object) -> EventContent:
    """The content of a ``cis.*`` event, or InvalidEvent saying what is wrong with it."""
    cls = CATALOGUE.get(event_type)
    if cls is None:
        raise InvalidEvent(f"{event_type}: not a cis_bot event type")
    if not isinstance(content, Mapping):
        raise InvalidEvent(f"{event_type}: content is not a JSON object")
    size = _size(content)
    if size > MAX_CONTENT_BYTES:
        raise InvalidEvent(f"{event_type}: content is {size} bytes, over {MAX_CONTENT_BYTES}")
    version = content.get("v")
    if version != VERSION:
        raise InvalidEvent(f"{event_type}: unsupported version v={version!r} (expected {VERSION})")
    try:
        return cls.from_table(Table(dict(content), file=event_type, fmt="json"))
    except InputError as exc:
        raise InvalidEvent(str(exc)) from None


def encode(payload: EventContent) -> tuple[str, dict[str, Any]]:
    """(event type, content) ready to send; ContentTooLarge, naming the largest field, for a
    content over the size bound (``fit`` first moves what it can to media)."""
    event_type, content, _ = encode_sized(payload)
    return event_type, content


def encode_sized(payload: EventContent) -> tuple[str, dict[str, Any], int]:
    """``encode``, and the content's size encoded (JSON, bytes), measured for the bound."""
    content = payload.content()
    size = _size(content)
    if size > MAX_CONTENT_BYTES:
        largest = max(content, key=lambda key: _size({key: content[key]}))
        raise ContentTooLarge(
            f"{payload.TYPE} content is {size} bytes, over the {MAX_CONTENT_BYTES}-byte bound "
            f"(its largest field is {largest!r})"
        )
    return payload.TYPE, content, size


def _size(content: Mapping[str, Any]) -> int:
    try:
        return len(json.dumps(content, ensure_ascii=False).encode())
    except (TypeError, ValueError):
        return MAX_CONTENT_BYTES + 1


def _holds(t: Table, key: str) -> dict[str, dict[str, int]] | None:
    """run id -> task id -> attempt."""
    runs = t.table(key)
    if runs is None:
        return None
    holds: dict[str, dict[str, int]] = {}
    for run_id in runs.data:
        tasks = runs.table(run_id)
        assert tasks is not None
        holds[run_id] = {task: _required_int(tasks, task, minimum=1) for task in tasks.data}
    return holds


def _facts(t: Table, key: str) -> NodeFacts | None:
    table = t.table(key)
    return None if table is None else NodeFacts.from_table(table)


def _count_map(t: Table, key: str) -> dict[str, int] | None:
    sub = t.table(key)
    if sub is None:
        return None
    return {name: sub.integer(name, 0, minimum=0) for name in sub.data}


def _json_object_text(t: Table, key: str, *, required: bool) -> str | None:
    """A string holding a JSON object (how we carry documents that may contain floats)."""
    if key not in t:
        if required:
            t.fail("missing required key", key)
        return None
    text = t.string(key, nonempty=True)
    try:
        value = json.loads(text)
    except ValueError as exc:
        t.fail(f"not valid JSON text: {exc}", key)
    if not isinstance(value, dict):
        t.fail("expected JSON text of an object", key)
    return text


def _required_string(t: Table, key: str) -> str:
    if key not in t:
        t.fail("missing required key", key)
    return t.string(key, nonempty=True)


def _required_int(t: Table, key: str, *, minimum: int | None = None) -> int:
    value = t.opt_integer(key, minimum=minimum)
    if value is None:
        t.fail("missing required key", key)
    return value

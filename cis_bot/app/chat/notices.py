"""Notices for people about a run driven here: what waits for them, and how to answer from the
room without typing ids.

- A blocked session: the notice quotes what the agent asks, shows the last lines of its screen,
  and mentions the people who may answer; a rich reply to it is typed into the session.
- A task awaiting approval: the notice mentions who may approve (an arbitrated task's
  stakeholders); a ✅ or 👍 reaction to it approves.

Each notice carries ``cis.notice`` (the run, and the session or task) so the process that sent it
knows what a reply or a reaction to it is about, even after a restart; a notice is edited in
place (``m.replace``) once it is answered. Notices go through an outbox: ordered per session or
task, delivered through outages.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import attrs
import structlog

from cis_bot.app.chat.rooms import RoomFacts
from cis_bot.chat.compose import Text, code, code_block, mention, notice_content, para
from cis_bot.dag.engine import (
    ApprovalRequested,
    RunEngine,
    RunEvent,
    TaskApproved,
    TaskFinished,
    TaskStatus,
)
from cis_bot.dag.spec import LevelKind
from cis_bot.ids import SessionId
from cis_bot.matrix.node import Node
from cis_bot.matrix.outbox import Outgoing
from cis_bot.session.events import (
    SessionBlocked,
    SessionEvent,
    SessionState,
    SessionStateChanged,
)

log = structlog.get_logger(__name__)

#: The content key naming what a notice is about.
NOTICE_KEY = "cis.notice"
#: Notices remembered by event id (older ones are found by reading the event back).
_REMEMBERED = 2000


@attrs.frozen
class NoticeTarget:
    """What a notice is about: a blocked session, or a task awaiting approval."""

    kind: str
    run_id: str
    session_id: str | None = None
    task_id: str | None = None

    def content(self) -> dict[str, str]:
        fields = {"kind": self.kind, "run_id": self.run_id}
        if self.session_id:
            fields["session_id"] = self.session_id
        if self.task_id:
            fields["task_id"] = self.task_id
        return fields

    @classmethod
    def read(cls, content: object) -> NoticeTarget | None:
        """From a notice's content (None when it is not one of ours, or malformed)."""
        fields = content.get(NOTICE_KEY) if isinstance(content, Mapping) else None
        if not isinstance(fields, Mapping):
            return None
        kind, run_id = fields.get("kind"), fields.get("run_id")
        session_id, task_id = fields.get("session_id"), fields.get("task_id")
        if not isinstance(run_id, str) or not run_id:
            return None
        if kind == "blocked" and isinstance(session_id, str):
            if SessionId.parse_or_none(session_id) is None:
                return None
            return cls("blocked", run_id, session_id=session_id)
        if kind == "approval" and isinstance(task_id, str) and task_id:
            return cls("approval", run_id, task_id=task_id)
        return None


class NoticeIndex:
    """This process's notices by event id (shared by the notices and the chat service)."""

    def __init__(self) -> None:
        self._by_event: OrderedDict[str, NoticeTarget] = OrderedDict()
        self._by_target: dict[NoticeTarget, str] = {}

    def add(self, event_id: str, target: NoticeTarget) -> None:
        self._by_event[event_id] = target
        self._by_target[target] = event_id
        while len(self._by_event) > _REMEMBERED:
            old_event, old_target = self._by_event.popitem(last=False)
            if self._by_target.get(old_target) == old_event:
                del self._by_target[old_target]

    def get(self, event_id: str) -> NoticeTarget | None:
        return self._by_event.get(event_id)

    def event_of(self, target: NoticeTarget) -> str | None:
        return self._by_target.get(target)


@attrs.frozen
class NoticeSettings:
    prefix: str
    #: Who may answer: the node's allowed users and members at this level.
    level: int
    allowed: tuple[str, ...]


class RunNotices:
    """A RunObserver posting the notices of one run (see the module docstring)."""

    def __init__(
        self,
        node: Node,
        *,
        room_id: str,
        run_id: str,
        index: NoticeIndex,
        settings: NoticeSettings,
        people: RoomFacts,
    ) -> None:
        self.node = node
        self.room_id = room_id
        self.run_id = run_id
        self.index = index
        self.settings = settings
        #: Who may act in the room, for the mentions.
        self.people = people
        self.outbox = node.outbox(room_id)
        self._blocked: set[str] = set()
        self._awaiting: set[str] = set()

    async def close(self, *, timeout: float = 10.0) -> None:
        await self.outbox.flush(timeout=timeout)
        await self.outbox.close()

    # --- RunObserver -----------------------------------------------------------------------------

    def on_run_event(self, event: RunEvent, engine: RunEngine) -> None:
        match event:
            case ApprovalRequested(task_id=tid, stakeholders=who, reason=reason):
                if tid in self._awaiting:
                    return
                self._awaiting.add(tid)
                kind = engine.spec.task(tid).level.kind
                if reason is not None:  # not its level: a lost attempt that may run again
                    kind = LevelKind.CONFIRMED
                self._post(
                    NoticeTarget("approval", self.run_id, task_id=tid),
                    self._approval(tid, kind, who, reason),
                    stakeholders=who if kind is LevelKind.ARBITRATED else None,
                )
            case TaskFinished(task_id=tid, attempt=attempt, outcome=outcome):
                sid = str(SessionId(self.run_id, tid, attempt))
                if sid in self._blocked:
                    self._blocked.discard(sid)
                    self._edit(
                        NoticeTarget("blocked", self.run_id, session_id=sid),
                        Text.of(f"⏹️ {sid} was blocked, then ended ({outcome})."),
                    )
            case TaskApproved(task_id=tid, by=by):
                record = engine.tasks.get(tid)
                waiting = record is not None and record.status is TaskStatus.AWAITING_APPROVAL
                if tid not in self._awaiting or waiting:
                    return  # an arbitrated task still waiting for other stakeholders
                self._awaiting.discard(tid)
                whom = f" by {by}" if by else " (its countdown ended)"
                self._edit(
                    NoticeTarget("approval", self.run_id, task_id=tid),
                    Text.of(f"✅ Task {tid} of run {self.run_id} was approved{whom}."),
                )

    def on_session_event(self, event: SessionEvent, task_id: str, attempt: int) -> None:
        sid = event.session_id
        target = NoticeTarget("blocked", self.run_id, session_id=sid)
        match event:
            case SessionBlocked(reason=reason, preview=preview):
                if sid in self._blocked:
                    return
                self._blocked.add(sid)
                self._post(target, self._blocked_text(sid, reason, preview))
            case SessionStateChanged(old=SessionState.BLOCKED, new=new) if not new.is_terminal:
                if sid in self._blocked:
                    self._blocked.discard(sid)
                    self._edit(target, Text.of(f"▶️ {sid} was answered: {new} again."))

    # --- texts -----------------------------------------------------------------------------------

    def _blocked_text(self, sid: str, reason: str, preview: str) -> Text:
        prefix = self.settings.prefix
        parts = [para("⛔ ", code(sid), " is blocked: ", reason.strip() or "it waits for input")]
        lines = [line for line in preview.rstrip().split("\n")][-12:]
        if any(line.strip() for line in lines):
            parts.append(code_block("\n".join(lines)))
        parts.append(
            para(
                "Reply to this message to answer (typed into the session, then Enter), or ",
                code(f"{prefix} input {sid} TEXT"),
                ".",
            )
        )
        return Text.join(parts)

    def _approval(
        self, task_id: str, kind: LevelKind, stakeholders: tuple[str, ...], reason: str | None
    ) -> Text:
        prefix = self.settings.prefix
        who = "each stakeholder approves" if kind is LevelKind.ARBITRATED else "approve it"
        why = f": {reason}." if reason else f" ({kind})."
        return Text.join(
            [
                para("✋ Task ", code(task_id), f" of run {self.run_id} waits for approval{why}"),
                para(
                    f"React with ✅ or 👍 to {who}, or send ",
                    code(f"{prefix} approve {self.run_id} {task_id}"),
                    "." if kind is not LevelKind.ARBITRATED else f" ({', '.join(stakeholders)}).",
                ),
            ]
        )

    # --- posting ---------------------------------------------------------------------------------

    def _post(
        self, target: NoticeTarget, text: Text, *, stakeholders: tuple[str, ...] | None = None
    ) -> None:
        content = notice_content(text, extra={NOTICE_KEY: target.content()})

        async def mention_people(item: Outgoing) -> None:
            try:
                people = (
                    list(stakeholders)
                    if stakeholders is not None
                    else await self.people.people_who_may_act(
                        self.room_id, level=self.settings.level, allowed=self.settings.allowed
                    )
                )
            except Exception as exc:  # a notice without mentions is still a notice
                log.warning("chat.mentions_failed", room_id=self.room_id, error=str(exc))
                return
            if people:
                pills = Text.join([mention(p) for p in people], ", ", ", ")
                shown = Text.join(
                    [
                        Text(item.content["body"], item.content["formatted_body"]),
                        para("For: ", pills),
                    ]
                )
                item.content["body"] = shown.plain
                item.content["formatted_body"] = shown.html
                item.content["m.mentions"] = {"user_ids": sorted(set(people))}

        def sent(event_id: str) -> None:
            self.index.add(event_id, target)

        self.outbox.post(
            Outgoing(
                "m.room.message",
                content,
                key=f"notice:{target.session_id or target.task_id}",
                prepare=mention_people,
                on_sent=sent,
            )
        )

    def _edit(self, target: NoticeTarget, text: Text) -> None:
        new = notice_content(text, extra={NOTICE_KEY: target.content()})

        async def aim(item: Outgoing) -> None:
            original = self.index.event_of(target)
            if original is None:
                raise LookupError("the notice to edit was never sent")
            item.content["m.relates_to"] = {"rel_type": "m.replace", "event_id": original}

        self.outbox.post(
            Outgoing(
                "m.room.message",
                {
                    "msgtype": "m.notice",
                    "body": f"* {new['body']}",
                    "format": new["format"],
                    "formatted_body": f"* {new['formatted_body']}",
                    "m.new_content": new,
                    "m.mentions": {},
                },
                key=f"notice:{target.session_id or target.task_id}",
                prepare=aim,
            )
        )

"""The chat service: reads what people send in the rooms this process answers in, decides
whether this process is the one to answer, checks who may do what, and answers.

One command, one answer (docs/chat.md, "Who answers"):

- A run process (``cis dag execute`` / ``resume``, ``ChatScope.run_id`` set) answers only in its
  run's room. In a room made for the run (local mode) it answers everything. In a shared room it
  answers what is about its run (a command naming it, a reply to its notices, a reaction to
  them), and what names no run only when no chat-enabled node heartbeats there.
- A node (``cis node``) answers in every room it is in, except what is about a run whose own
  process answers for it (its ``cis.dag.run.created`` says ``chat``, it has not ended, and that
  process is not this one). Among several chat-enabled nodes in a room, the one with the lowest
  user id answers what no run process takes.
- Replies to a notice and reactions to it are answered by the process that sent the notice.

Refusals (an acting command from someone not allowed, a sender over the rate limit) are
answers too, and are logged. Edits of commands (``m.replace``) are not run: the answer says to
send the command again. Nothing a message holds can stop the service: every handler catches and
logs.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import structlog
from mautrix.api import Method, Path

from cis_bot.app.chat.actions import Answer, ChatActions, Request, RunStarter
from cis_bot.app.chat.notices import NoticeIndex, NoticeTarget
from cis_bot.app.chat.rooms import RoomFacts
from cis_bot.app.chat.view import RoomView
from cis_bot.chat.commands import BY_NAME, Command, CommandError, parse
from cis_bot.chat.compose import Text, error, reply_content
from cis_bot.chat.incoming import FileRef, Message, Reaction
from cis_bot.chat.ratelimit import RateLimiter
from cis_bot.config import Config
from cis_bot.control.operations import ControlPlane
from cis_bot.errors import UserError
from cis_bot.matrix.node import Node
from cis_bot.matrix.outbox import Outgoing

log = structlog.get_logger(__name__)

#: Replied-to events read back and found not to be our notices (not read again).
_NOT_NOTICES = 5000


@attrs.frozen
class ChatScope:
    """What this process answers for (see the module docstring)."""

    #: A run process: its run and that run's room. None: a node, answering in all its rooms.
    run_id: str | None = None
    room_id: str | None = None
    #: The room was made for this run (local mode): everything said there is this process's.
    own_room: bool = False


class ChatService:
    def __init__(
        self,
        node: Node,
        plane: ControlPlane,
        config: Config,
        *,
        scope: ChatScope,
        starter: RunStarter | None = None,
        index: NoticeIndex | None = None,
        facts: RoomFacts | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.plane = plane
        self.config = config
        self.scope = scope
        self.index = index or NoticeIndex()
        self.facts = facts or RoomFacts(node)
        self.actions = ChatActions(
            node, plane, config, self.facts, starter=starter, timeout=timeout
        )
        self.limiter = RateLimiter(
            burst=config.chat.rate_burst, per_minute=config.chat.rate_per_minute
        )
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._not_notices: OrderedDict[str, None] = OrderedDict()
        self._closed = False

    @property
    def prefix(self) -> str:
        return self.config.chat.prefix

    def start(self) -> None:
        self.node.add_listener(self.on_event)
        log.info("chat.started", user=self.node.user_id, run_id=self.scope.run_id)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- intake ----------------------------------------------------------------------------------

    async def on_event(self, room_id: str, raw: Mapping[str, Any]) -> None:
        self.facts.observe(room_id, raw)
        if self._closed or raw.get("sender") == self.node.user_id:
            return
        if self.scope.room_id is not None and room_id != self.scope.room_id:
            return
        kind = raw.get("type")
        if kind == "m.room.message":
            message = Message.read(raw)
            if message is not None:
                self._spawn(self._on_message(message))
        elif kind == "m.reaction":
            reaction = Reaction.read(raw)
            if reaction is not None and reaction.approves:
                self._spawn(self._on_reaction(reaction))

    def _spawn(self, work: Any) -> None:
        # Answering may take a while (a kill waits out its grace period): not in the loop that
        # feeds the worker and the coordinator.
        task = asyncio.create_task(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Any) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("chat.failed")

    async def _on_message(self, message: Message) -> None:
        if message.msgtype not in ("m.text", "m.file"):
            return  # notices are bots talking; images and the rest carry no commands
        room_id = message.room_id
        text = message.command_text(self.prefix, prefix_optional=False)
        if text is None and message.reply_to is not None and message.edits is None:
            target = await self._notice(room_id, message.reply_to)
            if target is not None and target.kind == "blocked":
                assert target.session_id is not None
                command = Command(
                    BY_NAME["input"], {"RUN:TASK": target.session_id, "TEXT": message.body}
                )
                await self._answer(message, command, RoomView(self.node, room_id))
                return
        if text is None:
            if message.msgtype != "m.text" or not await self.facts.is_direct(room_id):
                return
            text = message.command_text(self.prefix, prefix_optional=True)
            if text is None:
                return
        view = RoomView(self.node, room_id)
        parsed: Command | CommandError
        try:
            parsed = parse(text, prefix=self.prefix)
        except CommandError as exc:
            parsed = exc
        if not await self._mine(room_id, parsed if isinstance(parsed, Command) else None, view):
            return
        if message.edits is not None:
            log.info("chat.edit_ignored", room_id=room_id, sender=message.sender)
            if self._limited(message):
                return
            await self._reply(
                message,
                Text.of(
                    "✏️ Edited commands are not run: send the corrected command as a new message."
                ),
            )
            return
        if isinstance(parsed, CommandError):
            if not self._limited(message):
                await self._reply(message, error(str(parsed), parsed.spec, self.prefix))
            return
        await self._answer(message, parsed, view)

    async def _on_reaction(self, reaction: Reaction) -> None:
        target = await self._notice(reaction.room_id, reaction.target)
        if target is None or target.kind != "approval":
            return
        assert target.task_id is not None
        notice = Message(
            event_id=reaction.target,
            room_id=reaction.room_id,
            sender=reaction.sender,
            msgtype="m.notice",
            body="",
        )
        command = Command(BY_NAME["approve"], {"RUN": target.run_id, "TASK": target.task_id})
        await self._answer(notice, command, RoomView(self.node, reaction.room_id))

    # --- who answers -----------------------------------------------------------------------------

    async def _mine(self, room_id: str, command: Command | None, view: RoomView) -> bool:
        """Whether this process answers ``command`` (None: one that did not parse)."""
        named = await view.named_run(command)
        me = self.node.user_id
        if self.scope.run_id is not None:
            if self.scope.own_room:
                return True
            if named is not None:
                return named.run_id == self.scope.run_id
            return not (await self.facts.answerers(room_id) - {me})
        if named is not None:
            if named.run_id in {h.run_id for h in self.plane.run_handles}:
                return True
            if named.chat and not named.ended and named.creator != me:
                return False  # its own process answers for it
        return min(await self.facts.answerers(room_id) | {me}) == me

    # --- answering -------------------------------------------------------------------------------

    def _limited(self, message: Message) -> bool:
        """Whether the sender is over the rate limit (told once, then ignored for a while)."""
        verdict = self.limiter.check(message.sender, self.clock())
        if verdict.allowed:
            return False
        log.warning(
            "chat.rate_limited", sender=message.sender, room_id=message.room_id, told=verdict.first
        )
        if verdict.first:
            self._spawn(
                self._reply(
                    message,
                    Text.of(
                        f"⏳ Too many commands: the next one is taken in "
                        f"{max(1, round(verdict.retry_after))}s (until then they are ignored)."
                    ),
                )
            )
        return True

    async def _answer(self, message: Message, command: Command, view: RoomView) -> None:
        if self._limited(message):
            return
        sender, room_id = message.sender, message.room_id
        if command.acting and not await self._may_act(room_id, sender):
            level = self.config.chat.command_power_level
            log.warning(
                "chat.refused", sender=sender, room_id=room_id, command=command.name, level=level
            )
            await self._reply(
                message,
                error(
                    f"{sender} may not {command.name} here: acting commands are for the node's "
                    f"allowed users and for members at power level {level} in this room. "
                    "Nothing was done."
                ),
            )
            return
        file = await self._file_for(message) if command.name == "run" else None
        request = Request(room_id, sender, message, command, file)
        started = time.monotonic()
        try:
            answer = await self.actions.answer(request, view)
        except UserError as exc:
            answer = Answer(
                error(str(exc), command.spec if isinstance(exc, CommandError) else None)
            )
        except Exception as exc:
            log.exception("chat.command_failed", command=command.name, room_id=room_id)
            answer = Answer(error(f"{command.name} failed: {type(exc).__name__}: {exc}"))
        log.info(
            "chat.answered",
            command=command.name,
            sender=sender,
            room_id=room_id,
            ms=round((time.monotonic() - started) * 1000),
        )
        await self.send_answer(message, answer)

    async def _may_act(self, room_id: str, sender: str) -> bool:
        return await self.node.authorised(
            room_id, sender, level=self.config.chat.command_power_level
        )

    async def send_answer(self, to: Message, answer: Answer) -> None:
        await self._reply(to, answer.text)
        for attachment in answer.files:
            try:
                mxc = await self.node.upload(
                    attachment.data, mime_type=attachment.mimetype, filename=attachment.filename
                )
            except Exception as exc:
                log.warning("chat.upload_failed", error=str(exc))
                await self._reply(
                    to, Text.of(f"⚠️ The file {attachment.filename} could not be uploaded: {exc}")
                )
                continue
            content = reply_content(Text.of(attachment.filename), to, msgtype="m.file")
            del content["format"], content["formatted_body"]
            content.update(
                filename=attachment.filename,
                url=mxc,
                info={"mimetype": attachment.mimetype, "size": len(attachment.data)},
            )
            await self._send(to.room_id, content)

    async def _reply(self, to: Message, text: Text) -> None:
        fallback = to.body if await self.facts.wants_fallback() and to.body else None
        await self._send(to.room_id, reply_content(text, to, fallback_body=fallback))

    async def _send(self, room_id: str, content: dict[str, Any]) -> None:
        try:
            await self.node.send_outgoing(room_id, Outgoing("m.room.message", content))
        except Exception as exc:
            log.warning("chat.reply_failed", room_id=room_id, error=str(exc))

    # --- what a message refers to ----------------------------------------------------------------

    async def _notice(self, room_id: str, event_id: str) -> NoticeTarget | None:
        """The notice of ours ``event_id`` is (this process sent it), if it is one."""
        known = self.index.get(event_id)
        if known is not None or event_id in self._not_notices:
            return known
        raw = await self._event(room_id, event_id)
        target = None
        if raw is not None and raw.get("sender") == self.node.user_id:
            target = NoticeTarget.read(raw.get("content"))
        if target is None:
            self._not_notices[event_id] = None
            while len(self._not_notices) > _NOT_NOTICES:
                self._not_notices.popitem(last=False)
        else:
            self.index.add(event_id, target)
        return target

    async def _event(self, room_id: str, event_id: str) -> dict[str, Any] | None:
        try:
            body = await self.node.intent.api.request(
                Method.GET, Path.v3.rooms[room_id].event[event_id]
            )
        except Exception as exc:
            log.info("chat.event_unreadable", event_id=event_id, error=str(exc))
            return None
        return body if isinstance(body, dict) else None

    async def _file_for(self, message: Message) -> FileRef | None:
        """The DAG file a ``run`` command comes with: its own (a caption), or the one it
        replies to."""
        if message.file is not None:
            return message.file
        if message.reply_to is None:
            return None
        raw = await self._event(message.room_id, message.reply_to)
        replied = Message.read(raw) if raw is not None else None
        return replied.file if replied is not None else None

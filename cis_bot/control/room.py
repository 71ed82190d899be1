"""Session control through a run's room, for sessions on other nodes: the node's side.

The CLI posts ``cis.dag.control.request`` (action, node, session or run, a request id, an expiry)
in the run's room and waits for the ``cis.dag.control.reply`` with that request id from the
acting node's user. The node (``RoomControl``) obeys only:

- requests addressed to it (``node``) and not expired;
- from a sender it trusts in that room (``Node.authorised``: an allowed user, itself, or a user
  at the configured power level) — anyone else gets a refusal;
- about a session or run of that same room (power in one room gives no say over another's).

Cancel and approve go to the run's coordinator, and become engine facts for its driver, which
records them in the room like any other decision. Attaching and following output stay on the
machine that runs the session: a room is no place for a byte stream. The requesting side is
``client/room.py``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import structlog

from cis_bot.control.operations import ControlPlane, OperationError
from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Node
from cis_bot.matrix.runlog import parse_room_event

log = structlog.get_logger(__name__)

#: Lines of a transcript a ``logs`` request returns when it names no number.
DEFAULT_LOG_LINES = 200
_SEEN_LIMIT = 1000


class RoomControl:
    """A node's handler of control requests (see the module docstring)."""

    def __init__(self, node: Node, plane: ControlPlane) -> None:
        self.node = node
        self.plane = plane
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        self.node.add_listener(self.on_event)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def on_event(self, room_id: str, raw: Mapping[str, Any]) -> None:
        if self._closed or raw.get("type") != ev.ControlRequestContent.TYPE:
            return
        event = parse_room_event(raw)
        if event is None or not isinstance(event.content, ev.ControlRequestContent):
            return
        request = event.content
        if request.node != self.node.identity.node_id or request.request_id in self._seen:
            return
        self._seen[request.request_id] = None
        while len(self._seen) > _SEEN_LIMIT:
            self._seen.popitem(last=False)
        if request.expires < ev.now_ms():
            log.info("control.request_expired", request_id=request.request_id, sender=event.sender)
            return
        # Acting may take a while (a kill waits out its grace period): not in the event loop
        # that feeds the worker and the coordinator.
        task = asyncio.create_task(self._handle(room_id, event.sender, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, room_id: str, sender: str, request: ev.ControlRequestContent) -> None:
        node_id = self.node.identity.node_id
        if not await self.node.authorised(room_id, sender):
            log.warning("control.refused", sender=sender, action=request.action, room_id=room_id)
            reply = ev.ControlReplyContent(
                request_id=request.request_id,
                node=node_id,
                ok=False,
                error=f"{sender} may not control node {node_id} (not an allowed user, and "
                "below the power level it obeys in this room)",
            )
        else:
            try:
                reply = await self._act(room_id, sender, request)
            except OperationError as exc:
                reply = ev.ControlReplyContent(
                    request_id=request.request_id, node=node_id, ok=False, error=str(exc)
                )
            except Exception as exc:  # never let one request take the handler down
                log.exception("control.request_failed", request_id=request.request_id)
                reply = ev.ControlReplyContent(
                    request_id=request.request_id, node=node_id, ok=False, error=str(exc)
                )
        try:
            await self.node.send(room_id, reply)
        except Exception as exc:
            log.warning("control.reply_failed", request_id=request.request_id, error=str(exc))

    async def _act(
        self, room_id: str, sender: str, r: ev.ControlRequestContent
    ) -> ev.ControlReplyContent:
        plane = self.plane
        node_id = self.node.identity.node_id

        def reply(
            state: str | None = None, exit_code: int | None = None, text: str | None = None
        ) -> ev.ControlReplyContent:
            return ev.ControlReplyContent(
                request_id=r.request_id,
                node=node_id,
                ok=True,
                state=state,
                exit_code=exit_code,
                text=text,
            )

        if r.action in ("cancel", "approve"):
            assert r.run_id is not None
            run = plane.run(r.run_id)
            if run.room_id != room_id:
                raise OperationError(f"run {r.run_id} does not belong to this room", 403)
            if r.action == "cancel":
                plane.cancel(r.run_id, by=sender)
            else:
                assert r.task_id is not None
                plane.approve(r.run_id, r.task_id, by=sender)
            return reply()
        assert r.session_id is not None
        if plane.session_room(r.session_id) != room_id:
            raise OperationError(
                f"session {r.session_id} does not belong to a run in this room", 403
            )
        if r.action == "input":
            newline = True if r.newline is None else r.newline
            done = await plane.send_input(r.session_id, r.text or "", newline=newline)
            return reply(state=done["state"])
        if r.action == "kill":
            done = await plane.kill(r.session_id, by=sender)
            return reply(state=done["state"], exit_code=done["exit_code"])
        lines = DEFAULT_LOG_LINES if r.tail is None else r.tail
        text = await plane.transcript_end(r.session_id, lines, ev.CONTROL_LOG_CHARS)
        return reply(state=str(plane.session(r.session_id).state), text=text)

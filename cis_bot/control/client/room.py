"""Session control through a run's room: the requesting side (``cis dag input / kill / logs /
cancel / approve`` for sessions and runs on other nodes). The node's side is ``control/room.py``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog
from mautrix.api import Method
from mautrix.api import Path as ApiPath
from mautrix.errors import MatrixError

from cis_bot.control.client.process import ControlError
from cis_bot.errors import UserError
from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Node
from cis_bot.matrix.runlog import parse_room_event

log = structlog.get_logger(__name__)


class RoomRequester:
    """The CLI's side: post a request, wait for its reply (``timeout``), never forever."""

    def __init__(self, node: Node, *, timeout: float = 15.0, poll_interval: float = 0.25) -> None:
        self.node = node
        self.timeout = timeout
        self.poll_interval = poll_interval

    async def request(
        self, room_id: str, *, node: str, node_user: str, **fields: Any
    ) -> ev.ControlReplyContent:
        """Ask ``node`` (whose replies must come from ``node_user``) to act; its reply, or a
        ControlError when it refuses or stays silent."""
        deadline = time.monotonic() + self.timeout
        request = ev.ControlRequestContent(
            request_id=secrets.token_hex(8),
            node=node,
            expires=ev.now_ms() + int(self.timeout * 1000),
            **fields,
        )
        try:
            token = await self._position(room_id)
            await self.node.send(room_id, request)
        except ev.ContentTooLarge as exc:
            raise UserError(f"too large to ask for through the room: {exc}") from None
        except (MatrixError, aiohttp.ClientError, OSError) as exc:
            raise ControlError(f"cannot post the request in {room_id}: {exc}") from None
        while True:
            try:
                replies, token = await self._replies_after(room_id, token)
            except (MatrixError, aiohttp.ClientError, OSError) as exc:
                log.warning("control.poll_failed", room_id=room_id, error=str(exc))
                replies = []
            for raw in replies:
                reply = self._match(raw, request.request_id, node_user)
                if reply is None:
                    continue
                if not reply.ok:
                    raise ControlError(f"node {node} refused: {reply.error}")
                return reply
            if time.monotonic() >= deadline:
                raise ControlError(
                    f"no answer from node {node} within {self.timeout:g}s: is it running? "
                    "(a request it gets later is ignored)"
                )
            await asyncio.sleep(self.poll_interval)

    def _match(
        self, raw: Mapping[str, Any], request_id: str, node_user: str
    ) -> ev.ControlReplyContent | None:
        event = parse_room_event(raw)
        if event is None or not isinstance(event.content, ev.ControlReplyContent):
            return None
        if event.content.request_id != request_id:
            return None
        if event.sender != node_user:
            log.warning("control.reply_forged", sender=event.sender, expected=node_user)
            return None
        return event.content

    async def _position(self, room_id: str) -> str:
        body = await self.node.intent.api.request(
            Method.GET,
            ApiPath.v3.rooms[room_id].messages,
            query_params={"dir": "b", "limit": "1"},
        )
        return str(body["start"])

    async def _replies_after(self, room_id: str, position: str) -> tuple[list[dict[str, Any]], str]:
        """Reply events after ``position``, and the position after them."""
        found: list[dict[str, Any]] = []
        while True:
            body = await self.node.intent.api.request(
                Method.GET,
                ApiPath.v3.rooms[room_id].messages,
                query_params={
                    "dir": "f",
                    "from": position,
                    "limit": "100",
                    "filter": json.dumps({"types": [ev.ControlReplyContent.TYPE]}),
                },
            )
            chunk = [e for e in body.get("chunk") or [] if isinstance(e, dict)]
            found.extend(chunk)
            end = body.get("end")
            if not isinstance(end, str) or end == position:
                return found, position
            position = end
            if not chunk:
                return found, position

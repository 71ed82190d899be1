"""The node: this machine as a Matrix appservice (mautrix), and the room plumbing everyone uses.

The homeserver pushes transactions to our appservice HTTP server; we take the raw events, accept
invitations from allowed users, and hand every other event, in order, to the listeners (the
worker, a coordinator, the control handlers). Listeners get plain dicts and parse what they need;
a listener that raises is logged and the loop goes on. Sending goes through the bot's IntentAPI.

Reading a room's history (``history``) uses the same credentials, so ``cis dag status`` works
while no node runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import attrs
import structlog
from aiohttp import web
from mautrix.api import Method, Path
from mautrix.appservice import AppService, AppServiceAPI
from mautrix.appservice.state_store import ASStateStore
from mautrix.client.state_store import MemoryStateStore
from mautrix.errors import MatrixConnectionError, MatrixRequestError, make_request_error
from mautrix.types import (
    JSON,
    ContentURI,
    DeviceID,
    DeviceLists,
    DeviceOTKCount,
    RoomAlias,
    RoomCreatePreset,
    RoomID,
    UserID,
)
from yarl import URL

from cis_bot.errors import UserError
from cis_bot.ids import SessionId, task_key
from cis_bot.matrix import events as ev
from cis_bot.matrix.identity import NodeIdentity
from cis_bot.matrix.outbox import Outbox, Outgoing

if TYPE_CHECKING:
    from mautrix.appservice import IntentAPI


log = structlog.get_logger(__name__)

Listener = Callable[[str, Mapping[str, Any]], Awaitable[None]]


class MemoryASStateStore(MemoryStateStore, ASStateStore):
    """mautrix's caches (membership, power levels) in memory: the room is our persistent state."""

    def __init__(self) -> None:
        MemoryStateStore.__init__(self)
        ASStateStore.__init__(self)


class _RawAppService(AppService):
    """mautrix's AppService, handing us each transaction's raw events in order."""

    def __init__(self, on_events: Callable[[list[dict[str, Any]]], None], **kw: Any) -> None:
        super().__init__(**kw)
        self._on_events = on_events

    async def handle_transaction(
        self,
        txn_id: str,
        *,
        events: list[JSON],
        extra_data: JSON,
        ephemeral: list[JSON] | None = None,
        to_device: list[JSON] | None = None,
        otk_counts: dict[UserID, dict[DeviceID, DeviceOTKCount]] | None = None,
        device_lists: DeviceLists | None = None,
    ) -> JSON:
        if isinstance(events, list):
            self._on_events([e for e in events if isinstance(e, dict)])
        return JSON({})


class Node:
    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity
        self._listeners: list[Listener] = []
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._appservice = _RawAppService(
            self._queue_events,
            server=identity.homeserver,
            domain=identity.server_name,
            as_token=identity.as_token,
            hs_token=identity.hs_token,
            bot_localpart=identity.localpart,
            id=identity.registration_id,
            state_store=MemoryASStateStore(),
            aiohttp_params={"client_max_size": 8 * 1024 * 1024},
        )
        self.port = identity.listen_port
        self._intent: IntentAPI | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        # Events seen recently, by id: a homeserver may push one again (a transaction retried
        # after its answer was lost).
        self._seen: set[str] = set()
        self._seen_order: collections.deque[str] = collections.deque()

    @property
    def user_id(self) -> str:
        return self.identity.user_id

    @property
    def intent(self) -> IntentAPI:
        if self._intent is None:
            raise RuntimeError("the node is not started")
        return self._intent

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def start(self, *, serve: bool = True) -> None:
        """Listen (unless ``serve=False``: reading rooms only) and connect to the homeserver."""
        if serve:
            await self.listen()
        await self.connect()

    async def listen(self) -> int:
        """Start the appservice HTTP server; returns its port (for a registration's url)."""
        host, port = self.identity.listen_host, self.identity.listen_port
        try:
            sock = socket.create_server((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} for the appservice ({exc.strerror}); is "
                "another `cis node` running with this config?"
            ) from None
        self._runner = web.AppRunner(self._appservice.app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.port = int(sock.getsockname()[1])
        self._consumer = asyncio.create_task(self._consume())
        return self.port

    async def connect(self, homeserver: str | None = None) -> None:
        """Talk to the homeserver (``homeserver`` overrides the identity's URL, for an embedded
        one whose port is known only now); registers the bot user the first time."""
        if homeserver:
            self.identity = attrs.evolve(self.identity, homeserver=homeserver.rstrip("/"))
        self._session = aiohttp.ClientSession()
        self._intent = AppServiceAPI(
            base_url=self.identity.homeserver,
            bot_mxid=UserID(self.user_id),
            token=self.identity.as_token,
            log=logging.getLogger("mau.as"),  # type: ignore[arg-type]  # a TraceLogger at runtime
            state_store=MemoryASStateStore(),
            client_session=self._session,
        ).bot_intent()
        try:
            await self.intent.ensure_registered()
        except (MatrixRequestError, aiohttp.ClientError, OSError) as exc:
            await self.stop()
            raise UserError(
                f"cannot reach the homeserver at {self.identity.homeserver} as "
                f"{self.user_id}: {exc}"
            ) from None
        log.info("node.connected", node=self.identity.node_id, user=self.user_id, port=self.port)

    async def stop(self) -> None:
        if self._consumer:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        if self._session:
            await self._session.close()
            self._session = None
        self._intent = None

    # --- intake ----------------------------------------------------------------------------------

    def _queue_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._queue.put_nowait(event)

    async def _consume(self) -> None:
        while True:
            event = await self._queue.get()
            room_id = event.get("room_id")
            if not isinstance(room_id, str) or self._already_seen(event.get("event_id")):
                continue
            if self._is_invite_for_me(event):
                await self._on_invite(room_id, event)
                continue
            for listener in self._listeners:
                try:
                    await listener(room_id, event)
                except Exception:
                    log.exception("node.listener_failed", event_id=event.get("event_id"))

    def _already_seen(self, event_id: object, keep: int = 20_000) -> bool:
        if not isinstance(event_id, str):
            return False
        if event_id in self._seen:
            return True
        self._seen.add(event_id)
        self._seen_order.append(event_id)
        if len(self._seen_order) > keep:
            self._seen.discard(self._seen_order.popleft())
        return False

    def _is_invite_for_me(self, event: Mapping[str, Any]) -> bool:
        content = event.get("content")
        return (
            event.get("type") == "m.room.member"
            and event.get("state_key") == self.user_id
            and isinstance(content, dict)
            and content.get("membership") == "invite"
        )

    async def _on_invite(self, room_id: str, event: Mapping[str, Any]) -> None:
        sender = str(event.get("sender"))
        if sender not in self.identity.allowed_users:
            log.warning("node.invite_refused", room_id=room_id, sender=sender)
            with contextlib.suppress(MatrixRequestError):
                await self.intent.leave_room(RoomID(room_id), reason="not an allowed user")
            return
        await self.intent.join_room_by_id(RoomID(room_id))
        log.info("node.joined", room_id=room_id, inviter=sender)

    # --- rooms -----------------------------------------------------------------------------------

    async def room_state(self, room_id: str) -> list[dict[str, Any]]:
        body = await self.intent.api.request(Method.GET, Path.v3.rooms[room_id].state)
        return [e for e in body if isinstance(e, dict)] if isinstance(body, list) else []

    async def resolve_room(self, room: str) -> str:
        """A room id for ``room`` (an id or an alias), joining it if the bot is not in it."""
        try:
            if room.startswith("#"):
                room_id = (await self.intent.resolve_room_alias(RoomAlias(room))).room_id
            else:
                room_id = RoomID(room)
            joined = await self.intent.get_joined_rooms()
            if room_id not in joined:
                await self.intent.join_room(room_id)
        except MatrixRequestError as exc:
            raise UserError(f"cannot join room {room}: {exc.message}") from None
        return str(room_id)

    async def create_room(
        self,
        *,
        name: str,
        alias: str | None = None,
        public: bool = False,
        invite: tuple[str, ...] = (),
    ) -> str:
        """A room for runs, created by this node (so it holds the top power level); anyone
        joined may post heartbeats (a state event, which rooms otherwise reserve for moderators).
        """
        room_id = await self.intent.create_room(
            alias_localpart=alias,
            preset=RoomCreatePreset.PUBLIC if public else RoomCreatePreset.PRIVATE,
            name=name,
            invitees=[UserID(u) for u in invite],
            power_level_override={
                # Room version 12 forbids listing the creator here: creators outrank everyone.
                "users": {u: 50 for u in invite},
                "events": {ev.NodeHeartbeatContent.TYPE: 0},
            },
        )
        return str(room_id)

    async def send(self, room_id: str, payload: ev.EventContent) -> str:
        """Send now (raises on failure); most callers post through an ``outbox`` instead."""
        return await self.send_outgoing(room_id, outgoing(payload))

    async def send_outgoing(self, room_id: str, item: Outgoing) -> str:
        # Straight to the client-server API, on the node's HTTP session: mautrix's IntentAPI
        # first checks power levels from its cache, which misreads custom event types, and
        # costs two extra requests; its generic request path (URL objects, logging, metrics)
        # cost a tenth of the CPU of every event a run sends. Errors are mautrix's, as before.
        if self._session is None:
            raise RuntimeError("the node is not started")
        if item.state_key is not None:
            parts = (room_id, "state", item.event_type, item.state_key)
        else:
            parts = (room_id, "send", item.event_type, item.txn_id)
        path = "/".join(quote(part, safe="") for part in parts)
        url = URL(
            f"{self.identity.homeserver}/_matrix/client/v3/rooms/{path}"
            f"?user_id={quote(self.user_id, safe='')}",
            encoded=True,
        )
        headers = {
            "Authorization": f"Bearer {self.identity.as_token}",
            "Content-Type": "application/json",
        }
        try:
            async with self._session.put(
                url, data=json.dumps(item.content), headers=headers
            ) as response:
                if not 200 <= response.status < 300:
                    raise await _request_error(response)
                body = await response.json()
        except aiohttp.ClientError as exc:
            raise MatrixConnectionError(str(exc)) from exc
        return str(body.get("event_id", "")) if isinstance(body, dict) else ""

    def outbox(self, room_id: str, **kw: Any) -> Outbox:
        """A started outbox that posts to ``room_id`` as this node."""

        async def send(item: Outgoing) -> str:
            return await self.send_outgoing(room_id, item)

        box = Outbox(send, **kw)
        box.start()
        return box

    async def power_level(self, room_id: str, user_id: str) -> int:
        levels = await self.intent.get_power_levels(RoomID(room_id))
        return int(levels.get_user_level(UserID(user_id)))

    async def authorised(self, room_id: str, user_id: str, *, level: int | None = None) -> bool:
        """May ``user_id`` give this node orders in this room: itself, an allowed user, or a
        member at ``level`` (default: ``assign_power_level``; chat commands pass theirs)?"""
        if user_id == self.user_id or user_id in self.identity.allowed_users:
            return True
        needed = self.identity.assign_power_level if level is None else level
        try:
            return await self.power_level(room_id, user_id) >= needed
        except MatrixRequestError:
            return False

    async def history(self, room_id: str, *, page: int = 500) -> AsyncIterator[dict[str, Any]]:
        """The room's events, oldest first (read backwards from now, then reversed per page)."""
        pages: list[list[dict[str, Any]]] = []
        token: str | None = None
        while True:
            query: dict[str, Any] = {"dir": "b", "limit": str(page)}
            if token:
                query["from"] = token
            body = await self.intent.api.request(
                Method.GET, Path.v3.rooms[room_id].messages, query_params=query
            )
            chunk = body.get("chunk") or []
            pages.append([e for e in chunk if isinstance(e, dict)])
            token = body.get("end")
            if not chunk or not token:
                break
        for events in reversed(pages):
            for event in reversed(events):
                yield event

    async def upload(self, data: bytes, *, mime_type: str, filename: str) -> str:
        return str(await self.intent.upload_media(data, mime_type=mime_type, filename=filename))

    async def download(self, mxc: str) -> bytes:
        data: bytes = await self.intent.download_media(ContentURI(mxc))
        return data

    async def download_json(self, mxc: str) -> Any:
        return json.loads(await self.download(mxc))


async def _request_error(response: aiohttp.ClientResponse) -> MatrixRequestError:
    """The mautrix error for a homeserver's error response (as mautrix's own requests raise)."""
    text = await response.text()
    errcode = message = unstable_errcode = None
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(text)
        errcode, message = body.get("errcode"), body.get("error")
        unstable_errcode = body.get("org.matrix.msc3848.unstable.errcode")
    return make_request_error(
        http_status=response.status,
        text=text,
        errcode=errcode,
        message=message,
        unstable_errcode=unstable_errcode,
    )


def outgoing(payload: ev.EventContent, *, droppable: bool = False) -> Outgoing:
    """An event to post; its ordering key keeps each task's events in order (run-wide events
    order against everything, see Outbox)."""
    event_type, content = ev.encode(payload)
    key: str | None = None
    if isinstance(payload, ev.NodeHeartbeatContent):
        key = f"heartbeat:{payload.node_id}"
    elif isinstance(payload, ev.RunContent) and isinstance(task_id := content.get("task_id"), str):
        key = task_key(payload.run_id, task_id)
    elif isinstance(payload, ev.SessionContent):
        sid = SessionId.parse_or_none(payload.session_id)
        key = sid.task_key if sid else payload.session_id
    return Outgoing(event_type, content, state_key=payload.state_key, droppable=droppable, key=key)

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
from cis_bot.matrix.batch import BATCH_TYPE, BATCHING, MayPost, batchable, unpack
from cis_bot.matrix.identity import NodeIdentity
from cis_bot.matrix.levels import RUN_LOG_POWER_LEVEL, run_room_event_levels
from cis_bot.matrix.outbox import Outbox, Outgoing
from cis_bot.matrix.powers import RoomPowers

if TYPE_CHECKING:
    from mautrix.appservice import IntentAPI


log = structlog.get_logger(__name__)

#: Waits between tries to read a room's power levels while the homeserver is away, before a
#: batch from that room is dropped as unreadable.
_POWERS_RETRY_SECS = (0.25, 0.5, 1.0)

Listener = Callable[[str, Mapping[str, Any]], Awaitable[None]]
#: A media upload: (data, mime type, file name) -> mxc URI.
Upload = Callable[[bytes, str, str], Awaitable[str]]


class PortInUse(UserError):
    """The appservice's port is taken (another process serves this node)."""


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
        # Each room's power levels and creation event, kept current from the pushed events.
        self._powers: dict[str, RoomPowers] = {}

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

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def start(self, *, serve: bool = True) -> None:
        """Listen (unless ``serve=False``: reading rooms only) and connect to the homeserver."""
        if serve:
            await self.listen()
        await self.connect()
        if serve:
            await self.ping_homeserver()

    async def ping_homeserver(self) -> None:
        """Have the homeserver reach our appservice (Matrix 1.7's appservice ping): a homeserver
        that failed to push to us while we were away retries at once, rather than at the end of
        its backoff (Synapse's grows to 8.5 minutes), so the room's events reach us now. A
        failure is logged: events will not be pushed until the homeserver can reach us."""
        try:
            took = await self.intent.appservice_ping(self.identity.registration_id)
        except (MatrixRequestError, aiohttp.ClientError, OSError) as exc:
            log.warning(
                "node.unreachable",
                node=self.identity.node_id,
                error=str(exc),
                hint=f"the homeserver cannot reach this node's appservice at "
                f"{self.identity.listen_host}:{self.port}: check the registration's url",
            )
        else:
            log.debug("node.ping", duration_ms=took)

    async def listen(self) -> int:
        """Start the appservice HTTP server; returns its port (for a registration's url)."""
        host, port = self.identity.listen_host, self.identity.listen_port
        try:
            sock = socket.create_server((host, port))
        except OSError as exc:
            raise PortInUse(
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
            try:
                await self._take(event)
            except Exception:  # one event's trouble must not leave the node deaf for good
                log.exception("node.event_failed", event_id=event.get("event_id"))

    async def _take(self, event: dict[str, Any]) -> None:
        room_id = event.get("room_id")
        if not isinstance(room_id, str) or self._already_seen(event.get("event_id")):
            return
        self._follow_power_levels(room_id, event)
        if self._is_invite_for_me(event):
            await self._on_invite(room_id, event)
            return
        for each in await self._unpacked(room_id, event):
            for listener in list(self._listeners):  # one may remove itself
                try:
                    await listener(room_id, each)
                except Exception:
                    log.exception("node.listener_failed", event_id=each.get("event_id"))

    async def _unpacked(self, room_id: str, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The event, or the events a batch carries (``batch.py``), each as if sent alone."""
        if event.get("type") != BATCH_TYPE:
            return [event]
        return unpack(event, await self._may_post(room_id, str(event.get("sender"))))

    async def _may_post(self, room_id: str, sender: str) -> MayPost:
        """What ``sender`` may post in the room now (nothing, when its levels cannot be read:
        refused, or the homeserver still away after a few tries)."""
        waits = list(_POWERS_RETRY_SECS)
        while True:
            try:
                return (await self._room_powers(room_id)).may_post(sender)
            except MatrixConnectionError as exc:
                if waits:
                    await asyncio.sleep(waits.pop(0))
                    continue
                error = str(exc)
            except MatrixRequestError as exc:
                error = str(exc.message)
            log.warning("room.power_levels_unread", room_id=room_id, error=error)
            return lambda _: False

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
        self, *, name: str, alias: str | None = None, invite: tuple[str, ...] = ()
    ) -> str:
        """A room for runs, created by this node (so it holds the top power level): invite
        only, out of the room directory, the run log for the node alone (see
        ``run_room_event_levels``); ``invite`` are people who may read it, at power level 0
        (they are invited one by one: one that cannot be invited is logged, not fatal).
        """
        room_id = await self.intent.create_room(
            alias_localpart=alias,
            preset=RoomCreatePreset.PRIVATE,
            name=name,
            power_level_override={
                # Room version 12 forbids listing the creator in "users": creators outrank
                # everyone. Who reads the room is the owner's choice: members do not invite.
                "invite": RUN_LOG_POWER_LEVEL,
                "events": run_room_event_levels(),
            },
        )
        for user_id in invite:
            try:
                await self.intent.invite_user(room_id, UserID(user_id))
            except MatrixRequestError as exc:
                log.warning("room.invite_failed", room_id=room_id, user=user_id, error=exc.message)
        return str(room_id)

    async def send(self, room_id: str, payload: ev.EventContent) -> str:
        """Send now (raises on failure; documents too large for the event go to media first);
        most callers post through an ``outbox`` instead."""
        item = outgoing(payload, upload=self.upload_for_events)
        if item.prepare is not None:
            await item.prepare(item)
        return await self.send_outgoing(room_id, item)

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

        kw.setdefault("batching", BATCHING)
        box = Outbox(send, **kw)
        box.start()
        return box

    async def power_level(self, room_id: str, user_id: str) -> int:
        """``user_id``'s power level in the room (a creator of a room version 12 room outranks
        every level)."""
        return (await self._room_powers(room_id)).user_level(user_id)

    async def _room_powers(self, room_id: str) -> RoomPowers:
        powers = self._powers.get(room_id)
        if powers is None:
            powers = self._powers[room_id] = RoomPowers.of_state(await self.room_state(room_id))
        return powers

    def _follow_power_levels(self, room_id: str, event: Mapping[str, Any]) -> None:
        """A power level change takes effect at once: a demoted user loses its say."""
        known = self._powers.get(room_id)
        if known is not None:
            known.follow(event)

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

    async def trusts_worker(self, room_id: str, user_id: str) -> bool:
        """May this node, coordinating a run in this room, hand ``user_id`` tasks (their
        upstream outputs with them) and take its results? Itself, a user of ``[node] workers``,
        and whoever it takes orders from in the room."""
        return user_id in self.identity.workers or await self.authorised(room_id, user_id)

    async def history(self, room_id: str, *, page: int = 500) -> AsyncIterator[dict[str, Any]]:
        """The room's events, oldest first (read backwards from now, then reversed per page),
        with batches unpacked: what their senders could post by the power levels of the time
        (the room's current ones when its history does not reach back to them)."""
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
        timeline = RoomPowers()
        for events in reversed(pages):
            for event in reversed(events):
                timeline.follow(event)
                if event.get("type") != BATCH_TYPE:
                    yield event
                    continue
                sender = str(event.get("sender"))
                if timeline.known:
                    may_post = timeline.may_post(sender)
                else:
                    may_post = await self._may_post(room_id, sender)
                for each in unpack(event, may_post):
                    yield each

    async def upload(self, data: bytes, *, mime_type: str, filename: str) -> str:
        return str(await self.intent.upload_media(data, mime_type=mime_type, filename=filename))

    async def upload_for_events(self, data: bytes, mime_type: str, filename: str) -> str:
        """``upload`` as an :data:`Upload` (what events' documents and transcripts use)."""
        return await self.upload(data, mime_type=mime_type, filename=filename)

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


def outgoing(
    payload: ev.EventContent,
    *,
    droppable: bool = False,
    state_key: str | None = None,
    upload: Upload | None = None,
) -> Outgoing:
    """An event to post; its ordering key keeps each task's events in order (run-wide events
    order against everything, see Outbox). A state event type needs its ``state_key``.

    A content too large for an event has its documents moved to media (``EventContent.fit``):
    they are uploaded through ``upload`` just before the event is first sent. ContentTooLarge
    when that is not enough, or there is no ``upload``."""
    if (state_key is not None) != payload.IS_STATE:
        raise ValueError(f"{payload.TYPE}: a state key goes with state event types, and only them")
    media: ev.Media = {}
    try:
        event_type, content, size = ev.encode_sized(payload)
    except ev.ContentTooLarge:
        payload, media = payload.fit()
        if media and upload is None:
            raise
        event_type, content, size = ev.encode_sized(payload)
    key: str | None = None
    if isinstance(payload, ev.NodeHeartbeatContent):
        key = f"heartbeat:{state_key}"
    elif payload.IS_STATE:
        key = f"{payload.TYPE}:{state_key}"
    elif isinstance(payload, ev.RunContent) and isinstance(task_id := content.get("task_id"), str):
        key = task_key(payload.run_id, task_id)
    elif isinstance(payload, ev.SessionContent):
        sid = SessionId.parse_or_none(payload.session_id)
        key = sid.task_key if sid else payload.session_id
    item = Outgoing(
        event_type,
        content,
        state_key=state_key,
        droppable=droppable,
        key=key,
        batchable=batchable(event_type, state_key),
        content_bytes=size,
    )
    if media:
        assert upload is not None
        item.prepare = _uploading(media, upload)
    return item


def _uploading(media: ev.Media, upload: Upload) -> Callable[[Outgoing], Awaitable[None]]:
    async def prepare(item: Outgoing) -> None:
        for field, (data, filename) in media.items():
            if field not in item.content:  # not uploaded by an earlier try
                item.content[field] = await upload(data, "application/json", filename)

    return prepare

"""Wires storage, handlers, the HTTP front end and the appservice pushers into a server.

``EmbeddedHomeserver`` is the public, in-process API (the node starts one inside
``cis dag execute --local``); ``cis homeserver`` runs the same thing in the foreground.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from typing import TYPE_CHECKING

import structlog

from cis_bot import private
from cis_bot.errors import InputError, UserError
from cis_bot.homeserver.appservice.registration import load_registrations
from cis_bot.homeserver.config import CONFIG_NAME, HomeserverConfig
from cis_bot.homeserver.errors import TOO_LARGE, MatrixError
from cis_bot.homeserver.handlers.auth import AuthHandler, hash_password
from cis_bot.homeserver.handlers.devicemessage import DeviceMessageHandler
from cis_bot.homeserver.handlers.devices import DeviceHandler
from cis_bot.homeserver.handlers.directory import DirectoryHandler
from cis_bot.homeserver.handlers.e2e_keys import E2EKeysHandler
from cis_bot.homeserver.handlers.e2e_room_keys import RoomKeyBackupHandler
from cis_bot.homeserver.handlers.ephemeral import ReceiptHandler, TypingHandler
from cis_bot.homeserver.handlers.message import EventCreationHandler
from cis_bot.homeserver.handlers.notifications import NotificationCounts
from cis_bot.homeserver.handlers.notifier import Notifier
from cis_bot.homeserver.handlers.pagination import PaginationHandler
from cis_bot.homeserver.handlers.presence import PresenceHandler
from cis_bot.homeserver.handlers.pushrules import PushRulesHandler
from cis_bot.homeserver.handlers.room import RoomCreationHandler
from cis_bot.homeserver.handlers.room_member import RoomMemberHandler
from cis_bot.homeserver.handlers.room_state import RoomStateHandler
from cis_bot.homeserver.handlers.serialize import Serializer
from cis_bot.homeserver.handlers.sync import SyncHandler
from cis_bot.homeserver.handlers.ui_auth import UserInteractiveAuth
from cis_bot.homeserver.handlers.visibility import Visibility
from cis_bot.homeserver.http.client import HttpClient
from cis_bot.homeserver.http.server import HttpServer
from cis_bot.homeserver.ids import check_new_localpart
from cis_bot.homeserver.ratelimiting import LoginRatelimiter
from cis_bot.homeserver.rest import (
    account,
    appservice,
    devices,
    keys,
    media,
    misc,
    notifications,
    room_keys,
    rooms,
    sync,
)
from cis_bot.homeserver.rest.base import MAX_JSON_BODY, HttpFrontend, Router, error_response
from cis_bot.homeserver.storage.database import DB_NAME
from cis_bot.homeserver.storage.registration import UserExistsError
from cis_bot.homeserver.storage.store import Store

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from cis_bot.homeserver.appservice.pusher import AppservicePusher
    from cis_bot.homeserver.appservice.registration import Appservice

log = structlog.get_logger(__name__)

DEFAULT_MAX_UPLOAD = 50 * 1024 * 1024


class Homeserver:
    """Everything a request handler can reach (Synapse's ``HomeServer``)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        server_name: str,
        appservices: Sequence[Appservice],
        config: HomeserverConfig,
        max_upload_size: int = DEFAULT_MAX_UPLOAD,
    ) -> None:
        self.server_name = server_name
        self.config = config
        self.login_ratelimiter = LoginRatelimiter(config.rc_login)
        self.state_dir = state_dir
        self.media_dir = state_dir / "media"
        self.max_upload_size = max_upload_size
        self.base_url = ""
        self.appservices = list(appservices)
        self.store = Store(state_dir / DB_NAME)
        try:
            self.store.claim_server_name(server_name)
        except ValueError as err:
            self.store.close()
            raise InputError(str(err)) from None
        self.notifier = Notifier()
        self.auth = AuthHandler(self.store, server_name, self.appservices)
        self.rooms = RoomStateHandler(self.store)
        self.events = EventCreationHandler(
            store=self.store, rooms=self.rooms, notifier=self.notifier
        )
        self.members = RoomMemberHandler(store=self.store, rooms=self.rooms, events=self.events)
        self.directory = DirectoryHandler(
            store=self.store,
            rooms=self.rooms,
            server_name=server_name,
            appservices=self.appservices,
        )
        self.room_creation = RoomCreationHandler(
            store=self.store,
            rooms=self.rooms,
            events=self.events,
            members=self.members,
            directory=self.directory,
            server_name=server_name,
        )
        self.serializer = Serializer(self.store)
        self.counts = NotificationCounts(self.store, self.rooms)
        self.visibility = Visibility(self.store)
        self.events.event_listeners.extend((self.counts.on_event, self.visibility.on_event))
        self.typing = TypingHandler(self.rooms, self.notifier)
        self.receipts = ReceiptHandler(self.store, self.rooms, self.notifier, self.counts)
        self.push_rules = PushRulesHandler(self.store, self.notifier, self.counts)
        self.pagination = PaginationHandler(
            self.store, self.rooms, self.serializer, self.visibility
        )
        self.ui_auth = UserInteractiveAuth(self.auth)
        self.devices = DeviceHandler(
            store=self.store,
            auth=self.auth,
            rooms=self.rooms,
            notifier=self.notifier,
        )
        self.auth.device_listeners.append(self.devices.device_created)
        self.e2e_keys = E2EKeysHandler(
            store=self.store, devices=self.devices, server_name=server_name
        )
        self.device_messages = DeviceMessageHandler(
            store=self.store,
            notifier=self.notifier,
            server_name=server_name,
        )
        self.room_key_backups = RoomKeyBackupHandler(self.store)
        self.presence = PresenceHandler(
            store=self.store,
            devices=self.devices,
            notifier=self.notifier,
            enabled=config.presence_enabled,
        )
        self.sync = SyncHandler(
            store=self.store,
            rooms=self.rooms,
            notifier=self.notifier,
            serializer=self.serializer,
            typing=self.typing,
            receipts=self.receipts,
            push_rules=self.push_rules,
            counts=self.counts,
            visibility=self.visibility,
            devices=self.devices,
            device_messages=self.device_messages,
            e2e_keys=self.e2e_keys,
            presence=self.presence,
        )
        self.pushers: dict[str, AppservicePusher] = {}

    def close(self) -> None:
        self.typing.close()
        self.presence.close()
        self.store.close()


def build_router() -> Router:
    router = Router()
    for module in (
        account,
        devices,
        keys,
        room_keys,
        rooms,
        sync,
        media,
        appservice,
        misc,
        notifications,
    ):
        module.register_routes(router)
    return router


def new_account(server_name: str, localpart: str, password: str | None) -> tuple[str, str, str]:
    """Validate the name and hash the password (slow: PBKDF2): (user_id, password, hash).
    Raises ValueError with a message for a bad name."""
    try:
        user_id = check_new_localpart(localpart, server_name)
    except MatrixError as err:
        raise ValueError(f"invalid user name {localpart!r}: {err.message}") from None
    secret = password if password is not None else secrets.token_urlsafe(18)
    return user_id, secret, hash_password(secret)


def store_account(store: Store, user_id: str, password_hash: str, admin: bool) -> None:
    localpart = user_id[1:].split(":", 1)[0]
    try:
        store.create_user(user_id, password_hash=password_hash, admin=admin, displayname=localpart)
    except UserExistsError:
        raise ValueError(f"user {user_id} already exists") from None


class EmbeddedHomeserver:
    """A loopback Matrix homeserver on SQLite, started inside the caller's event loop."""

    def __init__(
        self,
        *,
        state_dir: Path,
        server_name: str = "cis.local",
        host: str = "127.0.0.1",
        port: int = 0,
        appservice_files: Sequence[Path] = (),
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        max_upload_size: int = DEFAULT_MAX_UPLOAD,
        config: HomeserverConfig | None = None,
    ) -> None:
        """``config``: the settings; by default those of ``homeserver.toml`` in
        ``state_dir``."""
        self.state_dir = state_dir
        self.config = config
        self.server_name = server_name
        self.host = host
        self.port = port
        self.appservice_files = tuple(appservice_files)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_upload_size = max_upload_size
        self.hs: Homeserver | None = None
        self._http: HttpServer | None = None
        self._client: HttpClient | None = None

    @property
    def base_url(self) -> str:
        if self._http is None:
            raise RuntimeError("the homeserver is not started")
        return f"http://{self._display_host()}:{self.port}"

    def _display_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    async def start(self) -> None:
        """Read registrations (InputError when bad), open the database, bind (OSError when the
        port is taken), start the appservice pushers."""
        if self._http is not None:
            raise RuntimeError("the homeserver is already started")
        appservices = load_registrations(self.appservice_files, self.server_name)
        config = self.config or HomeserverConfig.load(self.state_dir / CONFIG_NAME)
        try:
            private.make_dirs(self.state_dir)
            hs = Homeserver(
                state_dir=self.state_dir,
                server_name=self.server_name,
                appservices=appservices,
                config=config,
                max_upload_size=self.max_upload_size,
            )
        except (sqlite3.Error, OSError) as exc:
            raise UserError(
                f"cannot open the homeserver's database in {self.state_dir}: {exc}"
            ) from None
        self.hs = hs
        try:
            http = HttpServer(
                HttpFrontend(hs, build_router()),
                max_body=max(self.max_upload_size, MAX_JSON_BODY),
                too_large=lambda: error_response(
                    MatrixError(413, TOO_LARGE, "Request body too large")
                ),
            )
            self.port = await http.start(self.host, self.port)
            self._http = http
            hs.base_url = self.base_url
            self._start_pushers(hs)
        except BaseException:
            hs.close()
            self.hs = None
            raise
        log.info("homeserver.started", base_url=self.base_url, server_name=self.server_name)

    def _start_pushers(self, hs: Homeserver) -> None:
        from cis_bot.homeserver.appservice.pusher import AppservicePusher

        self._client = HttpClient()
        for service in hs.appservices:
            pusher = AppservicePusher(
                service,
                store=hs.store,
                rooms=hs.rooms,
                serializer=hs.serializer,
                notifier=hs.notifier,
                client=self._client,
                retry_initial=self.retry_initial,
                retry_max=self.retry_max,
            )
            hs.pushers[service.id] = pusher
            pusher.start()

    async def stop(self, *, drain: float = 0.0) -> None:
        """Stop; ``drain``: first give the appservices, up to that many seconds, the events
        they have not had (a run's own homeserver, before the run's node goes)."""
        hs = self.hs
        if hs is not None:
            if drain > 0:
                await asyncio.gather(*(p.drain(drain) for p in hs.pushers.values()))
            for pusher in hs.pushers.values():
                await pusher.stop()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._client is not None:
            await self._client.close()
            self._client = None
        if hs is not None:
            hs.close()
            self.hs = None
        log.info("homeserver.stopped")

    async def add_user(
        self, localpart: str, password: str | None = None, admin: bool = False
    ) -> tuple[str, str]:
        """Create a local account: (user_id, password); a generated password when none is
        given. Raises ValueError for a bad or taken name."""
        if self.hs is None:
            raise RuntimeError("the homeserver is not started")
        user_id, secret, password_hash = await asyncio.to_thread(
            new_account, self.server_name, localpart, password
        )
        store_account(self.hs.store, user_id, password_hash, admin)
        return user_id, secret

"""Pushes events to appservices: ``PUT {url}/_matrix/app/v1/transactions/{txnId}`` with
``Authorization: Bearer <hs_token>``, like synapse/appservice/scheduler.py.

Per appservice, one task sorts new events into numbered transactions and delivers them one at a
time, in order, retrying each with exponential backoff until the appservice answers 2xx (or a
ping it answers shows it is back: then at once, as Synapse's ``force_retry``). A
transaction is written to SQLite (with the read position moved past its events, atomically)
before its first attempt, so after a crash it is re-sent with the same id and the same events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import structlog

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.http.client import HttpClient, HttpClientError

if TYPE_CHECKING:
    from cis_bot.homeserver.appservice.registration import Appservice
    from cis_bot.homeserver.events import Event
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.handlers.room_state import RoomStateHandler
    from cis_bot.homeserver.handlers.serialize import Serializer
    from cis_bot.homeserver.storage.store import Store

log = structlog.get_logger(__name__)

MAX_EVENTS_PER_TXN = 100  # Synapse's limit
_SCAN = 500


class PingError(Exception):
    """The appservice did not answer a ping with 2xx: our answer's status, errcode, message
    and extra fields."""

    def __init__(self, http_status: int, errcode: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.errcode = errcode
        self.message = message
        self.extra = extra


class AppservicePusher:
    def __init__(
        self,
        service: Appservice,
        *,
        store: Store,
        rooms: RoomStateHandler,
        serializer: Serializer,
        notifier: Notifier,
        client: HttpClient,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        request_timeout: float = 30.0,
    ) -> None:
        self.service = service
        self.store = store
        self.rooms = rooms
        self.serializer = serializer
        self.notifier = notifier
        self.client = client
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.request_timeout = request_timeout
        self._task: asyncio.Task[None] | None = None
        #: Set by a successful ping: a transaction waiting out its backoff goes at once.
        self._retry_now = asyncio.Event()
        #: Set whenever a transaction was delivered or there was nothing to deliver.
        self._progress = asyncio.Event()
        #: The last attempt failed: the appservice is away (perhaps for good).
        self._failing = False

    def start(self) -> None:
        if self.store.appservice_state(self.service.id) is None:
            # A newly registered appservice starts from now, as in Synapse: no history replay.
            self.store.init_appservice_state(self.service.id, self.store.current_stream)
        self._task = asyncio.create_task(self._run(), name=f"appservice-pusher-{self.service.id}")

    async def drain(self, timeout: float) -> None:
        """Wait, up to ``timeout`` seconds, until the appservice has every event stored so far,
        unless it is failing to take them (away, perhaps for good: no use waiting)."""
        if self._task is None or self.service.url is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._failing and not self._delivered_all():
            self._progress.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                return

    def _delivered_all(self) -> bool:
        state = self.store.appservice_state(self.service.id)
        if state is not None and state[0] < self.store.current_stream:
            return False
        return not self.store.pending_appservice_txns(self.service.id)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        if self.service.url is None:
            return  # Synapse: an explicit null url means "never push"
        while True:
            try:
                for txn_id, streams in self.store.pending_appservice_txns(self.service.id):
                    await self._deliver(txn_id, streams)
                if not self._sort_new_events():
                    self._progress.set()
                    await self.notifier.wait_for_stream()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not kill delivery for good: log it and carry on after a pause.
                log.exception("appservice.pusher_error", appservice=self.service.id)
                await asyncio.sleep(self.retry_initial)

    def _sort_new_events(self) -> bool:
        """Turn new events into the next transaction. False when there was nothing new."""
        state = self.store.appservice_state(self.service.id)
        assert state is not None
        last, next_txn = state
        current = self.store.current_stream
        if current <= last:
            return False
        picked: list[int] = []
        position = last
        while position < current and len(picked) < MAX_EVENTS_PER_TXN:
            batch = self.store.events_in_stream_range(position, current, _SCAN)
            if not batch:
                position = current
                break
            for event in batch:
                position = event.stream
                if self._interested(event):
                    picked.append(event.stream)
                    if len(picked) >= MAX_EVENTS_PER_TXN:
                        break
        # Non-event stream positions (account data, receipts) past the last event: skip them.
        if len(picked) < MAX_EVENTS_PER_TXN:
            position = current
        self.store.create_appservice_txn(self.service.id, next_txn, picked, position)
        return True

    def _interested(self, event: Event) -> bool:
        service = self.service
        if service.is_interested_in_user(event.sender):
            return True
        if (
            event.type == ev.MEMBER
            and event.state_key
            and service.is_interested_in_user(event.state_key)
        ):
            return True
        room_id = event.room_id
        if service.is_room_in_namespace(room_id):
            return True
        if service.aliases and any(
            service.is_alias_in_namespace(alias) for alias in self.store.aliases_for_room(room_id)
        ):
            return True
        room = self.rooms.get(room_id)
        return room is not None and any(service.is_interested_in_user(u) for u in room.joined)

    async def _deliver(self, txn_id: int, streams: list[int]) -> None:
        events = self.store.events_by_stream(streams)
        attempt = 0
        while True:
            body = self._body(events)
            ok = await self._put(txn_id, body)
            self._failing = not ok
            if ok:
                self.store.complete_appservice_txn(self.service.id, txn_id)
                self._progress.set()
                return
            self._progress.set()  # a drain stops waiting on a failing appservice
            delay = min(self.retry_initial * (2**attempt), self.retry_max)
            attempt += 1
            log.warning(
                "appservice.txn_retry",
                appservice=self.service.id,
                txn_id=txn_id,
                attempt=attempt,
                delay_s=delay,
            )
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), delay)

    def _body(self, events: list[Event]) -> dict[str, Any]:
        now_ms = int(time.time() * 1000)
        serialized = []
        for event in events:
            data = self.serializer.client_event(event, "v1", now_ms=now_ms)
            if (
                event.type == ev.MEMBER
                and event.membership in ("invite", "knock")
                and event.state_key is not None
                and self.service.is_interested_in_user(event.state_key)
            ):
                room = self.rooms.get(event.room_id)
                if room is not None:
                    stripped = [
                        room.state[(t, "")].stripped(room.version)
                        for t in ev.PREJOIN_STATE_TYPES
                        if (t, "") in room.state
                    ]
                    data["unsigned"]["invite_room_state"] = stripped
                    data["invite_room_state"] = stripped
            serialized.append(data)
        body: dict[str, Any] = {"events": serialized}
        if self.service.receive_ephemeral:
            body["ephemeral"] = []
            body["de.sorunome.msc2409.to_device"] = []
        return body

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.service.hs_token}",
            "Content-Type": "application/json",
        }

    async def _put(self, txn_id: int, body: dict[str, Any]) -> bool:
        assert self.service.url is not None
        url = (
            f"{self.service.url}/_matrix/app/v1/transactions/"
            f"{urllib.parse.quote(str(txn_id), safe='')}"
        )
        try:
            response = await self.client.request(
                "PUT",
                url,
                body=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                headers=self._headers(),
                timeout=self.request_timeout,
            )
        except (HttpClientError, TimeoutError) as exc:
            log.warning(
                "appservice.txn_failed",
                appservice=self.service.id,
                txn_id=txn_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        if 200 <= response.status < 300:
            return True
        log.warning(
            "appservice.txn_refused",
            appservice=self.service.id,
            txn_id=txn_id,
            status=response.status,
        )
        return False

    async def ping(self, transaction_id: Any) -> int:
        """POST /_matrix/app/v1/ping; returns the round trip in ms or raises PingError."""
        assert self.service.url is not None
        started = time.monotonic()
        try:
            response = await self.client.request(
                "POST",
                f"{self.service.url}/_matrix/app/v1/ping",
                body=json.dumps({"transaction_id": transaction_id}).encode(),
                headers=self._headers(),
                timeout=self.request_timeout,
            )
        except TimeoutError:
            raise PingError(504, "M_CONNECTION_TIMEOUT", "Timed out waiting for response") from None
        except HttpClientError as exc:
            raise PingError(502, "M_CONNECTION_FAILED", str(exc)) from None
        if not 200 <= response.status < 300:
            raise PingError(
                502,
                "M_BAD_STATUS",
                f"HTTP {response.status} {response.reason}",
                status=response.status,
                body=response.body.decode("utf-8", errors="replace"),
            )
        # The appservice answers again: deliver what waits for it now (Synapse's force_retry).
        self._retry_now.set()
        return int((time.monotonic() - started) * 1000)

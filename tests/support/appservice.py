"""Appservice registrations (the YAML Synapse reads from ``app_service_config_files``) and a
loopback aiohttp receiver that records every transaction a homeserver pushes.

The receiver runs its own event loop in a thread, so one receiver can outlive a test's event
loop (module-scoped rigs) and blocking code (fixtures, benchmarks) can use it too.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import yaml
from aiohttp import web

from tests.support.process import free_port


@attrs.frozen
class Namespace:
    regex: str
    exclusive: bool = True


@attrs.frozen
class AppserviceRegistration:
    id: str
    url: str | None
    sender_localpart: str
    users: tuple[Namespace, ...] = ()
    aliases: tuple[Namespace, ...] = ()
    rooms: tuple[Namespace, ...] = ()
    as_token: str = attrs.field(factory=lambda: f"as_{secrets.token_hex(16)}")
    hs_token: str = attrs.field(factory=lambda: f"hs_{secrets.token_hex(16)}")
    rate_limited: bool = False

    def as_dict(self) -> dict[str, Any]:
        def spaces(items: tuple[Namespace, ...]) -> list[dict[str, Any]]:
            return [{"exclusive": item.exclusive, "regex": item.regex} for item in items]

        return {
            "id": self.id,
            "url": self.url,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.sender_localpart,
            "namespaces": {
                "users": spaces(self.users),
                "aliases": spaces(self.aliases),
                "rooms": spaces(self.rooms),
            },
            "rate_limited": self.rate_limited,
        }

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.id}.yaml"
        path.write_text(yaml.safe_dump(self.as_dict(), sort_keys=False))
        return path

    def sender(self, server_name: str) -> str:
        return f"@{self.sender_localpart}:{server_name}"


def prefixed_registration(
    as_id: str, url: str | None, server_name: str, prefix: str, exclusive: bool = True
) -> AppserviceRegistration:
    """An appservice owning ``@{prefix}*`` and ``#{prefix}*`` on ``server_name``, with
    ``@{prefix}bot`` as its sender."""
    domain = server_name.replace(".", r"\.")
    return AppserviceRegistration(
        id=as_id,
        url=url,
        sender_localpart=f"{prefix}bot",
        users=(Namespace(f"@{prefix}.*:{domain}", exclusive),),
        aliases=(Namespace(f"#{prefix}.*:{domain}", exclusive),),
    )


@attrs.frozen
class Delivery:
    """One PUT of a transaction as the receiver saw it, and what it answered."""

    txn_id: str
    body: dict[str, Any]
    authorization: str | None
    status: int
    received_at: float

    @property
    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.body.get("events", [])
        return events

    @property
    def content(self) -> dict[str, Any]:
        """The body without the events' ``age``, which a retry recomputes (Synapse does)."""
        return {
            **self.body,
            "events": [_without_age(event) for event in self.events],
        }


def _without_age(event: dict[str, Any]) -> dict[str, Any]:
    event = {key: value for key, value in event.items() if key != "age"}
    if isinstance(event.get("unsigned"), dict):
        event["unsigned"] = {k: v for k, v in event["unsigned"].items() if k != "age"}
    return event


class TransactionReceiver:
    """``PUT /_matrix/app/v1/transactions/{txnId}`` recorder.

    ``fail_next(n, status)`` answers the next n transactions with an error; ``hold()`` keeps
    transaction requests open (unanswered) until ``release()``, to catch a server mid-delivery.
    """

    def __init__(self, hs_token: str | None = None, host: str = "127.0.0.1") -> None:
        self.hs_token = hs_token
        self.host = host
        self.port = free_port(host)
        self.deliveries: list[Delivery] = []
        self.pings: list[dict[str, Any]] = []
        self.user_queries: list[str] = []
        self._fail_remaining = 0
        self._fail_status = 500
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._released: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> TransactionReceiver:
        self._thread = threading.Thread(target=self._run, name="as-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("appservice receiver did not start")
        if self._startup_error is not None:
            raise RuntimeError(f"appservice receiver failed: {self._startup_error!r}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._cleanup())
        loop.close()

    async def _serve(self) -> None:
        self._released = asyncio.Event()
        self._released.set()
        app = web.Application()
        for prefix in ("/_matrix/app/v1", ""):
            app.router.add_put(prefix + "/transactions/{txn_id}", self._transaction)
            app.router.add_get(prefix + "/users/{user_id}", self._user)
            app.router.add_get(prefix + "/rooms/{alias}", self._not_found)
        app.router.add_post("/_matrix/app/v1/ping", self._ping)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def _cleanup(self) -> None:
        assert self._released is not None
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(30)
        self._loop = None

    def __enter__(self) -> TransactionReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- behaviour knobs ------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 500) -> None:
        with self._cond:
            self._fail_remaining = count
            self._fail_status = status

    def hold(self) -> None:
        assert self._loop is not None and self._released is not None
        self._loop.call_soon_threadsafe(self._released.clear)

    def release(self) -> None:
        assert self._loop is not None and self._released is not None
        self._loop.call_soon_threadsafe(self._released.set)

    def clear(self) -> None:
        with self._cond:
            self.deliveries.clear()
            self.pings.clear()
            self.user_queries.clear()
            self._fail_remaining = 0

    # --- handlers -------------------------------------------------------------------------

    def _authorised(self, request: web.Request) -> bool:
        if self.hs_token is None:
            return True
        return request.headers.get("Authorization") == f"Bearer {self.hs_token}"

    async def _transaction(self, request: web.Request) -> web.Response:
        txn_id = request.match_info["txn_id"]
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"errcode": "M_NOT_JSON", "error": "bad body"}, status=400)
        authorised = self._authorised(request)
        with self._cond:
            if not authorised:
                status = 403
            elif self._fail_remaining > 0:
                self._fail_remaining -= 1
                status = self._fail_status
            else:
                status = 200
            self.deliveries.append(
                Delivery(
                    txn_id=txn_id,
                    body=body,
                    authorization=request.headers.get("Authorization"),
                    status=status,
                    received_at=time.monotonic(),
                )
            )
            self._cond.notify_all()
        assert self._released is not None
        await self._released.wait()
        if status == 200:
            return web.json_response({})
        return web.json_response({"errcode": "M_UNKNOWN", "error": "test says no"}, status=status)

    async def _user(self, request: web.Request) -> web.Response:
        with self._cond:
            self.user_queries.append(request.match_info["user_id"])
            self._cond.notify_all()
        return await self._not_found(request)

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"errcode": "M_NOT_FOUND", "error": "none here"}, status=404)

    async def _ping(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"errcode": "M_FORBIDDEN", "error": "bad token"}, status=403)
        with self._cond:
            self.pings.append(await request.json())
            self._cond.notify_all()
        return web.json_response({})

    # --- reading what arrived -------------------------------------------------------------

    def snapshot(self) -> list[Delivery]:
        with self._cond:
            return list(self.deliveries)

    def wait_for(
        self, predicate: Callable[[list[Delivery]], bool], timeout: float = 30.0
    ) -> list[Delivery]:
        """Block until ``predicate(deliveries)`` holds; AssertionError with what arrived if not."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.deliveries), timeout):
                raise AssertionError(
                    f"appservice receiver: condition not met within {timeout}s; "
                    f"{len(self.deliveries)} deliveries: "
                    + json.dumps([(d.txn_id, d.status, _brief(d)) for d in self.deliveries])[-3000:]
                )
            return list(self.deliveries)

    async def until(
        self, predicate: Callable[[list[Delivery]], bool], timeout: float = 30.0
    ) -> list[Delivery]:
        return await asyncio.to_thread(self.wait_for, predicate, timeout)

    def acked_events(self) -> list[dict[str, Any]]:
        """Events of transactions answered 200, first acknowledgement of each txn id only, in
        arrival order."""
        seen: set[str] = set()
        events: list[dict[str, Any]] = []
        for delivery in self.snapshot():
            if delivery.status == 200 and delivery.txn_id not in seen:
                seen.add(delivery.txn_id)
                events.extend(delivery.events)
        return events

    def conflicting_txn_ids(self) -> dict[str, int]:
        """Transaction ids that arrived more than once with different bodies (must be empty)."""
        bodies: dict[str, set[str]] = {}
        for delivery in self.snapshot():
            bodies.setdefault(delivery.txn_id, set()).add(
                json.dumps(delivery.content, sort_keys=True)
            )
        return {txn: len(found) for txn, found in bodies.items() if len(found) > 1}


def event_ids(deliveries: list[Delivery], status: int | None = 200) -> list[str]:
    """Event ids in arrival order over deliveries answered ``status`` (any if None)."""
    return [
        event["event_id"]
        for delivery in deliveries
        if status is None or delivery.status == status
        for event in delivery.events
    ]


def _brief(delivery: Delivery) -> list[str]:
    return [f"{e.get('type')}:{e.get('event_id', '')[:12]}" for e in delivery.events]

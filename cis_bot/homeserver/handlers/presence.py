"""Presence (Synapse's PresenceHandler, simplified to one server and no federation).

A user is ``online`` while their clients sync with ``set_presence=online`` (the default), goes
``unavailable`` after ``idle_after_s`` without activity and ``offline`` ``offline_after_s``
after their last sync ends; ``PUT /presence/{user}/status`` sets a state and message outright.
Changes take positions in the global stream and reach, through ``/sync``, every user who shares
a room with the changed one. Disabled (``enabled=False``), it answers as Synapse does with
``presence.enabled: false``: everyone offline, nothing in ``/sync``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.homeserver.errors import bad_request, forbidden

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.devices import DeviceHandler
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.storage.presence import PresenceRow
    from cis_bot.homeserver.storage.store import Store

ONLINE = "online"
UNAVAILABLE = "unavailable"
OFFLINE = "offline"
STATES = (ONLINE, UNAVAILABLE, OFFLINE)
LAST_ACTIVE_GRANULARITY_MS = 60_000  # "currently_active" within this much of the last activity


def now_ms() -> int:
    return int(time.time() * 1000)


@attrs.frozen
class Presence:
    state: str = OFFLINE
    status_msg: str | None = None
    last_active_ts: int = 0
    currently_active: bool = False

    def content(self, now: int) -> dict[str, Any]:
        """Synapse's format_user_presence_state."""
        body: dict[str, Any] = {"presence": self.state}
        if self.last_active_ts:
            body["last_active_ago"] = now - self.last_active_ts
        if self.status_msg:
            body["status_msg"] = self.status_msg
        if self.state == ONLINE:
            body["currently_active"] = self.currently_active
        return body


def _from_row(row: PresenceRow) -> Presence:
    return Presence(row.state, row.status_msg, row.last_active_ts, row.currently_active)


class PresenceHandler:
    def __init__(
        self,
        *,
        store: Store,
        devices: DeviceHandler,
        notifier: Notifier,
        enabled: bool = True,
        offline_after_s: float = 30.0,
        idle_after_s: float = 300.0,
        check_every_s: float = 5.0,
    ) -> None:
        self.store = store
        self.devices = devices
        self.notifier = notifier
        self.enabled = enabled
        self.offline_after_ms = int(offline_after_s * 1000)
        self.idle_after_ms = int(idle_after_s * 1000)
        self.check_every_s = check_every_s
        self._syncing: dict[str, int] = {}  # user -> syncs in progress
        self._last_sync: dict[str, int] = {}  # user -> ms of their last sync's end
        self._timer: asyncio.TimerHandle | None = None
        # Every /sync reads presence: the rows read so far, and the newest change's position,
        # so that a sync with nothing new to say costs no query.
        self._rows: dict[str, PresenceRow | None] = {}
        self._last_change: int | None = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def current(self, user_id: str) -> Presence:
        row = self._row(user_id)
        return Presence() if row is None else _from_row(row)

    def _row(self, user_id: str) -> PresenceRow | None:
        if user_id not in self._rows:
            self._rows[user_id] = self.store.get_presence(user_id)
        return self._rows[user_id]

    def _newest_change(self) -> int:
        if self._last_change is None:
            self._last_change = self.store.presence_newest_stream()
        return self._last_change

    # --- what clients do ------------------------------------------------------------------

    def get_status(self, observer: str, user_id: str) -> dict[str, Any]:
        if not self.enabled:
            return {"presence": OFFLINE}
        if observer != user_id and user_id not in self.devices.shared_users(observer):
            raise forbidden("You are not allowed to see their presence.")
        return self.current(user_id).content(now_ms())

    def set_status(self, user_id: str, state: Any, status_msg: Any) -> None:
        if state not in STATES:
            raise bad_request("Invalid presence state")
        if not self.enabled:
            return
        previous = self.current(user_id)
        now = now_ms()
        active = state == ONLINE
        self._change(
            user_id,
            Presence(
                state=state,
                status_msg=status_msg if isinstance(status_msg, str) else None,
                last_active_ts=now if active else previous.last_active_ts,
                currently_active=active,
            ),
        )

    def sync_started(self, user_id: str, set_presence: str) -> None:
        """A /sync began; ``set_presence`` is its query parameter (default online)."""
        if not self.enabled:
            return
        self._syncing[user_id] = self._syncing.get(user_id, 0) + 1
        if set_presence == OFFLINE:
            return
        previous = self.current(user_id)
        now = now_ms()
        if set_presence == ONLINE:
            if (
                previous.state == UNAVAILABLE
                and previous.last_active_ts
                and (now - previous.last_active_ts < self.idle_after_ms)
            ):
                return  # the user said "away" themselves: a sync does not undo that
            if previous.state != ONLINE or not previous.currently_active:
                online = attrs.evolve(
                    previous, state=ONLINE, last_active_ts=now, currently_active=True
                )
                self._change(user_id, online)
        elif previous.state == OFFLINE:
            self._change(user_id, attrs.evolve(previous, state=UNAVAILABLE))
        self._schedule()

    def sync_ended(self, user_id: str) -> None:
        if not self.enabled:
            return
        left = self._syncing.get(user_id, 1) - 1
        if left > 0:
            self._syncing[user_id] = left
        else:
            self._syncing.pop(user_id, None)
        self._last_sync[user_id] = now_ms()

    # --- /sync ----------------------------------------------------------------------------

    def sync_events(
        self, user_id: str, since: int | None, upto: int, newly_seen: set[str]
    ) -> list[dict[str, Any]]:
        """Presence events for ``user_id``: everyone they share a room with who changed in
        (since, upto] (the initial sync: everyone not offline), and the users they newly
        share a room with."""
        if not self.enabled:
            return []
        if since is not None and since >= self._newest_change() and not newly_seen:
            return []  # no one's presence changed since: the common case
        now = now_ms()
        found: dict[str, Presence] = {}
        for other in sorted(self.devices.shared_users(user_id)):
            row = self._row(other)
            if row is None or row.stream > upto:
                continue
            if since is None:
                if row.state != OFFLINE:
                    found[other] = _from_row(row)
            elif row.stream > since or (other in newly_seen and other != user_id):
                found[other] = _from_row(row)
        return [
            {"type": "m.presence", "sender": other, "content": presence.content(now)}
            for other, presence in found.items()
        ]

    # --- timeouts -------------------------------------------------------------------------

    def _change(self, user_id: str, presence: Presence) -> None:
        row = self.store.set_presence(
            user_id,
            presence.state,
            presence.status_msg,
            presence.last_active_ts,
            presence.currently_active,
        )
        self._rows[user_id] = row
        self._last_change = row.stream
        self.notifier.notify_users(self.devices.shared_users(user_id))

    def _schedule(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.check_every_s, self._check_timeouts)

    def _check_timeouts(self) -> None:
        self._timer = None
        now = now_ms()
        for row in self.store.get_presence_not_offline():
            user_id = row.user_id
            presence = _from_row(row)
            if user_id in self._syncing:
                changed = presence
            elif user_id in self._last_sync and (
                now - self._last_sync[user_id] > self.offline_after_ms
            ):
                changed = attrs.evolve(presence, state=OFFLINE, currently_active=False)
                self._last_sync.pop(user_id, None)
            else:
                changed = presence
            if changed.state == ONLINE and now - changed.last_active_ts > self.idle_after_ms:
                changed = attrs.evolve(changed, state=UNAVAILABLE, currently_active=False)
            elif (
                changed.state == ONLINE
                and changed.currently_active
                and now - changed.last_active_ts > LAST_ACTIVE_GRANULARITY_MS
            ):
                changed = attrs.evolve(changed, currently_active=False)
            if changed != presence:
                self._change(user_id, changed)
        if self._syncing or self._last_sync:
            self._schedule()

"""Devices (Synapse's DeviceHandler): their lifecycle and the device-list stream that tells other
users' clients to fetch keys again (``device_lists`` in ``/sync``, ``/keys/changes``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import not_found

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.auth import AuthHandler
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.handlers.room_state import RoomStateHandler
    from cis_bot.homeserver.storage.store import Store


def device_json(
    user_id: str, device_id: str, name: str | None, seen: int | None, ip: str | None
) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "display_name": name,
        "last_seen_ip": ip,
        "last_seen_ts": seen,
        "user_id": user_id,
    }


class DeviceHandler:
    def __init__(
        self,
        *,
        store: Store,
        auth: AuthHandler,
        rooms: RoomStateHandler,
        notifier: Notifier,
    ) -> None:
        self.store = store
        self.auth = auth
        self.rooms = rooms
        self.notifier = notifier

    # --- devices --------------------------------------------------------------------------

    def devices(self, user_id: str) -> list[dict[str, Any]]:
        return [device_json(user_id, *row) for row in self.store.get_devices(user_id)]

    def device(self, user_id: str, device_id: str) -> dict[str, Any]:
        for row in self.store.get_devices(user_id):
            if row[0] == device_id:
                return device_json(user_id, *row)
        raise not_found("No device found")

    def device_created(self, user_id: str, device_id: str) -> None:
        """A login made a new device: others' clients should look at this user's devices."""
        self.notify_device_update(user_id)

    def rename(self, user_id: str, device_id: str, name: str | None) -> None:
        self.store.set_device_display_name(user_id, device_id, name)
        self.notify_device_update(user_id)

    def delete_devices(self, user_id: str, device_ids: list[str]) -> None:
        """Log the devices out and forget their keys and undelivered messages."""
        tokens: list[str] = []
        for device_id in device_ids:
            tokens += self.store.delete_device(user_id, device_id)
            self.store.delete_e2e_keys_by_device(user_id, device_id)
            self.store.delete_device_inbox(user_id, device_id)
        self.auth.forget_tokens(tokens)
        if device_ids:
            self.notify_device_update(user_id)

    def delete_all_devices(self, user_id: str) -> None:
        self.delete_devices(user_id, [row[0] for row in self.store.get_devices(user_id)])

    # --- the device-list stream -----------------------------------------------------------

    def shared_users(self, user_id: str) -> set[str]:
        """The users in rooms ``user_id`` is joined to, ``user_id`` included."""
        users = {user_id}
        for room_id in self.rooms.joined_rooms(user_id):
            room = self.rooms.get(room_id)
            if room is not None:
                users |= room.joined
        return users

    def notify_device_update(self, user_id: str, *, audience: str | None = None) -> None:
        """``user_id``'s devices or keys changed; ``audience``: tell only that user."""
        self.store.add_device_list_change(user_id, audience=audience)
        self.notifier.notify_users(
            [audience] if audience is not None else self.shared_users(user_id)
        )

    def changed_since(self, user_id: str, after: int, upto: int) -> list[str]:
        """Users whose device lists ``user_id`` should fetch again for changes in (after,
        upto] (key uploads, new or deleted devices; not membership changes)."""
        if after >= upto:
            return []
        changes = self.store.device_list_changes(after, upto)
        if not changes:
            return []
        shared = self.shared_users(user_id)
        changed: list[str] = []
        for changed_user, audience in changes:
            visible = audience == user_id if audience is not None else changed_user in shared
            if visible and changed_user not in changed:
                changed.append(changed_user)
        return changed

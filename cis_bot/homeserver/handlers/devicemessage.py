"""To-device messages (Synapse's DeviceMessageHandler): a device sends opaque content (olm
pre-key messages, key requests, verification steps) to other devices, which get it in their
``/sync`` until they sync past it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import structlog

from cis_bot.homeserver.errors import TOO_LARGE, MatrixError, bad_request
from cis_bot.homeserver.ids import split_id

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.storage.store import Store

log = structlog.get_logger(__name__)

MAX_MESSAGE_SIZE = 65536  # Synapse's MAX_TO_DEVICE_CONTENT_SIZE (its soft EDU limit)


class DeviceMessageHandler:
    def __init__(self, *, store: Store, notifier: Notifier, server_name: str) -> None:
        self.store = store
        self.notifier = notifier
        self.server_name = server_name

    def send(self, requester: Requester, message_type: str, messages: Any) -> None:
        if not isinstance(messages, dict) or not all(
            isinstance(by_device, dict) and all(isinstance(c, dict) for c in by_device.values())
            for by_device in messages.values()
        ):
            raise bad_request("messages must map user ids to device ids to objects")
        queued: list[tuple[str, str, dict[str, Any]]] = []
        for user_id, by_device in messages.items():
            try:
                _, server = split_id(user_id, "@")
            except ValueError:
                log.warning("to_device.invalid_user", user_id=user_id)
                continue
            if server != self.server_name:
                log.warning("to_device.remote_user_dropped", user_id=user_id)  # no federation
                continue
            known = [row[0] for row in self.store.get_devices(user_id)]
            for device_id, content in by_device.items():
                size = len(json.dumps(content, separators=(",", ":")).encode())
                if size > MAX_MESSAGE_SIZE:
                    raise MatrixError(
                        413,
                        TOO_LARGE,
                        f"To-device message for {user_id}:{device_id} is too large to send "
                        f"({size} > {MAX_MESSAGE_SIZE})",
                    )
                message = {"content": content, "type": message_type, "sender": requester.user_id}
                targets = known if device_id == "*" else [device_id]
                queued += [(user_id, target, message) for target in targets]
        if queued:
            self.store.add_to_device_messages(queued)
            self.notifier.notify_users({user_id for user_id, _, _ in queued})

    def for_sync(
        self, user_id: str, device_id: str | None, since: int | None, upto: int
    ) -> list[dict[str, Any]]:
        """The device's messages; those at or before ``since`` were delivered by the sync that
        handed out that token, so they go."""
        if device_id is None:
            return []
        if since is not None:
            self.store.delete_to_device_messages(user_id, device_id, since)
        return self.store.get_to_device_messages(user_id, device_id, upto)

"""Server-side key backup (Synapse's E2eRoomKeysHandler): versions, and encrypted room keys
merged into the current version (a key replaces a stored one only when it is better: verified,
or earlier first message index, or fewer forwards)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import INVALID_PARAM, MatrixError, bad_request, not_found

if TYPE_CHECKING:
    from cis_bot.homeserver.storage.e2e_room_keys import BackupVersion
    from cis_bot.homeserver.storage.store import Store

WRONG_VERSION = "M_WRONG_ROOM_KEYS_VERSION"
KEY_FIELDS = ("first_message_index", "forwarded_count", "is_verified", "session_data")


def _better(current: dict[str, Any], new: dict[str, Any]) -> bool:
    if new["is_verified"] and not current["is_verified"]:
        return True
    if new["first_message_index"] < current["first_message_index"]:
        return True
    return bool(new["forwarded_count"] < current["forwarded_count"])


class RoomKeyBackupHandler:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _version(self, user_id: str, version: str | None, message: str) -> BackupVersion:
        found = self.store.get_backup_version(user_id, version)
        if found is None:
            raise not_found(message)
        return found

    def version_info(self, user_id: str, version: str | None) -> dict[str, Any]:
        found = self._version(user_id, version, "No backup found")
        return {
            "algorithm": found.algorithm,
            "auth_data": found.auth_data,
            "version": str(found.version),
            "etag": str(found.etag),
            "count": self.store.count_backup_keys(user_id, found.version),
        }

    def create_version(self, user_id: str, body: dict[str, Any]) -> str:
        algorithm, auth_data = self._check_info(body)
        return str(self.store.create_backup_version(user_id, algorithm, auth_data))

    def update_version(self, user_id: str, version: str, body: dict[str, Any]) -> None:
        if "version" in body and body["version"] != version:
            raise bad_request("Version in body does not match", INVALID_PARAM)
        algorithm, auth_data = self._check_info(body)
        found = self._version(user_id, version, "Unknown backup version")
        if found.algorithm != algorithm:
            raise bad_request("Algorithm does not match", INVALID_PARAM)
        self.store.update_backup_version(user_id, found.version, auth_data=auth_data)

    def delete_version(self, user_id: str, version: str | None) -> None:
        found = self._version(user_id, version, "Unknown backup version")
        self.store.delete_backup_version(user_id, found.version)

    @staticmethod
    def _check_info(body: dict[str, Any]) -> tuple[str, Any]:
        algorithm = body.get("algorithm")
        if not isinstance(algorithm, str) or "auth_data" not in body:
            raise bad_request("Missing or invalid algorithm or auth_data", INVALID_PARAM)
        return algorithm, body["auth_data"]

    # --- keys -----------------------------------------------------------------------------

    def get_keys(
        self, user_id: str, version: str, room_id: str | None, session_id: str | None
    ) -> dict[str, Any]:
        found = self._version(user_id, version, "Unknown backup version")
        keys = self.store.get_backup_keys(user_id, found.version, room_id, session_id)
        if session_id is not None:
            assert room_id is not None
            key = keys.get(room_id, {}).get(session_id)
            if key is None:
                raise not_found("No room_keys found")
            return key
        if room_id is not None:
            return {"sessions": keys.get(room_id, {})}
        return {"rooms": {r: {"sessions": s} for r, s in keys.items()}}

    def upload_keys(self, user_id: str, version: str, rooms: Any) -> dict[str, Any]:
        current = self.store.get_backup_version(user_id, None)
        if current is None:
            raise not_found(f"Version '{version}' not found")
        if str(current.version) != version:
            asked = self.store.get_backup_version(user_id, version)
            if asked is None:
                raise not_found(f"Version '{version}' not found")
            # Synapse 1.163 names the version asked for as "current_version"; so do we.
            raise MatrixError(
                403, WRONG_VERSION, "Wrong room_keys version", current_version=str(asked.version)
            )
        if not isinstance(rooms, dict):
            raise bad_request("rooms must be an object", INVALID_PARAM)
        existing = self.store.get_backup_keys(user_id, current.version, None, None)
        changed: list[tuple[str, str, dict[str, Any]]] = []
        for room_id, room in rooms.items():
            sessions = room.get("sessions") if isinstance(room, dict) else None
            if not isinstance(sessions, dict):
                raise bad_request(f"sessions of room {room_id} must be an object", INVALID_PARAM)
            for session_id, key in sessions.items():
                self._check_key(room_id, session_id, key)
                stored = existing.get(room_id, {}).get(session_id)
                if stored is None or _better(stored, key):
                    changed.append((room_id, session_id, key))
        etag = current.etag
        if changed:
            self.store.put_backup_keys(user_id, current.version, changed)
            etag += 1
            self.store.update_backup_version(user_id, current.version, etag=etag)
        return {"etag": str(etag), "count": self.store.count_backup_keys(user_id, current.version)}

    @staticmethod
    def _check_key(room_id: str, session_id: str, key: Any) -> None:
        if not isinstance(key, dict) or any(field not in key for field in KEY_FIELDS):
            raise bad_request(f"Invalid key for session {session_id} in room {room_id}")
        if not isinstance(key["is_verified"], bool):
            raise bad_request(
                f"is_verified must be a boolean in keys for session {session_id} inroom {room_id}",
                INVALID_PARAM,
            )
        for field in ("first_message_index", "forwarded_count"):
            if not isinstance(key[field], int) or isinstance(key[field], bool):
                raise bad_request(f"{field} must be an integer", INVALID_PARAM)

    def delete_keys(
        self, user_id: str, version: str, room_id: str | None, session_id: str | None
    ) -> dict[str, Any]:
        found = self._version(user_id, version, "Unknown backup version")
        self.store.delete_backup_keys(user_id, found.version, room_id, session_id)
        etag = found.etag + 1
        self.store.update_backup_version(user_id, found.version, etag=etag)
        return {"etag": str(etag), "count": self.store.count_backup_keys(user_id, found.version)}

"""Room aliases: resolving, creating and deleting them, and appservices' exclusive claims on
them (Synapse's DirectoryHandler)."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

from cis_bot.homeserver import events as ev
from cis_bot.homeserver.errors import INVALID_PARAM, NOT_FOUND, MatrixError, bad_request, forbidden
from cis_bot.homeserver.handlers import event_auth
from cis_bot.homeserver.ids import split_id

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cis_bot.homeserver.appservice.registration import Appservice
    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.room_state import RoomStateHandler
    from cis_bot.homeserver.storage.store import Store


class DirectoryHandler:
    def __init__(
        self,
        *,
        store: Store,
        rooms: RoomStateHandler,
        server_name: str,
        appservices: Sequence[Appservice] = (),
    ) -> None:
        self.store = store
        self.rooms = rooms
        self.server_name = server_name
        self.appservices = list(appservices)

    def resolve_room(self, room_or_alias: str) -> str:
        if room_or_alias.startswith("!"):
            return room_or_alias
        if room_or_alias.startswith("#"):
            try:
                split_id(room_or_alias, "#")
            except ValueError:
                raise bad_request(f"Invalid room alias {room_or_alias}", INVALID_PARAM) from None
            mapping = self.store.get_alias(room_or_alias)
            if mapping is None:
                raise MatrixError(404, NOT_FOUND, f"Room alias {room_or_alias} not found")
            return mapping[0]
        raise bad_request(f"{room_or_alias} was not legal room ID or room alias", INVALID_PARAM)

    def alias_exclusive_to_other(self, alias: str, user_id: str) -> bool:
        """Synapse's can_modify_alias, negated: an appservice other than the user holds an
        exclusive claim on the alias."""
        for service in self.appservices:
            if not service.is_alias_in_namespace(alias):
                continue
            if service.sender == user_id:
                return False
            if service.is_exclusive_alias(alias):
                return True
        return False

    def check_alias_syntax(self, alias: str) -> tuple[str, str]:
        try:
            localpart, server = split_id(alias, "#")
        except ValueError:
            raise bad_request("Room alias invalid", INVALID_PARAM) from None
        return localpart, server

    def create_alias(
        self,
        requester: Requester,
        alias: str,
        room_id: str,
        *,
        is_admin: bool,
        check_membership: bool = True,
    ) -> None:
        """Synapse's DirectoryHandler.create_association."""
        localpart, server = self.check_alias_syntax(alias)
        if len(alias) > 255:
            raise bad_request("Can't create aliases longer than 255 characters", INVALID_PARAM)
        service = requester.appservice
        if service is not None:
            if not service.is_alias_in_namespace(alias):
                raise MatrixError(
                    400,
                    "M_EXCLUSIVE",
                    "This application service has not reserved this kind of alias.",
                )
        else:
            if check_membership and not is_admin:
                room = self.rooms.get(room_id)
                if room is None or room.membership(requester.user_id) != "join":
                    raise forbidden("You must be in the room to create an alias for it")
            if self.alias_exclusive_to_other(alias, requester.user_id):
                raise MatrixError(
                    400, "M_EXCLUSIVE", "This alias is reserved by an application service."
                )
        if any(ch in localpart for ch in string.whitespace):
            raise bad_request("Invalid characters in room alias")
        if server != self.server_name:
            raise bad_request("Room alias must be local")
        if not self.store.create_alias(alias, room_id, requester.user_id):
            raise MatrixError(409, "M_UNKNOWN", f"Room alias {alias} already exists")

    def delete_alias(self, requester: Requester, alias: str, is_admin: bool) -> None:
        self.check_alias_syntax(alias)
        service = requester.appservice
        if service is not None:
            if not service.is_alias_in_namespace(alias):
                raise MatrixError(
                    400,
                    "M_EXCLUSIVE",
                    "This application service has not reserved this kind of alias",
                )
            if self.store.get_alias(alias) is None:
                raise MatrixError(404, NOT_FOUND, "Unknown room alias")
            self.store.delete_alias(alias)
            return
        mapping = self.store.get_alias(alias)
        if mapping is None:
            raise MatrixError(404, NOT_FOUND, "Unknown room alias")
        room_id, creator = mapping
        allowed = is_admin or creator == requester.user_id
        if not allowed:
            room = self.rooms.get(room_id)
            if room is not None and room.membership(requester.user_id) == "join":
                level = event_auth.user_power_level(requester.user_id, room.state, room.version)
                allowed = level >= event_auth.send_level(ev.CANONICAL_ALIAS, "", room.state)
        if not allowed:
            raise forbidden("You don't have permission to delete the alias.")
        if self.alias_exclusive_to_other(alias, requester.user_id):
            raise MatrixError(
                400, "M_EXCLUSIVE", "This alias is reserved by an application service."
            )
        self.store.delete_alias(alias)

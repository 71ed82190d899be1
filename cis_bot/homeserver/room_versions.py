"""The room versions we create, and what changes between them (synapse/api/room_versions.py).

Synapse 1.163 creates version 12 rooms by default, so we do too; 10 and 11 can be asked for.
"""

from __future__ import annotations

import attrs

CREATOR_POWER_LEVEL = 2**53  # Synapse's stand-in for the infinite power of v12 creators


@attrs.frozen
class RoomVersion:
    identifier: str
    implicit_room_creator: bool  # v11+: no "creator" in m.room.create, the sender is it
    updated_redaction_rules: bool  # v11+: "redacts" moves into content, new redaction rules
    creator_power: bool  # v12 (MSC4289): creators have infinite power, not in PL users
    room_id_from_create: bool  # v12 (MSC4291): room id = hash of the create event


ROOM_VERSIONS = {
    "10": RoomVersion("10", False, False, False, False),
    "11": RoomVersion("11", True, True, False, False),
    "12": RoomVersion("12", True, True, True, True),
}
DEFAULT_ROOM_VERSION = "12"

# /capabilities advertises only what we can create (Synapse also lists 1-9 and unstable ones).
ADVERTISED_ROOM_VERSIONS = {v: "stable" for v in ROOM_VERSIONS}


def get(identifier: str) -> RoomVersion:
    return ROOM_VERSIONS.get(identifier, ROOM_VERSIONS["10"])

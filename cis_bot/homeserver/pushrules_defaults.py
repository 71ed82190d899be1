"""Synapse's default push rules (what ``GET /pushrules/`` answers for a new account), as
served by Synapse 1.163. ``__USER_ID__`` and ``__LOCALPART__`` are filled in per user."""

from __future__ import annotations

from typing import Any

DEFAULT_RULES: dict[str, list[dict[str, Any]]] = {
    "override": [
        {
            "conditions": [],
            "actions": [],
            "rule_id": ".m.rule.master",
            "default": True,
            "enabled": False,
        },
        {
            "conditions": [
                {"kind": "event_match", "key": "content.msgtype", "pattern": "m.notice"}
            ],
            "actions": [],
            "rule_id": ".m.rule.suppress_notices",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {"kind": "event_match", "key": "type", "pattern": "m.room.member"},
                {"kind": "event_match", "key": "content.membership", "pattern": "invite"},
                {"kind": "event_match", "key": "state_key", "pattern": "__USER_ID__"},
            ],
            "actions": [
                "notify",
                {"set_tweak": "highlight", "value": False},
                {"set_tweak": "sound", "value": "default"},
            ],
            "rule_id": ".m.rule.invite_for_me",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.room.member"}],
            "actions": [],
            "rule_id": ".m.rule.member_event",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {
                    "kind": "event_property_contains",
                    "key": "content.m\\.mentions.user_ids",
                    "value": "__USER_ID__",
                }
            ],
            "actions": [
                "notify",
                {"set_tweak": "highlight"},
                {"set_tweak": "sound", "value": "default"},
            ],
            "rule_id": ".m.rule.is_user_mention",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [{"kind": "contains_display_name"}],
            "actions": [
                "notify",
                {"set_tweak": "highlight"},
                {"set_tweak": "sound", "value": "default"},
            ],
            "rule_id": ".m.rule.contains_display_name",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {"kind": "event_property_is", "key": "content.m\\.mentions.room", "value": True},
                {"kind": "sender_notification_permission", "key": "room"},
            ],
            "actions": ["notify", {"set_tweak": "highlight"}],
            "rule_id": ".m.rule.is_room_mention",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {"kind": "sender_notification_permission", "key": "room"},
                {"kind": "event_match", "key": "content.body", "pattern": "@room"},
            ],
            "actions": ["notify", {"set_tweak": "highlight"}],
            "rule_id": ".m.rule.roomnotif",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {"kind": "event_match", "key": "type", "pattern": "m.room.tombstone"},
                {"kind": "event_match", "key": "state_key", "pattern": ""},
            ],
            "actions": ["notify", {"set_tweak": "highlight"}],
            "rule_id": ".m.rule.tombstone",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.reaction"}],
            "actions": [],
            "rule_id": ".m.rule.reaction",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {"kind": "event_match", "key": "type", "pattern": "m.room.server_acl"},
                {"kind": "event_match", "key": "state_key", "pattern": ""},
            ],
            "actions": [],
            "rule_id": ".m.rule.room.server_acl",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {
                    "kind": "event_property_is",
                    "key": "content.m\\.relates_to.rel_type",
                    "value": "m.replace",
                }
            ],
            "actions": [],
            "rule_id": ".m.rule.suppress_edits",
            "default": True,
            "enabled": True,
        },
    ],
    "content": [
        {
            "actions": [
                "notify",
                {"set_tweak": "highlight"},
                {"set_tweak": "sound", "value": "default"},
            ],
            "rule_id": ".m.rule.contains_user_name",
            "default": True,
            "pattern": "__LOCALPART__",
            "enabled": True,
        }
    ],
    "room": [],
    "sender": [],
    "underride": [
        {
            "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.call.invite"}],
            "actions": [
                "notify",
                {"set_tweak": "sound", "value": "ring"},
                {"set_tweak": "highlight", "value": False},
            ],
            "rule_id": ".m.rule.call",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {"kind": "event_match", "key": "type", "pattern": "m.room.encrypted"},
                {"kind": "room_member_count", "is": "2"},
            ],
            "actions": [
                "notify",
                {"set_tweak": "sound", "value": "default"},
                {"set_tweak": "highlight", "value": False},
            ],
            "rule_id": ".m.rule.encrypted_room_one_to_one",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {"kind": "event_match", "key": "type", "pattern": "m.room.message"},
                {"kind": "room_member_count", "is": "2"},
            ],
            "actions": [
                "notify",
                {"set_tweak": "sound", "value": "default"},
                {"set_tweak": "highlight", "value": False},
            ],
            "rule_id": ".m.rule.room_one_to_one",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.room.message"}],
            "actions": ["notify", {"set_tweak": "highlight", "value": False}],
            "rule_id": ".m.rule.message",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.room.encrypted"}],
            "actions": ["notify", {"set_tweak": "highlight", "value": False}],
            "rule_id": ".m.rule.encrypted",
            "default": True,
            "enabled": True,
        },
        {
            "conditions": [
                {"kind": "event_match", "key": "type", "pattern": "im.vector.modular.widgets"},
                {"kind": "event_match", "key": "content.type", "pattern": "jitsi"},
                {"kind": "event_match", "key": "state_key", "pattern": "*"},
            ],
            "actions": ["notify", {"set_tweak": "highlight", "value": False}],
            "rule_id": ".im.vector.jitsi",
            "default": True,
            "enabled": True,
        },
    ],
    "postcontent": [],
}

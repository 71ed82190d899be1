"""Push rules: Synapse's defaults plus each user's changes. Nothing is pushed anywhere (no push
gateways here); clients such as Element only need the rules to read and edit.

A change is also written as the ``m.push_rules`` account data, which is how it reaches
``/sync`` (Synapse sends push rules there too).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import MatrixError, bad_request, not_found
from cis_bot.homeserver.pushrules_defaults import DEFAULT_RULES

if TYPE_CHECKING:
    from cis_bot.homeserver.handlers.notifications import NotificationCounts
    from cis_bot.homeserver.handlers.notifier import Notifier
    from cis_bot.homeserver.storage.store import Store

KINDS = ("override", "content", "room", "sender", "underride", "postcontent")


def _fill(value: Any, user_id: str, localpart: str) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, user_id, localpart) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, user_id, localpart) for v in value]
    if value == "__USER_ID__":
        return user_id
    if value == "__LOCALPART__":
        return localpart
    return value


class PushRulesHandler:
    def __init__(self, store: Store, notifier: Notifier, counts: NotificationCounts) -> None:
        self.store = store
        self.notifier = notifier
        self.counts = counts

    def rules_for(self, user_id: str) -> dict[str, Any]:
        localpart = user_id[1:].split(":", 1)[0]
        rules: dict[str, list[dict[str, Any]]] = {
            kind: copy.deepcopy(_fill(DEFAULT_RULES.get(kind, []), user_id, localpart))
            for kind in KINDS
        }
        user_rules: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for kind, rule_id, rule, enabled, actions in self.store.push_rule_overrides(user_id):
            if kind not in rules:
                continue
            if rule_id.startswith("."):
                for existing in rules[kind]:
                    if existing["rule_id"] == rule_id:
                        if enabled is not None:
                            existing["enabled"] = enabled
                        if actions is not None:
                            existing["actions"] = actions
                continue
            entry = dict(rule)
            entry["rule_id"] = rule_id
            entry["default"] = False
            entry["enabled"] = True if enabled is None else enabled
            if actions is not None:
                entry["actions"] = actions
            user_rules[kind].append(entry)
        for kind in KINDS:
            if not user_rules[kind]:
                continue
            if kind == "override":
                rules[kind][1:1] = user_rules[kind]  # after .m.rule.master
            else:
                rules[kind][0:0] = user_rules[kind]
        return {"global": rules}

    def find(self, user_id: str, kind: str, rule_id: str) -> dict[str, Any]:
        if kind not in KINDS:
            raise bad_request(f"Unknown push rule kind {kind}", "M_INVALID_PARAM")
        for rule in self.rules_for(user_id)["global"][kind]:
            if rule["rule_id"] == rule_id:
                return dict(rule)
        raise not_found("Push rule not found")

    def _changed(self, user_id: str) -> None:
        self.store.set_account_data(user_id, "", "m.push_rules", self.rules_for(user_id))
        self.counts.on_rules_changed(user_id)
        self.notifier.notify_users([user_id])

    def set_attribute(self, user_id: str, kind: str, rule_id: str, attr: str, body: Any) -> None:
        self.find(user_id, kind, rule_id)
        if attr == "enabled":
            value = body.get("enabled") if isinstance(body, dict) else None
            if not isinstance(value, bool):
                raise bad_request("Missing/bad 'enabled'", "M_BAD_JSON")
            self.store.set_push_rule(user_id, kind, rule_id, enabled=value)
        elif attr == "actions":
            value = body.get("actions") if isinstance(body, dict) else None
            if not isinstance(value, list):
                raise bad_request("Missing/bad 'actions'", "M_BAD_JSON")
            self.store.set_push_rule(user_id, kind, rule_id, actions=value)
        else:
            raise MatrixError(400, "M_UNRECOGNIZED", "Unrecognised request")
        self._changed(user_id)

    def put_rule(self, user_id: str, kind: str, rule_id: str, body: Any) -> None:
        if kind not in KINDS or kind == "postcontent":
            raise bad_request(f"Unknown push rule kind {kind}", "M_INVALID_PARAM")
        if rule_id.startswith("."):
            raise bad_request("cannot add new rule_ids that start with '.'", "M_UNKNOWN")
        if not isinstance(body, dict) or not isinstance(body.get("actions"), list):
            raise bad_request("push rule actions must be a list", "M_BAD_JSON")
        rule: dict[str, Any] = {"actions": body["actions"]}
        if kind == "content":
            if not isinstance(body.get("pattern"), str):
                raise bad_request("Missing 'pattern'", "M_MISSING_PARAM")
            rule["pattern"] = body["pattern"]
        elif kind in ("room", "sender"):
            rule["conditions"] = [
                {
                    "kind": "event_match",
                    "key": "room_id" if kind == "room" else "user_id",
                    "pattern": rule_id,
                }
            ]
        else:
            conditions = body.get("conditions", [])
            if not isinstance(conditions, list):
                raise bad_request("push rule conditions must be a list", "M_BAD_JSON")
            rule["conditions"] = conditions
        self.store.set_push_rule(user_id, kind, rule_id, rule=rule, actions=body["actions"])
        self._changed(user_id)

    def delete_rule(self, user_id: str, kind: str, rule_id: str) -> None:
        if rule_id.startswith("."):
            raise bad_request("Cannot delete a server-default push rule", "M_UNKNOWN")
        if not self.store.delete_push_rule(user_id, kind, rule_id):
            raise not_found("Push rule not found")
        self._changed(user_id)

"""Users' push rules: their own and their overrides of the defaults (Synapse's
PushRuleStore)."""

from __future__ import annotations

import json
from typing import Any

from cis_bot.homeserver.storage.database import StoreBase


class PushRuleStore(StoreBase):
    def push_rule_overrides(self, user_id: str) -> list[tuple[str, str, dict[str, Any], Any, Any]]:
        return [
            (
                r[0],
                r[1],
                json.loads(r[2]),
                None if r[3] is None else bool(r[3]),
                None if r[4] is None else json.loads(r[4]),
            )
            for r in self.conn.execute(
                "SELECT kind, rule_id, rule, enabled, actions FROM push_rules WHERE user_id = ?"
                " ORDER BY priority",
                (user_id,),
            )
        ]

    def set_push_rule(
        self,
        user_id: str,
        kind: str,
        rule_id: str,
        *,
        rule: dict[str, Any] | None = None,
        enabled: bool | None = None,
        actions: list[Any] | None = None,
    ) -> None:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT rule, enabled, actions, priority FROM push_rules"
                " WHERE user_id = ? AND kind = ? AND rule_id = ?",
                (user_id, kind, rule_id),
            ).fetchone()
            current: tuple[dict[str, Any], Any, Any, int]
            if row is None:
                priority_row = conn.execute(
                    "SELECT COALESCE(MAX(priority), 0) + 1 FROM push_rules WHERE user_id = ?",
                    (user_id,),
                ).fetchone()
                current = ({}, None, None, int(priority_row[0]))
            else:
                current = (json.loads(row[0]), row[1], row[2], row[3])
            new_rule = rule if rule is not None else current[0]
            new_enabled = current[1] if enabled is None else int(enabled)
            new_actions = current[2] if actions is None else json.dumps(actions)
            conn.execute(
                "INSERT OR REPLACE INTO push_rules (user_id, kind, rule_id, rule, enabled,"
                " actions, priority) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    user_id,
                    kind,
                    rule_id,
                    json.dumps(new_rule),
                    new_enabled,
                    new_actions,
                    current[3],
                ),
            )

    def delete_push_rule(self, user_id: str, kind: str, rule_id: str) -> bool:
        with self.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM push_rules WHERE user_id = ? AND kind = ? AND rule_id = ?",
                (user_id, kind, rule_id),
            )
        return cursor.rowcount > 0

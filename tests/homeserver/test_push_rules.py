"""Default push rules (Complement: push_test): clients such as Element read them at start-up,
so the embedded server must offer the same rule set as Synapse."""

from __future__ import annotations

from typing import Any

from tests.homeserver.conftest import Pair
from tests.support.client import CS
from tests.support.fixtures import Users


async def test_push_rules(users: Users) -> None:
    alice = await users.new("alice")
    rules = await alice.ok("GET", f"{CS}/pushrules/")
    assert set(rules["global"]) >= {"override", "content", "room", "sender", "underride"}
    master = next(r for r in rules["global"]["override"] if r["rule_id"] == ".m.rule.master")
    assert master["enabled"] is False and master["default"] is True
    (await users.anonymous().request("GET", f"{CS}/pushrules/")).expect(401, "M_MISSING_TOKEN")


def rule_ids(rules: Any) -> dict[str, list[str]]:
    return {kind: [r["rule_id"] for r in entries] for kind, entries in rules["global"].items()}


async def test_push_rules_match_synapse(pair: Pair) -> None:
    answers = {}
    for name, users in pair.each():
        alice = await users.new("alice")
        answers[name] = await alice.ok("GET", f"{CS}/pushrules/")
    # The same default rules, in the same order, with the same actions; user ids differ.
    assert rule_ids(answers["embedded"]) == rule_ids(answers["synapse"])
    for kind, entries in answers["synapse"]["global"].items():
        for synapse_rule, embedded_rule in zip(
            entries, answers["embedded"]["global"][kind], strict=True
        ):
            assert embedded_rule["actions"] == synapse_rule["actions"], synapse_rule["rule_id"]
            assert embedded_rule["enabled"] == synapse_rule["enabled"], synapse_rule["rule_id"]

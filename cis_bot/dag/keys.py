"""The values of CIS's keys that are tables or lists of their own: a task's ``level`` and
``agent_config``, the DAG's ``env``, ``[[dag.todo]]`` and ``[dag.adaptive]``; ``dag/load.py`` reads
the rest."""

from __future__ import annotations

import re
from collections.abc import Mapping

from cis_bot.dag.skills import Skill
from cis_bot.dag.spec import (
    DEFAULT_RECOMMENDED_TIMEOUT_SECS,
    AgentConfig,
    DefaultAction,
    Level,
    LevelKind,
    TodoItem,
)
from cis_bot.validation import Table, type_name

_LEVEL_KEYS: Mapping[LevelKind, frozenset[str]] = {
    LevelKind.MECHANICAL: frozenset({"type", "retry"}),
    LevelKind.RECOMMENDED: frozenset(
        {"type", "retry", "timeout", "timeout_secs", "default_action"}
    ),
    LevelKind.CONFIRMED: frozenset({"type", "retry"}),
    LevelKind.ARBITRATED: frozenset({"type", "retry", "stakeholders"}),
}
_AGENT_CONFIG_KEYS = frozenset(
    {"model", "max_tokens", "temperature", "timeout_secs", "provider_type"}
)
_TODO_KEYS = frozenset({"id", "description", "priority", "status", "assignee"})
_MATRIX_USER_ID = re.compile(r"@[^\s:]+:\S+")
#: A stakeholder given by name: a Matrix localpart, resolved on the coordinator's homeserver.
_USER_NAME = re.compile(r"[a-z0-9._=/+-]+")


def read_env(table: Table, key: str) -> dict[str, str]:
    env = table.string_map(key) or {}
    for var in env:
        if "=" in var:
            table.fail(f"environment variable name {var!r} contains '='", f"{key}.{var}")
    return env


def read_dag_env(dag: Table, notes: list[str]) -> dict[str, str]:
    """``[dag.env]``. CIS's cross_compile_pipeline writes ``dag.env = {...}`` inside ``[dag]``,
    which TOML reads as ``dag.dag.env`` (and CIS then ignores): read it as the ``[dag.env]`` it
    was meant to be, and say so."""
    env = read_env(dag, "env")
    nested = dag.table("dag") if dag.path == "dag" else None
    if nested is not None:
        nested.reject_unknown({"env"})
        for var, value in read_env(nested, "env").items():
            env.setdefault(var, value)
        notes.append(
            "'dag.env = ...' inside [dag] is the key dag.dag.env; it was read as [dag.env] "
            "(write [dag.env] to say so)"
        )
    return env


def read_todo(dag: Table) -> tuple[TodoItem, ...]:
    items = []
    for table in dag.table_list("todo") or []:
        table.reject_unknown(_TODO_KEYS)
        items.append(
            TodoItem(
                id=table.string("id", nonempty=True),
                description=table.string("description", ""),
                priority=table.opt_integer("priority"),
                status=table.string("status", ""),
                assignee=table.string("assignee", ""),
            )
        )
    return tuple(items)


def read_adaptive(dag: Table) -> tuple[str, ...]:
    adaptive = dag.table("adaptive")
    if adaptive is None:
        return ()
    adaptive.reject_unknown({"rules"})
    return adaptive.string_list("rules") or ()


def read_agent_config(t: Table, skill: Skill | None) -> AgentConfig | None:
    """The task's ``agent_config`` over its skill's ``[agent]`` model and max_tokens."""
    base = AgentConfig(
        model=skill.model if skill else None, max_tokens=skill.max_tokens if skill else None
    )
    table = t.table("agent_config")
    if table is None:
        return None if base == AgentConfig() else base
    table.reject_unknown(
        _AGENT_CONFIG_KEYS,
        unsupported={
            key: f"agent_config.{key}: credentials and endpoints belong in the agent profile's "
            "env ([agents.NAME] env in the config), not in the DAG"
            for key in ("api_key", "base_url")
        },
    )
    model = table.opt_string("model", nonempty=True)
    max_tokens = table.opt_integer("max_tokens", minimum=1)
    return AgentConfig(
        model=model if model is not None else base.model,
        max_tokens=max_tokens if max_tokens is not None else base.max_tokens,
        temperature=table.opt_number("temperature", minimum=0),
        timeout_secs=table.opt_number("timeout_secs", positive=True),
        provider_type=table.opt_string("provider_type", nonempty=True),
    )


_ARBITRATED_EXAMPLE = 'level = { type = "arbitrated", stakeholders = ["@alice:example.org"] }'


def read_level(t: Table) -> Level:
    if "level" not in t:
        return Level()
    raw = t.data["level"]
    if isinstance(raw, str):
        kind = t.enum_value("level", raw, LevelKind)
        if kind is LevelKind.RECOMMENDED:
            return Level(kind=kind, timeout_secs=DEFAULT_RECOMMENDED_TIMEOUT_SECS)
        return Level(kind=kind)
    if not isinstance(raw, Mapping):
        t.fail(
            'expected a table such as { type = "mechanical", retry = 3 } or a level name, '
            f"got {type_name(raw, t.fmt)}",
            "level",
        )
    level = t.table("level")
    assert level is not None
    if "type" not in level:
        level.fail(
            "missing required key 'type' (mechanical, recommended, confirmed or arbitrated)",
            "type",
        )
    kind = level.choice("type", LevelKind, LevelKind.MECHANICAL)
    level.reject_unknown(_LEVEL_KEYS[kind])
    retry = level.opt_integer("retry", minimum=0)
    if kind is LevelKind.RECOMMENDED:
        timeout_key = one_of(level, "timeout", "timeout_secs") or "timeout"
        timeout = level.number(timeout_key, DEFAULT_RECOMMENDED_TIMEOUT_SECS, positive=True)
        action = level.choice("default_action", DefaultAction, DefaultAction.EXECUTE)
        return Level(kind=kind, retry=retry, timeout_secs=timeout, default_action=action)
    if kind is not LevelKind.ARBITRATED:
        return Level(kind=kind, retry=retry)
    stakeholders = level.string_list("stakeholders") or ()
    seen: set[str] = set()
    for i, user in enumerate(stakeholders):
        if not (_MATRIX_USER_ID.fullmatch(user) or _USER_NAME.fullmatch(user)):
            level.fail(
                f"{user!r} is neither a Matrix user id (like '@alice:example.org') nor a user "
                "name (lower-case letters, digits and ._=/+-)",
                f"stakeholders[{i}]",
            )
        if user in seen:
            level.fail(f"lists {user!r} twice", "stakeholders")
        seen.add(user)
    return Level(kind=kind, retry=retry, stakeholders=stakeholders)


def one_of(table: Table, key: str, alias: str) -> str | None:
    """Which of two spellings of a key the table uses (at most one)."""
    if key in table and alias in table:
        table.fail(f"give either {key!r} or {alias!r}, not both", alias)
    if alias in table:
        return alias
    return key if key in table else None

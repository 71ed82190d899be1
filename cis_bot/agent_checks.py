"""The checks of an ``[agents.NAME]`` table's values beyond their types, by key: each returns
what is wrong with a value (said after the file, table and key) or None. ``config.py`` applies
them as it reads a profile."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from cis_bot.session.output import extractors
from cis_bot.validation import suggestion


def _check_argv(argv: object) -> str | None:
    assert isinstance(argv, tuple)
    return "must not be empty: give the program and its arguments" if not argv else None


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"{pattern!r} is not a valid regular expression: {exc}"
    except (RecursionError, OverflowError, ValueError) as exc:
        return f"{pattern!r} is not a usable regular expression: {exc}"
    return None


def _check_patterns(patterns: object) -> str | None:
    assert isinstance(patterns, tuple)
    for i, pattern in enumerate(patterns):
        problem = _regex_problem(pattern)
        if problem:
            return f"item {i}: {problem}"
    return None


def _check_pattern(pattern: object) -> str | None:
    assert isinstance(pattern, str)
    return _regex_problem(pattern)


def _check_quiet(value: object) -> str | None:
    assert isinstance(value, float)
    return "must be greater than 0" if value <= 0 else None


def _check_pattern_lines(value: object) -> str | None:
    assert isinstance(value, int)
    return "must be at least 1" if value < 1 else None


_AGENT_CONFIG_KEYS = ("model", "max_tokens", "temperature")


def _check_config_keys(value: object) -> str | None:
    assert isinstance(value, Mapping)
    for key in value:
        if key not in _AGENT_CONFIG_KEYS:
            return (
                f"{key!r} is not an agent_config key a profile passes on; expected one of: "
                f"{', '.join(_AGENT_CONFIG_KEYS)}{suggestion(key, _AGENT_CONFIG_KEYS)}"
            )
    return None


def _check_output(name: object) -> str | None:
    assert isinstance(name, str)
    known = extractors()
    if name not in known:
        return f"unknown output extractor {name!r}{suggestion(name, known)}; known: " + ", ".join(
            sorted(known)
        )
    return None


def _check_env(env: object) -> str | None:
    assert isinstance(env, Mapping)
    for name in env:
        if "=" in name:
            return f"environment variable name {name!r} contains '='"
    return None


PROFILE_CHECKS: Mapping[str, Callable[[object], str | None]] = {
    "argv": _check_argv,
    "output": _check_output,
    "env": _check_env,
    "blocked_patterns": _check_patterns,
    "idle_patterns": _check_patterns,
    "ready_pattern": _check_pattern,
    "quiet_secs": _check_quiet,
    "pattern_lines": _check_pattern_lines,
    "config_args": _check_config_keys,
    "config_env": _check_config_keys,
}

"""The Claude Code CLI for the suites that drive it."""

from __future__ import annotations

import os

import pytest

from cis_bot.testing.claude_home import find_claude

MISSING = "the claude CLI is not installed: run `npm ci` in the repository root"


def require_claude() -> str:
    """Its path. Without it the test is skipped on a developer's machine, but fails under CI
    (the ``CI`` environment variable set), where a missing tool must not pass as green."""
    path = find_claude()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{MISSING} (CI is set: the suites that need it must run)")
        pytest.skip(MISSING)
    return path

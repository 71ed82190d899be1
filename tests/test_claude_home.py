"""The throwaway Claude Code HOME: what it writes, and the environment it hands to the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cis_bot.testing.claude_home import (
    FAKE_CREDENTIAL,
    OFFLINE_ENV,
    prepare_claude_home,
)
from cis_bot.testing.claude_screens import ScreenState, read_screen
from cis_bot.testing.fake_anthropic import FakeAnthropic
from tests.support.claude import require_claude
from tests.support.pty_screen import PtyScreen

URL = "http://127.0.0.1:9"


def test_writes_onboarding_trust_and_manual_mode(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    home = prepare_claude_home(tmp_path / "home", base_url=URL, work_dirs=[work])
    config = json.loads((home.home / ".claude.json").read_text())
    assert config["hasCompletedOnboarding"] is True
    assert config["hasSeenAutoDefaultNudge"] is True
    assert config["projects"][str(work)] == {"hasTrustDialogAccepted": True}
    assert "customApiKeyResponses" not in config
    settings = json.loads((home.home / ".claude" / "settings.json").read_text())
    assert settings == {"permissions": {"defaultMode": "default"}}


def test_environment_points_at_the_url_and_keeps_traffic_local(tmp_path: Path) -> None:
    home = prepare_claude_home(tmp_path / "home", base_url=URL, max_retries=2)
    env = home.environ(
        {
            "PATH": "/usr/bin",
            "ANTHROPIC_API_KEY": "a real key",
            "ANTHROPIC_BASE_URL": "https://api.anthropic.com",
            "CLAUDE_CODE_USE_BEDROCK": "1",
            "CLAUDE_CONFIG_DIR": "/root/.claude",
            "CLAUDECODE": "1",
            "HTTPS_PROXY": "http://proxy:3128",
            "https_proxy": "http://proxy:3128",
            "IS_SANDBOX": "1",
        }
    )
    assert env == {
        "PATH": "/usr/bin",
        **OFFLINE_ENV,
        "HOME": str(home.home),
        "ANTHROPIC_BASE_URL": URL,
        "ANTHROPIC_AUTH_TOKEN": FAKE_CREDENTIAL,
        "CLAUDE_CODE_MAX_RETRIES": "2",
    }


def test_api_key_auth_is_pre_approved_and_sandbox_allows_bypass(tmp_path: Path) -> None:
    home = prepare_claude_home(tmp_path / "home", base_url=URL, auth="api_key", sandbox=True)
    assert home.env["ANTHROPIC_API_KEY"] == FAKE_CREDENTIAL
    assert "ANTHROPIC_AUTH_TOKEN" not in home.env
    assert home.env["IS_SANDBOX"] == "1"
    config = json.loads((home.home / ".claude.json").read_text())
    assert config["customApiKeyResponses"]["approved"] == [FAKE_CREDENTIAL[-20:]]
    settings = json.loads((home.home / ".claude" / "settings.json").read_text())
    assert settings["skipDangerousModePermissionPrompt"] is True


def test_preparing_again_keeps_what_claude_wrote(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    home_dir = tmp_path / "home"
    prepare_claude_home(home_dir, base_url=URL, work_dirs=[first], auth="api_key")
    config_path = home_dir / ".claude.json"
    config = json.loads(config_path.read_text())
    config["userID"] = "written by claude"
    config["projects"][str(first)]["allowedTools"] = ["Bash(ls)"]
    config_path.write_text(json.dumps(config))
    prepare_claude_home(home_dir, base_url=URL, work_dirs=[second], auth="api_key")
    config = json.loads(config_path.read_text())
    assert config["userID"] == "written by claude"
    assert config["projects"][str(first)] == {
        "hasTrustDialogAccepted": True,
        "allowedTools": ["Bash(ls)"],
    }
    assert config["projects"][str(second)] == {"hasTrustDialogAccepted": True}
    assert config["customApiKeyResponses"]["approved"] == [FAKE_CREDENTIAL[-20:]]


def test_rejects_a_broken_config_and_a_negative_retry_count(tmp_path: Path) -> None:
    (tmp_path / ".claude.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"\.claude\.json: not a JSON file"):
        prepare_claude_home(tmp_path, base_url=URL)
    with pytest.raises(ValueError, match="max_retries"):
        prepare_claude_home(tmp_path / "other", base_url=URL, max_retries=-1)


async def test_api_key_home_starts_at_the_prompt(tmp_path: Path) -> None:
    """The pre-approved key really skips "Do you want to use this API key?"."""
    claude = require_claude()
    work = tmp_path / "work"
    work.mkdir()
    async with FakeAnthropic() as fake:
        home = prepare_claude_home(
            tmp_path / "home", base_url=fake.url, work_dirs=[work], auth="api_key"
        )
        tui = PtyScreen([claude], env=home.environ(), cwd=work)
        try:
            screen = await tui.wait_for(
                lambda s: read_screen(s).state in (ScreenState.IDLE, ScreenState.SETUP), 90
            )
        finally:
            tui.close()
    assert read_screen(screen).state == ScreenState.IDLE, screen

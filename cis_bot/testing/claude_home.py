"""A throwaway HOME in which the real Claude Code CLI runs offline against a given Messages API.

Claude Code keeps its state in ``$HOME/.claude.json`` and ``$HOME/.claude/``. A fresh HOME makes
the interactive CLI run its onboarding, which needs api.anthropic.com, then ask whether the work
directory is trusted; this module writes the answers beforehand. Print mode (``claude -p``) needs
none of it but gets the same environment. Measured on Claude Code 2.1.332; see
``tests/fixtures/claude/README.md`` for the screens each missing answer leads to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

#: The credential handed to Claude Code. The fake server accepts anything.
FAKE_CREDENTIAL = "sk-ant-cis-fake-credential-0000"

#: Variables always set: no update checks, telemetry, error reporting or other calls that would
#: leave the machine (with NONESSENTIAL_TRAFFIC off, the only requests are POST /v1/messages).
OFFLINE_ENV: Mapping[str, str] = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
}

# Inherited variables that would send Claude Code elsewhere (another API, another config dir, a
# cloud provider, a proxy) or change its behaviour behind the caller's back.
_STRIPPED_PREFIXES = ("ANTHROPIC_", "CLAUDE_CODE_", "CLAUDE_CONFIG_DIR", "CLAUDECODE")
_STRIPPED_NAMES = frozenset(
    {"IS_SANDBOX"}
    | {f"{name}{suffix}" for name in ("HTTP", "HTTPS", "ALL") for suffix in ("_PROXY", "_proxy")}
    | {f"{name.lower()}_proxy" for name in ("HTTP", "HTTPS", "ALL")}
)

PermissionMode = Literal["default", "acceptEdits", "plan", "auto", "bypassPermissions"]


@attrs.frozen
class ClaudeHome:
    """A prepared HOME and the variables that point Claude Code at ``base_url``."""

    home: Path
    base_url: str
    #: Variables to set on top of the caller's environment (see :meth:`environ`).
    env: Mapping[str, str]

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) without variables that would redirect
        Claude Code (other API keys and URLs, config dirs, proxies), plus :attr:`env`."""
        inherited = os.environ if base is None else base
        kept = {
            name: value
            for name, value in inherited.items()
            if not name.startswith(_STRIPPED_PREFIXES) and name not in _STRIPPED_NAMES
        }
        return {**kept, **self.env}


def prepare_claude_home(
    home: Path,
    *,
    base_url: str,
    work_dirs: Iterable[Path] = (),
    auth: Literal["token", "api_key"] = "token",
    max_retries: int | None = None,
    permission_mode: PermissionMode = "default",
    sandbox: bool = False,
) -> ClaudeHome:
    """Write HOME's Claude Code config so that the CLI starts straight at its prompt.

    - ``work_dirs``: directories the agent will run in; each is marked trusted (otherwise the
      interactive CLI opens with "Accessing workspace ... Yes, I trust this folder", whose default
      answer exits).
    - ``auth``: ``"token"`` sends the credential as ``ANTHROPIC_AUTH_TOKEN`` (a bearer token, no
      question asked); ``"api_key"`` as ``ANTHROPIC_API_KEY``, pre-approved in the config (else the
      CLI asks "Do you want to use this API key?" and defaults to No).
    - ``max_retries``: ``CLAUDE_CODE_MAX_RETRIES``; None keeps Claude Code's own default (10 for
      5xx, backing off to about 40 s: three minutes before a persistent 500 ends the run).
    - ``permission_mode``: written as the default mode. Since 2.1.3xx Claude Code defaults to
      ``auto``, which runs tools without asking; ``default`` ("manual mode") asks before a tool
      writes or runs anything, which is what shows the permission prompt.
    - ``sandbox``: set ``IS_SANDBOX=1`` so that ``--dangerously-skip-permissions`` works as root.
      It also lets 529 errors be retried up to ``max_retries`` (without it Claude Code gives up
      after 3 overloaded answers).
    """
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / ".claude.json"
    config = _read_json(config_path)
    projects = config.setdefault("projects", {})
    for work_dir in work_dirs:
        for key in {str(work_dir), str(work_dir.resolve())}:
            projects.setdefault(key, {})["hasTrustDialogAccepted"] = True
    config.update(
        {
            "hasCompletedOnboarding": True,
            # The "Make auto mode your default permission mode?" dialog shown to users whose
            # settings name another mode, and the notice that auto mode is now the default.
            "hasSeenAutoDefaultNudge": True,
            "hasSeenAutoDefaultNotice": True,
        }
    )
    if auth == "api_key":
        responses = config.setdefault("customApiKeyResponses", {"approved": [], "rejected": []})
        # Claude Code remembers an approved key by its last 20 characters.
        approved = responses.setdefault("approved", [])
        if FAKE_CREDENTIAL[-20:] not in approved:
            approved.append(FAKE_CREDENTIAL[-20:])
    _write_json(config_path, config)

    settings_path = home / ".claude" / "settings.json"
    settings = _read_json(settings_path)
    settings.setdefault("permissions", {})["defaultMode"] = permission_mode
    if sandbox:
        # The interactive "Bypass Permissions mode" warning that must otherwise be accepted.
        settings["skipDangerousModePermissionPrompt"] = True
    _write_json(settings_path, settings)

    env = {
        **OFFLINE_ENV,
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_AUTH_TOKEN" if auth == "token" else "ANTHROPIC_API_KEY": FAKE_CREDENTIAL,
    }
    if max_retries is not None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        env["CLAUDE_CODE_MAX_RETRIES"] = str(max_retries)
    if sandbox:
        env["IS_SANDBOX"] = "1"
    return ClaudeHome(home=home, base_url=base_url, env=env)


def find_claude() -> str | None:
    """The ``claude`` executable: the one npm installed in this checkout (package.json pins the
    version the screen patterns were measured on), else the one on PATH."""
    local = Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "claude"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("claude")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ValueError(f"{path}: not a JSON file Claude Code wrote ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)

"""Built-in agent profiles: how each supported agent CLI is started without a human at the keyboard.

A config's ``[agents.NAME]`` tables override or extend these. What each profile runs was taken from
the tools' own documentation; the comments say what has and has not been tried on this machine.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from cis_bot.session.profile import AgentProfile, PromptVia

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The prompt placeholder in argv templates (replaced token by token, never through str.format).
PROMPT_TOKEN = "{prompt}"

# Questions agents ask on a terminal, as they appear on screen. Kept deliberately specific: a
# false positive blocks a healthy session, a false negative only delays detection until the
# tty-read or quiet-period rule fires.
_YES_NO_PATTERNS = (
    r"\[[yY]/[nN]\]\s*:?\s*$",
    r"\([yY]/[nN]\)\s*:?\s*$",
    r"\(Y\)es/\(N\)o",
)

_SHELL = AgentProfile(
    name="shell",
    # The task's command is the "prompt": run it through sh exactly as written.
    argv=("/bin/sh", "-c", PROMPT_TOKEN),
    prompt_via=PromptVia.ARGUMENT,
    upstream_in_prompt=False,
    detect_tty_read=True,
    screen=False,
)

# Claude Code print mode (`claude -p`): runs one turn, prints stream-json events, exits. Checked
# here only in that it is the documented non-interactive invocation (issue 6 measured that it
# needs no setup); a later issue tunes this on the real CLI against a fake API server and adds an
# interactive profile that drives the TUI.
_CLAUDE = AgentProfile(
    name="claude",
    argv=("claude", "-p", PROMPT_TOKEN, "--output-format", "stream-json", "--verbose"),
    prompt_via=PromptVia.ARGUMENT,
    env={
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
    },
    blocked_patterns=(r"Do you want to proceed\?", *_YES_NO_PATTERNS),
    detect_tty_read=True,
    screen=False,
    output="claude-stream-json",
)

# aider scripting mode (aider.chat/docs/scripting.html): `--message` sends one instruction, applies
# the edits and exits; `--yes-always` answers its confirmations. Not installed here: unverified.
_AIDER = AgentProfile(
    name="aider",
    argv=("aider", "--message", PROMPT_TOKEN, "--yes-always", "--no-pretty", "--no-stream"),
    prompt_via=PromptVia.ARGUMENT,
    blocked_patterns=_YES_NO_PATTERNS,
    detect_tty_read=True,
    screen=False,
)

# Codex non-interactive mode (`codex exec`, OpenAI's docs): progress on stderr, the final agent
# message on stdout, exits when done. `--sandbox workspace-write` lets it edit the work dir (the
# docs deprecate `--full-auto` in its favour); `--skip-git-repo-check` lets it run outside a git
# repository. Not installed here: unverified. A known upstream bug (openai/codex#8744) made some
# versions hang after answering, which the quiet-period rule would report as blocked.
_CODEX = AgentProfile(
    name="codex",
    argv=(
        "codex",
        "exec",
        "--sandbox",
        "workspace-write",
        "--skip-git-repo-check",
        PROMPT_TOKEN,
    ),
    prompt_via=PromptVia.ARGUMENT,
    blocked_patterns=_YES_NO_PATTERNS,
    detect_tty_read=True,
    screen=False,
)

# opencode (opencode.ai/docs/cli): `opencode run MESSAGE` sends one message, prints the reply
# without the TUI and exits. (The older Go project of the same name used `opencode -p`; this is
# the one at opencode.ai.) Not installed here: unverified.
_OPENCODE = AgentProfile(
    name="opencode",
    argv=("opencode", "run", PROMPT_TOKEN),
    prompt_via=PromptVia.ARGUMENT,
    blocked_patterns=_YES_NO_PATTERNS,
    detect_tty_read=True,
    screen=False,
)

BUILTIN_PROFILES: Mapping[str, AgentProfile] = MappingProxyType(
    {p.name: p for p in (_SHELL, _CLAUDE, _AIDER, _CODEX, _OPENCODE)}
)

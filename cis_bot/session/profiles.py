"""Built-in agent profiles: how each supported agent CLI is started without a human at the keyboard.

A config's ``[agents.NAME]`` tables override or extend these. What each profile runs was taken from
the tools' own documentation; the comments say what has and has not been tried on this machine.
"""

from __future__ import annotations

import uuid
from types import MappingProxyType
from typing import TYPE_CHECKING

from cis_bot.session.profile import AgentProfile, ContinueVia, PromptVia

if TYPE_CHECKING:
    from collections.abc import Mapping

#: The prompt placeholder in argv templates (replaced token by token, never through str.format).
PROMPT_TOKEN = "{prompt}"
#: Replaced by :func:`session_uuid` of the session id.
SESSION_UUID_TOKEN = "{session_uuid}"
#: In ``keep_args`` / ``resume_args``: the UUID of the kept conversation.
CONVERSATION_TOKEN = "{conversation}"
#: In ``config_args``: the agent_config value.
VALUE_TOKEN = "{value}"

_SESSION_NAMESPACE = uuid.UUID("5d0b7c1e-2f4a-4c55-9b0e-6a1c3f8e9d21")


def session_uuid(session_id: str) -> str:
    """A UUID that stands for the session id (same id, same UUID): agents that name their
    conversations by UUID (``claude --session-id``) keep their records where we can find them."""
    return str(uuid.uuid5(_SESSION_NAMESPACE, session_id))


def escaped_prompt(profile: AgentProfile, prompt: str) -> str:
    """The prompt with a space in front when it starts with one of the profile's
    ``prompt_escapes`` (so the agent reads it as text, not as a command)."""
    if profile.prompt_escapes and prompt.startswith(tuple(profile.prompt_escapes)):
        return " " + prompt
    return prompt


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

# Claude Code (npm @anthropic-ai/claude-code). Both profiles were measured on 2.1.332 against
# cis_bot.testing.fake_anthropic (tests/test_claude_profiles.py, tests/fixtures/claude/). The
# variables turn off what an unattended run has no use for (update checks, telemetry, error
# reports); with them the only requests are the Messages API calls. `--` ends the options, so a
# prompt starting with "-" is not read as one; a prompt starting with "/" would run as a slash
# command (or fail as an unknown one), so it gets a leading space.
_CLAUDE_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
}
# agent_config: `--model` names the model of every request; CLAUDE_CODE_MAX_OUTPUT_TOKENS caps
# max_tokens (both seen in the requests the fake API gets). Claude Code has no temperature.
_CLAUDE_CONFIG_ARGS = {"model": "--model {value}"}
_CLAUDE_CONFIG_ENV = {"max_tokens": "CLAUDE_CODE_MAX_OUTPUT_TOKENS"}

# Print mode (`claude -p`): one turn, stream-json events on stdout, exits 0 (1 on an API error).
# The task's output is the final `result` event's text; its `is_error` (`subtype` says "success"
# even for API errors) or a missing result fails the task. Print mode never asks: tools that need
# permission are refused unless the permission mode allows them (the user's settings decide;
# override argv to add e.g. "--permission-mode", "acceptEdits"). API errors are retried by the CLI
# itself (CLAUDE_CODE_MAX_RETRIES, default 10 for 5xx, about three minutes).
_CLAUDE = AgentProfile(
    name="claude",
    argv=("claude", "-p", "--output-format", "stream-json", "--verbose", "--", PROMPT_TOKEN),
    prompt_via=PromptVia.ARGUMENT,
    env=_CLAUDE_ENV,
    detect_tty_read=True,
    screen=False,
    prompt_escapes=("/",),
    output="claude-stream-json",
    provider="claude",
    # A kept conversation is named with --session-id and continued by a new `claude -p
    # --resume <uuid>`, which appends to the same record (tests/test_claude_agents.py; measured
    # against the PTY's typed prompt by bench/agent_turns.py).
    continue_via=ContinueVia.RESUME,
    keep_args=("--session-id", CONVERSATION_TOKEN),
    resume_args=("--resume", CONVERSATION_TOKEN),
    config_args=_CLAUDE_CONFIG_ARGS,
    config_env=_CLAUDE_CONFIG_ENV,
)

# What Claude Code's TUI shows at the bottom of its screen (pyte, 120x40), matched on the last 24
# non-blank lines joined with newlines. Rules are full-width "─" lines, the prompt box is a "❯"
# line between two rules, and the footer under it says "esc to interrupt" while a turn runs.

#: A tool waits for approval: "Do you want to proceed?" (Bash), "Do you want to create X?"
#: (Write), "Do you want to make this edit to X?" (Edit), then numbered options starting "1. Yes"
#: and the panel's "Esc to cancel" footer as the last line (so a reply that merely contains such
#: a question does not match). The quote is the question and the line above it when that is the
#: command or file content shown between "╌" rules. Sending `1` (or Enter) approves.
CLAUDE_PERMISSION_PATTERN = (
    r"(?m)^(?P<quote>(?: \S.*\n╌{20,}\n)? *Do you want to .+\?)\n(?: *\n)?\s*(?:❯\s*)?1\. Yes\b"
    r"[\s\S]*^ *Esc to cancel\b.*\s*\Z"
)

#: Dialogs before the prompt, shown when HOME is not prepared for unattended use (see
#: cis_bot/testing/claude_home.py); each waits for a key press.
CLAUDE_SETUP_PATTERNS = (
    # The work dir is not trusted (projects.<dir>.hasTrustDialogAccepted); default answer: exit.
    r"(?m)^ *(?P<quote>Accessing workspace:\n.*)[\s\S]*Yes, I trust this folder\n"
    r" *Enter to confirm\b.*\s*\Z",
    # ANTHROPIC_API_KEY not approved in customApiKeyResponses; default answer: No.
    r"(?m)^ *(?P<quote>Do you want to use this API key\?)[\s\S]*^ *Enter to confirm\b.*\s*\Z",
    # --dangerously-skip-permissions without skipDangerousModePermissionPrompt.
    r"(?m)^ *(?P<quote>WARNING: Claude Code running in Bypass Permissions mode)[\s\S]*"
    r"^ *Enter to confirm\b.*\s*\Z",
    # A settings defaultMode other than auto, without hasSeenAutoDefaultNudge.
    r"(?m)^ *(?P<quote>Make auto mode your default permission mode\?)[\s\S]*"
    r"No, keep manual mode\s*\Z",
    # No hasCompletedOnboarding: the theme picker (bearer token) or a failed check of
    # api.anthropic.com (API key).
    r"(?P<quote>Choose the text style that looks best with your terminal)",
    r"(?P<quote>Unable to connect to Anthropic services)",
)

#: The turn is over: the line Claude Code prints under a finished turn ("✻ Worked for 7s · done
#: 9:25 PM") or the API error it ended on ("● API Error: ...", continued on lines indented by
#: two), directly above the prompt box (a right-aligned status line such as "◐ medium · /effort"
#: may sit between), and a footer that does not offer to interrupt.
CLAUDE_TURN_OVER_PATTERN = (
    r"(?m)^(?P<quote>\S \w+ for (?:\d+[hms] ?)+· done\b.*|● API Error: .*(?:\n  \S.*)*)\n"
    r"(?: {20,}\S.*\n)?─{20,}\n❯.*\n─{20,}\n(?![\s\S]*\besc to interrupt\b)[\s\S]*\Z"
)

# Interactive mode: the TUI in the PTY, for tasks a person may need to approve. The prompt is an
# argument (typed input over ~3 KB would be wrapped as pasted, untrusted content); manual
# permission mode so tools ask ("Do you want to proceed?" -> blocked, quoting the question; `1`
# or Enter approves); when the turn is over the session types /exit and Claude Code exits 0.
# `--session-id` names the conversation so the task's output is the final reply as Claude Code
# recorded it in ~/.claude/projects/*/<uuid>.jsonl (the screen is the fallback).
_CLAUDE_INTERACTIVE = AgentProfile(
    name="claude-interactive",
    argv=(
        "claude",
        "--permission-mode",
        "default",
        "--session-id",
        SESSION_UUID_TOKEN,
        "--",
        PROMPT_TOKEN,
    ),
    prompt_via=PromptVia.ARGUMENT,
    env=_CLAUDE_ENV,
    blocked_patterns=(CLAUDE_PERMISSION_PATTERN, *CLAUDE_SETUP_PATTERNS),
    idle_patterns=(CLAUDE_TURN_OVER_PATTERN,),
    exit_input="/exit\r",
    pattern_lines=24,
    # A TUI reads its terminal all the time: that says nothing about waiting for a person.
    detect_tty_read=False,
    screen=True,
    prompt_escapes=("/",),
    output="claude-interactive",
    provider="claude",
    # A kept TUI stays at its prompt when its turn is over; the next task's prompt is typed in,
    # a newline as backslash-Enter, 16 bytes at a time: input that comes as a paste (bracketed,
    # or a burst) reaches the model wrapped as <pasted_content>, and so does typed input over
    # about 3 KB (measured on 2.1.332).
    continue_via=ContinueVia.PTY,
    typed_newline="\\\r",
    typed_chunk_bytes=16,
    config_args=_CLAUDE_CONFIG_ARGS,
    config_env=_CLAUDE_CONFIG_ENV,
)

# aider scripting mode (aider.chat/docs/scripting.html): `--message` sends one instruction, applies
# the edits and exits; `--yes-always` answers its confirmations (in a directory without git that
# includes "create a git repo?": it does). No update check or analytics from an unattended run.
# Tried by hand with aider-chat 0.86.2 from PyPI in an AgentSession, offline against
# cis_bot.testing.fake_anthropic (`--model anthropic/<name>`, ANTHROPIC_API_KEY and
# ANTHROPIC_API_BASE in env): completed, exit 0, the reply in the transcript. Not in the test suite
# (aider is a large install). The output is the transcript's text, aider's banner included.
_AIDER = AgentProfile(
    name="aider",
    argv=(
        "aider",
        "--message",
        PROMPT_TOKEN,
        "--yes-always",
        "--no-pretty",
        "--no-stream",
        "--no-check-update",
        "--no-analytics",
    ),
    prompt_via=PromptVia.ARGUMENT,
    blocked_patterns=_YES_NO_PATTERNS,
    detect_tty_read=True,
    screen=False,
    provider="aider",
    config_args={"model": "--model {value}"},
)

# Codex non-interactive mode (`codex exec`, OpenAI's docs): progress on stderr, the final agent
# message on stdout, exits when done. `--sandbox workspace-write` lets it edit the work dir (the
# docs deprecate `--full-auto` in its favour); `--skip-git-repo-check` lets it run outside a git
# repository. Tried by hand with @openai/codex 0.171.0 from npm in an AgentSession, offline
# against a 40-line fake of OpenAI's Responses API (a `model_providers.<name>` with base_url and
# wire_api = "responses", given with `-c`): completed, exit 0. In a PTY stdout and stderr merge,
# so the output is the whole transcript's text. With its API unreachable it retries forever
# ("Reconnecting... waiting for network"): give codex tasks a timeout_secs.
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
    provider="codex",
    config_args={"model": "--model {value}"},
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
    provider="opencode",
    config_args={"model": "--model {value}"},
)

# Kimi Code CLI (MoonshotAI/kimi-cli, `pip install kimi-cli`; CIS's `agent_runtime = "kimi"`),
# print mode per its docs: `--print` runs one instruction without the TUI and exits, approving
# every tool call; `--final-message-only` prints only the final answer; `-p` takes the prompt;
# `--session ID` resumes that conversation, or starts one under that ID. Not installed here:
# unverified.
_KIMI = AgentProfile(
    name="kimi",
    argv=("kimi", "--print", "--final-message-only", "-p", PROMPT_TOKEN),
    prompt_via=PromptVia.ARGUMENT,
    blocked_patterns=_YES_NO_PATTERNS,
    detect_tty_read=True,
    screen=False,
    provider="kimi",
    continue_via=ContinueVia.RESUME,
    keep_args=("--session", CONVERSATION_TOKEN),
    resume_args=("--session", CONVERSATION_TOKEN),
    config_args={"model": "--model {value}"},
)

BUILTIN_PROFILES: Mapping[str, AgentProfile] = MappingProxyType(
    {p.name: p for p in (_SHELL, _CLAUDE, _CLAUDE_INTERACTIVE, _AIDER, _CODEX, _OPENCODE, _KIMI)}
)

"""What runs in a session's PTY: the argv a profile makes of the prompt, the executable found
in the agent's own PATH, and the prompt as keystrokes for agents that read it from stdin."""

from __future__ import annotations

import os
import shutil
import termios
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cis_bot.session.profile import AgentProfile, PromptVia
from cis_bot.session.profiles import (
    CONVERSATION_TOKEN,
    PROMPT_TOKEN,
    SESSION_UUID_TOKEN,
    escaped_prompt,
    session_uuid,
)


def build_argv(
    profile: AgentProfile,
    prompt: str,
    session_id: str = "",
    *,
    options: Sequence[str] = (),
    conversation: str | None = None,
) -> list[str]:
    """The profile's argv with ``{prompt}`` tokens replaced by the prompt (argument mode only)
    and ``{session_uuid}`` by the session's UUID; ``options`` (agent_config's arguments, a kept
    conversation's ``keep_args`` / ``resume_args``) go before a ``--`` that ends the options, or
    at the end; ``{conversation}`` in them is the UUID of ``conversation`` (a session id).

    Plain token replacement, never ``str.format``: braces in a prompt are just text.
    """
    if not profile.argv:
        raise ValueError(f"agent profile {profile.name!r} has an empty argv")
    argv = list(profile.argv)
    if options:
        uuid = session_uuid(conversation or session_id)
        extra = [arg.replace(CONVERSATION_TOKEN, uuid) for arg in options]
        at = argv.index("--") if "--" in argv else len(argv)
        argv[at:at] = extra
    if any(SESSION_UUID_TOKEN in arg for arg in argv):
        uuid = session_uuid(session_id)
        argv = [arg.replace(SESSION_UUID_TOKEN, uuid) for arg in argv]
    if profile.prompt_via is not PromptVia.ARGUMENT:
        return argv
    if not any(PROMPT_TOKEN in arg for arg in argv):
        raise ValueError(
            f"agent profile {profile.name!r} passes the prompt as an argument "
            f"but its argv has no {PROMPT_TOKEN}"
        )
    prompt = escaped_prompt(profile, prompt)
    return [arg.replace(PROMPT_TOKEN, prompt) for arg in argv]


def resolve_executable(command: str, env: Mapping[str, str], cwd: Path) -> str:
    """The path execve will run: PATH lookup in the agent's own environment."""
    if "/" in command:
        path = Path(command) if Path(command).is_absolute() else cwd / command
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError("no such executable file")
        return str(path)
    found = shutil.which(command, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError("command not found in PATH")
    return found


def stdin_payload(prompt: str, attrs_: list[Any]) -> bytes:
    """The prompt as keystrokes for a canonical-mode terminal, then end-of-file.

    Control characters are quoted with the terminal's literal-next character so ^C or ^D in a
    prompt is text, not a signal or an early EOF; the EOF character ends any partial line (lines
    are also cut every 1 KiB: the line discipline holds at most 4 KiB of one unfinished line),
    then a second one on an empty line reads as end-of-file.
    """
    cc = attrs_[6]
    eof, lnext = (
        c if isinstance(c, bytes) else bytes([c]) for c in (cc[termios.VEOF], cc[termios.VLNEXT])
    )
    out = bytearray()
    since_break = 0
    for ch in prompt.encode("utf-8"):
        if ch == 0x0A:
            out.append(ch)
            since_break = 0
            continue
        if (ch < 0x20 and ch != 0x09) or ch == 0x7F:
            out += lnext
        out.append(ch)
        since_break += 1
        if since_break >= 1024:
            out += eof
            since_break = 0
    if since_break:
        out += eof
    out += eof
    return bytes(out)

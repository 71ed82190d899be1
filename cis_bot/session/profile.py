"""Agent profiles: how to start an agent CLI, hand it the prompt, tell when it waits for a human."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import attrs


class ContinueVia(StrEnum):
    """How a later session continues a kept agent's conversation (``keep_agent`` /
    ``reuse_agent``)."""

    #: It cannot: the profile's CLI has no way back into a conversation.
    NONE = "none"
    #: A new process of the CLI, given ``resume_args`` (the conversation stays on disk).
    RESUME = "resume"
    #: The kept process itself: its turn over, it waits at its prompt for the next one, which is
    #: typed into the PTY.
    PTY = "pty"


class PromptVia(StrEnum):
    #: Substituted for ``{prompt}`` in the argv template.
    ARGUMENT = "argument"
    #: Written to the PTY followed by end-of-file, for CLIs that read the whole of stdin.
    STDIN = "stdin"
    #: Typed into the PTY like a person would, once the agent is ready; the session stays
    #: interactive.
    PTY = "pty"


@attrs.frozen
class AgentProfile:
    name: str
    #: argv template; ``{prompt}`` is replaced by the prompt when ``prompt_via = "argument"``,
    #: ``{session_uuid}`` by a UUID derived from the session id (for ``claude --session-id``).
    argv: tuple[str, ...]
    prompt_via: PromptVia = PromptVia.ARGUMENT
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: Regexes searched in the last lines of the rendered screen; a match means blocked. Each is
    #: tried on every line (the lowest match wins), then on those lines joined with newlines, so
    #: a ``(?m)`` pattern can describe a whole panel (a question, its options and a footer). A
    #: named group ``quote`` picks what the blocked reason quotes (default: the matched lines).
    blocked_patterns: tuple[str, ...] = ()
    #: Regexes, matched like ``blocked_patterns`` (which win), saying the agent finished its turn
    #: and waits for the next message. The session then types ``exit_input``; without one, the
    #: session is blocked ("idle") until someone sends input or kills it.
    idle_patterns: tuple[str, ...] = ()
    #: Typed once the agent is idle (``idle_patterns``), to make it exit; e.g. ``"/exit\r"``.
    exit_input: str = ""
    #: How many of the last non-empty lines the patterns see (None: the last line of a plain
    #: CLI's output, the last 10 lines of a rendered screen, where options and a footer often
    #: sit below the question).
    pattern_lines: int | None = None
    #: A prompt that starts with one of these strings gets a space in front, so the agent takes
    #: it as text: Claude Code runs a leading "/" as a slash command ("/tmp/x is broken" would
    #: be an unknown command).
    prompt_escapes: tuple[str, ...] = ()
    #: What to type for a newline of a prompt typed into the agent (``prompt_via = "pty"``, a
    #: continued kept agent); empty: the prompt goes in as one bracketed paste when the agent
    #: asks for those (Claude Code marks pasted text as such, so its profile types
    #: backslash-Enter, its line continuation, instead).
    typed_newline: str = ""
    #: With ``typed_newline``: the prompt is typed this many bytes at a time (0: at once).
    typed_chunk_bytes: int = 0
    #: ``prompt_via = "pty"``: a regex on those lines saying the agent is ready for the prompt.
    #: Without it, ready means the terminal is being read, or output has started and settled.
    ready_pattern: str | None = None
    #: No output for this long while the process is alive means blocked (None: never).
    quiet_secs: float | None = None
    #: Ask the OS whether the foreground process waits in a read() on the terminal.
    detect_tty_read: bool = True
    #: Render output through a terminal emulator (pyte): needed for full-screen TUI agents.
    screen: bool = False
    #: Append an "Upstream task outputs" section to the prompt (agents) or not (shell).
    upstream_in_prompt: bool = True
    #: Name of the extractor that turns the transcript into the task's output.
    output: str = "text"
    #: The agent CLI it runs, as CIS's ``agent_config.provider_type`` names it ("claude",
    #: "kimi", "aider", "opencode", "codex"; "" for the shell and custom profiles).
    provider: str = ""
    #: How a later task continues this agent (see ContinueVia).
    continue_via: ContinueVia = ContinueVia.NONE
    #: Arguments that name a new conversation to keep (``{conversation}``: its UUID).
    keep_args: tuple[str, ...] = ()
    #: Arguments that resume the conversation ``{conversation}`` (``continue_via = "resume"``).
    resume_args: tuple[str, ...] = ()
    #: ``agent_config`` keys the CLI takes as arguments, as an argument template each
    #: (``model = "--model {value}"``, split on spaces, ``{value}`` replaced).
    config_args: Mapping[str, str] = attrs.field(factory=dict)
    #: ``agent_config`` keys the CLI takes from an environment variable (``max_tokens =
    #: "CLAUDE_CODE_MAX_OUTPUT_TOKENS"``).
    config_env: Mapping[str, str] = attrs.field(factory=dict)

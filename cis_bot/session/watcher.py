"""The rules that read an agent's terminal, with no I/O: the part that changes with every agent
release, testable on a screen's text alone.

AgentSession (``session.py``) tells a Watcher what happens and when: output arrived, a person
typed, the prompt was typed. When a check is due it hands over what the terminal shows (its last
lines, and whether the foreground process is reading the terminal). The watcher answers with a
decision, which the session applies:

- ``TypePrompt``: the agent is ready for its prompt (``prompt_via = "pty"``): type it.
- ``Block``: the agent waits for a person: a blocked pattern, an idle pattern when the profile
  has no ``exit_input``, a read on the terminal, or no output for ``quiet_secs``.
- ``Unblock``: it no longer waits (new output, input, the question is gone).
- ``TurnOver``: its turn is over (an idle pattern, with an ``exit_input``): type that input.

It also says when to look: the settle check once output has been quiet for ``settle_secs`` (but
no later than ``settle_max_secs`` after the first unchecked output: spinners never settle),
re-checks with backoff while the agent is quiet, and the end of the quiet period.
:func:`outcome` says how a session ended. Times are the session's loop clock, in seconds.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Sequence

import attrs

from cis_bot.session.detect import (
    Blocked,
    BlockRule,
    compile_patterns,
    find_idle,
    find_prompt,
    idle_blocked,
    prompt_blocked,
    quiet_blocked,
    tty_read_blocked,
)
from cis_bot.session.events import SessionState
from cis_bot.session.profile import AgentProfile, PromptVia


@attrs.frozen
class TypePrompt:
    pass


@attrs.frozen
class Block:
    blocked: Blocked


@attrs.frozen
class Unblock:
    why: str


@attrs.frozen
class TurnOver:
    #: What the idle pattern matched (e.g. Claude Code's "✻ Worked for 7s · done").
    shown: str


Decision = TypePrompt | Block | Unblock | TurnOver


@attrs.frozen
class Screen:
    """What the terminal shows when a check is due."""

    #: The last non-empty lines (the watcher's ``pattern_lines`` of them), oldest first.
    lines: Sequence[str]
    #: The foreground process waits in a read on the terminal (False when that is not known).
    reading_tty: bool = False


@attrs.frozen
class Evaluation:
    decision: Decision | None
    #: Check again after this long (None: only when output or input calls for it).
    recheck_in: float | None


class Watcher:
    """One session's detection state (see the module docstring). Decisions are folded into
    the state as they are made: the same screen twice blocks once."""

    def __init__(
        self,
        profile: AgentProfile,
        *,
        settle_secs: float,
        settle_max_secs: float,
        tty_poll_max_secs: float,
        now: float,
    ) -> None:
        """Raises ValueError naming a profile's invalid pattern."""
        self.profile = profile
        self.settle_secs = settle_secs
        self.settle_max_secs = settle_max_secs
        self.tty_poll_max_secs = tty_poll_max_secs
        self._patterns = compile_patterns(profile.blocked_patterns)
        self._idle_patterns = compile_patterns(profile.idle_patterns)
        self._ready_pattern = (
            compile_patterns([profile.ready_pattern])[0] if profile.ready_pattern else None
        )
        #: How many of the last non-empty lines the patterns see.
        self.pattern_lines = profile.pattern_lines or (10 if profile.screen else 1)
        #: Whether the session can tell that the terminal is being read; it then re-checks
        #: with backoff while the agent is quiet (set once the agent runs).
        self.tty_probe = False
        self.prompt_pending = profile.prompt_via is PromptVia.PTY
        self.blocked: Blocked | None = None
        #: The turn is over and the exit input decided: nothing more to decide.
        self.turn_over = False
        self.last_activity = now
        self._unsettled_since: float | None = None
        self._output_since_input = False
        self._output_seen = False
        self._poll_interval = settle_secs
        #: A continued agent: what was above its turn-over line when its prompt was typed.
        self._stale_above: str | None = None

    @property
    def idle_patterns(self) -> tuple[re.Pattern[str], ...]:
        return self._idle_patterns

    def expect_new_turn(self, above: str | None) -> None:
        """The prompt of a continued agent goes in while its screen still shows the last turn
        as over, with ``above`` above that: until the screen above it changes, it is that old
        turn, not the new one."""
        self._stale_above = above

    # --- what happened ---------------------------------------------------------------------------

    def output(self, now: float) -> Decision | None:
        self.last_activity = now
        self._output_since_input = True
        self._output_seen = True
        if self._unsettled_since is None:
            self._unsettled_since = now
        self._poll_interval = self.settle_secs
        if self.blocked is not None and self.blocked.rule is not BlockRule.PROMPT:
            return self._unblock("new output")
        return None

    def input(self, now: float) -> Decision | None:
        self.last_activity = now
        self._output_since_input = False
        self._poll_interval = self.settle_secs
        return self._unblock("input") if self.blocked is not None else None

    def prompt_typed(self, now: float) -> float | None:
        """The prompt went in; returns when to check again."""
        self.last_activity = now
        self._output_since_input = False
        self._poll_interval = self.settle_secs
        return self.settle_secs if self.tty_probe else None

    # --- when to look ----------------------------------------------------------------------------

    def settle_check(self, now: float) -> float | None:
        """At a settle check: None when the output has settled (evaluate now), else the time
        to check again."""
        due = self.last_activity + self.settle_secs
        if self._unsettled_since is not None:
            due = min(due, self._unsettled_since + self.settle_max_secs)
        if now < due:
            return due
        self._unsettled_since = None
        return None

    def poll_check(self, now: float) -> float | None:
        """At a re-check: None when the agent has been quiet long enough to evaluate, else how
        long to wait before looking again (output or input since: the settle check leads)."""
        return self.settle_secs if now - self.last_activity < self.settle_secs else None

    def quiet_due(self) -> float | None:
        """When the quiet period ends (None: the profile has none, or the turn is over)."""
        quiet = self.profile.quiet_secs
        if quiet is None or self.turn_over:
            return None
        return self.last_activity + quiet

    # --- decisions -------------------------------------------------------------------------------

    def evaluate(self, screen: Screen, now: float) -> Evaluation:
        """Output has settled, or a re-check is due: is the agent ready, waiting, done?"""
        if self.turn_over:
            return Evaluation(None, None)
        lines = screen.lines
        if self.prompt_pending:
            if self._ready_for_prompt(screen, now):
                self.prompt_pending = False
                return Evaluation(TypePrompt(), None)
            return Evaluation(None, self._next_poll())
        blocked: Blocked | None = None
        if self._patterns and self._output_since_input:
            line = find_prompt(self._patterns, lines)
            if line is not None:
                blocked = prompt_blocked(line)
        if blocked is None and self._idle_patterns and self._output_since_input:
            found = find_idle(self._idle_patterns, lines)
            idle = found[0] if found is not None else None
            if found is not None and self._stale_above is not None:
                if found[1] == self._stale_above:
                    idle = None  # the turn before this one
                else:
                    self._stale_above = None
            if idle is not None:
                if self.profile.exit_input:
                    self.turn_over = True
                    self.blocked = None
                    return Evaluation(TurnOver(idle), None)
                blocked = idle_blocked(idle)
        if blocked is None and screen.reading_tty:
            blocked = tty_read_blocked(lines[-1] if lines else None)
        decision: Decision | None = None
        if blocked is not None:
            decision = self._block(blocked)
        elif self.blocked is not None and self.blocked.rule is not BlockRule.QUIET:
            decision = self._unblock("no longer waiting")
        return Evaluation(decision, self._next_poll())

    def quiet(self, last_line: str | None) -> Decision | None:
        """The quiet period has ended (see ``quiet_due``)."""
        if self.prompt_pending:
            self.prompt_pending = False
            return TypePrompt()
        quiet = self.profile.quiet_secs
        if self.blocked is None and quiet is not None:
            return self._block(quiet_blocked(quiet, last_line))
        return None

    def _ready_for_prompt(self, screen: Screen, now: float) -> bool:
        if self._ready_pattern is not None:
            return find_prompt((self._ready_pattern,), screen.lines) is not None
        if screen.reading_tty:
            return True
        return self._output_seen and now - self.last_activity >= self.settle_secs

    def _next_poll(self) -> float | None:
        if not self.tty_probe and not self.prompt_pending:
            return None
        self._poll_interval = min(self._poll_interval * 2, self.tty_poll_max_secs)
        return self._poll_interval

    def _block(self, blocked: Blocked) -> Block | None:
        if self.blocked == blocked:
            return None
        self.blocked = blocked
        return Block(blocked)

    def _unblock(self, why: str) -> Unblock:
        self.blocked = None
        return Unblock(why)


def exit_code_of(status: int | None) -> int | None:
    """The exit code of a ``waitpid`` status (negative: the signal that ended it)."""
    return None if status is None or status < 0 else os.waitstatus_to_exitcode(status)


def outcome(
    exit_code: int | None,
    *,
    killed: SessionState | None = None,
    kill_reason: str | None = None,
    spawn_failure: str | None = None,
    exit_overdue: bool = False,
) -> tuple[SessionState, int | None, str | None]:
    """How a session ended: (state, exit code, error). ``killed``: it was killed (or timed
    out) on request; ``spawn_failure``: it never ran its program; ``exit_overdue``: its turn was
    over and it was terminated for not exiting, so its work is done."""
    if killed is not None:
        return killed, exit_code, kill_reason
    if exit_code is None:
        return SessionState.FAILED, None, "exit status unavailable (reaped elsewhere)"
    if spawn_failure is not None:
        return SessionState.FAILED, exit_code, spawn_failure
    if exit_overdue:
        return SessionState.COMPLETED, exit_code, None
    if exit_code < 0:
        return SessionState.FAILED, exit_code, f"killed by {signal.Signals(-exit_code).name}"
    if exit_code != 0:
        return SessionState.FAILED, exit_code, f"exited with status {exit_code}"
    return SessionState.COMPLETED, 0, None

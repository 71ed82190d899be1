"""``cis dag execute --dry-run``: a whole run, with every agent task talking to a fake model.

The fake (:class:`~cis_bot.testing.fake_anthropic.FakeAnthropic`) runs in this process on loopback
and answers each request by echoing the prompt it got, so a pipeline's wiring (dependencies,
upstream outputs in prompts, work dirs, retries, the room log) can be tried without spending
tokens. Agent tasks run the real Claude Code CLI in a throwaway HOME under the state dir
(``<state-dir>/dry-run/<stamp>/home``, prepared so the CLI starts without questions); a task
whose profile is another agent (aider, codex, ...) runs Claude Code's print mode instead, since
those cannot be pointed at the fake. Shell tasks (profiles that take no upstream outputs in their
prompt) run as usual.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import structlog

from cis_bot import private
from cis_bot.errors import UserError
from cis_bot.session.profiles import BUILTIN_PROFILES
from cis_bot.testing.claude_home import find_claude, prepare_claude_home
from cis_bot.testing.fake_anthropic import EchoReply, FakeAnthropic

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from cis_bot.config import Config
    from cis_bot.dag.spec import DagSpec
    from cis_bot.session.profile import AgentProfile
    from cis_bot.testing.claude_home import ClaudeHome

log = structlog.get_logger(__name__)

#: What the fake puts before the echoed prompt.
ECHO_PREFIX = "dry run: "
#: Set to 1 in every task's environment during a dry run.
DRY_RUN_VARIABLE = "CIS_DRY_RUN"


@attrs.frozen
class DryRun:
    """A dry run under way: the fake model, the Claude HOME, and the config that uses them."""

    fake: FakeAnthropic
    home: ClaudeHome
    config: Config
    #: Task profiles that were replaced by Claude Code's print mode, by profile name.
    replaced: tuple[str, ...]

    @property
    def requests(self) -> int:
        return len(self.fake.message_requests)


def is_agent(profile: AgentProfile) -> bool:
    """Agents get their dependencies' outputs in the prompt; shell commands do not."""
    return profile.upstream_in_prompt


def is_claude(profile: AgentProfile) -> bool:
    return bool(profile.argv) and Path(profile.argv[0]).name == "claude"


def dry_run_profiles(
    agents: Mapping[str, AgentProfile], used: set[str], claude: str, home: ClaudeHome
) -> tuple[dict[str, AgentProfile], tuple[str, ...]]:
    """The profiles of a dry run: every agent profile the DAG uses runs ``claude`` (the given
    executable) in ``home``; other agents become Claude Code's print mode. Every task sees
    ``CIS_DRY_RUN=1``, so a command that needs what this machine lacks (a GPU, a toolchain) can
    stand in for itself: ``if [ -n "$CIS_DRY_RUN" ]; then echo nvcc ...; else nvcc ...; fi``."""
    profiles = {
        name: attrs.evolve(profile, env={**profile.env, DRY_RUN_VARIABLE: "1"})
        for name, profile in agents.items()
    }
    replaced = []
    for name in sorted(used):
        profile = agents[name]
        if not is_agent(profile):
            continue
        if not is_claude(profile):
            replaced.append(name)
            profile = attrs.evolve(BUILTIN_PROFILES["claude"], name=name)
        profiles[name] = attrs.evolve(
            profile,
            argv=(claude, *profile.argv[1:]),
            env={**profile.env, **home.env, DRY_RUN_VARIABLE: "1"},
        )
    return profiles, tuple(replaced)


@contextlib.asynccontextmanager
async def dry_run(
    config: Config, spec: DagSpec, *, state_dir: Path, work_dir: Path
) -> AsyncIterator[DryRun]:
    """Start the fake model and prepare the Claude HOME; yields the config to run with."""
    claude = find_claude()
    if claude is None:
        raise UserError(
            "--dry-run runs agent tasks with the Claude Code CLI, which is not installed: "
            "npm install -g @anthropic-ai/claude-code"
        )
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    base = state_dir / "dry-run" / stamp
    work_dirs = {work_dir, *(work_dir / t.work_dir for t in spec.tasks if t.work_dir)}
    async with FakeAnthropic(default=EchoReply(ECHO_PREFIX)) as fake:
        try:
            private.make_dirs(base)
            home = prepare_claude_home(
                base / "home", base_url=fake.url, work_dirs=sorted(work_dirs), max_retries=0
            )
        except OSError as exc:
            raise UserError(f"cannot prepare the dry run's Claude HOME in {base}: {exc}") from exc
        used = {task.agent for task in spec.tasks}
        profiles, replaced = dry_run_profiles(config.agents, used, claude, home)
        log.info("dry_run.started", fake=fake.url, home=str(home.home), replaced=",".join(replaced))
        yield DryRun(fake, home, attrs.evolve(config, agents=profiles), replaced)


def describe(run: DryRun) -> str:
    """One line for the end of a dry run."""
    replaced = f"; ran {', '.join(run.replaced)} as Claude Code print mode" if run.replaced else ""
    return (
        f"dry run: {run.requests} model requests answered by the fake{replaced}; "
        f"Claude Code's HOME: {run.home.home}"
    )

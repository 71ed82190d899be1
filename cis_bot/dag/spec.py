"""The DAG specification: what dag.toml (or .json) says, validated and with defaults resolved.

``dag/load.py`` reads a file into these classes (CIS-compatible: see its docstring and
``docs/dag-format.md``); ``dag/document.py`` turns them into the JSON document a run's room
keeps, and back. Every field here is already resolved: a skill's prompt or commands, the agent
that runs a task, the DAG's environment merged into each task's, the trigger of a fix-up task,
which tasks keep their agent for a later one.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

import attrs

from cis_bot.dag.condition import Condition
from cis_bot.dag.placement import Placement

DEFAULT_RETRY = 0
DEFAULT_TIMEOUT_SECS: float | None = None
DEFAULT_RETRY_BACKOFF_SECS = 1.0
MAX_RETRY_BACKOFF_SECS = 60.0
#: Countdown of a ``recommended`` task when the file gives none (CIS's decision.toml default).
DEFAULT_RECOMMENDED_TIMEOUT_SECS = 30.0
#: The profile that runs a task given only a ``command``.
SHELL_AGENT = "shell"
#: CIS's ``agent_runtime = "default"``: the config's default agent.
DEFAULT_AGENT_ALIAS = "default"
MAX_TASK_ID_BYTES = 128


class Policy(StrEnum):
    ALL_SUCCESS = "all_success"
    FIRST_SUCCESS = "first_success"
    ALLOW_DEBT = "allow_debt"


class Trigger(StrEnum):
    ALL_SUCCESS = "all_success"
    ALL_DONE = "all_done"
    ONE_FAILED = "one_failed"
    ONE_SUCCESS = "one_success"
    NONE_FAILED = "none_failed"


class LevelKind(StrEnum):
    MECHANICAL = "mechanical"
    RECOMMENDED = "recommended"
    CONFIRMED = "confirmed"
    ARBITRATED = "arbitrated"


class DefaultAction(StrEnum):
    """What a ``recommended`` task does when its countdown ends without a human decision."""

    EXECUTE = "execute"
    SKIP = "skip"
    ABORT = "abort"


@attrs.frozen
class Level:
    """CIS's four-level decision mechanism.

    mechanical: runs on its own.
    recommended: waits ``timeout_secs`` for a human to approve or reject, then applies
      ``default_action``.
    confirmed: waits for an approval, however long.
    arbitrated: waits for an approval from every one of ``stakeholders`` (Matrix user ids, or
      user names that the run resolves on its coordinator's homeserver); with none, from any
      person the coordinator trusts.

    ``retry``, on any level, replaces the task's ``retry``.
    """

    kind: LevelKind = LevelKind.MECHANICAL
    retry: int | None = None
    timeout_secs: float | None = None
    default_action: DefaultAction = DefaultAction.EXECUTE
    stakeholders: tuple[str, ...] = ()

    @property
    def needs_approval(self) -> bool:
        return self.kind is not LevelKind.MECHANICAL


@attrs.frozen
class AgentConfig:
    """CIS's ``agent_config``: what the task asks of its agent, mapped onto the agent profile
    when an attempt starts (``run/agentconfig.py``); keys a profile cannot honour are reported
    when the DAG is checked."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    timeout_secs: float | None = None
    provider_type: str | None = None


@attrs.frozen
class TodoItem:
    """CIS's ``[[dag.todo]]``: a planning note shown with the DAG; it does not change the run."""

    id: str
    description: str = ""
    priority: int | None = None
    status: str = ""
    assignee: str = ""


@attrs.frozen
class TaskSpec:
    id: str
    #: Agent profile that runs the task (``shell`` for a bare ``command``).
    agent: str
    #: What the profile is given: the prompt, or the command for the shell profile.
    prompt: str
    name: str = ""
    deps: tuple[str, ...] = ()
    command: str | None = None
    skill: str | None = None
    work_dir: str | None = None
    #: The DAG's ``env`` with the skill's and the task's own over it.
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: Retries after the first attempt (so ``retry + 1`` attempts at most).
    retry: int = DEFAULT_RETRY
    timeout_secs: float | None = DEFAULT_TIMEOUT_SECS
    level: Level = Level()
    trigger: Trigger = Trigger.ALL_SUCCESS
    #: The prompt is a template: its ``{{VARS}}`` are filled in when an attempt starts.
    prompt_template: bool = False
    #: Runs only if true once the trigger lets the task start; else the task is skipped.
    condition: Condition | None = None
    #: The fix-up task that runs when this one fails; its completing handles the failure.
    on_failure: str | None = None
    #: Shell commands that undo the task, when a failed or cancelled run is rolled back.
    rollback: tuple[str, ...] = ()
    #: False: an attempt lost with its node may have half-happened, so the task does not run
    #: again before a person approves.
    idempotent: bool = True
    #: A later task continues this task's agent, so it is kept when the task's turn ends.
    keep_agent: bool = False
    #: The task whose agent (its conversation) this task continues.
    reuse_agent: str | None = None
    agent_config: AgentConfig | None = None
    #: Which workers may run it (matrix and federation modes; ``dag/placement.py``).
    placement: Placement = attrs.field(factory=Placement)

    @property
    def max_attempts(self) -> int:
        return self.retry + 1


@attrs.frozen
class DagSpec:
    name: str
    tasks: tuple[TaskSpec, ...]
    policy: Policy = Policy.ALL_SUCCESS
    max_workers: int | None = None
    retry_backoff_secs: float = DEFAULT_RETRY_BACKOFF_SECS
    #: CIS's ``[dag.env]`` (already merged into every task's env).
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: CIS's ``[[dag.todo]]`` and ``[dag.adaptive] rules``: shown, not acted on.
    todo: tuple[TodoItem, ...] = ()
    adaptive: tuple[str, ...] = ()
    source: Path | None = None
    #: What reading the file found worth saying that is not an error (``cis dag validate``).
    notes: tuple[str, ...] = attrs.field(default=(), eq=False)
    _by_id: Mapping[str, TaskSpec] = attrs.field(init=False, repr=False, eq=False)
    _fixes: Mapping[str, str] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {t.id: t for t in self.tasks})
        fixes = {t.on_failure: t.id for t in self.tasks if t.on_failure is not None}
        object.__setattr__(self, "_fixes", fixes)

    def task(self, task_id: str) -> TaskSpec:
        return self._by_id[task_id]

    def fixes(self, task_id: str) -> str | None:
        """The task whose ``on_failure`` names this one (None: it is no fix-up task)."""
        return self._fixes.get(task_id)

    def waits_for(self, task_id: str) -> tuple[str, ...]:
        """What the task cannot start before: its deps, and the fix-up of each dep (but itself),
        since a failed dep is not done until its fix-up has had its say."""
        deps = self.task(task_id).deps
        fixers = (self.task(d).on_failure for d in deps)
        return (*deps, *(f for f in fixers if f is not None and f != task_id))


def resolve_stakeholders(spec: DagSpec, server_name: str) -> DagSpec:
    """The DAG with every stakeholder a Matrix user id: a bare name (CIS writes "tech-lead") is
    that user on ``server_name``, the coordinator's homeserver."""

    def resolved(task: TaskSpec) -> TaskSpec:
        named = task.level.stakeholders
        if all(s.startswith("@") for s in named):
            return task
        ids = tuple(s if s.startswith("@") else f"@{s}:{server_name}" for s in named)
        return attrs.evolve(task, level=attrs.evolve(task.level, stakeholders=ids))

    return attrs.evolve(spec, tasks=tuple(resolved(t) for t in spec.tasks))

"""The DAG specification: what dag.toml (or .json) says, validated and with defaults resolved.

CIS compatibility (checked against MoSiYuan/CIS's ``skill/manifest.rs`` and its example DAGs):
the file is either ``[dag]`` + ``[[dag.tasks]]`` (optionally with a ``[skill]`` table whose
``type`` is ``"dag"``) or bare ``[[tasks]]`` with ``name``/``policy``/``max_workers`` at the top
level; a ``.json`` file has the same shape. A task's ``level`` is written as CIS serialises it,
``level = { type = "mechanical", retry = 3 }``. Unlike CIS, unknown keys are errors, and CIS keys
cis_bot does not implement (``rollback``, ``keep_agent``, ...) are reported as such.

Defaults differ from CIS on purpose: CIS retried every task 3 times and timed it out after
300 s; here a task is tried once (``retry = 0``) and has no timeout unless the file says so.
``docs/dag-format.md`` documents every key.

Task resolution (who runs a task, and with what):

- ``command`` and no agent: the ``shell`` profile runs the command.
- ``prompt`` and no agent: the config's ``[dag.local] default_agent`` gets the prompt.
- an agent and only ``command``: the command is the agent's prompt (as CIS did).
- an agent and both: the agent gets ``prompt``; ``command`` is kept in ``TaskSpec.command``.
- both ``command`` and ``prompt`` but no agent: an error (it is not clear which was meant).
- neither: an error.
"""

from __future__ import annotations

import graphlib
import re
import unicodedata
from collections.abc import Collection, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import attrs

from cis_bot.dag.placement import Placement, parse_placement
from cis_bot.errors import InputError
from cis_bot.validation import (
    Table,
    format_for,
    parse_document,
    read_text,
    suggestion,
    type_name,
)

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

    mechanical: runs on its own (``retry`` overrides the task's retry).
    recommended: waits ``timeout_secs`` for a human to approve or reject, then applies
      ``default_action``.
    confirmed: waits for an approval, however long.
    arbitrated: waits for an approval from every one of ``stakeholders``.
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
    env: Mapping[str, str] = attrs.field(factory=dict)
    #: Retries after the first attempt (so ``retry + 1`` attempts at most).
    retry: int = DEFAULT_RETRY
    timeout_secs: float | None = DEFAULT_TIMEOUT_SECS
    level: Level = Level()
    trigger: Trigger = Trigger.ALL_SUCCESS
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
    source: Path | None = None
    _by_id: Mapping[str, TaskSpec] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {t.id: t for t in self.tasks})

    def task(self, task_id: str) -> TaskSpec:
        return self._by_id[task_id]


# -- loading ----------------------------------------------------------------------------------

_DAG_KEYS = frozenset({"name", "policy", "max_workers", "retry_backoff_secs", "tasks"})
_SKILL_KEYS = frozenset(
    {
        "name",
        "version",
        "type",
        "description",
        "author",
        "entry",
        "icon",
        "homepage",
        "repository",
        "license",
    }
)
_TASK_KEYS = frozenset(
    {
        "id",
        "name",
        "deps",
        "depends_on",
        "agent",
        "agent_runtime",
        "prompt",
        "command",
        "skill",
        "work_dir",
        "env",
        "retry",
        "timeout_secs",
        "level",
        "trigger",
        "target_node",
        "node_selector",
    }
)
_TASK_ALIASES = {
    "dependencies": "deps",
    "depends": "deps",
    "needs": "deps",
    "cmd": "command",
    "run": "command",
    "timeout": "timeout_secs",
    "retries": "retry",
    "max_retries": "retry",
    "cwd": "work_dir",
    "workdir": "work_dir",
    "working_dir": "work_dir",
    "environment": "env",
    "trigger_rule": "trigger",
    "runtime": "agent",
}
_CIS_UNSUPPORTED = {
    key: f"CIS's {key!r} is not supported by cis_bot; remove it"
    for key in (
        "rollback",
        "idempotent",
        "keep_agent",
        "reuse_agent",
        "agent_config",
        "on_failure",
        "condition",
    )
}
_LEVEL_KEYS: Mapping[LevelKind, frozenset[str]] = {
    LevelKind.MECHANICAL: frozenset({"type", "retry"}),
    LevelKind.RECOMMENDED: frozenset({"type", "timeout", "timeout_secs", "default_action"}),
    LevelKind.CONFIRMED: frozenset({"type"}),
    LevelKind.ARBITRATED: frozenset({"type", "stakeholders"}),
}
_MATRIX_USER_ID = re.compile(r"@[^\s:]+:\S+")
_ARBITRATED_EXAMPLE = 'level = { type = "arbitrated", stakeholders = ["@alice:example.org"] }'


def load_dag(path: str | Path, *, agents: Collection[str] | None, default_agent: str) -> DagSpec:
    """Read and validate a DAG file (``.json`` is JSON, anything else TOML).

    ``agents`` are the agent profile names the config knows (None: accept any name, for a spec
    read back from a room that another node's config resolved); ``default_agent`` is the config's
    ``[dag.local] default_agent``. Raises :class:`InputError` for any mistake in the file.
    """
    text = read_text(path)
    spec = parse_dag(
        text, file=str(path), fmt=format_for(path), agents=agents, default_agent=default_agent
    )
    return attrs.evolve(spec, source=Path(path))


def parse_dag(
    text: str,
    *,
    file: str,
    fmt: Literal["toml", "json"],
    agents: Collection[str] | None,
    default_agent: str,
) -> DagSpec:
    """Validate DAG text. ``file`` names the source in errors; its stem is the default name."""
    root = parse_document(text, file=file, fmt=fmt)
    skill = root.table("skill")
    skill_name = _check_skill(skill) if skill is not None else None
    if "dag" in root:
        if "tasks" in root:
            root.fail(
                "tasks are given both in [dag] and at the top level; keep one layout: "
                "[dag] with [[dag.tasks]], or [[tasks]] alone",
                "tasks",
            )
        root.reject_unknown({"skill", "dag"})
        dag = root.table("dag")
        assert dag is not None
        dag.reject_unknown(_DAG_KEYS, aliases={"task": "tasks"})
    else:
        dag = root
        dag.reject_unknown(_DAG_KEYS | {"skill"}, aliases={"task": "tasks"})

    name = dag.opt_string("name", nonempty=True) or skill_name or Path(file).stem
    policy = dag.choice("policy", Policy, Policy.ALL_SUCCESS)
    max_workers = dag.opt_integer("max_workers", minimum=1)
    backoff = dag.number("retry_backoff_secs", DEFAULT_RETRY_BACKOFF_SECS, positive=True)

    tasks = _parse_tasks(dag, agents=agents, default_agent=default_agent)
    return DagSpec(
        name=name,
        tasks=tuple(tasks),
        policy=policy,
        max_workers=max_workers,
        retry_backoff_secs=backoff,
    )


def _check_skill(skill: Table) -> str | None:
    """Validate CIS's ``[skill]`` header; returns its name."""
    skill.reject_unknown(_SKILL_KEYS)
    for key in _SKILL_KEYS - {"name", "type"}:
        skill.opt_string(key)
    kind = skill.opt_string("type")
    if kind is not None and kind != "dag":
        skill.fail(f'a DAG file\'s [skill] must have type = "dag", got {kind!r}', "type")
    return skill.opt_string("name", nonempty=True)


def _parse_tasks(
    dag: Table, *, agents: Collection[str] | None, default_agent: str
) -> list[TaskSpec]:
    double = "[[tasks]]" if dag.path == "" else f"[[{dag.path}.tasks]]"
    hint = "" if dag.fmt == "json" else f" (write {double}, with double brackets, once per task)"
    tables = dag.table_list("tasks", hint=hint)
    if not tables:
        what = "an empty array" if tables is not None else f"no {double}"
        dag.fail(f"the DAG has no tasks ({what}); add at least one {double}", "tasks")

    tasks: list[TaskSpec] = []
    deps_keys: dict[str, str] = {}
    position: dict[str, int] = {}
    for index, table in enumerate(tables):
        task, deps_key = _parse_task(table, agents=agents, default_agent=default_agent)
        if task.id in position:
            spelled = tables[position[task.id]].data.get("id") != table.data.get("id")
            raise InputError(
                f"duplicate task id {task.id!r}: tasks #{position[task.id] + 1} and "
                f"#{index + 1} both use it"
                + (" (spelled differently, the same text in Unicode NFC)" if spelled else ""),
                file=dag.file,
                task=task.id,
                key="id",
            )
        position[task.id] = index
        deps_keys[task.id] = deps_key
        tasks.append(task)

    for task in tasks:
        for dep in task.deps:
            if dep == task.id:
                raise InputError(
                    "a task cannot depend on itself",
                    file=dag.file,
                    task=task.id,
                    key=deps_keys[task.id],
                )
            if dep not in position:
                raise InputError(
                    f"unknown task {dep!r}{suggestion(dep, position)}",
                    file=dag.file,
                    task=task.id,
                    key=deps_keys[task.id],
                )

    try:
        graphlib.TopologicalSorter({t.id: t.deps for t in tasks}).prepare()
    except graphlib.CycleError as exc:
        # graphlib lists each node before the tasks that depend on it; show "depends on" arrows.
        cycle = [str(node) for node in reversed(exc.args[1])]
        raise InputError(
            f"dependency cycle: {' -> '.join(cycle)} (each task depends on the next)",
            file=dag.file,
            task=cycle[0],
            key=deps_keys[cycle[0]],
        ) from None
    return tasks


#: Besides letters, marks and digits (any script: CIS DAGs name tasks in Chinese too), the
#: characters a task id may hold.
TASK_ID_PUNCTUATION = "._-+=@~#(),[]"
#: Marks and letters that show nothing: an id holding one looks like another id.
_INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0]
    + list(range(0x180B, 0x1810))
    + list(range(0xFE00, 0xFE10))
    + list(range(0xE0100, 0xE01F0))
)


def normal_task_id(task_id: str) -> str:
    """A task id as it is compared and stored: Unicode NFC, so that two spellings of one text
    (precomposed 'é', or 'e' and a combining accent) are one id, not two that look the same."""
    return unicodedata.normalize("NFC", task_id)


def task_id_problem(task_id: str) -> str | None:
    """Why ``task_id`` cannot be a task id, or None. Ids appear in session ids
    (``run:task:attempt``), in room events and tables people read, and name the files
    ``<id>.txt`` in ``CIS_UPSTREAM_DIR``: letters, marks and digits of any script, and
    ``TASK_ID_PUNCTUATION``; nothing invisible, nothing that reorders text."""
    if not task_id:
        return "it is empty"
    if any(ch.isspace() for ch in task_id):
        return "it contains whitespace"
    if ":" in task_id:
        return "it contains ':' (task ids are part of session ids run:task:attempt)"
    if "/" in task_id or "\\" in task_id:
        return "it contains a slash (the id names the file holding the task's output)"
    if task_id in {".", ".."}:
        return "it is '.' or '..'"
    if len(task_id.encode("utf-8", "surrogatepass")) > MAX_TASK_ID_BYTES:
        return f"it is longer than {MAX_TASK_ID_BYTES} bytes"
    for ch in task_id:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs"):
            return f"it contains a control character ({_described(ch)})"
        if ord(ch) in _INVISIBLE or category in ("Cf", "Co", "Cn"):
            return f"it contains {_described(ch)}, which is invisible or reorders text"
        if category[0] not in "LMN" and ch not in TASK_ID_PUNCTUATION:
            return (
                f"it contains {_described(ch)}; task ids hold letters, digits and "
                f"{' '.join(TASK_ID_PUNCTUATION)}"
            )
    if unicodedata.category(task_id[0]).startswith("M"):
        return f"it starts with {_described(task_id[0])}, a mark that belongs to a letter"
    return None


def _described(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


def _one_of(table: Table, key: str, alias: str) -> str | None:
    """Which of two spellings of a key the table uses (at most one)."""
    if key in table and alias in table:
        table.fail(f"give either {key!r} or {alias!r}, not both", alias)
    if alias in table:
        return alias
    return key if key in table else None


def _parse_task(
    table: Table, *, agents: Collection[str] | None, default_agent: str
) -> tuple[TaskSpec, str]:
    """One task, and the key its dependencies were given under (for later error messages)."""
    if "id" not in table:
        table.fail("missing required key 'id' (every task needs a unique id)", "id")
    task_id = normal_task_id(table.string("id"))
    problem = task_id_problem(task_id)
    if problem:
        table.fail(f"invalid task id {task_id!r}: {problem}", "id")
    t = table.with_task(task_id)
    t.reject_unknown(_TASK_KEYS, aliases=_TASK_ALIASES, unsupported=_CIS_UNSUPPORTED)

    deps_key = _one_of(t, "deps", "depends_on") or "deps"
    deps = tuple(normal_task_id(dep) for dep in t.string_list(deps_key) or ())
    seen: set[str] = set()
    for dep in deps:
        if dep in seen:
            t.fail(f"lists {dep!r} twice", deps_key)
        seen.add(dep)

    env = t.string_map("env") or {}
    for var in env:
        if "=" in var:
            t.fail(f"environment variable name {var!r} contains '='", f"env.{var}")

    level = _parse_level(t)
    retry = t.integer("retry", DEFAULT_RETRY, minimum=0)
    if level.retry is not None:
        retry = level.retry
    agent, prompt = _resolve_agent(t, agents=agents, default_agent=default_agent)
    spec = TaskSpec(
        id=task_id,
        agent=agent,
        prompt=prompt,
        name=t.string("name", ""),
        deps=deps,
        command=t.opt_string("command", nonempty=True),
        skill=t.opt_string("skill", nonempty=True),
        work_dir=t.opt_string("work_dir", nonempty=True),
        env=env,
        retry=retry,
        timeout_secs=t.opt_number("timeout_secs", positive=True),
        level=level,
        trigger=t.choice("trigger", Trigger, Trigger.ALL_SUCCESS),
        placement=parse_placement(t),
    )
    return spec, deps_key


def _resolve_agent(
    t: Table, *, agents: Collection[str] | None, default_agent: str
) -> tuple[str, str]:
    """(agent profile, what it is given) following the rules in the module docstring."""
    command = t.opt_string("command", nonempty=True)
    prompt = t.opt_string("prompt", nonempty=True)
    skill = t.opt_string("skill", nonempty=True)
    agent_key = _one_of(t, "agent", "agent_runtime")
    agent = t.opt_string(agent_key, nonempty=True) if agent_key else None

    if command is None and prompt is None:
        if skill is not None:
            t.fail("skills are not supported by cis_bot yet; give a command or a prompt", "skill")
        t.fail("nothing to run: give a 'command' (run by the shell) or a 'prompt' (for an agent)")
    if agent is None:
        if command is not None and prompt is not None:
            t.fail(
                "both 'command' and 'prompt' but no 'agent': say which agent runs the task, or "
                "drop one ('command' alone runs in the shell, 'prompt' alone goes to the "
                f"default agent {default_agent!r})"
            )
        if command is not None:
            if agents is not None and SHELL_AGENT not in agents:
                t.fail(
                    f"a 'command' needs the {SHELL_AGENT!r} agent profile, which is not configured"
                )
            return SHELL_AGENT, command
        assert prompt is not None
        if agents is not None and default_agent not in agents:
            t.fail(
                f"the config's default agent {default_agent!r} ([dag.local] default_agent) is "
                f"not a known agent profile{suggestion(default_agent, agents)}; give 'agent'",
                "prompt",
            )
        return default_agent, prompt

    assert agent_key is not None
    if agent == DEFAULT_AGENT_ALIAS and (agents is None or agent not in agents):
        agent = default_agent
    if agents is not None and agent not in agents:
        t.fail(
            f"unknown agent profile {agent!r}{suggestion(agent, agents)}; "
            f"known profiles: {', '.join(sorted(agents)) or '(none)'}",
            agent_key,
        )
    text = prompt if prompt is not None else command
    assert text is not None
    return agent, text


def _parse_level(t: Table) -> Level:
    if "level" not in t:
        return Level()
    raw = t.data["level"]
    if isinstance(raw, str):
        kind = t.enum_value("level", raw, LevelKind)
        if kind is LevelKind.ARBITRATED:
            t.fail(f"an arbitrated level needs stakeholders: {_ARBITRATED_EXAMPLE}", "level")
        if kind is LevelKind.RECOMMENDED:
            return Level(kind=kind, timeout_secs=DEFAULT_RECOMMENDED_TIMEOUT_SECS)
        return Level(kind=kind)
    if not isinstance(raw, Mapping):
        t.fail(
            'expected a table such as { type = "mechanical", retry = 3 } or a level name, '
            f"got {type_name(raw, t.fmt)}",
            "level",
        )
    level = t.table("level")
    assert level is not None
    if "type" not in level:
        level.fail(
            "missing required key 'type' (mechanical, recommended, confirmed or arbitrated)",
            "type",
        )
    kind = level.choice("type", LevelKind, LevelKind.MECHANICAL)
    level.reject_unknown(_LEVEL_KEYS[kind])
    if kind is LevelKind.MECHANICAL:
        return Level(kind=kind, retry=level.opt_integer("retry", minimum=0))
    if kind is LevelKind.RECOMMENDED:
        timeout_key = _one_of(level, "timeout", "timeout_secs") or "timeout"
        timeout = level.number(timeout_key, DEFAULT_RECOMMENDED_TIMEOUT_SECS, positive=True)
        action = level.choice("default_action", DefaultAction, DefaultAction.EXECUTE)
        return Level(kind=kind, timeout_secs=timeout, default_action=action)
    if kind is LevelKind.CONFIRMED:
        return Level(kind=kind)
    stakeholders = level.string_list("stakeholders")
    if not stakeholders:
        level.fail(f"an arbitrated level needs stakeholders: {_ARBITRATED_EXAMPLE}", "stakeholders")
    seen: set[str] = set()
    for i, user in enumerate(stakeholders):
        if not _MATRIX_USER_ID.fullmatch(user):
            level.fail(
                f"{user!r} is not a Matrix user id (like '@alice:example.org')",
                f"stakeholders[{i}]",
            )
        if user in seen:
            level.fail(f"lists {user!r} twice", "stakeholders")
        seen.add(user)
    return Level(kind=kind, stakeholders=stakeholders)


# -- the spec as a document, for the room ------------------------------------------------------


def task_to_document(task: TaskSpec) -> dict[str, Any]:
    """A task as a table of dag.json's layout, resolved: the agent and its prompt explicit, so
    any node reads it back to the same TaskSpec whatever its own default agent."""
    doc: dict[str, Any] = {"id": task.id, "agent": task.agent, "prompt": task.prompt}
    if task.name:
        doc["name"] = task.name
    if task.deps:
        doc["deps"] = list(task.deps)
    for key in ("command", "skill", "work_dir", "timeout_secs"):
        value = getattr(task, key)
        if value is not None:
            doc[key] = value
    if task.env:
        doc["env"] = dict(task.env)
    if task.retry != DEFAULT_RETRY:
        doc["retry"] = task.retry
    if task.trigger is not Trigger.ALL_SUCCESS:
        doc["trigger"] = str(task.trigger)
    level = task.level
    if level != Level():
        level_doc: dict[str, Any] = {"type": str(level.kind)}
        if level.retry is not None:
            level_doc["retry"] = level.retry
        if level.kind is LevelKind.RECOMMENDED:
            level_doc["timeout"] = level.timeout_secs
            level_doc["default_action"] = str(level.default_action)
        elif level.kind is LevelKind.ARBITRATED:
            level_doc["stakeholders"] = list(level.stakeholders)
        doc["level"] = level_doc
    doc.update(task.placement.to_document())
    return doc


def spec_to_document(spec: DagSpec) -> dict[str, Any]:
    """The DAG in dag.json's layout; ``parse_dag(json.dumps(doc), fmt="json", agents=None, ...)``
    gives back an equal DagSpec (but for ``source``)."""
    dag: dict[str, Any] = {"name": spec.name, "policy": str(spec.policy)}
    if spec.max_workers is not None:
        dag["max_workers"] = spec.max_workers
    if spec.retry_backoff_secs != DEFAULT_RETRY_BACKOFF_SECS:
        dag["retry_backoff_secs"] = spec.retry_backoff_secs
    dag["tasks"] = [task_to_document(t) for t in spec.tasks]
    return {"dag": dag}


def parse_task_document(
    doc: Mapping[str, Any], *, file: str, agents: Collection[str] | None
) -> TaskSpec:
    """One resolved task table (as ``task_to_document`` writes it), validated alone: its deps
    name tasks of a DAG the reader may not have."""
    table = Table(dict(doc), file=file, fmt="json", path="task")
    task, _ = _parse_task(table, agents=agents, default_agent="")
    return task

"""Reading dag.toml (or .json) into a :class:`~cis_bot.dag.spec.DagSpec`, every mistake an
:class:`~cis_bot.errors.InputError` naming the file, the task and the key.

CIS compatibility (checked against MoSiYuan/CIS's skill manifest, its scheduler's task types and
its example DAGs): the file is either ``[dag]`` + ``[[dag.tasks]]`` (optionally with a ``[skill]``
table whose ``type`` is ``"dag"``) or bare ``[[tasks]]`` with ``name``/``policy``/``max_workers``
at the top level; a ``.json`` file has the same shape. A task's ``level`` is written as CIS
serialises it, ``level = { type = "mechanical", retry = 3 }``. Every key of CIS's tasks is read
(``dag/wiring.py`` resolves those that tie tasks together: ``on_failure``, ``condition``,
``keep_agent``/``reuse_agent``); ``skill`` runs a CIS skill file (``dag/skills.py``). Unlike CIS,
unknown keys are errors. ``target_node`` and ``node_selector`` are read by ``dag/placement.py``.

Defaults differ from CIS on purpose: CIS retried every task 3 times and timed it out after
300 s; here a task is tried once (``retry = 0``) and has no timeout unless the file says so.
``docs/dag-format.md`` documents every key.

Task resolution (who runs a task, and with what):

- ``command`` and no agent: the ``shell`` profile runs the command.
- ``prompt`` and no agent: the config's ``[dag.local] default_agent`` gets the prompt.
- an agent and only ``command``: the command is the agent's prompt (as CIS did).
- an agent and both: the agent gets ``prompt``; ``command`` is kept in ``TaskSpec.command``.
- both ``command`` and ``prompt`` but no agent: an error (it is not clear which was meant).
- neither: the ``skill`` (its prompt for an agent, or its commands for the shell); without one,
  an error.
- ``reuse_agent``: the agent (and work dir) of the task it names.
"""

from __future__ import annotations

import graphlib
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from cis_bot.dag.condition import ConditionError, parse_condition
from cis_bot.dag.keys import (
    one_of,
    read_adaptive,
    read_agent_config,
    read_dag_env,
    read_env,
    read_level,
    read_todo,
)
from cis_bot.dag.placement import parse_placement
from cis_bot.dag.skills import SKILL_KEYS, Skill, SkillLibrary, UnknownSkill
from cis_bot.dag.spec import (
    DEFAULT_AGENT_ALIAS,
    DEFAULT_RETRY,
    DEFAULT_RETRY_BACKOFF_SECS,
    MAX_TASK_ID_BYTES,
    SHELL_AGENT,
    DagSpec,
    Policy,
    TaskSpec,
    Trigger,
)
from cis_bot.dag.wiring import Written, wire
from cis_bot.errors import InputError
from cis_bot.validation import (
    Table,
    format_for,
    parse_document,
    read_text,
    suggestion,
)

_DAG_KEYS = frozenset(
    {"name", "policy", "max_workers", "retry_backoff_secs", "tasks", "env", "todo", "adaptive"}
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
        "prompt_template",
        "command",
        "skill",
        "work_dir",
        "env",
        "retry",
        "timeout_secs",
        "level",
        "trigger",
        "condition",
        "on_failure",
        "rollback",
        "idempotent",
        "keep_agent",
        "reuse_agent",
        "agent_config",
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
    "when": "condition",
    "if": "condition",
    "on_fail": "on_failure",
}


def load_dag(
    path: str | Path,
    *,
    agents: Collection[str] | None,
    default_agent: str,
    skills_dirs: Sequence[Path] = (),
) -> DagSpec:
    """Read and validate a DAG file (``.json`` is JSON, anything else TOML).

    ``agents`` are the agent profile names the config knows (None: accept any name, for a spec
    read back from a room that another node's config resolved); ``default_agent`` is the config's
    ``[dag.local] default_agent``. Skills are looked for in ``skills/`` beside the file, then in
    ``skills_dirs``. Raises :class:`InputError` for any mistake in the file.
    """
    text = read_text(path)
    spec = parse_dag(
        text,
        file=str(path),
        fmt=format_for(path),
        agents=agents,
        default_agent=default_agent,
        skill_folders=(Path(path).parent / "skills", *skills_dirs),
    )
    return attrs.evolve(spec, source=Path(path))


def parse_dag(
    text: str,
    *,
    file: str,
    fmt: Literal["toml", "json"],
    agents: Collection[str] | None,
    default_agent: str,
    skill_folders: Sequence[Path] = (),
) -> DagSpec:
    """Validate DAG text. ``file`` names the source in errors; its stem is the default name."""
    root = parse_document(text, file=file, fmt=fmt)
    skill = root.table("skill")
    skill_name = _check_skill(skill) if skill is not None else None
    notes: list[str] = []
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
        dag.reject_unknown(_DAG_KEYS | {"dag"}, aliases={"task": "tasks"})
    else:
        dag = root
        dag.reject_unknown(_DAG_KEYS | {"skill"}, aliases={"task": "tasks"})

    name = dag.opt_string("name", nonempty=True) or skill_name or Path(file).stem
    policy = dag.choice("policy", Policy, Policy.ALL_SUCCESS)
    max_workers = dag.opt_integer("max_workers", minimum=1)
    backoff = dag.number("retry_backoff_secs", DEFAULT_RETRY_BACKOFF_SECS, positive=True)
    env = read_dag_env(dag, notes)
    todo = read_todo(dag)
    adaptive = read_adaptive(dag)
    if todo:
        notes.append(
            f"[[dag.todo]]: {len(todo)} items, shown with the DAG; they do not change the run"
        )
    if adaptive:
        notes.append(
            f"[dag.adaptive]: {len(adaptive)} rules, shown with the DAG; they are not applied"
        )

    library = SkillLibrary(skill_folders)
    tasks = _parse_tasks(
        dag, agents=agents, default_agent=default_agent, env=env, skills=library, notes=notes
    )
    return DagSpec(
        name=name,
        tasks=tuple(tasks),
        policy=policy,
        max_workers=max_workers,
        retry_backoff_secs=backoff,
        env=env,
        todo=todo,
        adaptive=adaptive,
        notes=tuple(dict.fromkeys(notes)),
    )


def _check_skill(skill: Table) -> str | None:
    """Validate CIS's ``[skill]`` header; returns its name."""
    skill.reject_unknown(SKILL_KEYS)
    for key in SKILL_KEYS - {"name", "type"}:
        skill.opt_string(key)
    kind = skill.opt_string("type")
    if kind is not None and kind != "dag":
        skill.fail(f'a DAG file\'s [skill] must have type = "dag", got {kind!r}', "type")
    return skill.opt_string("name", nonempty=True)


def _parse_tasks(
    dag: Table,
    *,
    agents: Collection[str] | None,
    default_agent: str,
    env: Mapping[str, str],
    skills: SkillLibrary,
    notes: list[str],
) -> list[TaskSpec]:
    double = "[[tasks]]" if dag.path == "" else f"[[{dag.path}.tasks]]"
    hint = "" if dag.fmt == "json" else f" (write {double}, with double brackets, once per task)"
    tables = dag.table_list("tasks", hint=hint)
    if not tables:
        what = "an empty array" if tables is not None else f"no {double}"
        dag.fail(f"the DAG has no tasks ({what}); add at least one {double}", "tasks")

    tasks: list[TaskSpec] = []
    written: dict[str, Written] = {}
    missing: list[tuple[str, str]] = []
    position: dict[str, int] = {}
    for index, table in enumerate(tables):
        parsed = _parse_task(
            table, agents=agents, default_agent=default_agent, env=env, skills=skills
        )
        task = parsed.task
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
        written[task.id] = parsed.written
        tasks.append(task)
        if parsed.missing_skill is not None:
            missing.append((task.id, parsed.missing_skill))
        notes.extend(parsed.notes)

    for task in tasks:
        deps_key = written[task.id].deps_key
        for dep in task.deps:
            if dep == task.id:
                raise InputError(
                    "a task cannot depend on itself", file=dag.file, task=task.id, key=deps_key
                )
            if dep not in position:
                raise InputError(
                    f"unknown task {dep!r}{suggestion(dep, position)}",
                    file=dag.file,
                    task=task.id,
                    key=deps_key,
                )
    tasks = wire(tasks, written, file=dag.file, check_cycles=_check_cycles, notes=notes)
    if missing:
        raise _unknown_skills(missing, skills, dag.file)
    return tasks


def _check_cycles(
    tasks: Sequence[TaskSpec], written: Mapping[str, Written], file: str | None
) -> None:
    try:
        graphlib.TopologicalSorter({t.id: t.deps for t in tasks}).prepare()
    except graphlib.CycleError as exc:
        # graphlib lists each node before the tasks that depend on it; show "depends on" arrows.
        cycle = [str(node) for node in reversed(exc.args[1])]
        raise InputError(
            f"dependency cycle: {' -> '.join(cycle)} (each task depends on the next)",
            file=file,
            task=cycle[0],
            key=written[cycle[0]].deps_key,
        ) from None


def _unknown_skills(
    missing: Sequence[tuple[str, str]], library: SkillLibrary, file: str | None
) -> InputError:
    """One error naming every skill no folder has, and where they were looked for."""
    names: dict[str, list[str]] = {}
    for task_id, skill in missing:
        names.setdefault(skill, []).append(task_id)
    listed = ", ".join(
        f"{skill!r} (task{'s' if len(ids) > 1 else ''} {', '.join(ids)})"
        for skill, ids in names.items()
    )
    searched = ", ".join(str(f) for f in library.folders) or "no folder (give [dag] skills_dir)"
    unreadable = library.unreadable
    extra = f"; unreadable skill files: {'; '.join(unreadable)}" if unreadable else ""
    plural = "s" if len(names) > 1 else ""
    return InputError(
        f"unknown skill{plural} {listed}; searched: {searched}{extra}",
        file=file,
        task=missing[0][0],
        key="skill",
    )


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


@attrs.frozen
class _Parsed:
    task: TaskSpec
    written: Written
    missing_skill: str | None = None
    notes: tuple[str, ...] = ()


def _parse_task(
    table: Table,
    *,
    agents: Collection[str] | None,
    default_agent: str,
    env: Mapping[str, str],
    skills: SkillLibrary | None,
) -> _Parsed:
    """One task, what its table wrote in so many words, and the skill no folder had."""
    if "id" not in table:
        table.fail("missing required key 'id' (every task needs a unique id)", "id")
    task_id = normal_task_id(table.string("id"))
    problem = task_id_problem(task_id)
    if problem:
        table.fail(f"invalid task id {task_id!r}: {problem}", "id")
    t = table.with_task(task_id)
    t.reject_unknown(_TASK_KEYS, aliases=_TASK_ALIASES)

    deps_key = one_of(t, "deps", "depends_on") or "deps"
    deps = tuple(normal_task_id(dep) for dep in t.string_list(deps_key) or ())
    seen: set[str] = set()
    for dep in deps:
        if dep in seen:
            t.fail(f"lists {dep!r} twice", deps_key)
        seen.add(dep)

    command = t.opt_string("command", nonempty=True)
    prompt = t.opt_string("prompt", nonempty=True)
    skill_name = t.opt_string("skill", nonempty=True)
    skill: Skill | None = None
    missing_skill = None
    if command is None and prompt is None and skill_name is not None and skills is not None:
        try:
            skill = skills.find(skill_name)
        except UnknownSkill:
            missing_skill = skill_name
    task_env = {**env, **(skill.env if skill else {}), **read_env(t, "env")}

    level = read_level(t)
    retry = t.opt_integer("retry", minimum=0)
    if level.retry is not None:
        retry = level.retry
    if retry is None:
        retry = skill.retry if skill and skill.retry is not None else DEFAULT_RETRY
    config = read_agent_config(t, skill)
    timeout = t.opt_number("timeout_secs", positive=True)
    if timeout is None and config is not None:
        timeout = config.timeout_secs
    reuse = _task_reference(t, "reuse_agent")
    agent, text, template = _resolve_agent(
        t,
        agents=agents,
        default_agent=default_agent,
        skill=skill,
        missing_skill=missing_skill is not None,
        inherited=reuse is not None,
        provider=config.provider_type if config else None,
    )
    if skill is not None and skill.command is not None and command is None:
        command = skill.command
    rollback = t.string_list("rollback") or ()
    spec = TaskSpec(
        id=task_id,
        agent=agent,
        prompt=text,
        name=t.string("name", ""),
        deps=deps,
        command=command,
        skill=skill_name,
        work_dir=t.opt_string("work_dir", nonempty=True),
        env=task_env,
        retry=retry,
        timeout_secs=timeout,
        level=level,
        trigger=t.choice("trigger", Trigger, Trigger.ALL_SUCCESS),
        prompt_template=template,
        on_failure=_task_reference(t, "on_failure"),
        rollback=rollback,
        idempotent=t.boolean("idempotent", True),
        keep_agent=t.boolean("keep_agent", False),
        reuse_agent=reuse,
        agent_config=config,
        placement=parse_placement(t),
    )
    written = Written(
        deps_key=deps_key,
        trigger="trigger" in t,
        agent=one_of(t, "agent", "agent_runtime") is not None,
        work_dir="work_dir" in t,
        keep_agent=t.opt_boolean("keep_agent"),
        condition=t.opt_string("condition", nonempty=True),
    )
    return _Parsed(spec, written, missing_skill, skill.notes if skill else ())


def _task_reference(t: Table, key: str) -> str | None:
    """A key whose value names another task (compared as task ids are)."""
    value = t.opt_string(key, nonempty=True)
    return None if value is None else normal_task_id(value)


def _resolve_agent(
    t: Table,
    *,
    agents: Collection[str] | None,
    default_agent: str,
    skill: Skill | None,
    missing_skill: bool,
    inherited: bool,
    provider: str | None,
) -> tuple[str, str, bool]:
    """(agent profile, what it is given, whether that is a template) following the rules in the
    module docstring. A task that continues another's agent gets its agent later (""); so does
    one whose skill is missing (reported once every task has been read)."""
    command = t.opt_string("command", nonempty=True)
    prompt = t.opt_string("prompt", nonempty=True)
    template = t.boolean("prompt_template", False)
    agent_key = one_of(t, "agent", "agent_runtime")
    agent = t.opt_string(agent_key, nonempty=True) if agent_key else None

    if command is None and prompt is None:
        if missing_skill:
            return agent or "", "", False
        if skill is None:
            if "skill" in t:
                t.fail("a skill needs a folder to be found in: give the DAG's file path", "skill")
            t.fail(
                "nothing to run: give a 'command' (run by the shell), a 'prompt' (for an "
                "agent) or a 'skill'"
            )
        command, prompt, template = skill.command, skill.prompt, skill.prompt is not None
    if agent is None and provider is not None:
        agent, agent_key = provider, "agent_config.provider_type"
    if agent is None:
        if inherited:
            text = prompt if prompt is not None else command
            assert text is not None
            return "", text, template
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
            return SHELL_AGENT, command, False
        assert prompt is not None
        if agents is not None and default_agent not in agents:
            t.fail(
                f"the config's default agent {default_agent!r} ([dag.local] default_agent) is "
                f"not a known agent profile{suggestion(default_agent, agents)}; give 'agent'",
                "prompt",
            )
        return default_agent, prompt, template

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
    return agent, text, template and prompt is not None


def read_task_table(
    doc: Mapping[str, Any], *, file: str, agents: Collection[str] | None
) -> TaskSpec:
    """A resolved task table (as ``dag/document.py`` writes it), validated alone: its deps name
    tasks of a DAG the reader may not have."""
    table = Table(dict(doc), file=file, fmt="json", path="task")
    parsed = _parse_task(table, agents=agents, default_agent="", env={}, skills=None)
    task, text = parsed.task, parsed.written.condition
    if text is None:
        return task
    try:
        return attrs.evolve(task, condition=parse_condition(text, deps=task.deps))
    except ConditionError as exc:
        raise InputError(f"{text!r}: {exc}", file=file, task=task.id, key="condition") from None

"""How tasks refer to each other beyond ``deps``, resolved and checked once every task is read.

- ``on_failure = "fix"``: ``fix`` is the task's fix-up. It depends on the task (added to its
  deps when missing) and, unless it says otherwise, runs once its deps are done whatever their
  outcome (trigger ``all_done``; ``one_failed`` is the only other trigger that can see a
  failure); the engine runs it only when the task failed. A fix-up fixes one task.
- ``keep_agent`` / ``reuse_agent``: the tasks that use one agent (the task that keeps it, then
  each task that names it in ``reuse_agent``) run one after the other (each depends on the one
  before, perhaps through other tasks): an agent takes one prompt at a time. They share its
  profile and work dir. ``keep_agent`` is resolved to "a later task continues this agent":
  true for every user but the last, false for the last (its agent ends with its turn).
- ``condition``: parsed against the task's deps (``dag/condition.py``).
"""

from __future__ import annotations

import graphlib
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from cis_bot.dag.condition import ConditionError, parse_condition
from cis_bot.dag.skills import template_vars
from cis_bot.dag.spec import TaskSpec, Trigger
from cis_bot.errors import InputError
from cis_bot.validation import suggestion

#: Triggers under which a fix-up can see the failure it is there for.
FIXUP_TRIGGERS = (Trigger.ALL_DONE, Trigger.ONE_FAILED)
#: Values a prompt template gets from the run itself (besides the task's environment).
TEMPLATE_BUILTINS = frozenset(
    {
        "RUN_ID",
        "DAG_NAME",
        "TASK_ID",
        "TASK_NAME",
        "ATTEMPT",
        "WORK_DIR",
        "FAILED_TASK",
        "FAILED_TASK_NAME",
        "ERROR_LOG",
    }
)


@attrs.frozen
class Written:
    """What a task's table said in so many words (resolution tells given from default)."""

    deps_key: str
    trigger: bool = False
    agent: bool = False
    work_dir: bool = False
    keep_agent: bool | None = None
    condition: str | None = None


CheckCycles = Callable[[Sequence[TaskSpec], Mapping[str, Written], "str | None"], None]


def wire(
    tasks: Sequence[TaskSpec],
    written: Mapping[str, Written],
    *,
    file: str | None,
    check_cycles: CheckCycles,
    notes: list[str],
) -> list[TaskSpec]:
    by_id = {t.id: t for t in tasks}
    _wire_fixups(by_id, written, file)
    check_cycles(list(by_id.values()), written, file)
    _check_fixup_waits(by_id, file)
    _wire_agents(by_id, written, file, notes)
    _wire_conditions(by_id, written, file)
    _template_notes(by_id.values(), notes)
    return list(by_id.values())


def _fail(message: str, *, file: str | None, task: str, key: str) -> InputError:
    return InputError(message, file=file, task=task, key=key)


def _wire_fixups(
    by_id: dict[str, TaskSpec], written: Mapping[str, Written], file: str | None
) -> None:
    fixed_by: dict[str, str] = {}
    for task in list(by_id.values()):
        fixer_id = task.on_failure
        if fixer_id is None:
            continue
        if fixer_id == task.id:
            raise _fail(
                "a task cannot be its own fix-up", file=file, task=task.id, key="on_failure"
            )
        if fixer_id not in by_id:
            raise _fail(
                f"unknown task {fixer_id!r}{suggestion(fixer_id, by_id)}",
                file=file,
                task=task.id,
                key="on_failure",
            )
        if fixer_id in fixed_by:
            raise _fail(
                f"task {fixer_id!r} is already the fix-up of {fixed_by[fixer_id]!r}; a fix-up "
                "fixes one task (give each failing task its own)",
                file=file,
                task=task.id,
                key="on_failure",
            )
        fixed_by[fixer_id] = task.id
        fixer = by_id[fixer_id]
        trigger = fixer.trigger
        if written[fixer_id].trigger:
            if trigger not in FIXUP_TRIGGERS:
                raise _fail(
                    f"trigger {trigger!r} never lets a fix-up see the failure of {task.id!r} "
                    f"(it is that task's on_failure): use all_done or one_failed",
                    file=file,
                    task=fixer_id,
                    key="trigger",
                )
        else:
            trigger = Trigger.ALL_DONE
        deps = fixer.deps if task.id in fixer.deps else (*fixer.deps, task.id)
        by_id[fixer_id] = attrs.evolve(fixer, deps=deps, trigger=trigger)


def _check_fixup_waits(by_id: Mapping[str, TaskSpec], file: str | None) -> None:
    """A failed task's dependents wait for its fix-up: the fix-up must not wait for them."""
    waits = {
        t.id: (*t.deps, *(f for d in t.deps if (f := by_id[d].on_failure) and f != t.id))
        for t in by_id.values()
    }
    try:
        graphlib.TopologicalSorter(waits).prepare()
    except graphlib.CycleError as exc:
        cycle = [str(node) for node in reversed(exc.args[1])]
        fixup = next(t for t in cycle if any(d.on_failure == t for d in by_id.values()))
        raise _fail(
            f"tasks wait for each other: {' -> '.join(cycle)} (each waits for the next: a failed "
            "task's dependents wait for its fix-up, so the fix-up cannot depend on them)",
            file=file,
            task=fixup,
            key="deps",
        ) from None


def _wire_agents(
    by_id: dict[str, TaskSpec], written: Mapping[str, Written], file: str | None, notes: list[str]
) -> None:
    users: dict[str, list[str]] = {}
    for task in by_id.values():
        owner_id = task.reuse_agent
        if owner_id is None:
            continue
        if owner_id == task.id:
            raise _fail(
                "a task cannot reuse its own agent", file=file, task=task.id, key="reuse_agent"
            )
        owner = by_id.get(owner_id)
        if owner is None:
            raise _fail(
                f"unknown task {owner_id!r}{suggestion(owner_id, by_id)}",
                file=file,
                task=task.id,
                key="reuse_agent",
            )
        if owner.reuse_agent is not None:
            raise _fail(
                f"task {owner_id!r} itself continues the agent of {owner.reuse_agent!r}: name "
                f"that task ({owner.reuse_agent!r})",
                file=file,
                task=task.id,
                key="reuse_agent",
            )
        if written[owner_id].keep_agent is not True and not owner.keep_agent:
            raise _fail(
                f"task {owner_id!r} does not keep its agent: give it keep_agent = true",
                file=file,
                task=task.id,
                key="reuse_agent",
            )
        users.setdefault(owner_id, []).append(task.id)

    for task in list(by_id.values()):
        if task.keep_agent and task.reuse_agent is None and task.id not in users:
            notes.append(
                f"task {task.id!r} keeps its agent (keep_agent = true) but no task reuses it: "
                "the agent ends with the task"
            )
            by_id[task.id] = attrs.evolve(task, keep_agent=False)
    if not users:
        return
    order = graphlib.TopologicalSorter({t.id: t.deps for t in by_id.values()}).static_order()
    position = {tid: i for i, tid in enumerate(order)}
    for owner_id, reusers in users.items():
        owner = by_id[owner_id]
        chain = [owner_id, *sorted(reusers, key=position.__getitem__)]
        for before, after in itertools.pairwise(chain):
            if not _depends_on(by_id, after, before):
                raise _fail(
                    f"tasks {before!r} and {after!r} both use the agent of {owner_id!r}, but "
                    f"{after!r} does not depend on {before!r}: an agent takes one prompt at a "
                    f"time, so add {before!r} to the deps of {after!r}",
                    file=file,
                    task=after,
                    key="reuse_agent",
                )
        for i, tid in enumerate(chain):
            task = by_id[tid]
            last = i == len(chain) - 1
            if not last and written[tid].keep_agent is False:
                raise _fail(
                    f"keep_agent = false ends the agent of {owner_id!r} here, but "
                    f"{chain[i + 1]!r} reuses it later",
                    file=file,
                    task=tid,
                    key="keep_agent",
                )
            if tid != owner_id:
                task = _inherit(task, owner, written[tid], file)
            by_id[tid] = attrs.evolve(task, keep_agent=not last)


def _depends_on(by_id: Mapping[str, TaskSpec], task_id: str, ancestor: str) -> bool:
    """Whether ``ancestor`` is upstream of ``task_id``: a walk per question, not every task's
    ancestor set (quadratic in memory on a long chain)."""
    seen: set[str] = set()
    stack = list(by_id[task_id].deps)
    while stack:
        dep = stack.pop()
        if dep == ancestor:
            return True
        if dep not in seen:
            seen.add(dep)
            stack.extend(by_id[dep].deps)
    return False


def _inherit(task: TaskSpec, owner: TaskSpec, written: Written, file: str | None) -> TaskSpec:
    """A task continuing ``owner``'s agent runs that agent, in its work dir."""
    if written.agent and task.agent != owner.agent:
        raise _fail(
            f"agent {task.agent!r} differs from {owner.agent!r}, the agent of task {owner.id!r} "
            "that this task continues (leave the agent out)",
            file=file,
            task=task.id,
            key="agent",
        )
    if written.work_dir and task.work_dir != owner.work_dir:
        raise _fail(
            f"the agent of task {owner.id!r} works in {owner.work_dir or 'the run directory'!r}; "
            "a task continuing it cannot move it (leave work_dir out)",
            file=file,
            task=task.id,
            key="work_dir",
        )
    if task.agent_config is not None and task.agent_config != owner.agent_config:
        raise _fail(
            f"agent_config applies when an agent starts: give it on task {owner.id!r}, whose "
            "agent this task continues",
            file=file,
            task=task.id,
            key="agent_config",
        )
    config = owner.agent_config
    timeout = task.timeout_secs
    if timeout is None and config is not None:
        timeout = config.timeout_secs
    return attrs.evolve(
        task,
        agent=owner.agent,
        work_dir=owner.work_dir,
        agent_config=config,
        timeout_secs=timeout,
    )


def _wire_conditions(
    by_id: dict[str, TaskSpec], written: Mapping[str, Written], file: str | None
) -> None:
    for tid, task in list(by_id.items()):
        text = written[tid].condition
        if text is None:
            continue
        try:
            condition = parse_condition(text, deps=task.deps)
        except ConditionError as exc:
            raise _fail(f"{text!r}: {exc}", file=file, task=tid, key="condition") from None
        by_id[tid] = attrs.evolve(task, condition=condition)


def _template_notes(tasks: Iterable[TaskSpec], notes: list[str]) -> None:
    for task in tasks:
        if not task.prompt_template:
            continue
        unset = [
            v
            for v in template_vars(task.prompt)
            if v not in TEMPLATE_BUILTINS and v not in task.env
        ]
        if unset:
            shown = ", ".join("{{" + v + "}}" for v in unset)
            notes.append(
                f"task {task.id!r}: {shown} in its prompt has no value (set it in env or "
                "[dag.env]); it is left as written"
            )

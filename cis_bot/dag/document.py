"""A DAG as the JSON document a run's room keeps (``cis.dag.run.created``) and an assignment
carries (one task), resolved: every task's agent and prompt explicit, skills already read, the
DAG's environment in each task's, so any node reads it back to the same spec whatever its own
config (``parse_dag(json.dumps(doc), fmt="json", agents=None, ...)`` gives back an equal
DagSpec, but for ``source``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import attrs

from cis_bot.dag.load import read_task_table
from cis_bot.dag.spec import (
    DEFAULT_RETRY,
    DEFAULT_RETRY_BACKOFF_SECS,
    DagSpec,
    Level,
    LevelKind,
    TaskSpec,
    Trigger,
)


def task_to_document(task: TaskSpec) -> dict[str, Any]:
    """A task as a table of dag.json's layout, resolved."""
    doc: dict[str, Any] = {"id": task.id, "agent": task.agent, "prompt": task.prompt}
    if task.prompt_template:
        doc["prompt_template"] = True
    if task.name:
        doc["name"] = task.name
    if task.deps:
        doc["deps"] = list(task.deps)
    for key in ("command", "skill", "work_dir", "timeout_secs", "on_failure", "reuse_agent"):
        value = getattr(task, key)
        if value is not None:
            doc[key] = value
    if task.env:
        doc["env"] = dict(task.env)
    if task.retry != DEFAULT_RETRY:
        doc["retry"] = task.retry
    if task.trigger is not Trigger.ALL_SUCCESS:
        doc["trigger"] = str(task.trigger)
    if task.condition is not None:
        doc["condition"] = task.condition.source
    if task.rollback:
        doc["rollback"] = list(task.rollback)
    if not task.idempotent:
        doc["idempotent"] = False
    if task.keep_agent:
        doc["keep_agent"] = True
    if task.agent_config is not None:
        doc["agent_config"] = {
            k: v for k, v in attrs.asdict(task.agent_config).items() if v is not None
        }
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
    """The DAG in dag.json's layout."""
    dag: dict[str, Any] = {"name": spec.name, "policy": str(spec.policy)}
    if spec.max_workers is not None:
        dag["max_workers"] = spec.max_workers
    if spec.retry_backoff_secs != DEFAULT_RETRY_BACKOFF_SECS:
        dag["retry_backoff_secs"] = spec.retry_backoff_secs
    if spec.env:
        dag["env"] = dict(spec.env)
    if spec.todo:
        dag["todo"] = [
            {k: v for k, v in attrs.asdict(item).items() if v not in (None, "")}
            for item in spec.todo
        ]
    if spec.adaptive:
        dag["adaptive"] = {"rules": list(spec.adaptive)}
    dag["tasks"] = [task_to_document(t) for t in spec.tasks]
    return {"dag": dag}


def parse_task_document(
    doc: Mapping[str, Any], *, file: str, agents: Collection[str] | None
) -> TaskSpec:
    """One resolved task table (as ``task_to_document`` writes it), validated alone: its deps
    name tasks of a DAG the reader may not have."""
    return read_task_table(doc, file=file, agents=agents)

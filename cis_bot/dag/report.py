"""The run report, built from the engine's state alone: what ``cis dag execute --json`` prints
and ``report.json`` keeps, and what ``cis dag status`` shows of a run read back from its room."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cis_bot.dag.engine import Outcome

if TYPE_CHECKING:
    from cis_bot.dag.engine import RunEngine


def build_report(
    engine: RunEngine,
    *,
    run_id: str,
    transcripts: Mapping[tuple[str, int], str] | None = None,
    **run_fields: Any,
) -> dict[str, Any]:
    """``transcripts``: (task, attempt) -> where that attempt's transcript is kept (a file path,
    or an mxc URI for a session another node ran). ``run_fields`` (the duration, the mode, ...)
    follow the run's status in the report."""
    kept = transcripts or {}
    tasks: dict[str, Any] = {}
    for task_id, record in engine.tasks.items():
        attempt = record.current
        duration = attempt.duration_s if attempt else None
        transcript = kept.get((task_id, attempt.number)) if attempt else None
        tasks[task_id] = {
            "status": str(record.status),
            "attempts": len(record.attempts),
            "exit_code": record.exit_code,
            "duration_s": None if duration is None else round(duration, 3),
            "transcript": transcript,
            "reason": record.reason,
            "node": attempt.node if attempt else None,
        }
        if (fixer := engine.handled_by(task_id)) is not None:
            tasks[task_id]["handled_by"] = fixer
    return {
        "run_id": run_id,
        "dag": engine.spec.name,
        "status": str(engine.status),
        **run_fields,
        "debts": engine.debts,
        "rollback": rollback_report(engine, kept),
        "tasks": tasks,
    }


def rollback_report(
    engine: RunEngine, transcripts: Mapping[tuple[str, int], str]
) -> list[dict[str, Any]]:
    """The run's rollback, newest task first: each task's commands and how they went (``not
    run`` after one that failed: what is left may depend on what that one did not undo)."""
    entries: list[dict[str, Any]] = []
    stopped_by: str | None = None
    for task_id in engine.rollback_plan:
        record = engine.tasks[task_id]
        rollback = record.rollback
        entry: dict[str, Any] = {"task": task_id, "commands": list(record.spec.rollback)}
        if rollback is None:
            entry["status"] = "not run"
            if stopped_by is not None:
                entry["reason"] = f"the rollback of {stopped_by} failed"
        elif rollback.outcome is None:
            entry["status"] = "running"
        else:
            ok = rollback.outcome is Outcome.COMPLETED
            entry["status"] = "completed" if ok else "failed"
            entry["exit_code"] = rollback.exit_code
            if not ok:
                entry["reason"] = rollback.error or str(rollback.outcome)
                stopped_by = stopped_by or task_id
            entry["transcript"] = transcripts.get((task_id, rollback.number))
        entries.append(entry)
    return entries

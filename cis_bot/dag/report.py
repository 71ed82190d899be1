"""The run report, built from the engine's state alone: what ``cis dag execute --json`` prints
and ``report.json`` keeps, and what ``cis dag status`` shows of a run read back from its room."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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
    tasks: dict[str, Any] = {}
    for task_id, record in engine.tasks.items():
        attempt = record.current
        duration = attempt.duration_s if attempt else None
        transcript = (transcripts or {}).get((task_id, attempt.number)) if attempt else None
        tasks[task_id] = {
            "status": str(record.status),
            "attempts": len(record.attempts),
            "exit_code": record.exit_code,
            "duration_s": None if duration is None else round(duration, 3),
            "transcript": transcript,
            "reason": record.reason,
            "node": attempt.node if attempt else None,
        }
    return {
        "run_id": run_id,
        "dag": engine.spec.name,
        "status": str(engine.status),
        **run_fields,
        "debts": engine.debts,
        "tasks": tasks,
    }

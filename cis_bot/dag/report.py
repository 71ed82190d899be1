"""The run report: what ``cis dag execute --json`` prints and what ``report.json`` keeps."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cis_bot.dag.engine import RunEngine
    from cis_bot.dag.runner import RunPaths


def build_report(
    engine: RunEngine,
    *,
    run_id: str,
    paths: RunPaths,
    duration_s: float,
    transcripts: Mapping[tuple[str, int], str] | None = None,
) -> dict[str, Any]:
    """``transcripts`` names transcripts kept elsewhere (mxc URIs of sessions run by other
    nodes); local transcripts are found under ``paths``."""
    tasks: dict[str, Any] = {}
    for task_id, record in engine.tasks.items():
        attempt = record.current
        transcript: Path | str | None = None
        if attempt is not None:
            local = paths.transcript(task_id, attempt.number)
            remote = (transcripts or {}).get((task_id, attempt.number))
            transcript = local if local.exists() else remote
        duration = attempt.duration_s if attempt else None
        tasks[task_id] = {
            "status": str(record.status),
            "attempts": len(record.attempts),
            "exit_code": record.exit_code,
            "duration_s": None if duration is None else round(duration, 3),
            "transcript": str(transcript) if transcript else None,
            "reason": record.reason,
        }
    return {
        "run_id": run_id,
        "dag": engine.spec.name,
        "status": str(engine.status),
        "duration_s": round(duration_s, 3),
        "debts": engine.debts,
        "tasks": tasks,
    }

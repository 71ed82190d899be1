"""How one attempt of a task runs as a session, wherever it runs (the local executor, a worker):
where the run keeps its files, the CIS_* environment, the upstream outputs as files and in the
prompt, the transcript's path."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

from cis_bot import private
from cis_bot.dag.engine import RunEngine
from cis_bot.dag.skills import render_template, shell_script
from cis_bot.dag.spec import SHELL_AGENT, TaskSpec
from cis_bot.ids import SessionId
from cis_bot.run.agentconfig import config_options
from cis_bot.session.manager import SessionSpec
from cis_bot.session.profile import AgentProfile

#: Each upstream output appended to an agent's prompt is cut to its last this-many characters.
UPSTREAM_PROMPT_LIMIT = 10_000


@attrs.frozen
class RunPaths:
    """Where a run keeps its files: ``<state_dir>/runs/<run_id>/``."""

    run_dir: Path

    @classmethod
    def of(cls, state_dir: Path, run_id: str) -> RunPaths:
        return cls(state_dir / "runs" / run_id)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def transcript(self, task_id: str, attempt: int) -> Path:
        return self.run_dir / "sessions" / f"{task_id}.{attempt}.log"

    def upstream_dir(self, task_id: str) -> Path:
        return self.run_dir / "upstream" / task_id

    @property
    def report(self) -> Path:
        return self.run_dir / "report.json"

    def transcripts_kept(self, engine: RunEngine) -> dict[tuple[str, int], str]:
        """(task, attempt) -> transcript path, for each task's last attempt (and its rollback)
        that left one here."""
        found: dict[tuple[str, int], str] = {}
        for task_id, record in engine.tasks.items():
            for attempt in (record.current, record.rollback):
                if attempt is not None:
                    path = self.transcript(task_id, attempt.number)
                    if path.exists():
                        found[(task_id, attempt.number)] = str(path)
        return found

    @staticmethod
    def every_transcript(state_dir: Path) -> Iterator[tuple[SessionId, Path]]:
        """Every transcript under ``state_dir``'s runs, with the session it is of."""
        for path in sorted((state_dir / "runs").glob("*/sessions/*.log")):
            task_id, _, attempt = path.name[: -len(".log")].rpartition(".")
            if task_id and attempt.isdigit():
                yield SessionId(path.parent.parent.name, task_id, int(attempt)), path


def rollback_task(task: TaskSpec) -> TaskSpec:
    """What runs a task's rollback: its ``rollback`` commands in the shell, in its work dir and
    environment, stopping at the first that fails."""
    script = shell_script(task.rollback)
    return attrs.evolve(
        task,
        agent=SHELL_AGENT,
        prompt=script,
        command=script,
        deps=(),
        prompt_template=False,
        keep_agent=False,
        reuse_agent=None,
        agent_config=None,
        timeout_secs=None,
    )


def rendered(task: TaskSpec, engine: RunEngine, *, run_id: str, attempt: int) -> TaskSpec:
    """A task whose prompt is a template (a skill's), with its ``{{VARS}}`` filled in from the
    task's environment and the run: RUN_ID, DAG_NAME, TASK_ID, TASK_NAME, ATTEMPT, WORK_DIR (the
    task's work_dir as the DAG gives it, ``.`` without one), and of the deps that failed
    FAILED_TASK, FAILED_TASK_NAME and ERROR_LOG (their output's end and why they failed).
    Rendered once, by the run's coordinator, so values that come from outputs are never read as
    variables."""
    if not task.prompt_template:
        return task
    failed = [dep for dep in task.deps if engine.tasks[dep].status.is_failure]
    logs = []
    for dep in failed:
        record = engine.tasks[dep]
        output = record.output.strip()
        if len(output) > UPSTREAM_PROMPT_LIMIT:
            output = f"[... earlier output omitted]\n{output[-UPSTREAM_PROMPT_LIMIT:]}"
        logs.append(f"{output}\n({dep} {record.status}: {record.reason or 'no reason given'})")
    values = {
        **task.env,
        "RUN_ID": run_id,
        "DAG_NAME": engine.spec.name,
        "TASK_ID": task.id,
        "TASK_NAME": task.name or task.id,
        "ATTEMPT": str(attempt),
        "WORK_DIR": task.work_dir or ".",
        "FAILED_TASK": ", ".join(failed),
        "FAILED_TASK_NAME": ", ".join(engine.spec.task(d).name or d for d in failed),
        "ERROR_LOG": "\n\n".join(logs),
    }
    return attrs.evolve(task, prompt=render_template(task.prompt, values), prompt_template=False)


def prompt_with_upstream(prompt: str, upstream: Mapping[str, str]) -> str:
    """The prompt plus an "Upstream task outputs" section, each output bounded."""
    if not upstream:
        return prompt
    parts = [prompt.rstrip(), "", "## Upstream task outputs"]
    for dep, output in upstream.items():
        text = output.strip()
        if len(text) > UPSTREAM_PROMPT_LIMIT:
            omitted = len(text) - UPSTREAM_PROMPT_LIMIT
            text = f"[... {omitted} earlier characters omitted]\n{text[-UPSTREAM_PROMPT_LIMIT:]}"
        parts += ["", f"### {dep}", text or "(no output)"]
    return "\n".join(parts) + "\n"


def attempt_session(
    task: TaskSpec,
    attempt: int,
    *,
    run_id: str,
    node_id: str,
    paths: RunPaths,
    profile: AgentProfile,
    upstream: Mapping[str, str],
    work_dir: Path,
) -> SessionSpec:
    """The session that runs attempt ``attempt`` of ``task`` on node ``node_id`` (every
    ``CIS_*`` variable set here is listed in docs/dag-format.md)."""
    sid = str(SessionId(run_id, task.id, attempt))
    env = {
        **task.env,
        "CIS_RUN_ID": run_id,
        "CIS_TASK_ID": task.id,
        "CIS_ATTEMPT": str(attempt),
        "CIS_SESSION_ID": sid,
        "CIS_NODE_ID": node_id,
    }
    if task.deps:
        directory = private.make_dirs(paths.upstream_dir(task.id))
        for dep, output in upstream.items():
            private.write_file(directory / f"{dep}.txt", output)
        env["CIS_UPSTREAM_DIR"] = str(directory)
    prompt = task.prompt
    if profile.upstream_in_prompt:
        prompt = prompt_with_upstream(prompt, upstream)
    options, config_env = config_options(profile, task.agent_config)
    return SessionSpec(
        session_id=sid,
        profile=profile,
        prompt=prompt,
        work_dir=work_dir / task.work_dir if task.work_dir else work_dir,
        transcript_path=paths.transcript(task.id, attempt),
        env={**config_env, **env},
        options=options,
    )

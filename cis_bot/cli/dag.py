"""``cis dag ...``: validate and execute DAGs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cis_bot.errors import UserError

if TYPE_CHECKING:
    from cis_bot.config import Config
    from cis_bot.dag.spec import DagSpec
    from cis_bot.execute import RunRequest

_MODES = ("local", "matrix", "hybrid", "federation")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dag = subparsers.add_parser("dag", help="validate and run DAGs of agent sessions")
    commands = dag.add_subparsers(dest="dag_command", metavar="COMMAND", required=True)

    validate = commands.add_parser("validate", help="check a dag.toml (or .json) and exit")
    validate.add_argument("file", type=Path, metavar="FILE")
    validate.add_argument("--config", type=Path, metavar="F", help="config.toml to read")
    validate.add_argument("--json", action="store_true", help="print the result as JSON")
    validate.set_defaults(handler=_validate)

    execute = commands.add_parser("execute", help="run a DAG")
    modes = execute.add_mutually_exclusive_group()
    modes.add_argument("--local", dest="mode", action="store_const", const="local")
    modes.add_argument("--matrix", dest="mode", action="store_const", const="matrix")
    modes.add_argument("--hybrid", dest="mode", action="store_const", const="hybrid")
    modes.add_argument("--federation", dest="mode", action="store_const", const="federation")
    execute.add_argument("file", type=Path, metavar="FILE")
    execute.add_argument("--room", metavar="R", help="room id or alias (matrix, hybrid)")
    execute.add_argument("--workers", metavar="A,B,C", help="worker node ids (federation)")
    execute.add_argument("--config", type=Path, metavar="F", help="config.toml to read")
    execute.add_argument("--max-workers", type=_positive_int, metavar="N")
    execute.add_argument("--state-dir", type=Path, metavar="D", help="where runs keep their files")
    execute.add_argument("--json", action="store_true", help="print only a JSON report on stdout")
    execute.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    execute.set_defaults(handler=_execute, parser=execute)


def _load(file: Path, config_path: Path | None) -> tuple[Config, DagSpec]:
    from cis_bot.config import load_config
    from cis_bot.dag.spec import load_dag

    config = load_config(config_path)
    spec = load_dag(file, agents=config.agents.keys(), default_agent=config.dag.local.default_agent)
    return config, spec


def _validate(args: argparse.Namespace) -> int:
    from cis_bot.errors import InputError

    try:
        _, spec = _load(args.file, args.config)
    except InputError as exc:
        if not args.json:
            raise
        print(json.dumps({"valid": False, "error": str(exc), "task": exc.task, "key": exc.key}))
        return exc.exit_code
    if args.json:
        print(json.dumps({"valid": True, "dag": spec.name, "tasks": [t.id for t in spec.tasks]}))
    else:
        print(f"{args.file}: ok ({spec.name}: {len(spec.tasks)} tasks)")
    return 0


def _execute(args: argparse.Namespace) -> int:
    from cis_bot import log
    from cis_bot.config import ExecutionMode
    from cis_bot.dag.runner import default_state_dir
    from cis_bot.execute import RunRequest

    log.configure(args.log_level)
    config, spec = _load(args.file, args.config)
    mode = ExecutionMode(args.mode or config.dag.execution_mode)
    parser: argparse.ArgumentParser = args.parser
    if mode in (ExecutionMode.MATRIX, ExecutionMode.HYBRID) and not args.room:
        parser.error(f"--{mode} needs --room R")
    if mode is ExecutionMode.FEDERATION:
        raise UserError("--federation is not implemented yet; use --matrix, --hybrid or --local")
    request = RunRequest(
        spec=spec,
        config=config,
        mode=mode,
        max_workers=args.max_workers or spec.max_workers or config.dag.local.max_workers,
        state_dir=args.state_dir or default_state_dir(),
        work_dir=Path.cwd(),
        room=args.room,
    )
    report = asyncio.run(_run(request, as_json=args.json))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"run {report['run_id']} {report['status']} in {report['duration_s']:.2f}s")
    return 0 if report["status"] == "completed" else 1


async def _run(request: RunRequest, *, as_json: bool) -> dict[str, Any]:
    from cis_bot.cli.progress import LiveProgress, PlainProgress
    from cis_bot.dag.engine import RunCancelled
    from cis_bot.dag.runner import RunDriver, RunObserver
    from cis_bot.execute import execute
    from cis_bot.session.manager import SessionManager

    progress: LiveProgress | PlainProgress | None = None
    if not as_json:
        progress = LiveProgress() if sys.stdout.isatty() else PlainProgress()
    observers: list[RunObserver] = [progress] if progress else []
    loop = asyncio.get_running_loop()
    running: list[tuple[RunDriver, SessionManager]] = []
    interrupts: list[asyncio.Task[None] | None] = []

    def on_interrupt() -> None:
        if not running:
            raise KeyboardInterrupt  # still connecting: nothing to cancel yet
        driver, manager = running[0]
        if not interrupts:
            driver.submit(RunCancelled(time.time(), by="SIGINT"))
            interrupts.append(None)
        elif len(interrupts) == 1:  # a second Ctrl-C: stop waiting for sessions to end gracefully
            interrupts.append(loop.create_task(manager.close(grace_secs=0)))

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    loop.add_signal_handler(signal.SIGTERM, on_interrupt)
    try:
        with progress or contextlib.nullcontext():
            return await execute(
                request,
                observers=observers,
                on_started=lambda driver, manager: running.append((driver, manager)),
            )
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)

"""``cis dag ...``: validate and execute DAGs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cis_bot.cli import collecting, print_table, whole_number
from cis_bot.cli.completion import completes, run_ids
from cis_bot.errors import UserError

if TYPE_CHECKING:
    from cis_bot.app.drive import OnStarted, StartedRun
    from cis_bot.app.execute import RunRequest
    from cis_bot.app.hsprocess import HomeserverProcess
    from cis_bot.cli.live import Attach, LiveProgress
    from cis_bot.config import Config, ExecutionMode
    from cis_bot.dag.spec import DagSpec
    from cis_bot.matrix.runs import RoomRun
    from cis_bot.run.driver import RunObserver

_MODES = ("local", "matrix", "hybrid", "federation")


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
    modes.add_argument(
        "--local",
        dest="mode",
        action="store_const",
        const="local",
        help="run here; the run's room lives on the local homeserver (in --state-dir)",
    )
    modes.add_argument(
        "--matrix",
        dest="mode",
        action="store_const",
        const="matrix",
        help="coordinate only: worker nodes in --room run the tasks",
    )
    modes.add_argument(
        "--hybrid",
        dest="mode",
        action="store_const",
        const="hybrid",
        help="run here and broadcast to --room (the default mode, from the config)",
    )
    modes.add_argument(
        "--federation",
        dest="mode",
        action="store_const",
        const="federation",
        help="coordinate only, over --room's workers on any homeserver; placement by "
        "target_node / node_selector (docs/federation.md)",
    )
    execute.add_argument("file", type=Path, metavar="FILE", help="dag.toml or .json")
    execute.add_argument(
        "--room", metavar="R", help="room id or alias (matrix, hybrid, federation)"
    )
    execute.add_argument(
        "--workers",
        metavar="A,B,C",
        help="--federation: only these workers (node ids or user ids); each must be live in "
        "--room within [dag.matrix] no_worker_timeout_secs (default: every live worker)",
    )
    execute.add_argument("--config", type=Path, metavar="F", help="config.toml to read")
    execute.add_argument(
        "--max-workers",
        type=whole_number(1),
        metavar="N",
        help="tasks at once (default: the DAG's max_workers, else the config's)",
    )
    execute.add_argument("--state-dir", type=Path, metavar="D", help="where runs keep their files")
    execute.add_argument("--json", action="store_true", help="print only a JSON report on stdout")
    execute.add_argument(
        "--dry-run",
        action="store_true",
        help="agent tasks talk to a local fake model that echoes their prompts (no tokens "
        "spent); shell tasks run as usual",
    )
    execute.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    execute.set_defaults(handler=_execute, parser=execute, collects_when_started=True)

    status = commands.add_parser("status", help="a run's tasks, read from its room")
    completes(
        status.add_argument(
            "run", nargs="?", metavar="RUN", help="run id or prefix (default: latest)"
        ),
        run_ids,
    )
    _room_reader_options(status)
    status.set_defaults(handler=_status)

    listing = commands.add_parser(
        "list", help="the runs in the rooms this node is in, newest first"
    )
    _room_reader_options(listing)
    listing.set_defaults(handler=_list)

    resume = commands.add_parser(
        "resume",
        help="pick up a run whose coordinator stopped, or re-run a failed run's unfinished tasks",
    )
    completes(resume.add_argument("run", metavar="RUN", help="run id or unique prefix"), run_ids)
    _room_reader_options(resume)
    resume.add_argument("--log-level", default="warning", help=argparse.SUPPRESS)
    resume.set_defaults(handler=_resume, collects_when_started=True)

    from cis_bot.cli import session

    session.register(commands)


def _room_reader_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--local",
        action="store_true",
        help="read the embedded homeserver's rooms in --state-dir (the default when the config "
        "names no homeserver)",
    )
    parser.add_argument("--room", metavar="R", help="only this room (id or alias)")
    parser.add_argument("--config", type=Path, metavar="F", help="config.toml to read")
    parser.add_argument("--state-dir", type=Path, metavar="D", help="where runs keep their files")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _load(file: Path, config_path: Path | None) -> tuple[Config, DagSpec, list[str]]:
    """The config, the DAG, and notes on what it says that is not an error."""
    from cis_bot.config import load_config
    from cis_bot.dag.load import load_dag
    from cis_bot.run.agentconfig import check_with_profiles

    config = load_config(config_path)
    spec = load_dag(
        file,
        agents=config.agents.keys(),
        default_agent=config.dag.local.default_agent,
        skills_dirs=config.skills_dirs,
    )
    notes = [*spec.notes, *check_with_profiles(spec, config.agents)]
    return config, spec, notes


def _validate(args: argparse.Namespace) -> int:
    from cis_bot.errors import InputError

    try:
        _, spec, notes = _load(args.file, args.config)
    except InputError as exc:
        if not args.json:
            raise
        print(json.dumps({"valid": False, "error": str(exc), "task": exc.task, "key": exc.key}))
        return exc.exit_code
    if args.json:
        tasks = [t.id for t in spec.tasks]
        print(json.dumps({"valid": True, "dag": spec.name, "tasks": tasks, "notes": notes}))
    else:
        print(f"{args.file}: ok ({spec.name}: {len(spec.tasks)} tasks)")
        for note in notes:
            print(f"  note: {note}")
        for item in spec.todo:
            facts = {"priority": item.priority, "status": item.status, "assignee": item.assignee}
            shown = ", ".join(f"{k} {v}" for k, v in facts.items() if v not in (None, ""))
            print(f"  todo {item.id}: {item.description}" + (f" ({shown})" if shown else ""))
        for rule in spec.adaptive:
            print(f"  adaptive rule (not applied): {rule}")
    return 0


def _execute(args: argparse.Namespace) -> int:
    from cis_bot.config import ExecutionMode, open_state_dir

    parser: argparse.ArgumentParser = args.parser
    workers = None
    if args.workers is not None:
        if args.mode != "federation":
            parser.error("--workers goes with --federation")
        workers = tuple(name.strip() for name in args.workers.split(",") if name.strip())
        if not workers:
            parser.error("--workers needs worker node ids, e.g. --workers wa,wb")
    config, spec, notes = _load(args.file, args.config)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    mode = ExecutionMode(args.mode or config.dag.execution_mode)
    if (
        not args.mode
        and mode is ExecutionMode.HYBRID
        and not args.room
        and not config.node.homeserver
    ):
        # The default mode with nothing to broadcast to: local execution with its room on the
        # local homeserver is exactly that (hybrid is local execution plus a room).
        mode = ExecutionMode.LOCAL
    if mode is not ExecutionMode.LOCAL and not args.room:
        parser.error(f"--{mode} needs --room R")
    if args.dry_run and mode in (ExecutionMode.MATRIX, ExecutionMode.FEDERATION):
        raise UserError("--dry-run runs the tasks on this machine: use it with --local or --hybrid")
    state_dir = open_state_dir(args.state_dir)
    started = _start_homeserver(mode, state_dir, config)
    from cis_bot.app.execute import RunRequest

    request = RunRequest(
        spec=spec,
        config=config,
        mode=mode,
        max_workers=args.max_workers or spec.max_workers or config.dag.local.max_workers,
        state_dir=state_dir,
        work_dir=Path.cwd(),
        room=args.room,
        workers=workers,
        started=started,
    )
    where = _where(args)
    return _finish(
        lambda: _run(request, as_json=args.json, dry_run=args.dry_run, where=where),
        args.json,
        where,
    )


def _start_homeserver(
    mode: ExecutionMode, state_dir: Path, config: Config
) -> HomeserverProcess | None:
    """A local run's homeserver, started before the run's imports, the better part of its
    start: it loads on another core meanwhile (see cis_bot/app/hsprocess.py)."""
    from cis_bot.config import ExecutionMode

    if mode is not ExecutionMode.LOCAL:
        return None
    from cis_bot.app.hsprocess import start_local

    return start_local(state_dir, config)


def _where(args: argparse.Namespace) -> str:
    """The options another ``cis`` command needs to find what this one does (the state directory
    and config given, made absolute), ready to append to a command line."""
    options = []
    if args.state_dir:
        options += ["--state-dir", str(args.state_dir.resolve())]
    if args.config:
        options += ["--config", str(args.config.resolve())]
    return "".join(f" {shlex.quote(option)}" for option in options)


def _finish(
    run: Callable[[], Coroutine[Any, Any, dict[str, Any]]], as_json: bool, where: str
) -> int:
    """Run, print the report, exit 0 when the run completed (and was recorded), else 1. As text:
    a line, and the command that shows each failed task's log."""
    from cis_bot.app.drive import RunNotRecorded

    problem = None
    try:
        report = asyncio.run(run())
    except RunNotRecorded as exc:
        report, problem = exc.report, exc
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        run_id = report["run_id"]
        print(f"run {run_id} {report['status']} in {report['duration_s']:.2f}s")
        failed = [
            (task_id, task)
            for task_id, task in report["tasks"].items()
            if task["status"] in ("failed", "timeout")
        ]
        for task_id, task in failed[:_FAILED_SHOWN]:
            why = f" ({task['reason'][:60]})" if task["reason"] else ""
            ref = shlex.quote(f"{run_id}:{task_id}")
            print(f"  {task_id} {task['status']}{why}: cis dag logs {ref}{where}")
        if len(failed) > _FAILED_SHOWN:
            more = len(failed) - _FAILED_SHOWN
            print(f"  ... and {more} more failed: cis dag status {shlex.quote(run_id)}{where}")
    if problem is not None:
        raise problem
    return 0 if report["status"] == "completed" else 1


#: Failed tasks whose log command the end of a run shows.
_FAILED_SHOWN = 5


async def _run(request: RunRequest, *, as_json: bool, dry_run: bool, where: str) -> dict[str, Any]:
    from cis_bot.app.execute import execute

    async def run(observers: list[RunObserver], on_started: OnStarted) -> dict[str, Any]:
        if not dry_run:
            return await execute(request, observers=observers, on_started=on_started)
        import attrs

        from cis_bot.app.dryrun import describe
        from cis_bot.app.dryrun import dry_run as fake_model

        async with fake_model(
            request.config, request.spec, state_dir=request.state_dir, work_dir=request.work_dir
        ) as dry:
            report = await execute(
                attrs.evolve(request, config=dry.config),
                observers=observers,
                on_started=on_started,
            )
            print(describe(dry), file=sys.stderr)
            return report

    return await _with_progress(
        run, as_json=as_json, config=request.config, state_dir=request.state_dir, where=where
    )


async def _with_progress(
    run: Callable[[list[RunObserver], OnStarted], Awaitable[dict[str, Any]]],
    *,
    as_json: bool,
    config: Config,
    state_dir: Path,
    where: str,
) -> dict[str, Any]:
    """Run with a progress display (unless JSON), Ctrl-C cancelling the run: the first
    interrupt cancels it, the second stops waiting for its sessions to end gracefully. On a
    terminal, a live table; keys attach to the run's sessions when we have the keyboard."""
    from cis_bot.cli.progress import PlainProgress
    from cis_bot.dag.engine import RunCancelled

    live: LiveProgress | None = None
    plain: PlainProgress | None = None
    if not as_json and sys.stdout.isatty():
        from cis_bot.cli.live import LiveProgress

        attach = _attacher(config, state_dir) if _typing_here() else None
        live = LiveProgress(where=where, attach=attach)
    elif not as_json:
        plain = PlainProgress()
    observers: list[RunObserver] = [o for o in (live, plain) if o is not None]
    loop = asyncio.get_running_loop()
    running: list[StartedRun] = []
    interrupts: list[asyncio.Task[None] | None] = []

    def on_started(run: StartedRun) -> None:
        collecting()  # start-up is over (see cli.run)
        running.append(run)
        if live is not None:
            live.started(run.run_id, run.manager)

    def on_interrupt() -> None:
        if not running:
            raise KeyboardInterrupt  # still connecting: nothing to cancel yet
        if not interrupts:
            running[0].driver.submit(RunCancelled(time.time(), by="SIGINT"))
            interrupts.append(None)
        elif len(interrupts) == 1:
            interrupts.append(loop.create_task(running[0].manager.close(grace_secs=0)))

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    loop.add_signal_handler(signal.SIGTERM, on_interrupt)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if live is not None:
                await stack.enter_async_context(live)
            if plain is not None:
                stack.enter_context(plain)
            return await run(observers, on_started)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)


def _typing_here() -> bool:
    """stdin is the terminal, and we are its foreground job (a job started with ``&`` that
    touched the terminal's modes or read from it would be stopped)."""
    try:
        fd = sys.stdin.fileno()
        return os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError):
        return False


def _attacher(config: Config, state_dir: Path) -> Attach:
    """The live view's attach: as ``cis dag attach`` does it, to a session of this machine."""

    async def attach(session_id: str) -> str:
        from cis_bot.cli.session import DEFAULT_TIMEOUT
        from cis_bot.control.client.lookup import Lookup

        lookup = Lookup(config, state_dir, timeout=DEFAULT_TIMEOUT, local_only=True)
        try:
            record = await lookup.find_session(session_id, live=True)
            result = await lookup.attach(record, readonly=False)
        finally:
            await lookup.close()
        return f"{record.session_id}: {result.message}"

    return attach


def _reader_mode(args: argparse.Namespace) -> tuple[Config, ExecutionMode, Path]:
    from cis_bot.config import ExecutionMode, load_config, open_state_dir

    config = load_config(args.config)
    local = args.local or not config.node.homeserver
    mode = ExecutionMode.LOCAL if local else ExecutionMode(config.dag.execution_mode)
    return config, mode, open_state_dir(args.state_dir)


async def _read(args: argparse.Namespace) -> list[RoomRun]:
    from cis_bot.app.connect import open_connection
    from cis_bot.matrix.runs import joined_rooms, read_runs

    config, mode, state_dir = _reader_mode(args)
    connection = await open_connection(config, mode, state_dir, serve=False)
    try:
        node = connection.node
        rooms = await joined_rooms(node, args.room)
        return await read_runs(node, rooms, node.identity.trusted_coordinators)
    finally:
        await connection.close()


def _status(args: argparse.Namespace) -> int:
    from cis_bot.matrix.runs import pick_run

    summary = pick_run(asyncio.run(_read(args)), args.run).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"run {summary['run_id']} ({summary['dag']}, {summary['mode']}): {summary['status']}")
    for task_id, task in summary["tasks"].items():
        detail = f" — {task['reason']}" if task["reason"] else ""
        node = f" on {task['node']}" if task["node"] else ""
        print(f"  {task_id}: {task['status']} (attempts {task['attempts']}{node}){detail}")
    return 0


def _list(args: argparse.Namespace) -> int:
    summaries = sorted(
        (run.summary() for run in asyncio.run(_read(args))), key=_created_at, reverse=True
    )
    if args.json:
        keys = ("run_id", "dag", "status", "mode", "created_at", "room_id", "resumed_from")
        print(json.dumps([{k: s[k] for k in keys} for s in summaries], indent=2))
        return 0
    if not summaries:
        print("no runs")
        return 0
    rows = []
    for s in summaries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created_at"] / 1000))
        done = sum(1 for t in s["tasks"].values() if t["status"] == "completed")
        rows.append(
            (s["run_id"], when, s["status"], f"{done}/{len(s['tasks'])}", s["mode"], s["dag"])
        )
    print_table(("RUN", "CREATED", "STATUS", "DONE", "MODE", "DAG"), rows)
    return 0


def _created_at(summary: dict[str, Any]) -> int:
    created: int = summary["created_at"]
    return created


def _resume(args: argparse.Namespace) -> int:
    where = _where(args)
    config, mode, state_dir = _reader_mode(args)
    started = _start_homeserver(mode, state_dir, config)
    return _finish(
        lambda: _resume_run(args, where, config, mode, state_dir, started), args.json, where
    )


async def _resume_run(
    args: argparse.Namespace,
    where: str,
    config: Config,
    mode: ExecutionMode,
    state_dir: Path,
    started: HomeserverProcess | None,
) -> dict[str, Any]:
    from cis_bot.app.resume import resume

    async def run(observers: list[RunObserver], on_started: OnStarted) -> dict[str, Any]:
        return await resume(
            config,
            mode=mode,
            wanted=args.run,
            room=args.room,
            state_dir=state_dir,
            work_dir=Path.cwd(),
            observers=observers,
            on_started=on_started,
            started=started,
        )

    return await _with_progress(
        run, as_json=args.json, config=config, state_dir=state_dir, where=where
    )

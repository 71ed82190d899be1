"""A node's runs started from the chat: ``run`` (a DAG of the node's DAG directory, or a file sent
with the command) and ``resume``.

A run started from a room uses that room as its room, in the mode the node's config says
(``[dag] execution_mode``: ``matrix``: the room's workers run the tasks; ``hybrid`` or
``local``: this node runs them and reports to the room). Its driver shares the node's control
plane and worker; its notices (blocked sessions, approvals) go to the room; when it ends, the
command that started it gets a second answer saying how it went.

Raw ``command`` tasks (the ``shell`` profile) of a DAG from the node's directory are the node's
owner's; in a file someone sends, they run only when the owner listed that sender in ``[chat]
shell_users``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path

import structlog

from cis_bot.app.chat.actions import Answer, Request
from cis_bot.app.chat.notices import NoticeIndex, NoticeSettings, RunNotices
from cis_bot.app.chat.rooms import RoomFacts
from cis_bot.app.chat.view import RoomView
from cis_bot.app.drive import COORDINATED_MODES, RunPlan, announce, drive_run
from cis_bot.app.resume import plan_resume
from cis_bot.chat.compose import Text, code, para
from cis_bot.chat.incoming import FileRef, Message
from cis_bot.config import Config, ExecutionMode
from cis_bot.control.operations import ControlPlane
from cis_bot.dag.load import load_dag, parse_dag
from cis_bot.dag.spec import SHELL_AGENT, DagSpec
from cis_bot.errors import InputError, UserError
from cis_bot.ids import new_run_id
from cis_bot.matrix.leases import RunLeases
from cis_bot.matrix.node import Node
from cis_bot.run.agentconfig import check_with_profiles
from cis_bot.validation import format_for, suggestion

log = structlog.get_logger(__name__)

#: Largest DAG file taken from the room.
MAX_DAG_FILE_BYTES = 256 * 1024
DAG_SUFFIXES = (".toml", ".json")

Reply = Callable[[Message, Answer], Awaitable[None]]


class NodeRuns:
    def __init__(
        self,
        node: Node,
        plane: ControlPlane,
        config: Config,
        *,
        state_dir: Path,
        work_dir: Path,
        index: NoticeIndex,
        facts: RoomFacts,
        leases: RunLeases | None = None,
    ) -> None:
        self.node = node
        #: The node's leases on the runs it coordinates (one state event per room).
        self.leases = leases
        self.plane = plane
        self.config = config
        self.state_dir = state_dir
        self.work_dir = work_dir
        self.index = index
        self.facts = facts
        #: How a finished run's news reaches its command (the chat service sets it).
        self.reply: Reply | None = None
        self._drivers: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._drivers):
            task.cancel()
        if self._drivers:
            await asyncio.gather(*self._drivers, return_exceptions=True)

    # --- RunStarter ------------------------------------------------------------------------------

    async def run(self, request: Request, view: RoomView) -> Answer:
        spec, source = await self._dag(request)
        mode = self._mode()
        workers = request.command.options.get("--max-workers")
        max_workers = workers or spec.max_workers or self.config.dag.local.max_workers
        plan = RunPlan(new_run_id(), request.room_id, spec, mode, max_workers)
        await announce(self.node, plan, chat=True)
        self.drive(plan, reply_to=request.message)
        log.info("chat.run_started", run_id=plan.run_id, dag=spec.name, by=request.sender)
        prefix = self.config.chat.prefix
        return Answer(
            Text.join(
                [
                    para(
                        "▶️ Started run ",
                        code(plan.run_id),
                        f" of DAG {spec.name} ({source}; {mode} mode, {max_workers} at a time).",
                    ),
                    para(
                        "Its status table follows below; ",
                        code(f"{prefix} status {plan.run_id}"),
                        " and ",
                        code(f"{prefix} cancel {plan.run_id}"),
                        " work on it.",
                    ),
                ]
            )
        )

    async def resume(self, request: Request, view: RoomView) -> Answer:
        run = await view.pick(request.command.arg("RUN"))
        if run.run_id in {h.run_id for h in self.plane.run_handles}:
            raise UserError(f"run {run.run_id} is running here: nothing to resume")
        resumption = plan_resume(run, user_id=self.node.user_id, mode=self._mode())
        plan = resumption.plan
        if resumption.new:
            await announce(self.node, plan, resumed_from=resumption.resumed_from, chat=True)
        self.drive(plan, reply_to=request.message)
        what = (
            f"as run {plan.run_id}, keeping its completed tasks"
            if resumption.new
            else "from where its log ends"
        )
        return Answer(para(f"▶️ Resumed run {resumption.resumed_from} {what}."))

    # --- driving ---------------------------------------------------------------------------------

    def drive(self, plan: RunPlan, *, reply_to: Message | None) -> None:
        """Drive ``plan`` in the background, its notices in its room."""
        task = asyncio.create_task(self._drive(plan, reply_to))
        self._drivers.add(task)
        task.add_done_callback(self._drivers.discard)

    async def _drive(self, plan: RunPlan, reply_to: Message | None) -> None:
        chat = self.config.chat
        notices = RunNotices(
            self.node,
            room_id=plan.room_id,
            run_id=plan.run_id,
            index=self.index,
            settings=NoticeSettings(
                chat.prefix, chat.command_power_level, self.node.identity.allowed_users
            ),
            people=self.facts,
        )
        news: Text | None = None
        try:
            report = await drive_run(
                self.node,
                plan,
                config=self.config,
                state_dir=self.state_dir,
                work_dir=self.work_dir,
                observers=[notices],
                control=self.plane,
                own_worker=False,
                leases=self.leases,
            )
            icon = "🏁" if report["status"] == "completed" else "❌"
            failed = [
                f"{tid} ({t['status']})"
                for tid, t in report["tasks"].items()
                if t["status"] not in ("completed", "skipped")
            ]
            more = f"; not completed: {', '.join(failed)}" if failed else ""
            news = para(
                f"{icon} Run ",
                code(plan.run_id),
                f" {report['status']} in {report['duration_s']:.1f}s{more}.",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("chat.run_failed", run_id=plan.run_id)
            news = Text.of(f"⚠️ Run {plan.run_id} stopped: {type(exc).__name__}: {exc}")
        finally:
            await notices.close()
        if reply_to is not None and self.reply is not None and news is not None:
            await self.reply(reply_to, Answer(news))

    def _mode(self) -> ExecutionMode:
        mode = self.config.dag.execution_mode
        return mode if mode in COORDINATED_MODES else ExecutionMode.HYBRID

    # --- the DAG ---------------------------------------------------------------------------------

    async def _dag(self, request: Request) -> tuple[DagSpec, str]:
        """The DAG to run and where it came from."""
        name = request.command.arg("NAME")
        agents = self.config.agents.keys()
        default_agent = self.config.dag.local.default_agent
        if name is None:
            if request.file is None:
                raise UserError(
                    f"run what? `{self.config.chat.prefix} run NAME` runs NAME.toml from this "
                    "node's DAG directory; or attach a .toml/.json file with `run` as its "
                    "caption, or reply `run` to one"
                )
            spec = await self._from_file(request.file, agents, default_agent)
            self._check_shell(spec, request.sender)
            check_with_profiles(spec, self.config.agents)
            return spec, f"from {request.file.filename}"
        path = self._named(name)
        spec = load_dag(
            path,
            agents=agents,
            default_agent=default_agent,
            skills_dirs=self.config.skills_dirs,
        )
        check_with_profiles(spec, self.config.agents)
        return spec, f"from {path.name}"

    def _named(self, name: str) -> Path:
        directory = self.config.dags_dir
        for suffix in DAG_SUFFIXES:
            path = directory / f"{name}{suffix}"
            if path.is_file():
                return path
        known = sorted({p.stem for suffix in DAG_SUFFIXES for p in directory.glob(f"*{suffix}")})
        listing = f"; DAGs here: {', '.join(known)}" if known else " (it has none)"
        raise UserError(
            f"no DAG {name!r} in this node's DAG directory{suggestion(name, known)}{listing}"
        )

    async def _from_file(
        self, file: FileRef, agents: Collection[str], default_agent: str
    ) -> DagSpec:
        if not file.filename.lower().endswith(DAG_SUFFIXES):
            raise UserError(f"{file.filename}: a DAG file ends in .toml or .json")
        if file.size is not None and file.size > MAX_DAG_FILE_BYTES:
            raise UserError(
                f"{file.filename} is {file.size} bytes; a DAG file may have "
                f"{MAX_DAG_FILE_BYTES} at most"
            )
        data = await self.node.download(file.url)
        if len(data) > MAX_DAG_FILE_BYTES:
            raise UserError(
                f"{file.filename} is {len(data)} bytes; a DAG file may have "
                f"{MAX_DAG_FILE_BYTES} at most"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 text ({exc.reason})", file=file.filename) from None
        return parse_dag(
            text,
            file=file.filename,
            fmt=format_for(file.filename),
            agents=agents,
            default_agent=default_agent,
            skill_folders=self.config.skills_dirs,
        )

    def _check_shell(self, spec: DagSpec, sender: str) -> None:
        # A rollback is a raw command too, and so is a shell skill's script.
        commands = [task.id for task in spec.tasks if task.agent == SHELL_AGENT or task.rollback]
        if commands and sender not in self.config.chat.shell_users:
            raise UserError(
                f"task {', '.join(commands)} runs a raw command, which this node runs from a sent "
                f"file only for the users its owner lists in [chat] shell_users ({sender} is not "
                "one); give the task an agent, or ask the owner to add the DAG to the node's "
                "DAG directory"
            )

"""``cis dev-cluster up``: the cluster's processes started, watched and stopped.

In order: the directory (configs, tokens, registrations: reused from an earlier ``up``), the
homeserver (once it answers: the person's account), the nodes, the room (once the nodes are
connected, so its invitations find them), then ready when every node is in the room and has
beaten there. Until stopped (SIGINT, SIGTERM, SIGHUP: Ctrl-C in the foreground, ``down``
for a detached one) it tells its view how every process is; then it stops the nodes first (they
end their sessions and say so while the homeserver still answers), then the homeserver, then
whatever is left below it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Protocol

import aiohttp
import attrs
import structlog

from cis_bot import private
from cis_bot.app.devcluster.errors import ClusterError
from cis_bot.app.devcluster.homeservers import Homeserver, homeserver_of
from cis_bot.app.devcluster.layout import (
    DEFAULT_PORT,
    ClusterDir,
    ClusterState,
    free_port,
    port_free,
)
from cis_bot.app.devcluster.processes import (
    Child,
    ProcessRecord,
    Running,
    become_subreaper,
    end_descendants,
    self_record,
)
from cis_bot.app.devcluster.room import (
    PersonClient,
    ensure_room,
    heartbeats_in,
    wait_for_nodes,
)
from cis_bot.app.devcluster.topology import DEFAULT_WORKERS, FIRST_DAG, Topology
from cis_bot.control.registry import control_dir
from cis_bot.errors import UserError
from cis_bot.matrix.levels import run_room_event_levels

log = structlog.get_logger(__name__)

#: How long the homeserver may take to answer (Synapse's first start creates its database).
HOMESERVER_TIMEOUT = 120.0
#: How long the nodes may take to connect, join the room and beat there.
NODES_TIMEOUT = 60.0


@attrs.frozen
class UpOptions:
    homeserver: str | None = None
    workers: int | None = None
    #: 0: a free port; None: the last one (8008 the first time).
    port: int | None = None
    detached: bool = False
    #: Seconds a process has to stop after SIGTERM before SIGKILL.
    grace: float = 10.0
    #: Seconds between two looks at the processes and the heartbeats.
    refresh: float = 1.0


@attrs.frozen
class ClusterInfo:
    """What ``up`` prints once ready."""

    directory: str
    homeserver: str
    base_url: str
    room_alias: str
    room_id: str
    person_id: str
    password: str
    first_command: str
    nodes: tuple[str, ...]
    detached: bool


@attrs.frozen
class ProcessRow:
    """One process as a status line shows it."""

    name: str
    pid: int | None
    running: bool
    exit_code: int | None
    started: float
    #: Its node's heartbeat content in the room (nodes only; None: none seen).
    heartbeat: Mapping[str, Any] | None = None
    is_node: bool = True


class ClusterView(Protocol):
    def starting(self, directory: str, homeserver: str, workers: int) -> None: ...
    def ready(self, info: ClusterInfo, seconds: float) -> None: ...
    def update(self, rows: list[ProcessRow], heartbeats_known: bool) -> None: ...
    def stopping(self) -> None: ...
    def stopped(self) -> None: ...


class Supervisor:
    def __init__(self, directory: ClusterDir, options: UpOptions, view: ClusterView) -> None:
        self.directory = directory
        self.options = options
        self.view = view
        self.children: list[Child] = []
        self.homeserver_child: Child | None = None
        self.ready = False
        self._stop = asyncio.Event()
        self._lock: IO[str] | None = None
        self._http: aiohttp.ClientSession | None = None

    # --- the whole life ------------------------------------------------------------------

    async def run(self) -> None:
        began = time.monotonic()
        self._lock = self._take_lock()
        try:
            state, topology, homeserver = self._plan()
            self.view.starting(str(self.directory.path), homeserver.kind, topology.workers)
            become_subreaper()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, self._stop.set)
            self._http = aiohttp.ClientSession()
            try:
                starting = asyncio.create_task(self._start(state, topology, homeserver))
                stopped = asyncio.create_task(self._stop.wait())
                await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not starting.done():  # stopped while starting
                    starting.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ClusterError):
                        await starting
                    return
                stopped.cancel()
                info = starting.result()
                self.ready = True
                self._save_running()
                self.view.ready(info, time.monotonic() - began)
                await self._watch(state, topology)
            finally:
                self.view.stopping()
                await self._stop_all()
                await self._http.close()
                self.view.stopped()
        finally:
            self.directory.processes_file.unlink(missing_ok=True)
            self._lock.close()

    def _take_lock(self) -> IO[str]:
        self.directory.ensure()
        path = self.directory.run / "lock"
        handle = os.fdopen(private.open_file(path, os.O_RDWR | os.O_CREAT), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip()
            handle.close()
            raise UserError(
                f"a dev cluster already runs in {self.directory.path} (pid {holder or '?'}): "
                f"`cis dev-cluster status --dir {self.directory.path}` shows it, "
                f"`cis dev-cluster down --dir {self.directory.path}` stops it"
            ) from None
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _plan(self) -> tuple[ClusterState, Topology, Homeserver]:
        saved = self.directory.load()
        options = self.options
        kind = options.homeserver or (saved.homeserver if saved else "embedded")
        if saved and saved.homeserver != kind:
            raise UserError(
                f"{self.directory.path} holds a cluster on the {saved.homeserver} homeserver "
                f"(its rooms and accounts live there): leave out --homeserver, or give another "
                "--dir"
            )
        workers = options.workers or (saved.workers if saved else DEFAULT_WORKERS)
        if options.port is not None:
            port = options.port or free_port()
        else:
            port = saved.port if saved else DEFAULT_PORT
        if not port_free(port):
            raise UserError(
                f"port {port} is in use: give the homeserver another with --port P "
                "(--port 0 picks a free one)"
            )
        state = ClusterState(
            homeserver=kind,
            port=port,
            workers=workers,
            password=saved.password if saved else secrets.token_urlsafe(12),
            access_token=saved.access_token if saved else "",
            room_id=saved.room_id if saved else "",
        )
        topology = Topology(workers=workers)
        homeserver = homeserver_of(kind, self.directory, topology, port)
        self.directory.write_dags()
        registrations = self.directory.write_nodes(topology, homeserver.base_url)
        homeserver.prepare(registrations)
        self.directory.save(state)
        return state, topology, homeserver

    # --- starting ------------------------------------------------------------------------

    async def _start(
        self, state: ClusterState, topology: Topology, homeserver: Homeserver
    ) -> ClusterInfo:
        assert self._http is not None
        hs = Child(
            "homeserver",
            homeserver.command(),
            cwd=self.directory.path,
            log_file=self.directory.log("homeserver"),
            env=homeserver.env(),
        )
        self.homeserver_child = hs
        await self._launch(hs)
        await self._answering(hs, homeserver)
        nodes = []
        for node in topology.nodes:
            argv = [
                sys.executable,
                "-m",
                "cis_bot",
                "node",
                "--config",
                str(self.directory.node_config(node)),
                "--state-dir",
                str(self.directory.node_state(node)),
            ]
            if node.is_coordinator:
                argv.append("--coordinator")
            child = Child(
                node.node_id,
                argv,
                cwd=self.directory.node_dir(node),
                log_file=self.directory.log(node.node_id),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            nodes.append(child)
            await self._launch(child)
        since_ms = min(int(child.record.started * 1000) for child in nodes if child.record)
        state.access_token = await homeserver.person_token(
            self._http, state.password, state.access_token
        )
        self.directory.save(state)
        client = PersonClient(self._http, homeserver.base_url, state.access_token)
        await self._connected(nodes, topology)
        state.room_id = await ensure_room(
            client, topology, run_room_event_levels(), person_id=topology.person_id
        )
        self.directory.save(state)
        await wait_for_nodes(
            client,
            state.room_id,
            topology,
            since_ms=since_ms,
            timeout=NODES_TIMEOUT,
            check_alive=self._check_alive,
        )
        return ClusterInfo(
            directory=str(self.directory.path),
            homeserver=homeserver.kind,
            base_url=homeserver.base_url,
            room_alias=topology.room_alias,
            room_id=state.room_id,
            person_id=topology.person_id,
            password=state.password,
            first_command=f"!cis run {FIRST_DAG}",
            nodes=tuple(node.node_id for node in topology.nodes),
            detached=self.options.detached,
        )

    async def _launch(self, child: Child) -> None:
        await child.start()
        self.children.append(child)
        self._save_running()

    def _save_running(self) -> None:
        records = tuple(c.record for c in self.children if c.record is not None)
        Running(self_record(), records, self.ready, self.options.detached).save(
            self.directory.processes_file
        )

    def _check_alive(self) -> None:
        for child in self.children:
            if not child.running:
                raise child.failure()

    async def _answering(self, child: Child, homeserver: Homeserver) -> None:
        """Until the homeserver answers ``/versions``."""
        assert self._http is not None
        url = f"{homeserver.base_url}/_matrix/client/versions"
        deadline = time.monotonic() + HOMESERVER_TIMEOUT
        while True:
            self._check_alive()
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self._http.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the {homeserver.kind} homeserver did not answer within "
                    f"{HOMESERVER_TIMEOUT:.0f}s; its log is {child.log_file}"
                )
            # Nothing to wait on but its socket, which does not listen yet.
            await asyncio.sleep(0.02)

    async def _connected(self, nodes: list[Child], topology: Topology) -> None:
        """Until every node is connected to the homeserver (its control API, which it starts
        once connected, has written its entry), so that the room's invitations reach it."""
        deadline = time.monotonic() + NODES_TIMEOUT
        entries = {
            child.name: control_dir(self.directory.node_state(node)) / f"{child.process.pid}.json"
            for child, node in zip(nodes, topology.nodes, strict=True)
            if child.process is not None
        }
        while True:
            self._check_alive()
            waiting = [name for name, entry in entries.items() if not entry.exists()]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{', '.join(waiting)} did not connect within {NODES_TIMEOUT:.0f}s; "
                    f"see {self.directory.logs}"
                )
            await asyncio.sleep(0.02)  # a file to appear: nothing else to wait on

    # --- running -------------------------------------------------------------------------

    async def _watch(self, state: ClusterState, topology: Topology) -> None:
        assert self._http is not None
        client = PersonClient(self._http, f"http://127.0.0.1:{state.port}", state.access_token)
        exits = [asyncio.create_task(child.exited.wait()) for child in self.children]
        stop = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                beats: dict[str, dict[str, Any]] | None
                try:
                    beats = heartbeats_in(await client.state(state.room_id))
                except ClusterError:
                    beats = None
                self.view.update(rows_of(self.children, topology, beats), beats is not None)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.wait(
                            [stop, *[t for t in exits if not t.done()]],
                            return_when=asyncio.FIRST_COMPLETED,
                        ),
                        self.options.refresh,
                    )
        finally:
            for task in (stop, *exits):
                task.cancel()

    # --- stopping ------------------------------------------------------------------------

    async def _stop_all(self) -> None:
        nodes = [child for child in self.children if child is not self.homeserver_child]
        await asyncio.gather(*(child.stop(self.options.grace) for child in nodes))
        if self.homeserver_child is not None:
            await self.homeserver_child.stop(self.options.grace)
        left = end_descendants()
        if left:
            log.warning("devcluster.left_behind", pids=left)


def rows_of(
    children: list[Child], topology: Topology, beats: Mapping[str, Mapping[str, Any]] | None
) -> list[ProcessRow]:
    users = {node.node_id: node.user_id for node in topology.nodes}
    rows = []
    for child in children:
        record: ProcessRecord | None = child.record
        user = users.get(child.name)
        rows.append(
            ProcessRow(
                name=child.name,
                pid=record.pid if record else None,
                running=child.running,
                exit_code=child.exit_code,
                started=record.started if record else 0.0,
                heartbeat=(beats or {}).get(user) if user else None,
                is_node=user is not None,
            )
        )
    return rows

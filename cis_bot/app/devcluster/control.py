"""``cis dev-cluster down`` and ``status``: a running cluster seen from another process,
through ``run/processes.json`` (the supervisor and its children) and the room's heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import attrs

from cis_bot.app.devcluster.errors import ClusterError, NoCluster
from cis_bot.app.devcluster.layout import ClusterDir
from cis_bot.app.devcluster.processes import ProcessRecord, Running, signal_group
from cis_bot.app.devcluster.room import PersonClient, heartbeats_in
from cis_bot.app.devcluster.supervisor import ProcessRow
from cis_bot.app.devcluster.topology import Topology

#: How long ``down`` gives the supervisor to stop everything before it ends what is left.
DOWN_TIMEOUT = 60.0


@attrs.frozen
class Status:
    running: Running | None
    rows: list[ProcessRow]
    #: None: the room could not be read (the homeserver does not answer).
    heartbeats_known: bool
    base_url: str
    room_alias: str

    @property
    def up(self) -> bool:
        return (
            self.running is not None
            and self.running.supervisor.alive()
            and all(row.running for row in self.rows)
        )


def _cluster(directory: ClusterDir) -> None:
    if directory.load() is None:
        raise NoCluster(f"no dev cluster in {directory.path}: `cis dev-cluster up` makes one")


def _running(directory: ClusterDir) -> Running | None:
    running = Running.load(directory.processes_file)
    if running is None:
        return None
    if running.supervisor.alive():
        return running
    # A supervisor that died without cleaning up (kill -9): its children may live on.
    return running if any(p.alive() for p in running.processes) else None


async def status(directory: ClusterDir) -> Status:
    _cluster(directory)
    state = directory.load()
    assert state is not None
    topology = Topology(workers=state.workers)
    running = _running(directory)
    base_url = f"http://127.0.0.1:{state.port}"
    beats: dict[str, dict[str, Any]] | None = None
    if running is not None and state.room_id and state.access_token:
        async with aiohttp.ClientSession() as http:
            client = PersonClient(http, base_url, state.access_token)
            with contextlib.suppress(ClusterError):
                beats = heartbeats_in(await client.state(state.room_id))
    users = {node.node_id: node.user_id for node in topology.nodes}
    rows = [
        _row(record, users.get(record.name), beats)
        for record in (running.processes if running else ())
    ]
    return Status(running, rows, beats is not None, base_url, topology.room_alias)


def _row(
    record: ProcessRecord, user: str | None, beats: Mapping[str, Mapping[str, Any]] | None
) -> ProcessRow:
    return ProcessRow(
        name=record.name,
        pid=record.pid,
        running=record.alive(),
        exit_code=None,
        started=record.started,
        heartbeat=(beats or {}).get(user) if user else None,
        is_node=user is not None,
    )


def down(directory: ClusterDir, *, timeout: float = DOWN_TIMEOUT) -> bool:
    """Stop the cluster: its supervisor stops its processes in order; what outlives it (after a
    kill -9 of the supervisor, say) is ended here. False when nothing ran."""
    _cluster(directory)
    running = _running(directory)
    if running is None:
        return False
    supervisor = running.supervisor
    if supervisor.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor.pid, signal.SIGTERM)
        if not _wait_exit(supervisor, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor.pid, signal.SIGKILL)
            _wait_exit(supervisor, 5.0)
    for record in running.processes:
        if record.alive():
            signal_group(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    for record in running.processes:
        if not _wait_exit(record, max(0.0, deadline - time.monotonic())):
            signal_group(record.pid, signal.SIGKILL)
            _wait_exit(record, 5.0)
    directory.processes_file.unlink(missing_ok=True)
    return True


def _wait_exit(record: ProcessRecord, timeout: float) -> bool:
    """Until the process is gone (a pidfd says when: no polling), at most ``timeout``."""
    if not record.alive():
        return True
    try:
        fd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return True
    try:
        if not record.alive():  # the pid was reused between the check and the open
            return True
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(timeout * 1000):
            # Readable: it exited. It is not our child, so it is gone once its parent reaps it.
            return _gone_soon(record)
        return False
    finally:
        os.close(fd)


def _gone_soon(record: ProcessRecord, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while record.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)  # a zombie waiting for its parent's wait: nothing to wait on
    return True


def run_status(directory: ClusterDir) -> Status:
    return asyncio.run(status(directory))

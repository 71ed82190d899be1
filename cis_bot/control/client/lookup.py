"""The CLI's rules for finding what a command names, and for reaching it.

A session or run is looked for in the processes on this machine (their control sockets, found
in the state directory) first, then, when the config names a homeserver, in the runs' rooms
(sessions and runs of other nodes), then in the transcripts left on disk. An operation goes to
the process that holds the session or drives the run, over its socket; for another node's, it
is a request through the run's room, unless the room says that node is down.

A process that died without cleaning up, or does not answer, is named in the error, so a person
learns why a session cannot be reached rather than only that it cannot.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
from mautrix.errors import MatrixError

from cis_bot.config import Config
from cis_bot.control.client.finder import (
    LocalScan,
    SessionRecord,
    UnknownSession,
    resolve_session,
    scan_disk,
    scan_processes,
    scan_room,
)
from cis_bot.control.client.process import ControlError, ProcessClient
from cis_bot.control.client.room import RoomRequester
from cis_bot.control.client.terminal import AttachResult, run_attached, terminal_size
from cis_bot.control.registry import Discovery, ProcessEntry, discover
from cis_bot.errors import UserError
from cis_bot.ids import SessionRef, UnknownRun, match_run
from cis_bot.matrix import events as ev
from cis_bot.matrix.identity import NodeIdentity
from cis_bot.matrix.node import Node
from cis_bot.matrix.runs import RoomRun, joined_rooms, read_runs

#: A kill answers once the session has ended: the agent's grace period on top.
KILL_EXTRA_SECS = 10.0


@attrs.frozen
class RunTarget:
    """A run to act on: driven by a process on this machine, or by a node through its room."""

    run_id: str
    process: ProcessEntry | None = None
    room_id: str | None = None
    node: str | None = None
    node_user: str | None = None


def gone(entry: ProcessEntry) -> str:
    return f"{entry.describe()} is gone (it stopped without cleaning up)"


class Lookup:
    """What one command knows: this machine's processes, and (lazily) the rooms."""

    def __init__(
        self,
        config: Config,
        state_dir: Path,
        *,
        timeout: float,
        local_only: bool = False,
        room: str | None = None,
    ) -> None:
        configured = bool(config.node.homeserver)
        if room and not configured:
            raise UserError("--room needs a config whose [node] section names a homeserver")
        self.config = config
        self.state_dir = state_dir
        self.timeout = timeout
        #: Whether other nodes' runs are looked for in the rooms.
        self.remote = configured and not local_only
        self.room = room
        self.discovery: Discovery = discover(state_dir)
        self._scan: LocalScan | None = None
        self._node: Node | None = None
        self._runs: list[RoomRun] | None = None

    async def close(self) -> None:
        if self._node is not None:
            await self._node.stop()

    def warnings(self, scan: LocalScan) -> list[str]:
        """Processes that died or did not answer, for the person to know."""
        return [gone(entry) for entry in self.discovery.dead] + [e for _, e in scan.silent]

    async def local(self) -> LocalScan:
        if self._scan is None:
            self._scan = await scan_processes(
                self.discovery.live, include_ended=True, timeout=self.timeout
            )
        return self._scan

    async def node(self) -> Node:
        """The configured node, to read rooms and post requests (no appservice)."""
        if self._node is None:
            node = Node(NodeIdentity.from_config(self.config))
            await node.start(serve=False)
            self._node = node
        return self._node

    async def room_runs(self) -> list[RoomRun]:
        if self._runs is None:
            node = await self.node()
            rooms = await joined_rooms(node, self.room)
            self._runs = await read_runs(node, rooms, node.identity.trusted_coordinators)
        return self._runs

    async def records(self, *, disk: bool, rooms: bool) -> list[SessionRecord]:
        """Every session known: processes first, then rooms, then transcripts left on disk."""
        found = {r.session_id: r for r in (await self.local()).records}
        if rooms and self.remote:
            for run in await self.room_runs():
                for record in scan_room(run.room_id, run.log):
                    found.setdefault(record.session_id, record)
        if disk:
            for record in scan_disk(self.state_dir):
                known = found.get(record.session_id)
                if known is None:
                    found[record.session_id] = record
                elif known.source == "room" and known.ended:
                    known.transcript = record.transcript  # the local copy beats a download
                    known.source = "disk"
        return list(found.values())

    def _gone(self, run_id: str) -> str | None:
        """Why a run's sessions cannot be reached: its process died."""
        for entry in self.discovery.dead:
            if any(r.run_id == run_id for r in entry.runs):
                return gone(entry)
        return None

    # --- sessions --------------------------------------------------------------------------------

    async def find_session(self, text: str, *, live: bool) -> SessionRecord:
        """The session ``text`` names; with ``live``, one that can still be acted on."""
        scan = await self.local()
        try:
            record = resolve_session(text, scan.records)
        except UnknownSession:
            try:
                record = resolve_session(text, await self.records(disk=True, rooms=True))
            except UnknownSession as exc:
                wanted = SessionRef.parse(text)
                for entry in self.discovery.dead:
                    if any(wanted.matches_run(r.run_id) for r in entry.runs):
                        raise ControlError(f"{exc}; {gone(entry)}") from None
                if scan.silent:
                    silent = "; ".join(error for _, error in scan.silent)
                    raise ControlError(f"{exc}; and {silent}") from None
                raise
        if record.source != "process":
            for entry, error in scan.silent:
                if any(r.run_id == record.run_id for r in entry.runs):
                    raise ControlError(f"session {record.session_id}: {error}")
        if live:
            if record.source != "process" and (why := self._gone(record.run_id)):
                raise ControlError(f"session {record.session_id}: {why}")
            if record.source == "disk" and not record.ended:
                raise ControlError(
                    f"session {record.session_id} is held by no process here (only its "
                    f"transcript is left); `cis dag logs {record.session_id}` shows its output"
                )
            if record.ended:
                raise ControlError(
                    f"session {record.session_id} has ended ({record.state}); "
                    f"`cis dag logs {record.session_id}` shows its output"
                )
        return record

    def client(self, entry: ProcessEntry) -> ProcessClient:
        return ProcessClient(entry, timeout=self.timeout)

    async def attach(self, record: SessionRecord, *, readonly: bool) -> AttachResult:
        """This terminal in the session's until a detach (Ctrl-B d), the session's end or the
        loss of its process (``terminal.py``). Only where the session runs: its process is on
        this machine."""
        if record.source != "process" or record.process is None:
            raise UserError(
                f"session {record.session_id} runs on node {record.node}: attach works on "
                "that node's machine; from here: logs, input, kill"
            )
        async with self.client(record.process) as client:
            size = None if readonly else terminal_size(sys.stdout.fileno())
            ws = await client.attach(record.session_id, readonly=readonly, size=size)
            return await run_attached(ws, readonly=readonly)

    async def send_input(self, record: SessionRecord, text: str, *, newline: bool) -> str | None:
        """Type into the session; its state after."""
        if record.source == "process" and record.process is not None:
            async with self.client(record.process) as client:
                answer = await client.request(
                    "POST",
                    client.session_path(record.session_id, "input"),
                    body={"text": text, "newline": newline},
                )
            return _state_of(answer)
        reply = await self._session_request(record, action="input", text=text, newline=newline)
        return reply.state

    async def kill(self, record: SessionRecord, *, by: str) -> str | None:
        """End the session; its state after (killed, or how it ended meanwhile)."""
        if record.source == "process" and record.process is not None:
            async with self.client(record.process) as client:
                answer = await client.request(
                    "POST",
                    client.session_path(record.session_id, "kill"),
                    body={"by": by},
                    timeout=self.timeout + KILL_EXTRA_SECS,
                )
            return _state_of(answer)
        reply = await self._session_request(record, action="kill", extra_secs=KILL_EXTRA_SECS)
        return reply.state

    async def follow(self, record: SessionRecord, *, tail: int | None) -> AsyncIterator[bytes]:
        """The output of a session a process here holds, as it comes, until it ends."""
        assert record.process is not None
        async with self.client(record.process) as client:
            async for chunk in client.logs(record.session_id, tail=tail, follow=True):
                yield chunk

    async def transcript(
        self, record: SessionRecord, *, tail: int | None, follow: bool = False
    ) -> bytes:
        """The session's raw output so far: from its process, its file here, its room's upload,
        or (a live session on another node) the end its node sends through the room, which
        cannot be followed."""
        if record.source == "process" and record.process is not None:
            async with self.client(record.process) as client:
                stream = client.logs(record.session_id, tail=tail, follow=False)
                return b"".join([chunk async for chunk in stream])
        if record.source == "disk" and record.transcript:
            return await asyncio.to_thread(Path(record.transcript).read_bytes)
        if record.ended:
            if not record.transcript:
                raise UserError(f"session {record.session_id} left no transcript in its room")
            return await (await self.node()).download(record.transcript)
        if follow:
            raise UserError(
                f"session {record.session_id} runs on node {record.node}: following its "
                "output works on that node's machine; from here, logs without --follow "
                "shows its latest output"
            )
        reply = await self._session_request(record, action="logs", tail=tail)
        return (reply.text or "").encode("utf-8")

    async def _session_request(
        self, record: SessionRecord, *, extra_secs: float = 0, **fields: Any
    ) -> ev.ControlReplyContent:
        """Ask the session's node, through the room, to act on it."""
        if record.room_id is None or record.node is None or record.node_user is None:
            raise UserError(f"session {record.session_id}: its node is not known")
        await self.check_node(record.room_id, record.node, record.node_user)
        requester = RoomRequester(await self.node(), timeout=self.timeout + extra_secs)
        return await requester.request(
            record.room_id,
            node=record.node,
            node_user=record.node_user,
            run_id=record.run_id,
            session_id=record.session_id,
            **fields,
        )

    async def check_node(self, room_id: str, node_id: str, node_user: str) -> None:
        """Fail at once when the room says the node is down (its heartbeat, keyed by its user,
        has lapsed), rather than wait out the timeout. A node that does not heartbeat (a
        coordinator) is asked."""
        node = await self.node()
        try:
            state = await node.room_state(room_id)
        except MatrixError:
            return
        for raw in state:
            if raw.get("type") != ev.NodeHeartbeatContent.TYPE or raw.get("state_key") != node_user:
                continue
            try:
                beat = ev.decode(ev.NodeHeartbeatContent.TYPE, raw.get("content"))
            except ev.InvalidEvent:
                return
            assert isinstance(beat, ev.NodeHeartbeatContent)
            now = ev.now_ms()
            if not beat.alive_at(now):
                age = (now - beat.timestamp) / 1000
                raise ControlError(
                    f"node {node_id} looks down: its last heartbeat was {age:.0f}s ago (a "
                    f"running node renews it within {beat.ttl_ms / 1000:g}s)"
                )

    # --- runs ------------------------------------------------------------------------------------

    async def find_run(self, text: str) -> RunTarget:
        """The unfinished run ``text`` names (an id or a unique prefix), and who drives it."""
        local = {run.run_id: entry for entry in self.discovery.live for run in entry.runs}
        try:
            run_id = match_run(text, local)
            return RunTarget(run_id, process=local[run_id])
        except UnknownRun as exc:
            unknown = exc
        for entry in self.discovery.dead:
            if any(r.run_id.startswith(text) for r in entry.runs):
                raise ControlError(f"run {text!r}: {gone(entry)}")
        if not self.remote:
            raise unknown
        found = await self.room_runs()
        try:
            run_id = match_run(text, [run.run_id for run in found])
        except UnknownRun:
            raise UserError(f"{unknown} (and none in the rooms either)") from None
        run = next(run for run in found if run.run_id == run_id)
        engine = run.replay()
        if engine.finished:
            raise ControlError(f"run {run_id} has already ended ({engine.status})")
        return RunTarget(
            run_id,
            room_id=run.room_id,
            node=run.created.coordinator,
            node_user=run.coordinator_user,
        )

    async def run_request(
        self, target: RunTarget, action: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Cancel or approve: through the driving process's socket, or the run's room."""
        if target.process is not None:
            async with self.client(target.process) as client:
                answer = await client.request(
                    "POST", client.run_path(target.run_id, action), body=body
                )
            return answer if isinstance(answer, dict) else {}
        assert target.room_id is not None and target.node is not None
        assert target.node_user is not None
        await self.check_node(target.room_id, target.node, target.node_user)
        requester = RoomRequester(await self.node(), timeout=self.timeout)
        fields = {"task_id": body["task"]} if "task" in body else {}
        await requester.request(
            target.room_id,
            node=target.node,
            node_user=target.node_user,
            action=action,
            run_id=target.run_id,
            **fields,
        )
        return {"run_id": target.run_id, "via": target.room_id}


def _state_of(answer: object) -> str | None:
    state = answer.get("state") if isinstance(answer, dict) else None
    return state if isinstance(state, str) else None

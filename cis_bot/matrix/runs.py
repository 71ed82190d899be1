"""Runs read back from their rooms: what ``cis dag list / status / resume`` show and pick up, and
what a coordinator node finds it was coordinating when it starts.

A room's history is folded into run logs (``runlog.py``), trusting as coordinators only the users
the caller names; a run whose spec cannot be read (not in the event, its media gone or invalid) is
left out.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.dag.engine import RunEngine
from cis_bot.dag.report import build_report
from cis_bot.dag.spec import DagSpec
from cis_bot.errors import UserError
from cis_bot.ids import match_run
from cis_bot.matrix import events as ev
from cis_bot.matrix.runlog import RoomEvent, RunLog, fold_runs, parse_room_event, spec_from_text

if TYPE_CHECKING:
    from cis_bot.matrix.node import Node


@attrs.frozen
class RoomRun:
    """A run as its room tells it: its log, with the spec and the creation event it starts with."""

    room_id: str
    log: RunLog
    spec: DagSpec
    created: ev.RunCreatedContent

    @property
    def run_id(self) -> str:
        return self.log.run_id

    @property
    def coordinator_user(self) -> str:
        """The Matrix user that created the run, and alone decides for it."""
        assert self.log.coordinator_user is not None  # read_runs keeps trusted runs only
        return self.log.coordinator_user

    def replay(self) -> RunEngine:
        """The engine in the state the room's events leave it in."""
        return RunEngine.replay(self.spec, self.log.events, max_workers=self.created.max_workers)

    def transcripts(self) -> dict[tuple[str, int], str]:
        """(task, attempt) -> the transcript's mxc URI, as the workers reported them."""
        return {
            (e.content.task_id, e.content.attempt): e.content.transcript
            for e in self.log.sessions
            if isinstance(e.content, ev.SessionCompletedContent) and e.content.transcript
        }

    def summary(self) -> dict[str, Any]:
        """The run's report, as ``cis dag status`` and ``cis dag list`` show it."""
        return build_report(
            self.replay(),
            run_id=self.run_id,
            transcripts=self.transcripts(),
            mode=self.created.mode,
            # Whoever coordinates it now: its creator, or the last coordinator to take it over.
            coordinator=self.log.coordinator_node or self.created.coordinator,
            created_at=self.created.timestamp,
            resumed_from=self.created.resumed_from,
            room_id=self.room_id,
        )


async def joined_rooms(node: Node, room: str | None = None) -> list[str]:
    """``room`` (an id or an alias, joined if need be), or every room the node is in."""
    if room:
        return [await node.resolve_room(room)]
    return [str(r) for r in await node.intent.get_joined_rooms()]


async def read_runs(
    node: Node, rooms: Sequence[str], coordinators: Collection[str]
) -> list[RoomRun]:
    """Every run the rooms' logs hold that one of ``coordinators`` (Matrix user ids) created,
    oldest first per room."""
    found: list[RoomRun] = []
    for room_id in rooms:
        found += await runs_in(node, room_id, await room_log(node, room_id), coordinators)
    return found


async def room_log(node: Node, room_id: str) -> list[RoomEvent]:
    """The room's ``cis.*`` events, oldest first (malformed ones left out)."""
    events = []
    async for raw in node.history(room_id):
        event = parse_room_event(raw)
        if event is not None:
            events.append(event)
    return events


async def runs_in(
    node: Node, room_id: str, events: Sequence[RoomEvent], coordinators: Collection[str]
) -> list[RoomRun]:
    """The runs ``events`` (a room's, from ``room_log``) hold that one of ``coordinators``
    created, with their specs (fetched from media when they are there)."""
    found: list[RoomRun] = []
    for log in fold_runs(events, coordinators).values():
        created = log.created
        if created is None:
            continue
        if log.spec is None and created.spec_mxc:
            text = (await node.download(created.spec_mxc)).decode("utf-8", "replace")
            log.spec = spec_from_text(text, run_id=log.run_id)
        if log.spec is not None:
            found.append(RoomRun(room_id, log, log.spec, created))
    return found


def pick_run(found: Sequence[RoomRun], wanted: str | None) -> RoomRun:
    """The run ``wanted`` names (a run id or a unique prefix of one); None: the latest."""
    if not found:
        raise UserError("no runs found")
    if wanted is None:
        return max(found, key=lambda run: run.created.timestamp)
    run_id = match_run(wanted, (run.run_id for run in found))
    return next(run for run in found if run.run_id == run_id)

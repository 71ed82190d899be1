"""A room's run log as the chat reads it, once per command: the runs this node trusts (for what
it answers) and every run announced in the room (for who answers)."""

from __future__ import annotations

import attrs

from cis_bot.chat.commands import Command
from cis_bot.errors import UserError
from cis_bot.ids import match_run
from cis_bot.matrix import events as ev
from cis_bot.matrix.node import Node
from cis_bot.matrix.runlog import RoomEvent
from cis_bot.matrix.runs import RoomRun, pick_run, room_log, runs_in


@attrs.frozen
class Announced:
    """A run as its ``cis.dag.run.created`` announces it, whoever sent that (for deciding who
    answers about it; what a run holds is read from trusted coordinators only)."""

    run_id: str
    #: Who created it: its coordinator.
    creator: str
    #: Its process answers chat commands about it.
    chat: bool
    #: Its coordinator has recorded its end.
    ended: bool


class RoomView:
    """One room's run log, read once per command: the runs this node trusts (created by its own
    user or one of its ``[node] coordinators``), and every run announced there."""

    def __init__(self, node: Node, room_id: str) -> None:
        self.node = node
        self.room_id = room_id
        self._events: list[RoomEvent] | None = None
        self._runs: list[RoomRun] | None = None

    async def _log(self) -> list[RoomEvent]:
        if self._events is None:
            self._events = await room_log(self.node, self.room_id)
        return self._events

    async def runs(self) -> list[RoomRun]:
        if self._runs is None:
            trusted = self.node.identity.trusted_coordinators
            self._runs = await runs_in(self.node, self.room_id, await self._log(), trusted)
        return self._runs

    async def announced(self) -> dict[str, Announced]:
        found: dict[str, Announced] = {}
        for event in await self._log():
            payload = event.content
            if isinstance(payload, ev.RunCreatedContent) and payload.run_id not in found:
                found[payload.run_id] = Announced(
                    payload.run_id, event.sender, bool(payload.chat), ended=False
                )
            elif isinstance(payload, ev.RunCompletedContent):
                known = found.get(payload.run_id)
                if known is not None and known.creator == event.sender:
                    found[payload.run_id] = attrs.evolve(known, ended=True)
        return found

    async def pick(self, text: str | None) -> RoomRun:
        """The run ``text`` names (an id or a unique prefix; None: the latest)."""
        found = await self.runs()
        if not found:
            raise UserError("no runs in this room yet")
        return pick_run(found, text)

    async def named_run(self, command: Command | None) -> Announced | None:
        """The run a command names, when it names exactly one of those announced here."""
        if command is None:
            return None
        try:
            ref = command.session_ref
            text = command.run_ref
        except UserError:
            return None
        if text is None and ref is None:
            return None
        announced = await self.announced()
        if text is not None:
            try:
                return announced[match_run(text, announced)]
            except UserError:
                return None
        assert ref is not None  # a bare task: the one run that has it, if only one does
        having = [
            run.run_id for run in await self.runs() if any(t.id == ref.task for t in run.spec.tasks)
        ]
        return announced.get(having[0]) if len(having) == 1 else None

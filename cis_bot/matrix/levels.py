"""The power levels of our event types in the rooms that carry runs: the rooms a node creates,
and the ones people set up for runs as docs/matrix.md asks (the dev cluster's room among them).

Apart from ``node.py`` so that a process making such a room need not import mautrix for it.
"""

from __future__ import annotations

from cis_bot.matrix import events as ev

#: In rooms a node creates, the power level needed to post the run log's events (every
#: ``cis.dag.*`` type but the control requests): a level a member at 0 does not have.
RUN_LOG_POWER_LEVEL = 50


def run_room_event_levels() -> dict[str, int]:
    """Power levels of our event types in the rooms a node creates.

    The run log is for the node alone (``RUN_LOG_POWER_LEVEL``). Heartbeats stay at 0: workers
    need not be moderators to announce themselves, and the auth rules let a user set only its
    own ``@user`` state key. Control requests and replies stay at 0 too: whoever may give a node
    orders (an allowed user, who may have no power in the room) must be able to ask, and the
    node checks the sender of each (``Node.authorised``).
    """
    levels = {}
    for event_type, cls in ev.CATALOGUE.items():
        control = issubclass(cls, ev.ControlRequestContent | ev.ControlReplyContent)
        open_to_members = control or cls is ev.NodeHeartbeatContent
        levels[event_type] = 0 if open_to_members else RUN_LOG_POWER_LEVEL
    return levels

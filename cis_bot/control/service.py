"""Starting a process's control: the API on its socket, and the room handler on its node."""

from __future__ import annotations

from pathlib import Path

from cis_bot.control.room import RoomControl
from cis_bot.control.server import ControlPlane, ControlSettings
from cis_bot.matrix.node import Node


async def start_control(
    node: Node, state_dir: Path, *, kind: str, settings: ControlSettings | None = None
) -> ControlPlane:
    """This process's ControlPlane, serving; requests in the node's rooms are obeyed too.
    ``close()`` on the plane stops both."""
    plane = ControlPlane(state_dir, node_id=node.identity.node_id, kind=kind, settings=settings)
    await plane.start()
    room = RoomControl(node, plane)
    room.start()
    plane.on_close.append(room.close)
    return plane

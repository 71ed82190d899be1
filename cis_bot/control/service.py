"""Starting a process's control: the plane, its API on the process's socket, and the room
handler on its node."""

from __future__ import annotations

from pathlib import Path

from cis_bot.control.api import ControlApi
from cis_bot.control.operations import ControlPlane, ControlSettings
from cis_bot.control.room import RoomControl
from cis_bot.matrix.node import Node


async def serve_control(
    state_dir: Path, *, node_id: str, kind: str, settings: ControlSettings | None = None
) -> ControlPlane:
    """This process's ControlPlane, served on its socket; ``close()`` on the plane stops it."""
    plane = ControlPlane(node_id=node_id, settings=settings)
    await ControlApi(plane, state_dir, kind=kind).start()
    return plane


async def start_control(
    node: Node, state_dir: Path, *, kind: str, settings: ControlSettings | None = None
) -> ControlPlane:
    """``serve_control``, and requests in the node's rooms are obeyed too; ``close()`` on the
    plane stops both."""
    plane = await serve_control(
        state_dir, node_id=node.identity.node_id, kind=kind, settings=settings
    )
    room = RoomControl(node, plane)
    room.start()
    plane.on_close.insert(0, room.close)
    return plane

"""Connecting this process's node to a homeserver: the configured one, or the local homeserver
in the state directory (see ``localhs.py``), started here unless another process runs it."""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING

import attrs
import structlog

from cis_bot.app.localhs import InUse, LocalHomeserverDir, run_alias_prefix
from cis_bot.config import Config, ExecutionMode
from cis_bot.matrix.identity import NodeIdentity
from cis_bot.matrix.node import Node, PortInUse

if TYPE_CHECKING:
    from cis_bot.app.hsprocess import HomeserverProcess
    from cis_bot.homeserver.server import EmbeddedHomeserver

log = structlog.get_logger(__name__)


@attrs.define
class Connection:
    """A started node, and in local mode the embedded homeserver this process runs under it: in
    this process, or in a child of its own (``hsprocess.py``)."""

    node: Node
    homeserver: EmbeddedHomeserver | None = None
    process: HomeserverProcess | None = None
    #: Held while this process runs the homeserver on the directory.
    lock: IO[str] | None = None
    directory: LocalHomeserverDir | None = None

    async def close(self) -> None:
        # The homeserver first: its appservice pusher must not be left waiting on our
        # appservice endpoint once that is gone.
        if self.directory is not None:
            self.directory.withdraw_endpoint()
        if self.homeserver is not None:
            await self.homeserver.stop()
        if self.process is not None:
            await self.process.stop()
        await self.node.stop()
        if self.lock is not None:
            self.lock.close()


async def open_connection(
    config: Config,
    mode: ExecutionMode,
    state_dir: Path,
    *,
    serve: bool = True,
    started: HomeserverProcess | None = None,
) -> Connection:
    """A node to work with in ``mode`` (``serve=False``: only to read rooms and post, no
    appservice; ``started``: the local homeserver this command started in a child)."""
    if mode is ExecutionMode.LOCAL:
        if started is not None:
            return await connect_started(
                started, run_alias_prefix(config), allowed_users=config.node.allowed_users
            )
        return await connect_local(
            state_dir,
            config.dag.matrix.home_server,
            run_alias_prefix(config),
            serve=serve,
            allowed_users=config.node.allowed_users,
        )
    return await connect_configured(config, serve=serve)


async def connect_configured(config: Config, *, serve: bool = True) -> Connection:
    node = Node(NodeIdentity.from_config(config))
    await node.start(serve=serve)
    return Connection(node)


async def connect_local(
    state_dir: Path,
    server_name: str,
    alias_prefix: str,
    *,
    serve: bool = True,
    allowed_users: tuple[str, ...] = (),
) -> Connection:
    """The local node on the local homeserver in ``state_dir/homeserver``.

    If a process already runs that homeserver, use it: a standalone ``cis homeserver`` for
    anything, another run's only to read (``serve=False``), since it ends with that run. Else
    start it here: the appservice listens first (the registration names its port), then the
    homeserver starts with the registrations in its directory, and says where it answers.
    ``allowed_users`` (the config's ``[node] allowed_users``) may give the local node orders, as
    they may any node: from a chat client, commands in a local run's room.

    Local runs share the local node's identity, so on a standalone homeserver one of them at a
    time receives the node's events: the others run without (a local run needs none: its tasks
    run here and it is controlled through its socket).
    """
    from cis_bot.homeserver.server import EmbeddedHomeserver

    directory = LocalHomeserverDir.of(state_dir)
    identity = attrs.evolve(
        directory.local_identity(server_name, alias_prefix), allowed_users=allowed_users
    )
    try:
        lock = directory.lock("cis")
    except InUse:
        running = directory.running_endpoint()
        if running is None or not (running[1] or not serve):
            raise
        node = Node(identity)
        if serve:
            try:
                await node.listen()  # the standalone homeserver knows this port from its start
            except PortInUse:
                log.info(
                    "local.events_elsewhere",
                    hint="another local run receives the local node's room events; this one "
                    "needs none",
                )
        await node.connect(running[0])
        return Connection(node)
    node = Node(identity)
    homeserver = EmbeddedHomeserver(
        state_dir=directory.path,
        server_name=server_name,
        appservice_files=directory.registrations(),
    )
    try:
        if serve:
            try:
                await node.listen()
            except PortInUse:  # the port we used last time is taken now: take another one
                node.identity = attrs.evolve(identity, listen_port=0)
                node.identity = attrs.evolve(identity, listen_port=await node.listen())
            directory.save_registration(node.identity, alias_prefix)
            homeserver.appservice_files = tuple(directory.registrations())
        await homeserver.start()
        directory.publish_endpoint(homeserver.base_url, standalone=False)
        await node.connect(homeserver.base_url)
    except BaseException:
        await homeserver.stop()
        await node.stop()
        directory.withdraw_endpoint()
        lock.close()
        raise
    return Connection(node, homeserver, lock=lock, directory=directory)


async def connect_started(
    process: HomeserverProcess,
    alias_prefix: str,
    *,
    allowed_users: tuple[str, ...] = (),
    ready_timeout: float = 30.0,
) -> Connection:
    """The local node on the homeserver ``start_local`` started in a child: the node listens
    where its registration says (the child loaded it), then connects once the child answers. If
    that port is taken now, the node takes another and the child starts again with it. From
    then on the child is started again should it end before the run does."""
    from cis_bot.app.hsprocess import HomeserverProcess

    directory, lock = process.directory, process.lock
    identity = attrs.evolve(process.node, allowed_users=allowed_users)
    node = Node(identity)
    try:
        try:
            await node.listen()
        except PortInUse:
            node.identity = attrs.evolve(identity, listen_port=0)
            node.identity = attrs.evolve(identity, listen_port=await node.listen())
            directory.save_registration(node.identity, alias_prefix)
            await process.stop()
            process = HomeserverProcess.start(directory, lock, node.identity)
        base_url = await process.ready(ready_timeout)
        directory.publish_endpoint(base_url, standalone=False)
        await node.connect(base_url)
        process.supervise(ready_timeout=ready_timeout)
    except BaseException:
        await process.stop()
        await node.stop()
        directory.withdraw_endpoint()
        lock.close()
        raise
    return Connection(node, process=process, lock=lock, directory=directory)

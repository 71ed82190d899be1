"""``cis node`` (a long-lived worker node) and ``cis registration generate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import signal
from pathlib import Path

from cis_bot.errors import UserError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = subparsers.add_parser(
        "node", help="run this machine as a worker node (a Matrix appservice) until stopped"
    )
    node.add_argument("--config", type=Path, metavar="F", required=True)
    node.add_argument(
        "--coordinator",
        action="store_true",
        help="coordinate: resume the unfinished runs this node started, and answer chat "
        "commands in its rooms (docs/chat.md)",
    )
    node.add_argument("--state-dir", type=Path, metavar="D", help="where sessions keep files")
    node.add_argument("--log-level", default="info", help=argparse.SUPPRESS)
    node.set_defaults(handler=_node)

    registration = subparsers.add_parser(
        "registration", help="the appservice registration a homeserver loads"
    )
    commands = registration.add_subparsers(dest="registration_command", required=True)
    generate = commands.add_parser(
        "generate",
        help="write registration.yaml from the config's [node] section (new tokens are "
        "written back to the config)",
    )
    generate.add_argument("--config", type=Path, metavar="F", required=True)
    generate.add_argument("-o", "--output", type=Path, metavar="FILE", required=True)
    generate.set_defaults(handler=_generate)


def _node(args: argparse.Namespace) -> int:
    from cis_bot.app.serve import serve_node
    from cis_bot.config import load_config, open_state_dir

    config = load_config(args.config)
    state_dir = open_state_dir(args.state_dir)

    async def run() -> None:
        task = asyncio.create_task(
            serve_node(
                config, state_dir=state_dir, work_dir=Path.cwd(), coordinator=args.coordinator
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    return 0


def _generate(args: argparse.Namespace) -> int:
    import tomlkit
    import yaml

    from cis_bot import private
    from cis_bot.config import load_config
    from cis_bot.matrix.identity import NodeIdentity

    config = load_config(args.config)
    if not config.node.id:
        raise UserError(f"{args.config}: [node] needs an id (this node's name) first")
    output: Path = args.output
    if output.is_dir():
        raise UserError(f"-o {output} is a directory: give the registration file's path")
    if not output.parent.is_dir():
        raise UserError(f"-o {output}: no directory {output.parent}")
    if output.exists() and output.samefile(args.config):
        raise UserError(
            f"-o {output} is the config itself: the registration goes to a file of its own"
        )
    document = tomlkit.parse(args.config.read_text(encoding="utf-8"))
    node_table = document.setdefault("node", tomlkit.table())
    for key in ("as_token", "hs_token"):
        if not node_table.get(key):
            node_table[key] = secrets.token_urlsafe(32)
    # The config now holds secrets: for its owner only, written whole or not at all.
    private.write_file(args.config, tomlkit.dumps(document))
    config = load_config(args.config)
    identity = NodeIdentity.from_config(config, require_homeserver=False)
    private.write_file(
        output,
        "# Appservice registration for cis_bot node "
        f"{identity.node_id!r}; the homeserver loads it (Synapse: app_service_config_files).\n"
        + yaml.safe_dump(identity.registration(), sort_keys=False),
    )
    print(f"wrote {output} for {identity.user_id}")
    return 0

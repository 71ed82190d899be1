"""``cis node`` (a long-lived worker node) and ``cis registration generate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path


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
    generate.add_argument(
        "--url",
        help="where the homeserver reaches the node's appservice, when it is not "
        "http://LISTEN_HOST:LISTEN_PORT (e.g. http://worker-a:29333 in a container network)",
    )
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
    from cis_bot.app.registration import generate_registration

    identity = generate_registration(args.config, args.output, url=args.url)
    print(f"wrote {args.output} for {identity.user_id}")
    return 0

"""``cis homeserver``: run the embedded loopback homeserver in the foreground, or add a local
account to its database (``cis homeserver add-user``, safe while the server runs: SQLite WAL).

``--state-dir`` is cis's state directory, as for every command: the homeserver lives in its
``homeserver/`` (see ``cis_bot/app/localhs.py``), the one local runs use. While ``cis homeserver``
runs there, local runs use it instead of starting their own, so a Matrix client pointed at it
sees their rooms live (each run invites the accounts ``add-user`` made; see docs/matrix.md's
trust model).

Nothing heavy is imported until a handler runs, and the server path avoids rich/mautrix so the
first ``/versions`` answers within half a second of process start.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cis_bot.errors import UserError

if TYPE_CHECKING:
    import asyncio

if sys.argv[1:2] == ["homeserver"]:
    # This process is `cis homeserver`: structlog imports rich when it can (for pretty
    # tracebacks), which costs start-up time and memory the server does not use. The `cis`
    # entry point configures structlog before any handler runs, so this has to happen here,
    # while the parser is built; other commands are unaffected.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "homeserver",
        help="run the embedded loopback Matrix homeserver",
        description="Run the embedded Matrix homeserver in the foreground (SQLite, loopback by "
        "default). Prints 'listening on http://HOST:PORT' when ready; SIGTERM/SIGINT stop it.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="cis's state directory; the database and media live in its homeserver/ "
        "(default: $XDG_STATE_HOME/cis, as for local runs)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=8008, help="port to bind; 0 picks a free one (default 8008)"
    )
    parser.add_argument(
        "--server-name", default="cis.local", help="the server name in ids (default cis.local)"
    )
    parser.add_argument(
        "--appservice",
        type=Path,
        action="append",
        default=[],
        metavar="REG.yaml",
        help="an appservice registration file (repeatable)",
    )
    parser.add_argument(
        "--log-level", default="info", help="debug, info, warning or error (default info)"
    )
    # A local run's own homeserver (cis_bot/app/hsprocess.py): the run holds the directory and
    # publishes where it answers; it stops when its stdin closes.
    parser.add_argument("--for-run", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)
    commands = parser.add_subparsers(dest="homeserver_command", metavar="COMMAND")
    add_user = commands.add_parser(
        "add-user",
        help="create a local account",
        description="Create a local account in the homeserver's database. Prints the user id, "
        "and the password when one was generated.",
    )
    add_user.add_argument("name", help="the localpart of the new user id")
    add_user.add_argument(
        "--state-dir",
        type=Path,
        dest="user_state_dir",
        help="cis's state directory, as for the server (default: $XDG_STATE_HOME/cis)",
    )
    add_user.add_argument(
        "--server-name",
        default=None,
        dest="user_server_name",
        help="server name (default: the one the database was created with, else cis.local)",
    )
    add_user.add_argument("--password", help="the password (default: generate one)")
    add_user.add_argument("--admin", action="store_true", help="make the user a server admin")
    add_user.set_defaults(handler=run_add_user)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def run(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from cis_bot.app.localhs import LocalHomeserverDir
    from cis_bot.homeserver.server import EmbeddedHomeserver

    directory = LocalHomeserverDir.of(_state_dir(args.state_dir))
    # For a run, the run holds the directory (this process inherited its locked file).
    lock = None if args.for_run else directory.lock("cis homeserver")
    try:
        if not args.for_run:
            # The local node's registration, so local runs can use this server (it reads
            # registrations only now).
            directory.local_identity(args.server_name, alias_prefix="dag-")
        server = EmbeddedHomeserver(
            state_dir=directory.path,
            server_name=args.server_name,
            host=args.host,
            port=args.port,
            appservice_files=[*args.appservice, *directory.registrations()],
        )
        try:
            await server.start()
        except OSError as exc:
            # asyncio wraps a bind error as "error while attempting to bind on ...: <reason>"
            reason = (exc.strerror or str(exc)).rsplit(": ", 1)[-1]
            raise UserError(f"cannot listen on {args.host}:{args.port}: {reason}") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.for_run:
            loop.add_reader(sys.stdin.fileno(), _stop_at_eof, sys.stdin.fileno(), stop)
        else:
            directory.publish_endpoint(server.base_url, standalone=True)
        print(f"listening on {server.base_url}", flush=True)
        try:
            await stop.wait()
        finally:
            if not args.for_run:
                directory.withdraw_endpoint()
            # A run's own: its node is still listening, and takes its last events now (they
            # would wait in the database for an appservice that is gone).
            await server.stop(drain=_RUN_DRAIN_SECS if args.for_run else 0.0)
    finally:
        if lock is not None:
            lock.close()
    return 0


#: How long a run's homeserver, told to stop, keeps delivering to the run's node.
_RUN_DRAIN_SECS = 5.0


def _stop_at_eof(fd: int, stop: asyncio.Event) -> None:
    """The run that started this homeserver closed our stdin, or is gone."""
    import asyncio

    try:
        data = os.read(fd, 4096)
    except OSError:
        data = b""
    if not data:
        asyncio.get_running_loop().remove_reader(fd)
        stop.set()


def _state_dir(given: Path | None) -> Path:
    from cis_bot.config import open_state_dir

    return open_state_dir(given)


def run_add_user(args: argparse.Namespace) -> int:
    from cis_bot import private
    from cis_bot.homeserver.server import new_account, store_account
    from cis_bot.homeserver.storage.store import Store

    state_dir = private.make_dirs(_state_dir(args.user_state_dir) / "homeserver")
    try:
        store = Store(state_dir / "homeserver.db")
    except Exception as exc:  # sqlite3.Error, or a newer schema
        raise UserError(f"cannot open {state_dir / 'homeserver.db'}: {exc}") from None
    try:
        server_name = args.user_server_name or store.server_name() or "cis.local"
        try:
            store.claim_server_name(server_name)
            user_id, password, password_hash = new_account(server_name, args.name, args.password)
            store_account(store, user_id, password_hash, args.admin)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    finally:
        store.close()
    print(user_id)
    if args.password is None:
        print(password)
    return 0

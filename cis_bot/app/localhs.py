"""The local homeserver's directory, shared by local runs and by ``cis homeserver``.

``<state_dir>/homeserver/`` holds:

- the embedded homeserver's SQLite database and media (the local runs' rooms);
- ``appservices/*.yaml``: the registrations it loads, among them ``local-node.yaml``, the local
  node's (its tokens and appservice port persist, so a homeserver started earlier knows them);
- ``lock``: held by the one process that runs the homeserver on this database (a local run
  started from the command line shares it with its homeserver child, ``hsprocess.py``);
- ``endpoint.json``: where a standalone ``cis homeserver`` listens, so local runs use it instead
  of starting their own (and a person's Matrix client sees their rooms live).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import attrs
import yaml

from cis_bot import private
from cis_bot.errors import UserError
from cis_bot.matrix.identity import NodeIdentity

if TYPE_CHECKING:
    from cis_bot.config import Config

LOCAL_NODE_ID = "local"


def run_alias_prefix(config: Config) -> str:
    """Local run rooms are ``#<prefix><run_id>:<server>`` (from ``[dag.matrix] room_prefix``)."""
    return config.dag.matrix.room_prefix.lstrip("!#") or "dag-"


class InUse(UserError):
    """Another process runs the homeserver on this directory."""

    def __init__(self, directory: Path, holder: str) -> None:
        self.holder = holder
        super().__init__(
            f"the local homeserver in {directory} is in use by {holder}; wait for it to finish "
            "or give another --state-dir"
        )


@attrs.frozen
class LocalHomeserverDir:
    path: Path

    @classmethod
    def of(cls, state_dir: Path) -> LocalHomeserverDir:
        return cls(state_dir / "homeserver")

    @property
    def registration(self) -> Path:
        return self.path / "appservices" / "local-node.yaml"

    @property
    def endpoint(self) -> Path:
        return self.path / "endpoint.json"

    def human_accounts(self) -> list[str]:
        """The people's accounts on this homeserver (``cis homeserver add-user``'s)."""
        from cis_bot.homeserver.storage.database import DB_NAME
        from cis_bot.homeserver.storage.registration import human_users_in

        return human_users_in(self.path / DB_NAME)

    def registrations(self) -> list[Path]:
        return sorted((self.path / "appservices").glob("*.yaml"))

    def local_identity(self, server_name: str, alias_prefix: str) -> NodeIdentity:
        """The local node's identity, created (tokens, a free appservice port) the first time."""
        try:
            saved = yaml.safe_load(self.registration.read_text(encoding="utf-8"))
            identity = NodeIdentity(
                node_id=LOCAL_NODE_ID,
                homeserver="",
                server_name=server_name,
                localpart=str(saved["sender_localpart"]),
                as_token=str(saved["as_token"]),
                hs_token=str(saved["hs_token"]),
                listen_port=int(str(saved["url"]).rsplit(":", 1)[1]),
            )
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, IndexError):
            identity = NodeIdentity(
                node_id=LOCAL_NODE_ID,
                homeserver="",
                server_name=server_name,
                localpart=f"cis_{LOCAL_NODE_ID}",
                as_token=secrets.token_urlsafe(32),
                hs_token=secrets.token_urlsafe(32),
                listen_port=_free_port(),
            )
            self.save_registration(identity, alias_prefix)
        return identity

    def save_registration(self, identity: NodeIdentity, alias_prefix: str) -> None:
        private.make_dirs(self.registration.parent)
        url = f"http://127.0.0.1:{identity.listen_port}"
        text = yaml.safe_dump(identity.registration(url=url, room_alias_prefix=alias_prefix))
        private.write_file(self.registration, text)

    def lock(self, what: str, *, orphan_wait: float = 5.0) -> IO[str]:
        """Hold the directory (released when the returned file is closed); InUse if taken.

        A run's homeserver child shares its run's hold and ends moments after the run does
        (``hsprocess.py``): when the holder named in the file is gone, wait up to
        ``orphan_wait`` seconds for that child to let go."""
        private.make_dirs(self.path)
        fd = private.open_file(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_APPEND)
        handle = os.fdopen(fd, "a+")
        deadline = time.monotonic() + orphan_wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if _alive(_holder_pid(holder)) or time.monotonic() >= deadline:
                    handle.close()
                    raise InUse(self.path, holder) from None
                time.sleep(0.01)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (pid {os.getpid()})")
        handle.flush()
        return handle

    def publish_endpoint(self, base_url: str, *, standalone: bool) -> None:
        """Say where the homeserver on this directory answers: ``standalone`` for ``cis
        homeserver`` (local runs may use it), else a run's own (for readers only)."""
        data = {"base_url": base_url, "pid": os.getpid(), "standalone": standalone}
        private.write_file(self.endpoint, json.dumps(data))

    def withdraw_endpoint(self) -> None:
        self.endpoint.unlink(missing_ok=True)

    def running_endpoint(self) -> tuple[str, bool] | None:
        """(base URL, standalone) of the live homeserver on this directory, if there is one."""
        try:
            data: Any = json.loads(self.endpoint.read_text())
            pid, base_url = int(data["pid"]), str(data["base_url"])
            standalone = bool(data.get("standalone"))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (base_url, standalone) if _alive(pid) else None


def _holder_pid(holder: str) -> int | None:
    found = re.search(r"\(pid (\d+)\)$", holder)
    return int(found.group(1)) if found else None


def _alive(pid: int | None) -> bool:
    """Whether the process is there (True when unknown: then nothing is waited for)."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

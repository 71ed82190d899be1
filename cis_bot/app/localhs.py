"""The local homeserver's directory, shared by local runs and by ``cis homeserver``.

``<state_dir>/homeserver/`` holds:

- the embedded homeserver's SQLite database and media (the local runs' rooms);
- ``appservices/*.yaml``: the registrations it loads, among them ``local-node.yaml``, the local
  node's (its tokens and appservice port persist, so a homeserver started earlier knows them);
- ``lock``: held by the one process that runs the homeserver on this database;
- ``endpoint.json``: where a standalone ``cis homeserver`` listens, so local runs use it instead
  of starting their own (and a person's Matrix client sees their rooms live).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
from pathlib import Path
from typing import IO, Any

import attrs
import yaml

from cis_bot import private
from cis_bot.errors import UserError
from cis_bot.matrix.identity import NodeIdentity

LOCAL_NODE_ID = "local"


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
        from cis_bot.homeserver.server import DB_NAME, human_accounts

        return human_accounts(self.path / DB_NAME)

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

    def lock(self, what: str) -> IO[str]:
        """Hold the directory (released when the returned file is closed); InUse if taken."""
        private.make_dirs(self.path)
        fd = private.open_file(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_APPEND)
        handle = os.fdopen(fd, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise InUse(self.path, holder) from None
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
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return base_url, standalone


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

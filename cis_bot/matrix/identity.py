"""Who a node is: its id, its bot user, its tokens, where its appservice listens.

Kept apart from node.py (which needs mautrix) so that writing a registration file costs nothing
to import: ``cis homeserver`` and ``cis registration generate`` use it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import attrs

from cis_bot.errors import UserError

if TYPE_CHECKING:
    from cis_bot.config import Config


@attrs.frozen
class NodeIdentity:
    """Everything a node needs to act as its appservice."""

    node_id: str
    homeserver: str
    server_name: str
    localpart: str
    as_token: str
    hs_token: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    allowed_users: tuple[str, ...] = ()
    assign_power_level: int = 50
    #: Users, besides this node's own, whose runs it reads as theirs to coordinate.
    coordinators: tuple[str, ...] = ()
    #: Users this node, coordinating, hands tasks to without a power level in the room.
    workers: tuple[str, ...] = ()

    @property
    def user_id(self) -> str:
        return f"@{self.localpart}:{self.server_name}"

    @property
    def trusted_coordinators(self) -> frozenset[str]:
        """Whose ``cis.dag.run.created`` makes a run for this node: its own user, and the
        ``[node] coordinators`` of its config."""
        return frozenset((self.user_id, *self.coordinators))

    @property
    def registration_id(self) -> str:
        return f"cis-{self.node_id}"

    @classmethod
    def from_config(cls, config: Config, *, require_homeserver: bool = True) -> NodeIdentity:
        node = config.node
        required = [("id", node.id), ("as_token", node.as_token), ("hs_token", node.hs_token)]
        if require_homeserver:
            required.append(("homeserver", node.homeserver))
        missing = [key for key, value in required if not value]
        if missing:
            where = f" in {config.source}" if config.source else ""
            raise UserError(
                f"the config's [node] section{where} lacks {', '.join(missing)}: set id and "
                "homeserver, then run `cis registration generate --config F -o registration.yaml`"
            )
        return cls(
            node_id=node.id,
            homeserver=node.homeserver.rstrip("/"),
            server_name=node.server_name or config.dag.matrix.home_server,
            localpart=node.localpart,
            as_token=node.as_token,
            hs_token=node.hs_token,
            listen_host=node.listen_host,
            listen_port=node.listen_port,
            allowed_users=node.allowed_users,
            assign_power_level=node.assign_power_level,
            coordinators=node.coordinators,
            workers=node.workers,
        )

    def registration(
        self, *, url: str | None = None, room_alias_prefix: str | None = None
    ) -> dict[str, Any]:
        """The registration file the homeserver loads (Synapse's ``app_service_config_files``).

        The bot owns users and aliases under its localpart; ``room_alias_prefix`` also lets it
        name rooms ``#<prefix>...`` (shared, not exclusive)."""
        localpart = re.escape(self.localpart)
        server = re.escape(self.server_name)
        aliases = [{"regex": f"#{localpart}_[^:]*:{server}", "exclusive": True}]
        if room_alias_prefix:
            prefix = re.escape(room_alias_prefix)
            aliases.append({"regex": f"#{prefix}[^:]*:{server}", "exclusive": False})
        return {
            "id": self.registration_id,
            "url": url or f"http://{self.listen_host}:{self.listen_port}",
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.localpart,
            "namespaces": {
                "users": [{"regex": f"@{localpart}(_[^:]*)?:{server}", "exclusive": True}],
                "aliases": aliases,
                "rooms": [],
            },
            "rate_limited": False,
        }

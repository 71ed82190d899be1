"""``cis registration generate``'s work: a node config's tokens (made the first time, kept
after) and the registration file the homeserver loads. The dev cluster (``cis dev-cluster``, and
the compose set-up in ``synapse-dev/``) makes its nodes' registrations through here too."""

from __future__ import annotations

import secrets
import urllib.parse
from pathlib import Path

import tomlkit
import yaml

from cis_bot import private
from cis_bot.config import load_config
from cis_bot.errors import UserError
from cis_bot.matrix.identity import NodeIdentity

TOKEN_KEYS = ("as_token", "hs_token")


def generate_registration(
    config_path: Path, output: Path, *, url: str | None = None
) -> NodeIdentity:
    """Fill the ``[node]`` tokens the config lacks (written back, owner-only, comments kept) and
    write ``output``. ``url`` is where the homeserver reaches the node when that is not
    ``http://listen_host:listen_port`` (in a container network: the service's name)."""
    if url is not None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UserError(
                f"--url {url!r}: expected the appservice's URL, like http://node-a:29333"
            )
    config = load_config(config_path)
    if not config.node.id:
        raise UserError(f"{config_path}: [node] needs an id (this node's name) first")
    if output.is_dir():
        raise UserError(f"-o {output} is a directory: give the registration file's path")
    if not output.parent.is_dir():
        raise UserError(f"-o {output}: no directory {output.parent}")
    if output.exists() and output.samefile(config_path):
        raise UserError(
            f"-o {output} is the config itself: the registration goes to a file of its own"
        )
    document = tomlkit.parse(config_path.read_text(encoding="utf-8"))
    node_table = document.setdefault("node", tomlkit.table())
    for key in TOKEN_KEYS:
        if not node_table.get(key):
            node_table[key] = secrets.token_urlsafe(32)
    # The config now holds secrets: for its owner only, written whole or not at all.
    private.write_file(config_path, tomlkit.dumps(document))
    identity = NodeIdentity.from_config(load_config(config_path), require_homeserver=False)
    private.write_file(
        output,
        "# Appservice registration for cis_bot node "
        f"{identity.node_id!r}; the homeserver loads it (Synapse: app_service_config_files).\n"
        + yaml.safe_dump(identity.registration(url=url), sort_keys=False),
    )
    return identity


def saved_tokens(config_path: Path) -> dict[str, str]:
    """The ``[node]`` tokens a config already holds (none when it does not exist yet)."""
    try:
        document = tomlkit.parse(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except tomlkit.exceptions.ParseError as exc:
        raise UserError(f"{config_path}: {exc}") from None
    node = document.get("node") or {}
    return {key: str(node[key]) for key in TOKEN_KEYS if node.get(key)}


def write_config_keeping_tokens(config_path: Path, text: str) -> None:
    """Write a node config rendered afresh (``text``, without tokens), keeping the tokens the
    file had: its registration, which the homeserver holds, stays valid."""
    document = tomlkit.parse(text)
    tokens = saved_tokens(config_path)
    if tokens:
        node_table = document.setdefault("node", tomlkit.table())
        for key, value in tokens.items():
            node_table[key] = value
    private.write_file(config_path, tomlkit.dumps(document))

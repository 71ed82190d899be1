"""Synapse for the dev cluster: finding one, its config, and accounts made with its shared
secret.

``cis dev-cluster --homeserver synapse`` runs Synapse from PyPI (``matrix-synapse``) on SQLite,
with the dev settings that ``synapse-dev/homeserver.yaml`` gives the compose cluster's Synapse
(``DEV_SETTINGS``; a test keeps the two equal). Its secrets and signing key are made the first
time and kept in the cluster's directory, never anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import os
import secrets
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from cis_bot import private
from cis_bot.errors import UserError

#: The interpreter of a Python environment that has matrix-synapse installed.
SYNAPSE_PYTHON_ENV = "CIS_SYNAPSE_PYTHON"
#: Synapse's console script, in the bin/ of the environment it was installed into.
SYNAPSE_SCRIPT = "synapse_homeserver"
#: Where `scripts/ensure-synapse` puts it in a checkout of cis_bot.
CHECKOUT_VENV = Path(".venv-synapse")

_ROOMY = {"per_second": 10, "burst_count": 100}

#: What makes Synapse a dev homeserver, with or without Docker: no open registration (the
#: person's account comes from the shared secret), no key servers (no federation), and rate
#: limits a person driving the cluster by hand never meets (the nodes are appservices whose
#: registrations say `rate_limited: false`: never limited). Failed logins keep Synapse's limit.
DEV_SETTINGS: Mapping[str, Any] = {
    "report_stats": False,
    "enable_registration": False,
    "trusted_key_servers": [],
    "suppress_key_server_warning": True,
    "rc_message": _ROOMY,
    "rc_login": {"address": _ROOMY, "account": _ROOMY},
    "rc_joins": {"local": _ROOMY, "remote": _ROOMY},
    "rc_invites": {"per_room": _ROOMY, "per_user": _ROOMY, "per_issuer": _ROOMY},
    "rc_room_creation": _ROOMY,
    "rc_media_create": _ROOMY,
}

_SECRETS = ("registration_shared_secret", "macaroon_secret_key", "form_secret")

NOT_INSTALLED = (
    "no Synapse found for --homeserver synapse. Install it in a virtual environment of its own "
    "(python3 -m venv ~/synapse && ~/synapse/bin/pip install matrix-synapse; in a checkout of "
    "cis_bot, scripts/ensure-synapse makes .venv-synapse) and name its interpreter in "
    f"${SYNAPSE_PYTHON_ENV}, or put its bin/ on PATH; or use --homeserver embedded"
)


def synapse_command() -> list[str]:
    """argv that runs Synapse's homeserver, from the first of: ``$CIS_SYNAPSE_PYTHON``, this
    interpreter when it has Synapse, ``synapse_homeserver`` on PATH, ``.venv-synapse`` in the
    working directory (a checkout of cis_bot)."""
    override = os.environ.get(SYNAPSE_PYTHON_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise UserError(f"${SYNAPSE_PYTHON_ENV}={override}: not an executable interpreter")
        return [override, "-m", "synapse.app.homeserver"]
    if _importable("synapse.app.homeserver"):
        return [sys.executable, "-m", "synapse.app.homeserver"]
    script = shutil.which(SYNAPSE_SCRIPT)
    if script:
        return [script]
    checkout = Path.cwd() / CHECKOUT_VENV / "bin" / "python"
    if checkout.exists():
        return [str(checkout), "-m", "synapse.app.homeserver"]
    raise UserError(NOT_INSTALLED)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def synapse_env() -> dict[str, str]:
    """Our environment, less what would put our packages before Synapse's own."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    return env


class SynapseDir:
    """``<cluster>/synapse``: homeserver.yaml, log.yaml, data/ (signing key, SQLite, media)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = path / "homeserver.yaml"
        self.log = path / "homeserver.log"
        self.data = path / "data"

    def write_config(self, *, server_name: str, port: int, registrations: list[Path]) -> str:
        """Write homeserver.yaml for this start (port, registrations), keeping the secrets and
        signing key of earlier starts; the registration shared secret."""
        private.make_dirs(self.data)
        kept: dict[str, Any] = {}
        if self.config.exists():
            loaded = yaml.safe_load(self.config.read_text(encoding="utf-8"))
            kept = loaded if isinstance(loaded, dict) else {}
        made = {key: str(kept.get(key) or secrets.token_urlsafe(32)) for key in _SECRETS}
        signing_key = self.data / "signing.key"
        if not signing_key.exists():
            # An ed25519 signing key is 32 random bytes (its seed), in Synapse's file format.
            seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
            private.write_file(signing_key, f"ed25519 a_{secrets.token_hex(2)} {seed}\n")
        log_config = self.path / "log.yaml"
        private.write_file(log_config, _dump(self._log_config()))
        base_url = f"http://127.0.0.1:{port}"
        config: dict[str, Any] = {
            "server_name": server_name,
            "public_baseurl": f"{base_url}/",
            "pid_file": str(self.data / "homeserver.pid"),
            "listeners": [
                {
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(self.data / "homeserver.db")}},
            "media_store_path": str(self.data / "media_store"),
            "signing_key_path": str(signing_key),
            "log_config": str(log_config),
            **made,
            "app_service_config_files": [str(path) for path in registrations],
            **DEV_SETTINGS,
        }
        private.write_file(self.config, _dump(config))
        return made["registration_shared_secret"]

    def _log_config(self) -> dict[str, Any]:
        return {
            "version": 1,
            "formatters": {
                "precise": {"format": "%(asctime)s - %(name)s - %(levelname)s - %(message)s"}
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log),
                    "encoding": "utf8",
                }
            },
            "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    def command(self) -> list[str]:
        return [*synapse_command(), "--config-path", str(self.config)]


class _NoAliases(yaml.SafeDumper):
    """Shared dicts written out each time, not as YAML anchors: the file is for people too."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(data: Mapping[str, Any]) -> str:
    return yaml.dump(dict(data), Dumper=_NoAliases, sort_keys=False)


async def register_with_shared_secret(
    http: aiohttp.ClientSession, base_url: str, secret: str, localpart: str, password: str
) -> str | None:
    """A new account through Synapse's shared-secret registration (the admin API that
    ``register_new_matrix_user`` uses); its access token, or None when it exists already."""
    url = f"{base_url}/_synapse/admin/v1/register"
    async with http.get(url) as response:
        body = await response.json(content_type=None)
        if response.status != 200 or not isinstance(body, dict) or "nonce" not in body:
            raise UserError(f"Synapse at {base_url} refused a registration nonce: {body}")
        nonce = str(body["nonce"])
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"notadmin"]))
    request = {
        "nonce": nonce,
        "username": localpart,
        "password": password,
        "admin": False,
        "mac": mac.hexdigest(),
    }
    async with http.post(url, json=request) as response:
        body = await response.json(content_type=None)
        if response.status == 200 and isinstance(body, dict):
            return str(body["access_token"])
        if isinstance(body, dict) and body.get("errcode") == "M_USER_IN_USE":
            return None
        raise UserError(f"Synapse at {base_url} refused to register {localpart}: {body}")

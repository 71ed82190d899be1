"""A real Synapse (PyPI ``matrix-synapse``) on a free loopback port, for tests and benchmarks.

Synapse runs from ``.venv-synapse`` (made by ``scripts/ensure-synapse``) or from the python named
by ``$CIS_SYNAPSE_PYTHON``. Its config is what ``--generate-config`` would write (secrets, a
signing key), adjusted: SQLite, loopback only, no open registration (accounts come from the
shared-secret admin API), rate limits out of the way, no presence, and the given appservice
registrations (Synapse reads those only at start-up, so a test that needs its own registrations
asks for its own Synapse).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support.process import HomeserverStartError, HomeserverUnderTest, http_json

REPO_ROOT = Path(__file__).resolve().parents[2]

# Every client-side rate limit Synapse has, opened wide: tests create rooms, users and events
# far faster than a person would. (rc_federation has another shape and no federation runs.)
_UNLIMITED = {"per_second": 100000, "burst_count": 100000}
RATE_LIMITS: dict[str, Any] = {
    "rc_message": _UNLIMITED,
    "rc_registration": _UNLIMITED,
    "rc_registration_token_validity": _UNLIMITED,
    "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
    "rc_admin_redaction": _UNLIMITED,
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_joins_per_room": _UNLIMITED,
    "rc_3pid_validation": _UNLIMITED,
    "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
    "rc_third_party_invite": _UNLIMITED,
    "rc_media_create": _UNLIMITED,
    "rc_key_requests": _UNLIMITED,
    "rc_presence": {"per_user": _UNLIMITED},
    "rc_delayed_event_mgmt": _UNLIMITED,
    "rc_room_creation": _UNLIMITED,
    "rc_reports": _UNLIMITED,
    "rc_user_directory": _UNLIMITED,
    "rc_profile": _UNLIMITED,
}


def synapse_python() -> str:
    """The interpreter that has ``synapse`` installed."""
    override = os.environ.get("CIS_SYNAPSE_PYTHON")
    if override:
        return override
    venv_python = REPO_ROOT / ".venv-synapse" / "bin" / "python"
    if venv_python.exists():
        return str(venv_python)
    raise HomeserverStartError(
        f"no Synapse: {venv_python} is missing and $CIS_SYNAPSE_PYTHON is unset; "
        "run scripts/ensure-synapse"
    )


class SynapseServer(HomeserverUnderTest):
    kind = "synapse"

    def __init__(
        self,
        *,
        workdir: Path,
        server_name: str = "cis.local",
        appservice_files: tuple[Path, ...] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        log_level: str = "INFO",
        extra_config: dict[str, Any] | None = None,
        command_prefix: tuple[str, ...] = (),
    ) -> None:
        super().__init__(
            workdir=workdir,
            server_name=server_name,
            appservice_files=appservice_files,
            host=host,
            port=port,
            command_prefix=command_prefix,
        )
        self.python = synapse_python()
        self.config_path = workdir / "homeserver.yaml"
        self.synapse_log = workdir / "homeserver.log"
        self.log_level = log_level
        self.extra_config = extra_config or {}
        self.shared_secret = ""

    def _log_files(self) -> list[Path]:
        return [self.log_path, self.synapse_log]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Synapse's venv, not ours, must be the one on sys.path.
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(var, None)
        return env

    def _command(self) -> list[str]:
        return [self.python, "-m", "synapse.app.homeserver", "--config-path", str(self.config_path)]

    def start(self, timeout: float = 60.0) -> None:
        if not self.config_path.exists():
            self._write_config()
        elif not self.shared_secret:
            config = yaml.safe_load(self.config_path.read_text())
            self.shared_secret = str(config["registration_shared_secret"])
        super().start(timeout)

    def _write_config(self) -> None:
        # Written here rather than by ``--generate-config``, which holds nothing else and costs
        # a second Synapse start-up (~1.4 s of a core) per server.
        data_dir = self.workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.shared_secret = secrets.token_urlsafe(32)
        signing_key = data_dir / "signing.key"
        # An ed25519 signing key is any 32 random bytes (its seed), in Synapse's file format.
        seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
        signing_key.write_text(f"ed25519 a_{secrets.token_hex(2)} {seed}\n")
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "pid_file": str(data_dir / "homeserver.pid"),
            "database": {"name": "sqlite3", "args": {"database": str(data_dir / "homeserver.db")}},
            "media_store_path": str(data_dir / "media_store"),
            "signing_key_path": str(signing_key),
            "registration_shared_secret": self.shared_secret,
            "macaroon_secret_key": secrets.token_urlsafe(32),
            "form_secret": secrets.token_urlsafe(32),
        }
        log_config = self.workdir / "log.yaml"
        log_config.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "formatters": {
                        "precise": {
                            "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                            " - %(request)s - %(message)s"
                        }
                    },
                    "handlers": {
                        "file": {
                            "class": "logging.FileHandler",
                            "formatter": "precise",
                            "filename": str(self.synapse_log),
                            "encoding": "utf8",
                        }
                    },
                    "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
                    "root": {"level": self.log_level, "handlers": ["file"]},
                    "disable_existing_loggers": False,
                }
            )
        )
        config.update(
            {
                "public_baseurl": f"{self.base_url}/",
                "listeners": self._listeners(),
                "log_config": str(log_config),
                "enable_registration": False,
                "report_stats": False,
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "presence": {"enabled": False},
                # Issue 3 asks for downloads on the v3 paths as well as the authenticated v1
                # ones; Synapse refuses v3 downloads of new media unless this is off.
                "enable_authenticated_media": False,
                # Below Synapse's 200 MiB request cap, so an upload over it gets the upload
                # servlet's 413 M_TOO_LARGE rather than an aborted connection.
                "max_upload_size": "4M",
                # Cheap password hashing: tests create hundreds of accounts.
                "bcrypt_rounds": 4,
                "app_service_config_files": [str(path) for path in self.appservice_files],
                # Anyone may list a room in the public directory, as on the embedded homeserver
                # (local runs' rooms are listed); Synapse's default lets nobody.
                "room_list_publication_rules": [{"action": "allow"}],
                **RATE_LIMITS,
                **self._more_config(),
                **self.extra_config,
            }
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def _listeners(self) -> list[dict[str, Any]]:
        return [
            {
                "port": self.port,
                "bind_addresses": [self.host],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]

    def _more_config(self) -> dict[str, Any]:
        """What a subclass adds to the config (``extra_config`` still goes over it)."""
        return {}

    def _register(self, localpart: str, password: str, admin: bool) -> str:
        """Synapse's shared-secret registration (``/_synapse/admin/v1/register``)."""
        url = f"{self.base_url}/_synapse/admin/v1/register"
        status, answer = http_json("GET", url)
        if status != 200:
            raise RuntimeError(f"synapse register nonce: {status} {answer}")
        nonce = answer["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [
                    nonce.encode(),
                    localpart.encode(),
                    password.encode(),
                    b"admin" if admin else b"notadmin",
                ]
            )
        )
        status, answer = http_json(
            "POST",
            url,
            {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
        )
        if status != 200:
            raise RuntimeError(f"synapse register {localpart}: {status} {answer}")
        return str(answer["access_token"])


def _main() -> None:
    """``python -m tests.support.synapse DIR``: run one by hand, for poking at it with curl."""
    import tempfile

    workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="synapse-"))
    server = SynapseServer(workdir=workdir)
    server.start()
    print(f"synapse on {server.base_url} (workdir {workdir}); Ctrl-C stops it", flush=True)
    try:
        assert server.process is not None
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    _main()

"""A real Synapse (PyPI ``matrix-synapse``) on a free loopback port, for tests and benchmarks.

Synapse runs from ``.venv-synapse`` (made by ``scripts/ensure-synapse``) or from the python named
by ``$CIS_SYNAPSE_PYTHON``. Its config comes from ``--generate-config`` and is then adjusted:
SQLite, loopback only, no open registration (accounts come from the shared-secret admin API),
rate limits out of the way, no presence, and the given appservice registrations (Synapse reads
those only at start-up, so a test that needs its own registrations asks for its own Synapse).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
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
        port: int | None = None,
        log_level: str = "INFO",
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            workdir=workdir, server_name=server_name, appservice_files=appservice_files, port=port
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
        data_dir = self.workdir / "data"
        generated = subprocess.run(
            [
                self.python,
                "-m",
                "synapse.app.homeserver",
                "--server-name",
                self.server_name,
                "--config-path",
                str(self.config_path),
                "--data-directory",
                str(data_dir),
                "--generate-config",
                "--report-stats=no",
            ],
            cwd=self.workdir,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if generated.returncode != 0:
            raise HomeserverStartError(
                f"synapse --generate-config failed ({generated.returncode}):\n"
                f"{generated.stdout[-3000:]}\n{generated.stderr[-3000:]}"
            )
        # The generated YAML ends without a newline, so it is loaded and dumped rather than
        # appended to.
        config = yaml.safe_load(self.config_path.read_text())
        self.shared_secret = str(config["registration_shared_secret"])
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
                "listeners": [
                    {
                        "port": self.port,
                        "bind_addresses": [self.host],
                        "type": "http",
                        "tls": False,
                        "x_forwarded": False,
                        "resources": [{"names": ["client"], "compress": False}],
                    }
                ],
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
                **self.extra_config,
            }
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

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

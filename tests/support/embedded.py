"""Our embedded homeserver run as a child process through ``cis homeserver``, so that kill -9 is
real and the handle is the same as Synapse's.

Like the Synapse fixture, it opens the login rate limits wide (tests log in far more often than
a person would) through the server's ``homeserver.toml``; ``extra_config`` (Synapse's option
names) goes over that, for the tests of the limits themselves.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

from tests.support.process import START_TIMEOUT, HomeserverUnderTest
from tests.support.synapse import RATE_LIMITS


class EmbeddedServer(HomeserverUnderTest):
    kind = "embedded"

    def __init__(
        self,
        *,
        workdir: Path,
        server_name: str = "cis.local",
        appservice_files: tuple[Path, ...] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        python: str = sys.executable,
        add_user_in_process: bool = True,
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
        self.python = python
        self.state_dir = workdir / "state"
        self.add_user_in_process = add_user_in_process
        # Presence off, as in the test Synapse's config, so that the two answer alike.
        self.config = _merged(
            {"rc_login": RATE_LIMITS["rc_login"], "presence": {"enabled": False}},
            extra_config or {},
        )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        config_path = self.state_dir / "homeserver" / "homeserver.toml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(tomli_w.dumps(self.config))
        super().start(timeout)

    def _cis(self, *args: str) -> list[str]:
        return [self.python, "-m", "cis_bot", "homeserver", *args]

    def _command(self) -> list[str]:
        command = self._cis(
            "--state-dir",
            str(self.state_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--server-name",
            self.server_name,
        )
        for path in self.appservice_files:
            command += ["--appservice", str(path)]
        return command

    def _register(self, localpart: str, password: str, admin: bool) -> None:
        # add-user gives no token: create_user then logs in with the password.
        args = [
            "add-user",
            "--state-dir",
            str(self.state_dir),
            "--server-name",
            self.server_name,
            localpart,
            "--password",
            password,
            *(["--admin"] if admin else []),
        ]
        if self.add_user_in_process:
            # The same CLI code without an interpreter start per account (tests make hundreds).
            from cis_bot.cli import main

            status = main(["homeserver", *args])
            if status != 0:
                raise RuntimeError(f"cis homeserver add-user {localpart} exited {status}")
            return
        command = self._cis(*args)
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=60, check=False, cwd=self.workdir
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"cis homeserver add-user {localpart} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged

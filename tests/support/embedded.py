"""Our embedded homeserver run as a child process through ``cis homeserver``, so that kill -9 is
real and the handle is the same as Synapse's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.process import HomeserverUnderTest


class EmbeddedServer(HomeserverUnderTest):
    kind = "embedded"

    def __init__(
        self,
        *,
        workdir: Path,
        server_name: str = "cis.local",
        appservice_files: tuple[Path, ...] = (),
        port: int | None = None,
        python: str = sys.executable,
        add_user_in_process: bool = True,
        presence: bool = False,
    ) -> None:
        super().__init__(
            workdir=workdir, server_name=server_name, appservice_files=appservice_files, port=port
        )
        self.python = python
        self.state_dir = workdir / "state"
        self.add_user_in_process = add_user_in_process
        # Off by default, like the test Synapse's config, so that the two answer alike.
        self.presence = presence

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
        if not self.presence:
            command.append("--no-presence")
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

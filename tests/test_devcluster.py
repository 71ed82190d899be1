"""``cis dev-cluster up | down | status`` as a person uses it, on both homeservers: a DAG run
from the chat (``!cis run`` from a plain client) completes on the workers, ``status`` shows every
process and its heartbeat, ``down`` leaves no process of the tree behind, a second ``up`` reuses
the tokens, the account and the room, and Ctrl-C on a foreground ``up`` (through a PTY) stops
everything cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pexpect
import pytest
import yaml

from tests.support.chat import Person, body, replies_to
from tests.support.client import MatrixClient
from tests.support.devcluster import (
    REPO,
    base_url,
    cis,
    cluster_env,
    down,
    log_in,
    process_tree,
    state,
    still_alive,
    supervisor_pid,
    up_detached,
)
from tests.support.nodes import room_events, wait_for

PERSON = "@dev:cis.local"
WORKERS = {"@cis_worker-a:cis.local", "@cis_worker-b:cis.local"}


async def person(http: aiohttp.ClientSession, directory: Path) -> Person:
    client = MatrixClient(http, base_url(directory), user_id=PERSON, token=log_in(directory))
    return await Person(client).start()


def tokens(directory: Path) -> dict[str, tuple[str, str]]:
    found = {}
    for registration in sorted((directory / "nodes").glob("*/registration.yaml")):
        data = yaml.safe_load(registration.read_text())
        found[registration.parent.name] = (data["as_token"], data["hs_token"])
    return found


async def run_hello(who: Person, room_id: str) -> str:
    """``!cis run hello`` from the chat, to its end; the run id."""
    command = await who.say(room_id, "!cis run hello")
    started = await who.wait(replies_to(command), what="the run's start")
    assert "▶️ Started run" in body(started), body(started)
    assert "matrix mode" in body(started)
    run_id = re.search(r"run `(\d{8}-\d{6}-[0-9a-f]{4})`", body(started))
    assert run_id, body(started)
    done = await who.wait(
        lambda e: replies_to(command)(e) and "🏁" in body(e), timeout=90, what="the run's end"
    )
    assert f"Run `{run_id.group(1)}` completed" in body(done), body(done)
    return run_id.group(1)


def assert_ran_on_the_workers(events: list[dict[str, Any]], run_id: str) -> None:
    of_run = [e for e in events if (e.get("content") or {}).get("run_id") == run_id]
    claims = [e for e in of_run if e["type"] == "cis.dag.task.claimed"]
    assert sorted(e["content"]["task_id"] for e in claims) == ["both", "left", "right"]
    assert {e["sender"] for e in claims} <= WORKERS, [e["sender"] for e in claims]
    completed = [e for e in of_run if e["type"] == "cis.dag.session.completed"]
    assert {e["sender"] for e in completed} <= WORKERS
    assert all(e["content"]["status"] == "completed" for e in completed)
    both = next(e for e in completed if e["content"]["session_id"].endswith(":both:1"))
    assert "left ran on" in both["content"]["output"]
    assert "right ran on" in both["content"]["output"]


def status_lines(directory: Path) -> str:
    done = cis("dev-cluster", "status", "--dir", directory)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", pytest.param("synapse", marks=pytest.mark.synapse)])
async def test_a_run_from_the_chat_completes_on_the_workers_and_a_second_up_reuses_all(
    kind: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    directory = tmp_path / "cluster"
    said = up_detached(directory, "--port", "0", "--homeserver", kind, kind=kind)
    tree: dict[int, int | None] = {}
    try:
        saved = state(directory)
        assert f"{kind} homeserver" in said
        for text in (
            base_url(directory),
            saved["password"],
            "#cis-dev:cis.local",
            "!cis run hello",
        ):
            assert text in said, f"{text!r} not in:\n{said}"
        tree = process_tree(supervisor_pid(directory))
        assert len(tree) >= 5  # supervisor, homeserver, coordinator, two workers

        shown = status_lines(directory)
        for name in ("homeserver", "coordinator", "worker-a", "worker-b"):
            line = next(line for line in shown.splitlines() if line.startswith(name))
            assert "up " in line, shown
            if name != "homeserver":
                assert "heartbeat" in line and "no heartbeat" not in line, shown

        dev = await person(http, directory)
        try:
            run_id = await run_hello(dev, saved["room_id"])
            assert_ran_on_the_workers(await room_events(dev.client, saved["room_id"]), run_id)
        finally:
            await dev.stop()
        if kind == "synapse":
            # The compose set-up's room step, against this Synapse and these nodes (the same
            # node ids as synapse-dev/nodes): it signs in, finds the room as it is, sees every
            # node there.
            setup = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "synapse-dev" / "setup.py"),
                    "room",
                    "--templates",
                    str(REPO / "synapse-dev" / "nodes"),
                    "--homeserver",
                    base_url(directory),
                    "--synapse-config",
                    str(directory / "synapse" / "homeserver.yaml"),
                ],
                env={**cluster_env(), "CIS_DEV_PASSWORD": saved["password"]},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert setup.returncode == 0, setup.stderr
            assert "cis dev cluster ready" in setup.stdout and "#cis-dev:cis.local" in setup.stdout
        # One cluster per directory.
        twice = cis("dev-cluster", "up", "--dir", directory, env=cluster_env(kind))
        assert twice.returncode == 2 and "already runs" in twice.stderr, twice.stderr
    finally:
        said_down = down(directory)
    assert "stopped" in said_down
    assert still_alive(tree) == []
    assert not (directory / "run" / "processes.json").exists()
    after = cis("dev-cluster", "status", "--dir", directory)
    assert after.returncode == 1 and "not running" in after.stdout

    # Again, on the same directory: the same tokens, account, port and room.
    before = tokens(directory)
    again = up_detached(directory, kind=kind)
    try:
        assert tokens(directory) == before
        assert state(directory)["room_id"] == saved["room_id"]
        assert state(directory)["password"] in again and base_url(directory) in again
        dev = await person(http, directory)
        try:
            listing = await dev.ask(saved["room_id"], "!cis list")
            assert run_id in body(listing), body(listing)
        finally:
            await dev.stop()
        tree = process_tree(supervisor_pid(directory))
    finally:
        down(directory)
    assert still_alive(tree) == []


@pytest.mark.slow
async def test_ctrl_c_on_a_foreground_up_stops_everything(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "cis_bot", "dev-cluster", "up", "--dir", str(directory), "--port", "0"],
        env=cluster_env(),
        encoding="utf-8",
        timeout=90,
        dimensions=(40, 160),
    )
    tree: dict[int, int | None] = {}
    try:
        child.expect("dev cluster ready in")
        child.expect("Ctrl-C")
        # One live status line per process, the nodes with their heartbeat.
        child.expect(r"worker-b +pid \d+ +up \S+ +heartbeat")
        tree = process_tree(child.pid)
        assert len(tree) >= 5
        child.sendintr()
        child.expect("stopping the dev cluster")
        child.expect("stopped")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        for pid in still_alive(tree):  # a failed run's leftovers
            os.kill(pid, signal.SIGKILL)
    assert child.exitstatus == 0, child.before
    assert still_alive(tree) == []
    assert not (directory / "run" / "processes.json").exists()


@pytest.mark.slow
async def test_down_ends_what_a_killed_supervisor_left_behind(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    up_detached(directory, "--port", "0", "--workers", "1")
    supervisor = supervisor_pid(directory)
    tree = process_tree(supervisor)
    os.kill(supervisor, signal.SIGKILL)

    async def gone() -> bool:
        return supervisor not in still_alive(tree)

    await wait_for(gone, what="the supervisor to die")
    shown = cis("dev-cluster", "status", "--dir", directory)
    assert shown.returncode == 1 and "supervisor gone" in shown.stdout, shown.stdout
    # Its homeserver and nodes live on without it, until `down`.
    assert len(still_alive(tree)) >= 3, shown.stdout
    assert "stopped the dev cluster" in down(directory)

    async def all_gone() -> bool:
        return not still_alive(tree)  # the last ones reaped by init, which adopted them

    await wait_for(all_gone, timeout=10, what="every process to end")


def test_mistakes_exit_2_with_a_usage_line(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    for args, message in (
        (["up", "--workers", "0"], "must be at least 1"),
        (["up", "--workers", "27"], "at most 26"),
        (["up", "--homeserver", "dendrite"], "invalid choice"),
        (["up", "--port", "70000"], "port out of range"),
        (["status", "--dir", str(directory)], "no dev cluster in"),
        (["down", "--dir", str(directory)], "no dev cluster in"),
    ):
        done = cis("dev-cluster", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert done.stderr.startswith(f"usage: cis dev-cluster {args[0]} "), done.stderr
        assert "Traceback" not in done.stderr


def test_no_synapse_installed_is_said_before_anything_starts(tmp_path: Path) -> None:
    env = {**cluster_env(), "PATH": "/usr/bin:/bin"}
    env.pop("CIS_SYNAPSE_PYTHON", None)
    directory = tmp_path / "cluster"
    done = cis(
        "dev-cluster", "up", "--dir", directory, "--homeserver", "synapse", env=env, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert "no Synapse found" in done.stderr and "CIS_SYNAPSE_PYTHON" in done.stderr
    assert "--homeserver embedded" in done.stderr and "Traceback" not in done.stderr
    assert not (directory / "run" / "processes.json").exists()
    assert not (directory / "logs" / "homeserver.log").exists()

"""Hydrogen (matrix.org's web client, in Debian's Chromium) watching a cis run, as a person would:
log in, join the run's room by its alias, watch the status table reach "completed" while the run
goes, and type a message into the composer that then is in the room.

On the embedded homeserver: a standalone ``cis homeserver``, a user made with ``cis homeserver
add-user``, and a ``cis dag execute --local`` in the same state directory (local runs use a
running ``cis homeserver``). On Synapse: a ``cis dag execute --hybrid --room`` into a public room
an operator made. Everything goes through the ``cis`` command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.browser.conftest import Browser
from tests.browser.hydrogen import Hydrogen
from tests.browser.webapp import StaticSite
from tests.support.client import MatrixClient, unique
from tests.support.embedded import EmbeddedServer
from tests.support.fixtures import start_or_fail
from tests.support.nodes import cis_command, cis_env, plan_nodes, wait_for, write_configs
from tests.support.process import HomeserverUnderTest
from tests.support.synapse import SynapseServer

pytestmark = pytest.mark.slow

# The first task waits on a FIFO the test writes to once Hydrogen shows the run going: the run
# reaches "completed" only while the person is watching.
DAG = """
name = "watched"

[[tasks]]
id = "wait"
command = "cat release; echo released"

[[tasks]]
id = "after"
deps = ["wait"]
command = "echo after"
"""


class RunProcess:
    """``cis dag execute ...`` in the background, in its own directory."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = workdir
        self.fifo = workdir / "release"
        os.mkfifo(self.fifo)
        (workdir / "dag.toml").write_text(DAG)
        self.process = subprocess.Popen(
            cis_command("dag", "execute", *args, "dag.toml", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=workdir,
            env=cis_env(),
            start_new_session=True,
        )

    def release(self) -> None:
        # Opening a FIFO for writing waits for its reader: the task is running by now.
        with self.fifo.open("w") as fifo:
            fifo.write("go\n")

    async def finish(self, timeout: float = 60) -> dict[str, object]:
        out, err = await asyncio.to_thread(self.process.communicate, timeout=timeout)
        assert self.process.returncode == 0, f"cis dag execute failed:\n{err[-3000:]}"
        report: dict[str, object] = json.loads(out)
        return report

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


async def cis(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *cis_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cis_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"cis {' '.join(args)}: {err.decode()[-2000:]}"
    return out.decode()


async def running_run(*where: str) -> str | None:
    """The id of the run `cis dag list` shows running, if any."""
    listing = json.loads(await cis("dag", "list", "--json", *where))
    return next((str(r["run_id"]) for r in listing if r["status"] == "running"), None)


@pytest.fixture
def runs() -> Iterator[list[RunProcess]]:
    started: list[RunProcess] = []
    yield started
    for run in started:
        run.stop()


async def watch_run_in_hydrogen(
    hydrogen: Hydrogen,
    server: HomeserverUnderTest,
    reader: MatrixClient,
    room_alias: str,
    room_id: str,
    run: RunProcess,
    run_id: str,
    watcher: str,
    screenshot: Path,
) -> None:
    await hydrogen.login(server.base_url, watcher, server.password(watcher))
    await hydrogen.join_room(room_alias)
    await hydrogen.expect_in_timeline(re.compile(rf"run {run_id}: running"))

    await asyncio.to_thread(run.release)
    await hydrogen.expect_in_timeline(re.compile(rf"run {run_id}: completed"))
    report = await run.finish()
    assert report["status"] == "completed"

    text = f"hello from Hydrogen {unique('')}"
    await hydrogen.send(text)

    async def arrived() -> bool:
        page = await reader.messages(room_id, dir="b", limit="20")
        return any(
            e["type"] == "m.room.message"
            and e["sender"] == server.user_id(watcher)
            and e["content"].get("body") == text
            for e in page["chunk"]
        )

    await wait_for(arrived, timeout=30, what="the composer's message in the room")
    await hydrogen.page.screenshot(path=str(screenshot))
    # The README's picture is this one: CIS_README_SCREENSHOT=docs/hydrogen-run.png retakes it.
    if readme_copy := os.environ.get("CIS_README_SCREENSHOT"):
        shutil.copyfile(screenshot, readme_copy)


async def test_hydrogen_watches_a_local_run_on_cis_homeserver(
    browser: Browser,
    hydrogen_site: StaticSite,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    runs: list[RunProcess],
) -> None:
    server = EmbeddedServer(
        workdir=tmp_path / "hs",
        add_user_in_process=False,
        extra_config={"presence": {"enabled": True}},  # as `cis homeserver` has it by default
    )
    start_or_fail(server)
    try:
        # Accounts through `cis homeserver add-user`, as the README tells a person.
        await server.create_user("watcher")
        reader_id, reader_token = await server.create_user("reader")
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        run = RunProcess(run_dir, "--local", "--state-dir", str(server.state_dir))
        runs.append(run)

        run_id = await wait_for(
            lambda: running_run("--local", "--state-dir", str(server.state_dir)),
            timeout=30,
            what="the run in `cis dag list`",
        )
        alias = f"#dag-{run_id}:{server.server_name}"
        reader = MatrixClient(http, server.base_url, user_id=reader_id, token=reader_token)
        room_id = await reader.join(alias)

        page = await browser.new_page()
        hydrogen = Hydrogen(page, hydrogen_site.url)
        await watch_run_in_hydrogen(
            hydrogen,
            server,
            reader,
            alias,
            room_id,
            run,
            run_id,
            "watcher",
            tmp_path / "hydrogen-run.png",
        )
    finally:
        server.stop()


async def test_hydrogen_watches_a_hybrid_run_on_synapse(
    browser: Browser,
    hydrogen_site: StaticSite,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    runs: list[RunProcess],
) -> None:
    (node,) = plan_nodes(tmp_path, "cis.local", "laptop")
    server = SynapseServer(workdir=tmp_path / "synapse", appservice_files=(node.registration,))
    start_or_fail(server)
    try:
        operator_id, operator_token = await server.create_user("operator")
        await server.create_user("watcher")
        operator = MatrixClient(http, server.base_url, user_id=operator_id, token=operator_token)
        write_configs([node], server.base_url, allowed_users=[operator_id])
        localpart = unique("runs")
        room_id = await operator.create_room(
            name="runs",
            preset="public_chat",
            room_alias_name=localpart,
            invite=[node.user_id],
            power_level_content_override={"events": {"cis.node.heartbeat": 0}},
        )
        run = RunProcess(
            node.workdir,
            "--hybrid",
            "--room",
            room_id,
            "--config",
            str(node.config),
            "--state-dir",
            str(node.state_dir),
        )
        runs.append(run)

        run_id = await wait_for(
            lambda: running_run(
                "--room", room_id, "--config", str(node.config), "--state-dir", str(node.state_dir)
            ),
            timeout=30,
            what="the run in `cis dag list`",
        )
        page = await browser.new_page()
        hydrogen = Hydrogen(page, hydrogen_site.url)
        await watch_run_in_hydrogen(
            hydrogen,
            server,
            operator,
            f"#{localpart}:{server.server_name}",
            room_id,
            run,
            run_id,
            "watcher",
            tmp_path / "hydrogen-run.png",
        )
    finally:
        server.stop()

"""A run driven from a chat client (Hydrogen, in Debian's Chromium): a person types `!cis run`
into the composer, sees the answer, answers the blocked agent with `!cis input`, and watches the
status table reach "completed". On a standalone `cis homeserver` with a `cis node --coordinator`,
everything set up through the `cis` command line and the client-server API, as docs/chat.md
tells a person.

docs/chat.png is this test's screenshot: CIS_CHAT_SCREENSHOT=docs/chat.png retakes it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.browser.conftest import Browser
from tests.browser.hydrogen import Hydrogen
from tests.browser.webapp import StaticSite
from tests.support.client import MatrixClient
from tests.support.control import AGENT
from tests.support.embedded import EmbeddedServer
from tests.support.fixtures import start_or_fail
from tests.support.nodes import NodeProcess, joined_members, plan_nodes, wait_for, write_configs

pytestmark = pytest.mark.slow

DAG = f"""
name = "release"

[[tasks]]
id = "build"
command = "echo built"

[[tasks]]
id = "deploy"
deps = ["build"]
command = '''{AGENT} --script "print deploying; ask Deploy to staging?; print deployed"'''
"""


async def test_a_person_drives_a_run_from_hydrogen(
    browser: Browser, hydrogen_site: StaticSite, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (coord,) = plan_nodes(tmp_path, "cis.local", "coord")
    server = EmbeddedServer(
        workdir=tmp_path / "hs",
        appservice_files=(coord.registration,),
        add_user_in_process=False,
        extra_config={"presence": {"enabled": True}},
    )
    start_or_fail(server)
    node: NodeProcess | None = None
    try:
        alice_id, alice_token = await server.create_user("alice")
        dags = tmp_path / "dags"
        dags.mkdir()
        (dags / "release.toml").write_text(DAG)
        write_configs(
            [coord], server.base_url, allowed_users=[alice_id],
            extra=f'\n[chat]\ndags_dir = "{dags}"\n',
        )  # fmt: skip
        node = NodeProcess(coord, "--coordinator").start()
        alice = MatrixClient(http, server.base_url, user_id=alice_id, token=alice_token)
        room_id = await alice.create_room(name="releases", invite=[coord.user_id])

        async def bot_joined() -> bool:
            return coord.user_id in await joined_members(alice, room_id)

        await wait_for(bot_joined, what="the bot to join")

        hydrogen = Hydrogen(await browser.new_page(), hydrogen_site.url)
        await hydrogen.login(server.base_url, "alice", server.password("alice"))
        await hydrogen.open_room("releases")
        await hydrogen.send("!cis run release")
        await hydrogen.expect_in_timeline(re.compile(r"Started run \d{8}-\d{6}-[0-9a-f]{4}"))
        started = (
            await hydrogen.timeline().get_by_text(re.compile(r"Started run")).last.inner_text()
        )
        found = re.search(r"\d{8}-\d{6}-[0-9a-f]{4}", started)
        assert found, started
        run_id = found.group()
        await hydrogen.expect_in_timeline(re.compile(r"is blocked: .*Deploy to staging"))

        await hydrogen.send("!cis input deploy y")
        await hydrogen.expect_in_timeline(re.compile(rf"Typed 1 character and Enter into {run_id}"))
        await hydrogen.expect_in_timeline(re.compile(rf"run {run_id}: completed"))
        await hydrogen.expect_in_timeline(re.compile(rf"Run {run_id} completed in"))
        await hydrogen.send("!cis status")
        await hydrogen.expect_in_timeline(re.compile(rf"Run {run_id} — DAG release"))

        # Tall enough to show the whole exchange, from the command to the status.
        await hydrogen.page.set_viewport_size({"width": 1100, "height": 1500})
        await hydrogen.expect_in_timeline("!cis run release")
        screenshot = tmp_path / "chat.png"
        await hydrogen.page.screenshot(path=str(screenshot))
        if copy := os.environ.get("CIS_CHAT_SCREENSHOT"):
            shutil.copyfile(screenshot, copy)
    finally:
        if node is not None:
            node.stop()
        server.stop()

"""Item 2 of the security review, local mode: a person with an account on the local homeserver
forges a ``cis.dag.run.created`` and waits for ``cis dag list / status / resume`` to pick it up.

Replayed through the real processes: a standalone ``cis homeserver`` on the state directory, the
attacker over plain HTTP, and the ``cis`` commands the owner runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from cis_bot.matrix import events as ev
from cis_bot.matrix.levels import RUN_LOG_POWER_LEVEL
from tests.security.support import REPO, acis, forge_run_created, marking_spec
from tests.support.client import CS, MatrixClient, q
from tests.support.embedded import EmbeddedServer
from tests.support.fixtures import start_or_fail

pytestmark = pytest.mark.slow

HELLO = str(REPO / "examples" / "hello.toml")


@pytest.fixture
def local_homeserver(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """``cis homeserver`` on a state directory, as a person runs it to follow local runs."""
    server = EmbeddedServer(workdir=tmp_path / "hs")
    start_or_fail(server)
    try:
        yield server
    finally:
        server.stop()


async def client_of(server: EmbeddedServer, http: aiohttp.ClientSession, name: str) -> MatrixClient:
    user_id, token = await server.create_user(name)
    return MatrixClient(http, server.base_url, user_id=user_id, token=token)


def local_node(server: EmbeddedServer, http: aiohttp.ClientSession) -> MatrixClient:
    """The local node's bot, with the token from its registration in the state directory."""
    registration = server.state_dir / "homeserver" / "appservices" / "local-node.yaml"
    saved: dict[str, Any] = yaml.safe_load(registration.read_text())
    user_id = f"@{saved['sender_localpart']}:{server.server_name}"
    return MatrixClient(http, server.base_url, user_id=user_id, token=saved["as_token"])


async def test_a_run_a_member_forged_in_an_old_public_room_is_not_a_run(
    local_homeserver: EmbeddedServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    server, state = local_homeserver, str(local_homeserver.state_dir)
    mallory = await client_of(server, http, "mallory")
    run = await acis("dag", "execute", "--local", HELLO, "--state-dir", state, "--json")
    assert run.returncode == 0, run.stderr
    real = json.loads(run.stdout)["run_id"]

    # A run room as cis_bot made them before: public, joinable by alias, the log open to all.
    node = local_node(server, http)
    old_room = await node.create_room(
        preset="public_chat",
        room_alias_name="dag-old",
        power_level_content_override={"events": {ev.NodeHeartbeatContent.TYPE: 0}},
    )
    await mallory.join(f"#dag-old:{server.server_name}")
    marker = tmp_path / "pwned"
    forged = "21000101-000000-0bad"
    await forge_run_created(
        mallory, old_room, forged, marking_spec(marker), coordinator="local", mode="local"
    )

    listing = await acis("dag", "list", "--state-dir", state, "--json")
    assert listing.returncode == 0, listing.stderr
    assert [r["run_id"] for r in json.loads(listing.stdout)] == [real]
    status = await acis("dag", "status", "--state-dir", state, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["run_id"] == real  # not the forged "latest" run
    resume = await acis("dag", "resume", forged, "--state-dir", state, cwd=tmp_path)
    assert resume.returncode == 2, resume.stderr
    assert f"no run {forged!r}" in resume.stderr and "Traceback" not in resume.stderr
    assert not marker.exists()


async def test_a_local_run_room_admits_its_watchers_only_and_they_cannot_write_its_log(
    local_homeserver: EmbeddedServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    server, state = local_homeserver, str(local_homeserver.state_dir)
    alice = await client_of(server, http, "alice")
    mallory = await client_of(server, http, "mallory")
    config = tmp_path / "config.toml"
    config.write_text(f'[dag.local]\nwatchers = ["{alice.user_id}"]\n')
    since = (await alice.sync())["next_batch"]
    run = await acis("dag", "execute", "--local", HELLO, "--state-dir", state, "--json",
                     config=config)  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    room_id, alias = report["room_id"], f"#dag-{report['run_id']}:{server.server_name}"

    # Not in the directory; not joinable by alias or id by anyone it did not invite.
    directory = await mallory.ok("GET", f"{CS}/publicRooms")
    assert room_id not in [r["room_id"] for r in directory["chunk"]]
    for target in (alias, room_id):
        refused = await mallory.request("POST", f"{CS}/join/{q(target)}", {})
        assert refused.status == 403, refused.body

    # The watcher is invited, so the run shows up in her client; she joins and reads it.
    await alice.sync_until(
        lambda body: room_id in body.get("rooms", {}).get("invite", {}), since=since
    )
    assert await alice.join(alias) == room_id
    types = [e["type"] for e in (await alice.messages(room_id, dir="b", limit="200"))["chunk"]]
    assert ev.RunCompletedContent.TYPE in types

    # At power 0 she cannot write the run's log, nor speak for the node, nor invite anyone.
    levels = await alice.get_state(room_id, "m.room.power_levels")
    for event_type, cls in ev.CATALOGUE.items():
        if cls in (ev.NodeHeartbeatContent, ev.ControlRequestContent, ev.ControlReplyContent):
            continue
        assert levels["events"][event_type] >= RUN_LOG_POWER_LEVEL > 0, event_type
        refused = await alice.request(
            "PUT", f"{CS}/rooms/{q(room_id)}/send/{q(event_type)}/{alice.next_txn()}", {"v": 1}
        )
        assert refused.status == 403, (event_type, refused.body)
    node_user = local_node(server, http).user_id
    as_node = await alice.request(
        "PUT",
        f"{CS}/rooms/{q(room_id)}/state/{q(ev.NodeHeartbeatContent.TYPE)}/{q(node_user)}",
        {"v": 1},
    )
    assert as_node.status == 403, as_node.body
    invite = await alice.request(
        "POST", f"{CS}/rooms/{q(room_id)}/invite", {"user_id": mallory.user_id}
    )
    assert invite.status == 403, invite.body


async def test_by_default_every_persons_account_watches_new_runs(
    local_homeserver: EmbeddedServer, http: aiohttp.ClientSession
) -> None:
    server, state = local_homeserver, str(local_homeserver.state_dir)
    alice = await client_of(server, http, "alice")
    bob = await client_of(server, http, "bob")
    since = {c.user_id: (await c.sync())["next_batch"] for c in (alice, bob)}
    run = await acis("dag", "execute", "--local", HELLO, "--state-dir", state, "--json")
    assert run.returncode == 0, run.stderr
    room_id = json.loads(run.stdout)["room_id"]
    for person in (alice, bob):
        await person.sync_until(
            lambda body: room_id in body.get("rooms", {}).get("invite", {}),
            since=since[person.user_id],
        )


def start_local_run(dag: Path, state: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cis_bot", "dag", "execute", "--local", str(dag), "--json",
         "--state-dir", state],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        env={**os.environ, "CIS_CONFIG": os.devnull},
    )  # fmt: skip


async def test_two_local_runs_next_to_a_standalone_homeserver_both_run(
    local_homeserver: EmbeddedServer, tmp_path: Path
) -> None:
    """Item 11: they share the local node's identity, and used to fight over its port."""
    state = str(local_homeserver.state_dir)
    runs = []
    for name in ("first", "second"):
        dag = tmp_path / f"{name}.toml"
        # Each waits for the other to be under way, so the two overlap for sure.
        dag.write_text(
            f'[[tasks]]\nid = "{name}"\ncommand = "touch {name}.started; '
            'while [ ! -e first.started ] || [ ! -e second.started ]; do sleep 0.05; done"\n'
        )
        runs.append(start_local_run(dag, state, tmp_path))
    reports = []
    for run in runs:
        stdout, stderr = await asyncio.to_thread(run.communicate, timeout=60)
        assert run.returncode == 0, stderr
        assert "Traceback" not in stderr
        reports.append(json.loads(stdout))
    listing = await acis("dag", "list", "--state-dir", state, "--json")
    assert {r["run_id"]: r["status"] for r in json.loads(listing.stdout)} == {
        r["run_id"]: "completed" for r in reports
    }

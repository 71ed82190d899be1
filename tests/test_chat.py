"""Chat commands as people use them, on the embedded homeserver and on Synapse: plain clients
send commands, replies and reactions, and read the answers; `cis node --coordinator` (and, where
it says so, a `cis dag execute` process) answers. docs/chat.md is what these tests hold true."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cis_bot.control.registry import discover
from tests.support.chat import Person, body, html, notice_of, path, replies_to
from tests.support.client import MatrixClient
from tests.support.control import AGENT, Background
from tests.support.embedded import EmbeddedServer
from tests.support.fixtures import start_or_fail
from tests.support.nodes import (
    NodePlan,
    NodeProcess,
    joined_members,
    plan_nodes,
    registration_files,
    room_events,
    wait_for,
    write_configs,
)

pytestmark = pytest.mark.slow

#: A profile that is not the shell: the fake agent runs its prompt as a script.
FAKE_ARGV = [sys.executable, "-m", "cis_bot.testing.fake_agent", "--script", "{prompt}"]
FAKE_AGENT = (
    f'[agents.fake]\nargv = {json.dumps(FAKE_ARGV)}\nprompt_via = "argument"\n'
    "upstream_in_prompt = false\n"
)


def chat_config(dags: Path, **keys: Any) -> str:
    """A [chat] section (rate limits out of the way unless given) and the fake profile."""
    settings = {"dags_dir": str(dags), "rate_burst": 100, "rate_per_minute": 6000.0, **keys}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    return "\n[chat]\n" + "\n".join(lines) + "\n\n" + FAKE_AGENT


async def person(http: aiohttp.ClientSession, hs: Any, name: str) -> Person:
    user_id, token = await hs.create_user(name)
    return await Person(MatrixClient(http, hs.base_url, user_id=user_id, token=token)).start()


async def bot_in(room: str, owner: Person, *bots: str) -> None:
    async def joined() -> bool:
        return set(bots) <= await joined_members(owner.client, room)

    await wait_for(joined, what=f"{', '.join(bots)} to join")


def run_id_in(event: dict[str, Any]) -> str:
    found = re.search(r"run `?(\d{8}-\d{6}-[0-9a-f]{4})", body(event))
    assert found, body(event)
    return found.group(1)


async def _has(who: Person, room: str, command: str, text: str) -> bool:
    return text in body(await who.ask(room, command))


def command_of(answer: dict[str, Any]) -> str:
    """The command an answer answers."""
    return str(answer["content"]["m.relates_to"]["m.in_reply_to"]["event_id"])


def start_node(plan: NodePlan) -> NodeProcess:
    return NodeProcess(plan, "--coordinator").start()


async def test_people_drive_a_run_from_the_room(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (coord,) = plan_nodes(tmp_path, "cis.local", "coord")
    hs = homeserver_factory(appservice_files=registration_files([coord]))
    alice, bob, carol = [await person(http, hs, n) for n in ("alice", "bob", "carol")]
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "review.toml").write_text(
        f"[[tasks]]\nid = \"ask\"\ncommand = '''{AGENT} --script "
        "\"print hello; ask Continue?; print after-yes\"'''\n"
        f"[[tasks]]\nid = \"second\"\ncommand = '''{AGENT} --script "
        '"ask Deploy?; print deployed"\'\'\'\ndeps = ["ask"]\n'
        '[[tasks]]\nid = "gate"\ncommand = "echo gated"\nlevel = { type = "confirmed" }\n'
    )
    (dags / "slow.toml").write_text(
        f"[[tasks]]\nid = \"sleepy\"\ncommand = '{AGENT} --sleep 60'\n"
        f"[[tasks]]\nid = \"other\"\ncommand = '{AGENT} --sleep 60'\n"
    )
    write_configs([coord], hs.base_url, allowed_users=[alice.user_id], extra=chat_config(dags))
    node = start_node(coord)
    try:
        room = await alice.client.create_room(
            name="runs",
            invite=[coord.user_id, bob.user_id, carol.user_id],
            power_level_content_override={"events": {"cis.node.heartbeat": 0}},
        )
        for member in (bob, carol):
            await member.join(room)
        await alice.set_power(room, carol.user_id, 50)
        await bot_in(room, alice, coord.user_id)

        # Read commands: anyone in the room. Mistakes are answered with what to do instead.
        helped = await bob.ask(room, "!cis help")
        assert helped["content"]["msgtype"] == "m.notice"
        assert "<table>" in html(helped) and "!cis input RUN:TASK TEXT" in body(helped)
        assert helped["content"]["m.mentions"] == {"user_ids": [bob.user_id]}
        typo = await bob.ask(room, "!cis stauts")
        assert "did you mean `status`?" in body(typo) and "`!cis help`" in body(typo)
        usage = await bob.ask(room, "!cis input 2026")
        assert "input: missing TEXT" in body(usage) and "!cis input RUN:TASK TEXT" in body(usage)
        none = await bob.ask(room, "!cis status")
        assert "no runs in this room yet" in body(none)

        # Acting commands: refused to a member at power level 0, with why; nothing is done.
        refused = await bob.ask(room, "!cis run review")
        assert f"{bob.user_id} may not run here" in body(refused)
        assert "power level 50" in body(refused) and "Nothing was done" in body(refused)
        # carol (power level 50) may; alice (an allowed user) too.
        started = await carol.ask(room, "!cis run review --max-workers 2")
        assert "▶️ Started run" in body(started) and "2 at a time" in body(started)
        run_id = run_id_in(started)

        # The blocked agent's notice quotes the question and mentions who may answer.
        blocked = await bob.wait(notice_of("blocked", session_id=f"{run_id}:ask:1"), what="ask")
        assert "Continue? [y/N]" in body(blocked)
        assert set(blocked["content"]["m.mentions"]["user_ids"]) == {alice.user_id, carol.user_id}
        sessions = await bob.ask(room, "!cis sessions")
        assert f"{run_id}:ask:1" in body(sessions) and "blocked" in body(sessions)
        # bob's answer is refused; alice's rich reply is typed into the session.
        no = await bob.reply(room, blocked, "y")
        assert "may not input here" in body(await bob.wait(replies_to(no), what="refusal"))
        yes = await alice.reply(room, blocked, "y")
        typed = await alice.wait(replies_to(yes), what="the typed answer")
        assert f"Typed 1 character and Enter into `{run_id}:ask:1`" in body(typed)
        # The notice is edited once answered.
        await alice.wait(
            lambda e: (
                e["content"].get("m.relates_to", {}).get("event_id") == blocked["event_id"]
                and "was answered" in body(e)
            ),
            what="the blocked notice edited",
        )

        # The next one is answered with `!cis input`, its id given by a prefix.
        second = await bob.wait(notice_of("blocked", session_id=f"{run_id}:second:1"), what="2nd")
        answered = await carol.ask(room, f"!cis input {run_id[:15]}:second y")
        assert f"into `{run_id}:second:1`" in body(answered)
        logs = await bob.ask(room, f"!cis logs {run_id}:second")
        assert "deployed" in body(logs) or "Deploy? [y/N]" in body(logs)
        assert "<pre><code>" in html(logs)
        assert second["event_id"]

        # The confirmed task waits for approval: bob's 👍 is refused, alice's ✅ approves.
        approval = await bob.wait(notice_of("approval", task_id="gate"), what="the approval")
        assert f"!cis approve {run_id} gate" in body(approval)
        await bob.react(room, approval["event_id"], "👍")
        refusal = await bob.wait(replies_to(approval["event_id"]), what="a refused reaction")
        assert "may not approve here" in body(refusal)
        await alice.react(room, approval["event_id"], "✅")
        await alice.wait(
            lambda e: replies_to(approval["event_id"])(e) and "Approved" in body(e),
            what="the approval answered",
        )
        # The run ends; the command that started it hears how, and the status table says so.
        done = await carol.wait(
            lambda e: replies_to(command_of(started))(e) and "🏁" in body(e),
            timeout=60,
            what="the run's end",
        )
        assert f"Run `{run_id}` completed" in body(done)
        status = await bob.ask(room, f"!cis status {run_id[:15]}")
        assert f"Run {run_id}" in body(status) and ": completed" in body(status)
        assert body(status).count("completed") >= 4
        listing = await bob.ask(room, "!cis list")
        assert run_id in body(listing) and "3/3" in body(listing)
        table = await bob.wait(
            lambda e: body(e).startswith("* DAG review") and "completed" in body(e).split("\n")[0],
            what="the status table at completed",
        )
        assert table["sender"] == coord.user_id
        await wait_for(lambda: _has(bob, room, "!cis nodes", "🟢 up"), what="the node's beat")

        # A command in a thread is answered in the thread.
        threaded = await bob.say(
            room,
            "!cis help kill",
            **{"m.relates_to": {"rel_type": "m.thread", "event_id": started["event_id"]}},
        )
        in_thread = await bob.wait(replies_to(threaded), what="the answer in the thread")
        assert in_thread["content"]["m.relates_to"] == {
            "rel_type": "m.thread",
            "event_id": started["event_id"],
            "is_falling_back": False,
            "m.in_reply_to": {"event_id": threaded},
        }

        # An edited command is not run again; the answer says to send it anew.
        edit = await alice.say(
            room,
            "* !cis run slow",
            **{
                "m.new_content": {"msgtype": "m.text", "body": "!cis run slow"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": listing["event_id"]},
            },
        )
        hint = await alice.wait(replies_to(edit), what="the edit's answer")
        assert "Edited commands are not run" in body(hint)

        # Kill one session, then cancel the run.
        slow = await alice.ask(room, "!cis run slow")
        slow_id = run_id_in(slow)

        async def running() -> bool:
            answer = await alice.ask(room, f"!cis sessions {slow_id}")
            return "sleepy" in body(answer) and "other" in body(answer)

        await wait_for(running, what="both sessions to run")
        killed = await alice.ask(room, f"!cis kill {slow_id}:sleepy")
        assert f"`{slow_id}:sleepy:1`: killed" in body(killed)
        cancelled = await alice.ask(room, f"!cis cancel {slow_id}")
        assert f"Run {slow_id} cancelled" in body(cancelled)
        end = await alice.wait(
            lambda e: replies_to(command_of(slow))(e) and "❌" in body(e),
            timeout=60,
            what="the cancelled run's end",
        )
        assert "cancelled" in body(end) and "sleepy (failed)" in body(end)
        again = await alice.ask(room, f"!cis cancel {slow_id}")
        assert "has already ended (cancelled)" in body(again)
        resumed = await alice.ask(room, f"!cis resume {slow_id[:15]}")
        assert f"Resumed run {slow_id} as run" in body(resumed)
        new_id = run_id_in({"content": {"body": body(resumed).split(" as ", 1)[1]}})
        assert new_id != slow_id
        await wait_for(
            lambda: _has(alice, room, f"!cis sessions {new_id}", "sleepy"),
            what="the resumed run's sessions",
        )
        assert "cancelled" in body(await alice.ask(room, f"!cis cancel {new_id}"))
        await alice.wait(
            lambda e: replies_to(command_of(resumed))(e) and "❌" in body(e),
            timeout=60,
            what="the resumed run's end",
        )
        unknown = await alice.ask(room, "!cis status 1999")
        assert "no run '1999'" in body(unknown) and run_id in body(unknown)
        assert "chat.refused" in node.log_text()
    finally:
        for p in (alice, bob, carol):
            await p.stop()
        node.stop()
    assert "Traceback" not in node.log_text()


async def test_direct_chats_sent_files_floods_and_odd_messages(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (coord,) = plan_nodes(tmp_path, "cis.local", "coord")
    hs = homeserver_factory(appservice_files=registration_files([coord]))
    alice, bob, carol, mallory = [
        await person(http, hs, n) for n in ("alice", "bob", "carol", "mallory")
    ]
    dags = tmp_path / "dags"
    dags.mkdir()
    extra = chat_config(dags, rate_burst=8, rate_per_minute=6.0, shell_users=[alice.user_id])
    allowed = [alice.user_id, carol.user_id]
    write_configs([coord], hs.base_url, allowed_users=allowed, extra=extra)
    node = start_node(coord)
    try:
        # A direct chat: the bot and one person, the prefix optional.
        direct = await alice.client.create_room(is_direct=True, invite=[coord.user_id])
        await bot_in(direct, alice, coord.user_id)
        helped = await alice.ask(direct, "help")
        assert "Commands" in body(helped)
        assert "no runs in this room yet" in body(await alice.ask(direct, "status"))

        room = await alice.client.create_room(
            name="runs", invite=[coord.user_id, bob.user_id, carol.user_id, mallory.user_id]
        )
        for member in (bob, carol, mallory):
            await member.join(room)
        await bot_in(room, alice, coord.user_id)
        # In a room with more people the prefix is needed: plain talk is left alone.
        chatter = await bob.say(room, "status of the build, anyone?")
        await bob.none_within(replies_to(chatter), 1.5)

        # A DAG sent as a file: carol may act, but is no shell user, so raw commands are refused.
        shell_dag = b'[[tasks]]\nid = "build"\ncommand = "echo built"\n'
        sent = await carol.send_file(room, "build.toml", shell_dag, caption="!cis run")
        refused = await carol.wait(replies_to(sent), what="the refused file")
        assert "task build runs a raw command" in body(refused)
        assert "[chat] shell_users" in body(refused) and carol.user_id in body(refused)
        # alice, a shell user, runs the same file by replying to it.
        again = await alice.reply(room, {"event_id": sent}, "!cis run")
        started = await alice.wait(replies_to(again), what="the file run's start")
        assert "from build.toml" in body(started)
        done = await alice.wait(
            lambda e: replies_to(again)(e) and "🏁" in body(e), timeout=60, what="its end"
        )
        assert "completed" in body(done)
        # A file without raw commands runs for carol.
        agent_dag = b'[[tasks]]\nid = "hi"\nagent = "fake"\nprompt = "flood 6K; print hi"\n'
        sent = await carol.send_file(room, "hi.toml", agent_dag, caption="!cis run")
        hi_run = run_id_in(await carol.wait(replies_to(sent), what="the agent run's start"))
        await carol.wait(
            lambda e: replies_to(sent)(e) and "🏁" in body(e), timeout=60, what="the agent run"
        )
        # A log longer than asked for: its end in the answer, the whole of it as a file.
        asked = await carol.say(room, f"!cis logs {hi_run}:hi 5")
        shown = await carol.wait(replies_to(asked), what="the log's end")
        total = int(re.search(r"the last 5 of (\d+) lines", body(shown)).group(1))  # type: ignore[union-attr]
        assert total > 50 and "hi\n```" in body(shown) and "0000000001 " not in body(shown)
        attached = await carol.wait(
            lambda e: replies_to(asked)(e) and e["content"]["msgtype"] == "m.file", what="file"
        )
        assert attached["content"]["filename"] == f"{hi_run}_hi_1.log"
        server, media = attached["content"]["url"][len("mxc://") :].split("/")
        whole = await carol.client.request(
            "GET", f"/_matrix/client/v1/media/download/{server}/{media}"
        )
        assert whole.status == 200 and whole.raw.decode().count("\n") == total
        bad = await carol.send_file(room, "bad.toml", b"[[tasks]]\nid = 3\n", caption="!cis run")
        problem = body(await carol.wait(replies_to(bad), what="the bad file's answer"))
        assert "bad.toml" in problem and "id" in problem
        text = await carol.send_file(room, "notes.txt", b"hello", caption="!cis run")
        assert "ends in .toml or .json" in body(await carol.wait(replies_to(text), what="txt"))

        # Malformed and odd messages: answered when they are commands, never a crash.
        for content in (
            {"msgtype": "m.text", "body": 42},
            {"msgtype": "m.text", "body": {"x": 1}},
            {"msgtype": ["m.text"], "body": "!cis help"},
            {"msgtype": "m.text", "body": "!cis help", "m.relates_to": "nonsense"},
            {"body": "!cis help"},
        ):
            # A homeserver may refuse some of these (a body that is not a string): those it
            # lets through must not hurt.
            txn = bob.client.next_txn()
            await bob.client.request("PUT", f"{path(room)}/send/m.room.message/{txn}", content)
        huge = await bob.say(room, "!cis " + "x" * 40_000)
        assert "unknown command 'xxxx" in body(await bob.wait(replies_to(huge), what="huge"))
        homoglyph = await bob.ask(room, "!cis st\u0430tus\u202e")
        assert "did you mean `status`?" in body(homoglyph)
        answered = await bob.ask(room, "!cis help \u200bkill")
        assert "unknown command" in body(answered) or "kill" in body(answered)

        # A flood: the burst is answered, then one word about the limit, then silence.
        flood = [await mallory.say(room, "!cis help nodes") for _ in range(12)]
        answers = [await mallory.wait(replies_to(e), what="flood answers") for e in flood[:9]]
        assert "Too many commands" in body(answers[8])
        assert all("Too many" not in body(a) for a in answers[:8])
        for event_id in flood[9:]:
            await mallory.none_within(replies_to(event_id), 0.5)
        assert "chat.rate_limited" in node.log_text()
        assert "Traceback" not in node.log_text()
        assert "Commands" in body(await alice.ask(direct, "help"))
    finally:
        for p in (alice, bob, carol, mallory):
            await p.stop()
        node.stop()


async def test_a_node_and_a_run_process_in_one_room_answer_each_command_once(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    coord, runner = plan_nodes(tmp_path, "cis.local", "coord", "runner")
    hs = homeserver_factory(appservice_files=registration_files([coord, runner]))
    alice = await person(http, hs, "alice")
    dags = tmp_path / "dags"
    dags.mkdir()
    write_configs(
        [coord, runner], hs.base_url, allowed_users=[alice.user_id], extra=chat_config(dags)
    )
    node = start_node(coord)
    run: Background | None = None
    try:
        room = await alice.client.create_room(
            name="shared",
            invite=[coord.user_id, runner.user_id],
            power_level_content_override={"events": {"cis.node.heartbeat": 0}},
        )
        await bot_in(room, alice, coord.user_id)  # the run process joins when it starts
        dag = tmp_path / "dag.toml"
        dag.write_text(
            f"[[tasks]]\nid = \"ask\"\ncommand = '''{AGENT} --script "
            "\"ask Continue?; sleep 60\"'''\n"
        )
        run = Background(
            tmp_path, "run", "dag", "execute", "--hybrid", "--room", room, str(dag), "--json",
            "--config", str(runner.config), "--state-dir", str(runner.state_dir),
        )  # fmt: skip
        blocked = await alice.wait(notice_of("blocked"), what="the run process's notice")
        assert blocked["sender"] == runner.user_id
        run_id = blocked["content"]["cis.notice"]["run_id"]

        asked: dict[str, str] = {}
        for text in ("!cis help", f"!cis status {run_id}", f"!cis sessions {run_id[:15]}"):
            asked[text] = await alice.say(room, text)
        asked["reply"] = await alice.reply(room, blocked, "y")
        asked["!cis status"] = await alice.say(room, "!cis status")
        expected = {
            "!cis help": coord.user_id,
            f"!cis status {run_id}": runner.user_id,
            f"!cis sessions {run_id[:15]}": runner.user_id,
            "reply": runner.user_id,
            "!cis status": coord.user_id,
        }
        first: set[str] = set()
        for what, event_id in asked.items():
            answer = await alice.wait(replies_to(event_id), what=f"the answer to {what}")
            assert answer["sender"] == expected[what], (what, body(answer))
            first.add(answer["event_id"])
        # ... and no second answer to any of them.
        await alice.none_within(
            lambda e: e["event_id"] not in first and any(replies_to(i)(e) for i in asked.values()),
            2.0,
        )
        assert "Typed 1 character" in body(await alice.wait(replies_to(asked["reply"])))

        # Without a chat-enabled node (its heartbeat lapsed), the run process answers the rest.
        node.stop()

        async def answered_by_runner() -> bool:
            try:
                answer = await alice.ask(room, "!cis help", timeout=5)
            except AssertionError:  # nobody answers while the node's heartbeat still counts
                return False
            return bool(answer["sender"] == runner.user_id)

        await wait_for(answered_by_runner, timeout=30, what="the run process to take over")
        cancelled = await alice.ask(room, f"!cis cancel {run_id}")
        assert cancelled["sender"] == runner.user_id and "cancelled" in body(cancelled)
        assert await run.wait(60) == 1
        assert json.loads(run.stdout)["status"] == "cancelled"
        # The run process's own worker left its hybrid run's task alone: one claim and one
        # end for the one attempt (the worker refusing it would be a second end).
        events = await room_events(alice.client, room)
        ends = [(e["type"], e["content"].get("task_id")) for e in events if e["type"] in (
            "cis.dag.task.claimed", "cis.dag.session.completed"
        )]  # fmt: skip
        assert ends == [("cis.dag.task.claimed", "ask"), ("cis.dag.session.completed", "ask")]
    finally:
        await alice.stop()
        node.stop()
        if run is not None:
            run.stop()


async def test_a_local_run_answers_in_its_own_room(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    server = EmbeddedServer(workdir=tmp_path / "hs")
    start_or_fail(server)
    run: Background | None = None
    try:
        alice = await person(http, server, "alice")
        config = tmp_path / "config.toml"
        config.write_text(f"[node]\nallowed_users = [{json.dumps(alice.user_id)}]\n")
        dag = tmp_path / "dag.toml"
        dag.write_text(
            f"[[tasks]]\nid = \"ask\"\ncommand = '''{AGENT} --script "
            "\"ask Continue?; print after-yes\"'''\n"
        )
        run = Background(
            tmp_path, "run", "dag", "execute", "--local", str(dag), "--json",
            "--config", str(config), "--state-dir", str(server.state_dir),
        )  # fmt: skip

        pid = run.process.pid

        async def registered() -> str | None:
            for entry in discover(server.state_dir, clean=False).live:
                if entry.pid == pid and entry.runs:
                    return entry.runs[0].run_id
            return None

        run_id = await wait_for(registered, what="the run to start")
        room = await alice.client.join(f"#dag-{run_id}:cis.local")
        blocked = await alice.wait(notice_of("blocked", run_id=run_id), what="the notice")
        # The room was made for the run: its process answers everything there...
        helped = await alice.ask(room, "!cis help")
        assert helped["sender"] == "@cis_local:cis.local"
        refused = await alice.ask(room, "!cis run other")
        assert "this process does not start runs" in body(refused) and run_id in body(refused)
        # ... but it is no direct chat: without the prefix, nothing is a command.
        plain = await alice.say(room, "status")
        await alice.none_within(replies_to(plain), 1.0)
        answer = await alice.reply(room, blocked, "y")
        assert "Typed 1 character" in body(await alice.wait(replies_to(answer), what="typed"))
        assert await run.wait(60) == 0, run.stderr
        assert json.loads(run.stdout)["status"] == "completed"
    finally:
        if run is not None:
            run.stop()
        server.stop()


async def test_in_matrix_mode_sessions_on_workers_are_answered_through_the_room(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    coord, worker = plan_nodes(tmp_path, "cis.local", "coord", "wa")
    hs = homeserver_factory(appservice_files=registration_files([coord, worker]))
    alice = await person(http, hs, "alice")
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "remote.toml").write_text(
        f"[[tasks]]\nid = \"ask\"\ncommand = '''{AGENT} --script "
        "\"print remote-hello; ask Continue?; print after-yes; sleep 60\"'''\n"
    )
    matrix = '\n[dag]\nexecution_mode = "matrix"\n'
    # The coordinator hands its tasks to the worker, which obeys it.
    trusted = f"workers = {json.dumps([worker.user_id])}\n"
    write_configs(
        [coord], hs.base_url, allowed_users=[alice.user_id], extra=trusted + chat_config(dags)
    )
    coord.config.write_text(matrix + coord.config.read_text())
    write_configs(
        [worker], hs.base_url, allowed_users=[alice.user_id, coord.user_id], accept_agents=["shell"]
    )
    node, wa = start_node(coord), NodeProcess(worker).start()
    try:
        room = await alice.client.create_room(
            name="matrix",
            invite=[coord.user_id, worker.user_id],
            power_level_content_override={"events": {"cis.node.heartbeat": 0}},
        )
        await bot_in(room, alice, coord.user_id, worker.user_id)

        async def worker_beats() -> bool:
            return "`wa`" in body(await alice.ask(room, "!cis nodes"))

        await wait_for(worker_beats, what="the worker's heartbeat")
        started = await alice.ask(room, "!cis run remote")
        assert "matrix mode" in body(started)
        run_id = run_id_in(started)
        # The worker's blocked session: the coordinator hears of it and posts the notice.
        blocked = await alice.wait(notice_of("blocked", session_id=f"{run_id}:ask:1"), what="it")
        assert blocked["sender"] == coord.user_id
        sessions = await alice.ask(room, f"!cis sessions {run_id}")
        assert "wa" in body(sessions) and "blocked" in body(sessions)
        answer = await alice.reply(room, blocked, "y")
        typed = await alice.wait(replies_to(answer), timeout=30, what="the answer, via the room")
        assert f"Typed 1 character and Enter into `{run_id}:ask:1`" in body(typed)

        async def said_yes() -> bool:
            return "after-yes" in body(await alice.ask(room, f"!cis logs {run_id}:ask"))

        await wait_for(said_yes, timeout=30, what="the live log from the worker")
        killed = await alice.ask(room, f"!cis kill {run_id}:ask")
        assert f"`{run_id}:ask:1`: killed" in body(killed)
        end = await alice.wait(
            lambda e: replies_to(command_of(started))(e) and "❌" in body(e),
            timeout=60,
            what="the run's end",
        )
        assert "ask (failed)" in body(end)
        # Its transcript, from the worker's upload.
        logs = await alice.ask(room, f"!cis logs {run_id}:ask")
        assert "(killed)" in body(logs) and "remote-hello" in body(logs)
    finally:
        await alice.stop()
        node.stop()
        wa.stop()
    assert "Traceback" not in node.log_text() + wa.log_text()


async def test_a_rooms_creator_may_act_and_a_demoted_member_no_longer_may(
    homeserver_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (coord,) = plan_nodes(tmp_path, "cis.local", "coord")
    hs = homeserver_factory(appservice_files=registration_files([coord]))
    alice, bob, carol = [await person(http, hs, n) for n in ("alice", "bob", "carol")]
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "hello.toml").write_text('[[tasks]]\nid = "hi"\ncommand = "echo hi"\n')
    write_configs([coord], hs.base_url, allowed_users=[alice.user_id], extra=chat_config(dags))
    node = start_node(coord)
    try:
        # bob's room (room version 12: its creator outranks every power level), the bot
        # invited by alice, whom the node obeys; carol a moderator at first.
        room = await bob.client.create_room(
            name="bob's", invite=[alice.user_id, carol.user_id], room_version="12"
        )
        await alice.join(room)
        await carol.join(room)
        await bob.set_power(room, carol.user_id, 50)
        await alice.client.invite(room, coord.user_id)
        await bot_in(room, bob, coord.user_id)

        started = await bob.ask(room, "!cis run hello")
        assert "Started run" in body(started), body(started)
        assert "Started run" in body(await carol.ask(room, "!cis run hello"))
        await bob.set_power(room, carol.user_id, 0)
        refused = await carol.ask(room, "!cis run hello")
        assert f"{carol.user_id} may not run here" in body(refused)
    finally:
        for p in (alice, bob, carol):
            await p.stop()
        node.stop()

"""The session-control pieces on their own: detach keys, text rendering of a stream, transcript
tails, id resolution, the control events, process discovery, and the control API in-process
against real sessions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import attrs
import pytest

from cis_bot.control import registry
from cis_bot.control.api import replay_of
from cis_bot.control.client.finder import SessionRecord, resolve_session
from cis_bot.control.client.process import ControlError, ProcessClient
from cis_bot.control.client.terminal import DetachKeys, TextStream
from cis_bot.control.operations import ControlSettings, tail_offset
from cis_bot.control.service import serve_control
from cis_bot.errors import UserError
from cis_bot.ids import match_run
from cis_bot.matrix import events as ev
from cis_bot.session.manager import SessionManager, SessionSpec
from cis_bot.session.profiles import BUILTIN_PROFILES
from cis_bot.session.session import SessionSettings

AGENT = f"{sys.executable} -m cis_bot.testing.fake_agent"


# --- detach keys ---------------------------------------------------------------------------------


def test_ctrl_b_d_detaches_and_everything_else_passes_through() -> None:
    keys = DetachKeys()
    assert keys.feed(b"abc") == (b"abc", False)
    assert keys.feed(b"x\x02d") == (b"x", True)
    keys = DetachKeys()
    assert keys.feed(b"\x02") == (b"", False)  # the prefix may end a read ...
    assert keys.feed(b"D") == (b"", True)  # ... and the key come in the next
    keys = DetachKeys()
    assert keys.feed(b"\x02\x02") == (b"\x02", False)  # Ctrl-B twice types one
    assert keys.feed(b"\x02q\x03") == (b"\x02q\x03", False)  # Ctrl-C goes to the agent
    readonly = DetachKeys(readonly=True)
    assert readonly.feed(b"zz\x03") == (b"zz", True)


# --- logs as text --------------------------------------------------------------------------------


def test_text_stream_renders_lines_and_shows_a_waiting_prompt_once() -> None:
    stream = TextStream()
    assert stream.feed(b"\x1b[1mbold\x1b[0m line\r\nprogress 1\rprogress 2\r\n") == (
        "bold line\nprogress 2\n"
    )
    assert stream.feed(b"Continue? [y/N] ") == ""
    assert stream.flush() == "Continue? [y/N] "
    assert stream.flush() == ""
    assert stream.feed(b"y\r\nanswer: yes\r\n") == "y\nanswer: yes\n"
    # A partial line cut inside an escape sequence or a UTF-8 character shows what is whole.
    assert stream.feed(b"caf\xc3") == ""
    assert stream.flush() == "caf"
    assert stream.feed(b"\xa9 \x1b[3") == ""
    assert stream.flush() == "é "
    assert stream.feed(b"1mok\n") == "ok\n"
    # A partial line later overwritten (a spinner) is shown again, whole, on a new line.
    assert stream.feed(b"- working") == "" and stream.flush() == "- working"
    assert stream.feed(b"\rdone     \n") == "\ndone     \n"


def test_tail_offset_finds_the_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    lines = [f"line {i}".encode() for i in range(100_000)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    end = path.stat().st_size
    for n in (0, 1, 2, 5000):
        data = path.read_bytes()[tail_offset(path, n, end) :]
        assert data.split(b"\n")[:-1] == (lines[-n:] if n else [])
    assert tail_offset(path, 200_000, end) == 0
    path.write_bytes(b"a\nb\npartial")
    assert path.read_bytes()[tail_offset(path, 2, path.stat().st_size) :] == b"b\npartial"


def test_a_replay_starts_at_the_last_screen_clear_or_a_line() -> None:
    assert replay_of(b"old\n\x1b[2Jscreen", 1000) == b"\x1b[2Jscreen"
    assert replay_of(b"\x1b[?1049hfull\x1b[2Jagain", 1000) == b"\x1b[2Jagain"
    long = b"".join(f"{i}\n".encode() for i in range(1000))
    shown = replay_of(long, 100)
    assert len(shown) <= 100 and shown.endswith(b"999\n") and shown.startswith(b"9")
    assert long.endswith(shown) and long[: -len(shown)].endswith(b"\n")


# --- ids ----------------------------------------------------------------------------------------


def record(sid: str, state: str = "running") -> SessionRecord:
    run, task, attempt = sid.split(":")
    return SessionRecord(sid, run, task, int(attempt), state, "process")


RECORDS = [
    record("20261127-211502-3fa9:build:1", "failed"),
    record("20261127-211502-3fa9:build:2"),
    record("20261127-211502-3fa9:test:1"),
    record("20261127-220000-aaaa:build:1", "completed"),
]


def test_ids_resolve_by_run_prefix_and_latest_attempt() -> None:
    assert resolve_session("20261127-2115:build", RECORDS).session_id.endswith("build:2")
    assert resolve_session("20261127-211502-3fa9:build:1", RECORDS).state == "failed"
    assert resolve_session("test", RECORDS).session_id == "20261127-211502-3fa9:test:1"
    assert resolve_session("20261127-22:build", RECORDS).state == "completed"
    with pytest.raises(UserError) as ambiguous:
        resolve_session("build", RECORDS)
    assert "'build' is ambiguous: " in str(ambiguous.value)
    assert all(f"{r.session_id} ({r.state})" in str(ambiguous.value) for r in RECORDS[:2])
    assert "20261127-220000-aaaa:build:1 (completed)" in str(ambiguous.value)
    with pytest.raises(UserError) as unknown:
        resolve_session("x:deploy", RECORDS)
    assert str(unknown.value).startswith("no session 'x:deploy'; sessions: ")
    assert "20261127-211502-3fa9:test:1 (running)" in str(unknown.value)
    for bad in ("", "a::b", "a:b:c:d", "run:task:first"):
        with pytest.raises(UserError):
            resolve_session(bad, RECORDS)
    assert match_run("2026112", ["2026112", "20261127-1"]) == "2026112"
    with pytest.raises(UserError, match="ambiguous"):
        match_run("2026", ["20261127-1", "20261127-2"])


# --- events -------------------------------------------------------------------------------------


def test_control_events_round_trip_and_reject_what_cannot_be_obeyed() -> None:
    request = ev.ControlRequestContent(
        request_id="r1", action="input", node="wa", session_id="run:t:1", text="y",
        newline=True, expires=1,
    )  # fmt: skip
    event_type, content = ev.encode(request)
    assert ev.decode(event_type, content) == request
    reply = ev.ControlReplyContent(request_id="r1", node="wa", ok=False, error="no")
    assert ev.decode(*ev.encode(reply)) == reply
    base = {"v": 1, "request_id": "r", "node": "wa", "expires": 5}
    for content, problem in (
        ({**base, "action": "reboot", "session_id": "s"}, "unknown action"),
        ({**base, "action": "input"}, "needs a session_id"),
        ({**base, "action": "approve", "run_id": "r"}, "needs a task_id"),
        ({**base, "action": "cancel"}, "needs a run_id"),
        ({**base, "action": "kill", "session_id": "s", "expires": "soon"}, "expires"),
        ({**base, "action": "input", "session_id": "s", "text": "x" * 20_000}, "longer"),
    ):
        with pytest.raises(ev.InvalidEvent, match=problem):
            ev.decode(ev.ControlRequestContent.TYPE, content)
    with pytest.raises(ev.InvalidEvent, match="ok"):
        ev.decode(ev.ControlReplyContent.TYPE, {"v": 1, "request_id": "r", "node": "n"})


# --- discovery ----------------------------------------------------------------------------------


def test_discovery_drops_dead_and_reused_pids(tmp_path: Path) -> None:
    directory = tmp_path / "control"
    directory.mkdir()
    child = subprocess.Popen(["true"])
    child.wait()
    me = os.getpid()
    entries = {
        "dead": {"pid": child.pid, "socket": "x.sock", "runs": [{"run_id": "r1"}]},
        "reused": {"pid": me, "socket": "y.sock", "start_ticks": 1},
        "alive": {"pid": me, "socket": "z.sock", "node_id": "n", "kind": "node",
                  "start_ticks": registry.process_start_ticks(me)},
    }  # fmt: skip
    for name, data in entries.items():
        (directory / f"{name}.json").write_text(json.dumps(data))
    (directory / "garbage.json").write_text("{not json")
    found = registry.discover(tmp_path)
    assert [e.file.name for e in found.live if e.file] == ["alive.json"]
    assert sorted(e.file.name for e in found.dead if e.file) == ["dead.json", "reused.json"]
    assert found.dead[0].runs or found.dead[1].runs
    assert sorted(p.name for p in directory.iterdir()) == ["alive.json", "garbage.json"]


def test_a_deep_state_dir_gets_its_socket_elsewhere(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    path = registry.socket_path(deep, 12345)
    assert len(os.fsencode(path)) <= registry.MAX_SOCKET_PATH
    assert path.name == "12345.sock" and deep not in path.parents
    assert registry.socket_path(tmp_path, 1) == tmp_path / "control" / "1.sock"


# --- the API in-process, on real sessions ---------------------------------------------------------


async def test_the_api_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    manager = SessionManager(SessionSettings(settle_secs=0.05, kill_grace_secs=1))
    plane = await serve_control(tmp_path, node_id="n1", kind="node", settings=ControlSettings())
    plane.add_sessions(manager, lambda sid: None)
    try:
        spec = SessionSpec(
            session_id="r1:t:1",
            profile=BUILTIN_PROFILES["shell"],
            prompt=f"{AGENT} --print hi --ask 'Go?'",
            work_dir=tmp_path,
            transcript_path=tmp_path / "t.log",
        )
        session = await manager.start(spec)
        (entry,) = registry.discover(tmp_path).live
        async with ProcessClient(entry, timeout=5) as client:
            with pytest.raises(UserError, match="no session 'nope'"):
                await client.request("POST", client.session_path("nope", "input"), body={})
            with pytest.raises(UserError, match="expected"):
                await client.request(
                    "POST", client.session_path("r1:t:1", "input"), body={"text": 5}
                )
            with pytest.raises(UserError, match="does not drive run"):
                await client.request("POST", client.run_path("r1", "cancel"), body={})
            big = "x" * (ControlSettings().max_input_bytes + 1)
            with pytest.raises(UserError, match="over the limit"):
                await client.request(
                    "POST", client.session_path("r1:t:1", "input"), body={"text": big}
                )
            async with asyncio.timeout(20):  # typed ahead, the answer would share its line
                while session.state != "blocked":
                    await asyncio.sleep(0.05)
            await client.request("POST", client.session_path("r1:t:1", "input"), body={"text": "y"})
            completed = await session.wait()
            assert completed.state == "completed"
            with pytest.raises(ControlError, match="has ended"):
                await client.request(
                    "POST", client.session_path("r1:t:1", "input"), body={"text": "y"}
                )
            with pytest.raises(ControlError, match="already ended"):
                await client.request("POST", client.session_path("r1:t:1", "kill"), body={})
            logs = b"".join([c async for c in client.logs("r1:t:1", tail=1, follow=True)])
            assert logs == b"answer: yes\r\n"
    finally:
        await manager.close()
        await plane.close()
    assert not list((tmp_path / "control").iterdir())
    with pytest.raises(ControlError, match="cannot be reached"):
        async with ProcessClient(entry, timeout=5) as client:
            await client.sessions(include_ended=False)


async def test_a_writer_attaching_to_a_full_screen_program_asks_it_to_redraw(
    tmp_path: Path,
) -> None:
    settings = SessionSettings(rows=24, cols=80)
    manager = SessionManager(settings)
    plane = await serve_control(tmp_path, node_id="n1", kind="node")
    plane.add_sessions(manager, lambda sid: None)
    tui = attrs.evolve(BUILTIN_PROFILES["shell"], name="tui", screen=True, detect_tty_read=False)
    script = "trap 'echo redraw-$(stty size)' WINCH; echo ready; while :; do sleep 0.05; done"
    try:
        session = await manager.start(
            SessionSpec("r1:tui:1", tui, script, tmp_path, tmp_path / "tui.log")
        )
        async with asyncio.timeout(20):  # the trap is set once it says so
            while b"ready" not in session.tail_bytes():
                await asyncio.sleep(0.05)
        (entry,) = registry.discover(tmp_path).live
        async with ProcessClient(entry, timeout=5) as client:
            watcher = await client.attach("r1:tui:1", readonly=True, size=(50, 50))
            writer = await client.attach("r1:tui:1", readonly=False, size=(24, 80))
            seen = b""
            async with asyncio.timeout(20):
                while b"redraw-24 80" not in seen:
                    message = await writer.receive()
                    if message.type is aiohttp.WSMsgType.BINARY:
                        seen += message.data
            assert session.tail_bytes().count(b"redraw-") == 1  # the watcher asked nothing
            await writer.close()
            await watcher.close()
    finally:
        await manager.close()
        await plane.close()

"""AgentSession and SessionManager against real processes in real PTYs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest

from cis_bot.session import procfs
from cis_bot.session.events import (
    SessionBlocked,
    SessionCompleted,
    SessionCreated,
    SessionEvent,
    SessionOutputUpdated,
    SessionState,
    SessionStateChanged,
)
from cis_bot.session.manager import SessionManager, SessionSpec, Subscription
from cis_bot.session.profile import AgentProfile, PromptVia
from cis_bot.session.profiles import BUILTIN_PROFILES
from cis_bot.session.session import SessionError, SessionSettings
from cis_bot.session.spawn import SpawnMethod, setsid_failure
from tests.support.claude import require_claude

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

SHELL = BUILTIN_PROFILES["shell"]
FAKE_AGENT = (sys.executable, "-m", "cis_bot.testing.fake_agent")
FAST = SessionSettings(
    settle_secs=0.1,
    settle_max_secs=0.5,
    tty_poll_max_secs=0.3,
    output_interval=0.05,
    kill_grace_secs=0.5,
    drain_secs=0.5,
)
DEADLINE = 20.0


def fake_profile(*args: str, **changes: object) -> AgentProfile:
    """The fake agent with ``args``; in argument mode without a ``{prompt}`` among them, the
    prompt is the fake agent's script (``"print hi; ask Go?; exit 3"``)."""
    argv: tuple[str, ...] = (*FAKE_AGENT, *args)
    if "prompt_via" not in changes and not any("{prompt}" in a for a in args):
        argv = (*argv, "--script", "{prompt}")
    fields: dict[str, object] = {"name": "fake", "argv": argv}
    fields.update(changes)
    return AgentProfile(**fields)  # type: ignore[arg-type]


class Spawner:
    def __init__(self, manager: SessionManager, tmp_path: Path) -> None:
        self.manager = manager
        self.tmp_path = tmp_path
        self.count = 0

    async def start(
        self,
        prompt: str,
        profile: AgentProfile = SHELL,
        *,
        env: dict[str, str] | None = None,
        work_dir: Path | None = None,
    ) -> tuple[str, Path]:
        self.count += 1
        sid = f"run:task{self.count}:1"
        transcript = self.tmp_path / "transcripts" / f"task{self.count}.log"
        await self.manager.start(
            SessionSpec(
                session_id=sid,
                profile=profile,
                prompt=prompt,
                work_dir=work_dir or self.tmp_path,
                transcript_path=transcript,
                env=env or {},
            )
        )
        return sid, transcript

    async def run(
        self, prompt: str, profile: AgentProfile = SHELL, **kw: object
    ) -> SessionCompleted:
        sid, _ = await self.start(prompt, profile, **kw)  # type: ignore[arg-type]
        session = self.manager.get(sid)
        assert session is not None
        async with asyncio.timeout(DEADLINE):
            return await session.wait()


@pytest.fixture
async def manager() -> AsyncIterator[SessionManager]:
    mgr = SessionManager(FAST)
    yield mgr
    await mgr.close(grace_secs=0.2)


@pytest.fixture
def spawner(manager: SessionManager, tmp_path: Path) -> Spawner:
    return Spawner(manager, tmp_path)


@pytest.fixture(params=list(SpawnMethod))
async def either(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Spawner]:
    """A spawner using each way of starting a PTY process (see cis_bot/session/spawn.py)."""
    method: SpawnMethod = request.param
    if method.usable() is not method:
        pytest.skip(f"no {method} here")
    mgr = SessionManager(attrs.evolve(FAST, spawn_method=method))
    yield Spawner(mgr, tmp_path)
    await mgr.close(grace_secs=0.2)


async def next_event(
    sub: Subscription, match: Callable[[SessionEvent], bool], timeout: float = DEADLINE
) -> SessionEvent:
    async with asyncio.timeout(timeout):
        async for event in sub:
            if match(event):
                return event
    raise AssertionError("subscription ended")


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for its (new) parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


# ------------------------------------------------------------------------------- exit status


async def test_exit_zero_completes_with_output(either: Spawner) -> None:
    done = await either.run("echo hello; echo world")
    assert done.state is SessionState.COMPLETED
    assert done.exit_code == 0
    assert done.error is None
    assert done.output == "hello\nworld"
    assert done.duration_s > 0


async def test_non_zero_exit_fails_with_its_status(either: Spawner) -> None:
    done = await either.run("echo doomed; exit 3")
    assert done.state is SessionState.FAILED
    assert done.exit_code == 3
    assert done.error == "exited with status 3"
    assert done.output == "doomed"


async def test_death_by_signal_fails_naming_the_signal(either: Spawner) -> None:
    done = await either.run("kill -SEGV $$")
    assert done.state is SessionState.FAILED
    assert done.exit_code == -signal.SIGSEGV
    assert done.error == "killed by SIGSEGV"


async def test_missing_command_fails_to_start_with_events(
    manager: SessionManager, spawner: Spawner
) -> None:
    with manager.subscribe() as sub:
        profile = attrs.evolve(SHELL, name="ghost", argv=("no-such-agent-cli", "{prompt}"))
        done = await spawner.run("hi", profile)
        events = []
        while (event := sub.get_nowait()) is not None:
            events.append(event)
    assert done.state is SessionState.FAILED
    assert done.exit_code is None
    assert done.error == "cannot execute 'no-such-agent-cli': command not found in PATH"
    assert [type(e) for e in events] == [SessionCreated, SessionStateChanged, SessionCompleted]
    created, changed = events[0], events[1]
    assert isinstance(created, SessionCreated) and created.pid is None
    assert isinstance(changed, SessionStateChanged)
    assert (changed.old, changed.new) == (SessionState.SPAWNING, SessionState.FAILED)


async def test_bad_interpreter_is_a_spawn_failure(either: Spawner, tmp_path: Path) -> None:
    script = tmp_path / "agent"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    done = await either.run("x", attrs.evolve(SHELL, argv=(str(script), "{prompt}")))
    assert done.state is SessionState.FAILED
    assert done.error is not None
    assert done.error.startswith(f"cannot execute {str(script)!r}: ")
    assert "No such file or directory" in done.error


async def test_exec_failure_in_forked_child_is_reported_and_the_child_reaped(
    tmp_path: Path,
) -> None:
    manager = SessionManager(attrs.evolve(FAST, spawn_method=SpawnMethod.FORK))
    not_a_program = tmp_path / "garbage"
    not_a_program.write_bytes(b"\x7fELF\x00garbage")
    not_a_program.chmod(0o755)
    profile = attrs.evolve(SHELL, argv=(str(not_a_program), "{prompt}"))
    # Only a process born during this test counts: others' (alive now) may end meanwhile.
    existing = set(procfs.descendants(os.getpid()))
    done = await Spawner(manager, tmp_path).run("x", profile)
    await manager.close()
    assert done.state is SessionState.FAILED
    assert done.error is not None
    assert done.error.startswith(f"cannot execute {str(not_a_program)!r}: ")
    assert "Exec format error" in done.error
    # The forked child that failed to exec must not stay a zombie.
    async with asyncio.timeout(DEADLINE):
        while {p for p in procfs.descendants(os.getpid()) if gone(p)} - existing:
            await asyncio.sleep(0.01)


def test_setsid_failure_message() -> None:
    head = b"setsid: failed to execute /x/agent: Permission denied\r\nmore"
    assert setsid_failure(126, head) == "Permission denied"
    assert setsid_failure(0, head) is None
    assert setsid_failure(1, b"agent output\r\n") is None
    assert setsid_failure(1, b"setsid: failed to set the controlling terminal: EPERM") == (
        "failed to set the controlling terminal: EPERM"
    )


async def test_missing_work_dir_fails_to_start(spawner: Spawner, tmp_path: Path) -> None:
    done = await spawner.run("true", work_dir=tmp_path / "nowhere")
    assert done.state is SessionState.FAILED
    assert done.error is not None and "is not a directory" in done.error


async def test_profile_without_prompt_token_fails_clearly(spawner: Spawner) -> None:
    profile = attrs.evolve(SHELL, argv=("/bin/echo", "hello"))
    done = await spawner.run("x", profile)
    assert done.state is SessionState.FAILED
    assert done.error is not None and "has no {prompt}" in done.error


async def test_work_dir_and_environment(
    either: Spawner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TERM", raising=False)  # a PTY gets a TERM even when we have none
    work = tmp_path / "work"
    work.mkdir()
    profile = attrs.evolve(SHELL, env={"FROM_PROFILE": "p", "OVERRIDDEN": "profile"})
    done = await either.run(
        'pwd; echo "$FROM_PROFILE $OVERRIDDEN $TERM"; [ -t 0 ] && [ -t 1 ] && echo tty',
        profile,
        env={"OVERRIDDEN": "task"},
        work_dir=work,
    )
    assert done.output.splitlines() == [str(work), "p task xterm-256color", "tty"]


async def test_the_agent_leads_a_session_whose_terminal_is_its_pty(either: Spawner) -> None:
    done = await either.run(
        "[ \"$(awk '{print $6}' /proc/$$/stat)\" = $$ ] && echo leader; : </dev/tty && echo ctty"
    )
    assert done.output.splitlines() == ["leader", "ctty"]


async def test_ctrl_c_typed_into_the_terminal_interrupts_the_agent(either: Spawner) -> None:
    sid, _ = await either.start("echo ready; sleep 30")
    session = either.manager.get(sid)
    assert session is not None
    async with asyncio.timeout(DEADLINE):
        while "ready" not in session.tail_text():
            await asyncio.sleep(0.01)
    await either.manager.send_input(sid, "\x03")
    async with asyncio.timeout(DEADLINE):
        done = await session.wait()
    assert (done.exit_code, done.error) == (-signal.SIGINT, "killed by SIGINT")


async def test_exec_failure_through_posix_spawn_is_an_error_at_once(tmp_path: Path) -> None:
    if SpawnMethod.POSIX_SPAWN.usable() is not SpawnMethod.POSIX_SPAWN:
        pytest.skip("no posix_spawn here")
    manager = SessionManager(attrs.evolve(FAST, spawn_method=SpawnMethod.POSIX_SPAWN))
    not_a_program = tmp_path / "garbage"
    not_a_program.write_bytes(b"\x7fELF\x00garbage")
    not_a_program.chmod(0o755)
    profile = attrs.evolve(SHELL, argv=(str(not_a_program), "{prompt}"))
    existing = set(procfs.descendants(os.getpid()))
    done = await Spawner(manager, tmp_path).run("x", profile)
    await manager.close()
    assert done.state is SessionState.FAILED and done.exit_code is None
    assert done.error == f"cannot execute {str(not_a_program)!r}: Exec format error"
    assert not {p for p in procfs.descendants(os.getpid()) if gone(p)} - existing


async def test_agent_starts_with_default_signal_dispositions(either: Spawner) -> None:
    # Python ignores SIGPIPE; the agent must not inherit that: `yes | head` ends by SIGPIPE.
    done = await either.run("yes | head -n 2; grep SigIgn /proc/$$/status")
    assert done.state is SessionState.COMPLETED
    lines = done.output.splitlines()
    assert lines[:2] == ["y", "y"]
    assert no_standard_signal_ignored(lines[2])


def no_standard_signal_ignored(sig_ign_line: str) -> bool:
    """From /proc's ``SigIgn:`` line: none of signals 1-31 ignored. (glibc's posix_spawn leaves
    its two internal signals, 32 and 33, ignored in the child; no program relies on them.)"""
    label, mask = sig_ign_line.split()
    return label == "SigIgn:" and int(mask, 16) & ((1 << 31) - 1) == 0


@pytest.fixture
def parent_ignores_hangups() -> Iterator[None]:
    """This process as a `cis` started under nohup or as a background job: the signals that
    survive exec as "ignored"."""
    signals = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("parent_ignores_hangups")
async def test_agent_of_a_nohup_parent_starts_with_default_dispositions(either: Spawner) -> None:
    done = await either.run("grep SigIgn /proc/$$/status")
    assert done.state is SessionState.COMPLETED
    assert no_standard_signal_ignored(done.output)


@pytest.mark.usefixtures("parent_ignores_hangups")
async def test_exec_failure_of_a_nohup_parents_agent_is_reported(
    either: Spawner, tmp_path: Path
) -> None:
    script = tmp_path / "agent"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    done = await either.run("x", attrs.evolve(SHELL, argv=(str(script), "{prompt}")))
    assert done.state is SessionState.FAILED
    assert done.error is not None
    assert done.error.startswith(f"cannot execute {str(script)!r}: ")
    assert "No such file or directory" in done.error


# ------------------------------------------------------------------------------- the prompt


async def test_prompt_via_argument_is_substituted_verbatim(spawner: Spawner) -> None:
    prompt = "say {name} and {prompt} and $HOME 'quoted' \"double\" %s"
    done = await spawner.run(prompt, fake_profile("--print", "[{prompt}]"))
    assert done.output == f"[{prompt}]"


async def test_prompt_via_stdin_arrives_byte_for_byte(either: Spawner) -> None:
    long_line = "x" * 5000  # longer than the line discipline's 4 KiB line buffer
    prompt = (
        f"first line\n{long_line}\ncontrol: \x03 \x04 \x1a \x7f end\nünïcødé\nno newline at end"
    )
    profile = fake_profile("--stdin", prompt_via=PromptVia.STDIN)
    done = await either.run(prompt, profile)
    data = prompt.encode()
    assert done.state is SessionState.COMPLETED, done
    assert done.output == f"stdin: {len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}"


async def test_large_prompt_via_stdin(spawner: Spawner) -> None:
    prompt = "".join(f"line {i} " + "y" * (i % 3000) + "\n" for i in range(200))  # ~300 KB
    done = await spawner.run(prompt, fake_profile("--stdin", prompt_via=PromptVia.STDIN))
    data = prompt.encode()
    assert done.output == f"stdin: {len(data)} bytes sha256={hashlib.sha256(data).hexdigest()}"


async def test_prompt_typed_into_a_line_oriented_cli(spawner: Spawner) -> None:
    profile = fake_profile("--readline", "Your task: ", prompt_via=PromptVia.PTY)
    done = await spawner.run("count the files", profile)
    assert done.state is SessionState.COMPLETED
    assert done.output.splitlines()[-1] == "got: count the files"


async def test_prompt_pasted_into_a_tui_when_it_asks_for_bracketed_paste(
    spawner: Spawner,
) -> None:
    profile = fake_profile(
        "--tui",
        "Agent",
        "--tui-input",
        prompt_via=PromptVia.PTY,
        screen=True,
        ready_pattern=r"\? for shortcuts",
    )
    done = await spawner.run("line one\nline two", profile)
    assert done.state is SessionState.COMPLETED, done
    # Pasted, the newline stays inside the prompt instead of submitting the first line.
    assert done.output.endswith("prompt: line one\nline two")


# ------------------------------------------------------------------------------- kill


async def test_kill_takes_the_whole_process_group_even_if_it_ignores_sigterm(
    either: Spawner,
) -> None:
    manager, spawner = either.manager, either
    # sh ignores TERM and so do its children (an ignored signal stays ignored across exec);
    # one grandchild sits in a process group of its own (job control), still in the session.
    script = (
        "trap '' TERM; sleep 1000 & sleep 1000 & set -m; sleep 1000 & set +m; echo started; wait"
    )
    sid, _ = await spawner.start(script)
    session = manager.get(sid)
    assert session is not None and session.pid is not None
    with manager.subscribe() as sub:
        await next_event(sub, lambda e: isinstance(e, SessionOutputUpdated) and "started" in e.tail)
    tree = [session.pid, *procfs.descendants(session.pid)]
    assert len(tree) == 4
    assert len({procfs.pgrp(p) for p in tree}) == 2
    started = time.monotonic()
    async with asyncio.timeout(DEADLINE):
        done = await manager.kill(sid, reason="cancelled by test", grace_secs=0.3)
    assert time.monotonic() - started >= 0.3  # TERM was ignored: it took the SIGKILL
    assert done.state is SessionState.KILLED
    assert done.error == "cancelled by test"
    assert done.exit_code == -signal.SIGKILL
    async with asyncio.timeout(DEADLINE):
        while not all(gone(p) for p in tree):
            await asyncio.sleep(0.01)


async def test_kill_with_timeout_state(tmp_path: Path) -> None:
    # A grace period far longer than TERM needs, so a loaded machine cannot make KILL necessary
    # (it costs nothing when TERM works, as it should here).
    manager = SessionManager(attrs.evolve(FAST, kill_grace_secs=10.0))
    spawner = Spawner(manager, tmp_path)
    sid, _ = await spawner.start("sleep 1000")
    done = await manager.kill(sid, state=SessionState.TIMEOUT, reason="ran past 1s")
    assert done.state is SessionState.TIMEOUT
    assert done.error == "ran past 1s"
    assert done.exit_code == -signal.SIGTERM  # sleep honours TERM: no need for the KILL
    # Killing again returns how it ended.
    assert await manager.kill(sid) == done
    await manager.close()


async def test_operations_on_unknown_or_ended_sessions_are_clear_errors(
    manager: SessionManager, spawner: Spawner
) -> None:
    with pytest.raises(SessionError, match="no session 'nope'"):
        await manager.kill("nope")
    with pytest.raises(SessionError, match="no session"):
        await manager.send_input("nope", "x")
    done = await spawner.run("true")
    with pytest.raises(SessionError, match="has ended"):
        await manager.send_input(done.session_id, "late\n")
    assert manager.get(done.session_id) is not None


async def test_close_kills_running_sessions_and_ends_subscriptions(tmp_path: Path) -> None:
    manager = SessionManager(FAST)
    spawner = Spawner(manager, tmp_path)
    sub = manager.subscribe()
    sids = [(await spawner.start("sleep 1000"))[0] for _ in range(3)]
    await manager.close()
    states = {s.session_id: s.state for s in manager.list()}
    assert states == dict.fromkeys(sids, SessionState.KILLED)
    events = [e async for e in sub]  # ends: the manager closed it
    completed = [e for e in events if isinstance(e, SessionCompleted)]
    assert sorted(e.session_id for e in completed) == sorted(sids)
    with pytest.raises(SessionError, match="closed"):
        await spawner.start("true")


# ------------------------------------------------------------------------------- output


async def test_transcript_is_raw_and_output_is_clean_text(spawner: Spawner) -> None:
    command = (
        r"printf '\033[1;31mred\033[0m \033]0;title\007plain\nprogress 10%%\rprogress 100%%\n'"
    )
    sid, transcript = await spawner.start(command)
    session = spawner.manager.get(sid)
    assert session is not None
    done = await session.wait()
    raw = transcript.read_bytes()
    assert raw == b"\x1b[1;31mred\x1b[0m \x1b]0;title\x07plain\r\nprogress 10%\rprogress 100%\r\n"
    assert session.total_bytes == len(raw)
    assert session.tail_bytes() == raw
    assert done.output == "red plain\nprogress 100%"
    assert session.tail_text() == "red plain\nprogress 100%"


async def test_tail_is_bounded_and_output_keeps_the_last_64_kib(
    tmp_path: Path,
) -> None:
    settings = attrs.evolve(FAST, tail_bytes=32 * 1024, finished_tail_bytes=8 * 1024)
    manager = SessionManager(settings)
    spawner = Spawner(manager, tmp_path)
    seen_tail_sizes: list[int] = []
    sid, transcript = await spawner.start("flood 1M", fake_profile())
    session = manager.get(sid)
    assert session is not None
    session.add_output_listener(lambda _: seen_tail_sizes.append(len(session.tail_bytes())))
    done = await session.wait()
    await manager.close()
    raw = transcript.read_bytes()
    assert len(raw) == session.total_bytes > 1024 * 1024  # every \n became \r\n on the PTY
    assert max(seen_tail_sizes) <= 2 * 32 * 1024
    assert len(session.tail_bytes()) == 8 * 1024
    assert raw.endswith(session.tail_bytes())
    assert len(done.output.encode()) <= 64 * 1024
    text = raw.decode().replace("\r\n", "\n").rstrip("\n")
    assert text.endswith(done.output)
    assert len(done.output.encode()) > 60 * 1024


async def test_output_listener_gets_every_byte_and_can_leave(spawner: Spawner) -> None:
    chunks: list[bytes] = []
    sid, transcript = await spawner.start("flood 200K; sleep 0.2", fake_profile())
    session = spawner.manager.get(sid)
    assert session is not None
    remove = session.add_output_listener(chunks.append)
    await session.wait()
    assert b"".join(chunks) == transcript.read_bytes()
    remove()
    remove()  # idempotent


async def test_resize_reaches_the_agent(manager: SessionManager, spawner: Spawner) -> None:
    sid, _ = await spawner.start("stty size; read go; stty size")
    session = manager.get(sid)
    assert session is not None
    with manager.subscribe() as sub:
        await next_event(sub, lambda e: isinstance(e, SessionBlocked))
        session.resize(50, 100)
        with pytest.raises(ValueError, match="invalid terminal size"):
            session.resize(0, 80)
        session.send_input("go\n")
        done = await session.wait()
    lines = done.output.splitlines()
    assert lines[0] == f"{FAST.rows} {FAST.cols}"
    assert lines[-1] == "50 100"


@pytest.mark.slow
async def test_50_mb_through_one_session_without_stalling_the_loop(
    tmp_path: Path,
) -> None:
    manager = SessionManager(attrs.evolve(FAST, output_interval=0.2))
    spawner = Spawner(manager, tmp_path)
    size = 50 * 1024 * 1024
    lags: list[float] = []
    stop = asyncio.Event()

    async def measure_lag() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    probe = asyncio.create_task(measure_lag())
    started = time.monotonic()
    sid, transcript = await spawner.start("flood 50M", fake_profile())
    session = manager.get(sid)
    assert session is not None
    async with asyncio.timeout(120):
        done = await session.wait()
    elapsed = time.monotonic() - started
    stop.set()
    await probe
    await manager.close()
    assert done.state is SessionState.COMPLETED
    # The fake agent writes numbered 100-byte lines; the PTY turns each \n into \r\n.
    expected = hashlib.sha256()
    lines = size // 100
    for start in range(0, lines, 10000):
        expected.update(
            b"".join(
                b"%010d %s\r\n" % (n, b"x" * 88) for n in range(start, min(start + 10000, lines))
            )
        )
    actual = hashlib.sha256()
    with transcript.open("rb") as f:
        while block := f.read(1 << 20):
            actual.update(block)
    assert transcript.stat().st_size == size + lines == session.total_bytes
    assert actual.hexdigest() == expected.hexdigest()
    assert len(lags) > 10
    assert max(lags) < 0.25, f"loop stalled {max(lags):.3f}s (50 MB in {elapsed:.1f}s)"


# ------------------------------------------------------------------------------- events


async def test_events_of_a_session_in_order(manager: SessionManager, spawner: Spawner) -> None:
    with manager.subscribe() as sub:
        sid, transcript = await spawner.start("echo one; exit 4")
        events: list[SessionEvent] = []
        async with asyncio.timeout(DEADLINE):
            async for event in sub:
                events.append(event)
                if isinstance(event, SessionCompleted):
                    break
    assert all(e.session_id == sid for e in events)
    created = events[0]
    assert isinstance(created, SessionCreated)
    assert created.agent == "shell" and created.pid and created.transcript_path == transcript
    changes = [(e.old, e.new) for e in events if isinstance(e, SessionStateChanged)]
    assert changes == [
        (SessionState.SPAWNING, SessionState.RUNNING),
        (SessionState.RUNNING, SessionState.FAILED),
    ]
    updates = [e for e in events if isinstance(e, SessionOutputUpdated)]
    assert updates and updates[-1].tail == "one" and updates[-1].total_bytes == 5
    completed = events[-1]
    assert isinstance(completed, SessionCompleted)
    assert (completed.state, completed.exit_code, completed.output) == (
        SessionState.FAILED,
        4,
        "one",
    )


async def test_output_updates_are_coalesced(tmp_path: Path) -> None:
    interval = 0.25
    manager = SessionManager(attrs.evolve(FAST, output_interval=interval))
    spawner = Spawner(manager, tmp_path)
    events: list[SessionEvent] = []

    async def keep_up(sub: Subscription) -> None:
        async for event in sub:
            events.append(event)
            if isinstance(event, SessionCompleted):
                return

    with manager.subscribe() as sub:
        reader = asyncio.create_task(keep_up(sub))
        started = time.monotonic()
        done = await spawner.run("spinner 1.5", fake_profile())
        elapsed = time.monotonic() - started
        async with asyncio.timeout(DEADLINE):
            await reader
    await manager.close()
    updates = [e for e in events if isinstance(e, SessionOutputUpdated)]
    session = manager.get(done.session_id)
    assert session is not None
    # ~30 spinner frames in 1.5 s, but at most one update per interval (plus the final flush).
    assert 2 <= len(updates) <= elapsed / interval + 2
    assert updates[-1].total_bytes == session.total_bytes
    assert updates[-1].tail == "thinking done"
    assert events.index(updates[-1]) < events.index(
        next(e for e in events if isinstance(e, SessionCompleted))
    )


async def test_a_subscriber_that_falls_behind_loses_only_intermediate_output_updates(
    manager: SessionManager, spawner: Spawner
) -> None:
    with manager.subscribe() as slow:
        done = await spawner.run("spinner 0.6", fake_profile())
        events = []
        while (event := slow.get_nowait()) is not None:
            events.append(event)
    kinds = [type(e) for e in events]
    # Nothing was read while the session ran: one (the latest) OutputUpdated is left, nothing
    # else is missing.
    assert kinds.count(SessionOutputUpdated) == 1
    assert kinds.count(SessionCreated) == 1 and kinds.count(SessionCompleted) == 1
    assert kinds.count(SessionStateChanged) == 2
    update = next(e for e in events if isinstance(e, SessionOutputUpdated))
    assert update.tail == "thinking done"
    assert done.state is SessionState.COMPLETED


async def test_unsubscribe(manager: SessionManager, spawner: Spawner) -> None:
    stays = manager.subscribe()
    leaves = manager.subscribe()
    await spawner.run("echo first")
    queued_before = leaves.pending
    leaves.close()
    await spawner.run("echo second")
    assert leaves.pending == queued_before
    received = []
    async with leaves:
        async for event in leaves:  # drains what was queued, then ends
            received.append(event)
    assert len(received) == queued_before
    completed = [e.output for e in _drain(stays) if isinstance(e, SessionCompleted)]
    assert completed == ["first", "second"]
    stays.close()


def _drain(sub: Subscription) -> list[SessionEvent]:
    events = []
    while (event := sub.get_nowait()) is not None:
        events.append(event)
    return events


async def test_many_sessions_in_parallel_each_complete_once(
    manager: SessionManager, spawner: Spawner
) -> None:
    with manager.subscribe() as sub:
        sids = [(await spawner.start(f"echo {i}; exit {i % 3}"))[0] for i in range(12)]
        completed: dict[str, SessionCompleted] = {}
        async with asyncio.timeout(DEADLINE):
            async for event in sub:
                if isinstance(event, SessionCompleted):
                    assert event.session_id not in completed
                    completed[event.session_id] = event
                    if len(completed) == len(sids):
                        break
    for i, sid in enumerate(sids):
        assert completed[sid].exit_code == i % 3
        assert completed[sid].output == str(i)
    assert {s.session_id for s in manager.list()} == set(sids)


@pytest.mark.slow
async def test_screen_rendering_of_a_flood_does_not_stall_the_loop(tmp_path: Path) -> None:
    # pyte renders about 1 MB/s: a screen session must feed it in small steps.
    manager = SessionManager(FAST)
    spawner = Spawner(manager, tmp_path)
    lags: list[float] = []
    stop = asyncio.Event()

    async def measure_lag() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    probe = asyncio.create_task(measure_lag())
    done = await spawner.run("flood 1000000; print END", fake_profile(screen=True))
    stop.set()
    await probe
    session = manager.get(done.session_id)
    await manager.close()
    assert done.state is SessionState.COMPLETED
    assert session is not None
    screen = session.screen_lines()
    assert screen is not None and "END" in screen
    assert max(lags) < 0.25, f"loop stalled {max(lags):.3f}s"


async def test_real_claude_print_mode_api_error_fails_the_task(
    spawner: Spawner, tmp_path: Path
) -> None:
    # The real CLI, offline: its API is a closed loopback port. Exit status alone would not
    # say it failed; the claude-stream-json extractor reads the result event.
    claude_bin = Path(require_claude()).parent
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": f"{claude_bin}:{os.environ.get('PATH', os.defpath)}",
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
        "ANTHROPIC_API_KEY": "sk-test",
        "CLAUDE_CODE_MAX_RETRIES": "0",
    }
    done = await spawner.run("say hi", BUILTIN_PROFILES["claude"], env=env)
    assert done.state is SessionState.FAILED
    assert done.error is not None
    assert done.error.startswith("exited with status 1 (agent error: API Error")
    assert done.output.startswith("API Error")


async def test_invalid_profile_pattern_fails_the_session_not_the_caller(spawner: Spawner) -> None:
    done = await spawner.run("true", attrs.evolve(SHELL, blocked_patterns=("[unclosed",)))
    assert done.state is SessionState.FAILED
    assert done.error is not None and "invalid blocked pattern '[unclosed'" in done.error

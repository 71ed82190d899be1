"""Session control from another terminal: a run in one process, the `cis dag` commands in
others, on real PTYs and the fake agent."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.control import AGENT, REPO, Background, LocalRun, cis, cis_argv, cis_env
from tests.support.nodes import wait_for
from tests.support.pty_screen import PtyScreen

CTRL_B_D = "\x02d"


def ask_dag(*steps: str) -> str:
    script = "; ".join(steps)
    return f"[[tasks]]\nid = \"ask\"\ncommand = '''{AGENT} --script \"{script}\"'''\n"


@pytest.mark.slow
async def test_input_unblocks_and_logs_follow_ends_with_the_session(tmp_path: Path) -> None:
    run = LocalRun(tmp_path, ask_dag("print hello", "ask Continue?", "print after-yes"))
    try:
        run_id = await run.wait_for_run_id()
        await run.session("ask", "blocked")
        state = str(run.state)
        follower = Background(
            tmp_path, "follow", "dag", "logs", f"{run_id[:15]}:ask", "--follow",
            "--state-dir", state,
        )  # fmt: skip

        listing = await cis("dag", "sessions", "--json", "--state-dir", state)
        assert listing.returncode == 0, listing.stderr
        (session,) = json.loads(listing.stdout)
        assert session["session_id"] == f"{run_id}:ask:1"
        assert session["state"] == "blocked"
        assert "Continue? [y/N]" in session["blocked_reason"]
        assert (session["agent"], session["node"]) == ("shell", "local")
        table = await cis("dag", "sessions", "--state-dir", state)
        assert re.search(
            rf"{run_id}:ask:1\s+shell\s+blocked\s+\d+s\s+local\s+waiting", table.stdout
        )

        # The follower prints what is there, as text, and the waiting prompt (no newline yet).
        async def prompt_followed() -> bool:
            return "Continue? [y/N]" in follower.stdout

        await wait_for(prompt_followed, what="the follower to show the prompt")
        assert follower.process.poll() is None

        typed = await cis("dag", "unblock", "ask", "y", "--state-dir", state)
        assert typed.returncode == 0, typed.stderr
        assert f"{run_id}:ask:1: typed 1 characters and Enter" in typed.stdout

        assert await follower.wait(30) == 0, follower.stderr
        followed = follower.stdout
        assert followed.index("hello") < followed.index("Continue?") < followed.index("after-yes")
        assert "\x1b" not in followed and "\r" not in followed

        code, report = await run.report()
        assert code == 0, run.stderr
        assert report["tasks"]["ask"]["status"] == "completed"
    finally:
        run.stop()

    # The process is gone: the transcript on disk still answers.
    logs = await cis("dag", "logs", f"{run_id}:ask:1", "--tail", "1", "--state-dir", state)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "after-yes\n"
    raw = await asyncio.to_thread(
        subprocess.run,
        cis_argv("dag", "logs", "ask", "--raw", "--state-dir", state),
        capture_output=True,
        env=cis_env(),
    )
    assert b"Continue? [y/N] y\r\n" in raw.stdout
    ended = await cis("dag", "sessions", "--all", "--json", "--state-dir", state)
    assert [(s["session_id"], s["state"]) for s in json.loads(ended.stdout)] == [
        (f"{run_id}:ask:1", "completed")
    ]
    assert (await cis("dag", "sessions", "--state-dir", state)).stdout.startswith("no sessions")
    again = await cis("dag", "input", "ask", "y", "--state-dir", state)
    assert again.returncode == 1
    assert "has ended (completed)" in again.stderr


async def test_attach_types_into_the_agent_forwards_the_size_and_detaches(tmp_path: Path) -> None:
    steps = (
        f"{AGENT} --readline 'Name? '; stty size; {AGENT} --readline 'Colour? '; stty size; "
        f"{AGENT} --readline 'Last? '"
    )
    run = LocalRun(tmp_path, f"[[tasks]]\nid = \"talk\"\ncommand = '''{steps}'''\n")
    tui: PtyScreen | None = None
    try:
        run_id = await run.wait_for_run_id()
        await run.session("talk", "blocked")
        tui = PtyScreen(
            cis_argv("dag", "attach", f"{run_id}:talk", "--state-dir", str(run.state)),
            env=cis_env(),
            cwd=REPO,
            rows=30,
            cols=100,
        )
        await tui.wait_for("Name\\?", 30)
        tui.write("Bob\r")
        await tui.wait_for("got: Bob", 30)
        await tui.wait_for(r"\b30 100\b", 30)  # the agent's terminal took our window's size

        tui.process.setwinsize(35, 90)  # SIGWINCH to `cis dag attach`, which forwards it
        tui.screen.resize(35, 90)
        await tui.wait_for("Colour\\?", 30)
        tui.write("Red\r")
        await tui.wait_for("got: Red", 30)
        await tui.wait_for(r"\b35 90\b", 30)

        tui.write(CTRL_B_D)
        assert await tui.wait_exit(30) == 0
        assert "detached; the session keeps running" in bytes(tui.raw).decode(errors="replace")

        # Still running, now waiting for the last answer; answered from elsewhere, it ends.
        session = await run.session("talk", "blocked")
        assert "Last?" in session["blocked_reason"]
        assert (
            await cis("dag", "input", "talk", "fin", "--state-dir", str(run.state))
        ).returncode == 0
        code, report = await run.report()
        assert code == 0, run.stderr
    finally:
        if tui is not None:
            tui.close()
        run.stop()
    transcript = Path(report["tasks"]["talk"]["transcript"]).read_text()
    assert "got: Bob" in transcript and "got: Red" in transcript and "got: fin" in transcript


@pytest.mark.slow
async def test_two_attached_the_newest_writer_takes_over(tmp_path: Path) -> None:
    run = LocalRun(tmp_path, ask_dag("readline First? ", "readline Second? ", "print all-done"))
    screens: list[PtyScreen] = []
    try:
        run_id = await run.wait_for_run_id()
        await run.session("ask", "blocked")
        state = str(run.state)

        def attach(*extra: str) -> PtyScreen:
            screen = PtyScreen(
                cis_argv("dag", "attach", f"{run_id}:ask", "--state-dir", state, *extra),
                env=cis_env(),
                cwd=REPO,
            )
            screens.append(screen)
            return screen

        first = attach()
        await first.wait_for("First\\?", 30)
        second = attach()
        await second.wait_for("First\\?", 30)
        await first.wait_for("read-only now", 30)
        watcher = attach("--readonly")  # a read-only attach takes nothing from the writer
        await watcher.wait_for("First\\?", 30)

        first.write("from-first\r")  # read-only now: dropped
        second.write("from-second\r")
        for screen in (first, second, watcher):
            await screen.wait_for("got: from-second", 30)
        second.write("two\r")
        # The session ends: every attached terminal is told, and exits 0.
        for screen in (first, second, watcher):
            assert await screen.wait_exit(30) == 0
            assert "the session ended (completed)" in bytes(screen.raw).decode(errors="replace")
        code, report = await run.report()
        assert code == 0
    finally:
        for screen in screens:
            screen.close()
        run.stop()
    transcript = Path(report["tasks"]["ask"]["transcript"]).read_text()
    assert "got: from-second" in transcript and "got: two" in transcript
    assert "from-first" not in transcript


async def test_kill_ends_a_session_and_its_task_fails_without_retry(tmp_path: Path) -> None:
    dag = (
        '[[tasks]]\nid = "long"\nretry = 2\n'
        f"command = '''{AGENT} --script \"print started; sleep 60\"'''\n"
    )
    run = LocalRun(tmp_path, dag)
    try:
        run_id = await run.wait_for_run_id()
        await run.session("long", "running")
        started = time.monotonic()
        killed = await cis("dag", "kill", f"{run_id}:long", "--state-dir", str(run.state))
        assert killed.returncode == 0, killed.stderr
        assert killed.stdout.strip() == f"{run_id}:long:1: killed"
        assert time.monotonic() - started < 15
        code, report = await run.report()
        assert code == 1
        task = report["tasks"]["long"]
        assert (task["status"], task["attempts"]) == ("failed", 1)
        assert task["reason"].startswith("killed by ")
    finally:
        run.stop()
    again = await cis("dag", "kill", f"{run_id}:long", "--state-dir", str(run.state))
    assert again.returncode == 1
    assert "has ended" in again.stderr


@pytest.mark.slow
async def test_approve_a_confirmed_task_and_cancel_a_run(tmp_path: Path) -> None:
    dag = (
        '[[tasks]]\nid = "gate"\ncommand = "echo gated"\nlevel = { type = "confirmed" }\n'
        '[[tasks]]\nid = "after"\ndeps = ["gate"]\ncommand = "echo after"\n'
        '[[tasks]]\nid = "plain"\ncommand = "echo plain"\n'
    )
    run = LocalRun(tmp_path, dag)
    try:
        run_id = await run.wait_for_run_id()
        state = str(run.state)

        async def awaiting() -> bool:
            runs = await run.runs()
            return bool(runs) and runs[0]["tasks"]["gate"] == "awaiting_approval"

        await wait_for(awaiting, what="gate to await approval")
        wrong = await cis("dag", "approve", run_id[:15], "plain", "--state-dir", state)
        assert wrong.returncode == 1
        assert "needs no approval" in wrong.stderr and "awaiting approval: gate" in wrong.stderr
        unknown = await cis("dag", "approve", run_id, "nope", "--state-dir", state)
        assert unknown.returncode == 2
        assert "has no task 'nope'" in unknown.stderr

        approved = await cis("dag", "approve", run_id[:15], "gate", "--state-dir", state, "--json")
        assert approved.returncode == 0, approved.stderr
        assert json.loads(approved.stdout)["approved"] is True
        code, report = await run.report()
        assert code == 0, run.stderr
        assert {t: v["status"] for t, v in report["tasks"].items()} == {
            "gate": "completed",
            "after": "completed",
            "plain": "completed",
        }
    finally:
        run.stop()

    slow = LocalRun(
        tmp_path,
        f"[[tasks]]\nid = \"a\"\ncommand = '{AGENT} --sleep 60'\n"
        f"[[tasks]]\nid = \"b\"\ncommand = '{AGENT} --sleep 60'\n",
        name="slow",
    )
    try:
        run_id = await slow.wait_for_run_id()
        await slow.session("a", "running")
        await slow.session("b", "running")
        cancelled = await cis("dag", "cancel", run_id, "--state-dir", str(slow.state))
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"run {run_id}: cancelled" in cancelled.stdout
        code, report = await slow.report()
        assert code == 1
        assert report["status"] == "cancelled"
        assert {t["status"] for t in report["tasks"].values()} == {"cancelled"}
    finally:
        slow.stop()
    ended = await cis("dag", "cancel", run_id, "--state-dir", str(slow.state))
    assert ended.returncode == 2
    assert f"no run {run_id!r}" in ended.stderr


@pytest.mark.slow
async def test_unknown_and_ambiguous_ids_list_the_candidates(tmp_path: Path) -> None:
    state = tmp_path / "state"
    quick = tmp_path / "quick.toml"
    quick.write_text('[[tasks]]\nid = "t"\ncommand = "echo from-$CIS_RUN_ID"\n')
    done = []
    for _ in range(2):
        proc = await cis(
            "dag", "execute", "--local", str(quick), "--state-dir", str(state), "--json"
        )
        assert proc.returncode == 0, proc.stderr
        done.append(json.loads(proc.stdout)["run_id"])
    first, second = done
    common = next(first[:i] for i in range(len(first), 0, -1) if second.startswith(first[:i]))

    for wanted in ("t", f"{common}:t"):
        proc = await cis("dag", "logs", wanted, "--state-dir", str(state))
        assert proc.returncode == 2, wanted
        assert "is ambiguous" in proc.stderr
        assert f"{first}:t:1 (completed)" in proc.stderr
        assert f"{second}:t:1 (completed)" in proc.stderr
    exact = await cis("dag", "logs", f"{first}:t", "--state-dir", str(state))
    assert exact.stdout == f"from-{first}\n"

    unknown = await cis("dag", "logs", "nope", "--state-dir", str(state))
    assert unknown.returncode == 2
    assert "no session 'nope'; sessions:" in unknown.stderr
    assert f"{first}:t:1" in unknown.stderr and f"{second}:t:1" in unknown.stderr
    bad = await cis("dag", "kill", f"{first}:t:x", "--state-dir", str(state))
    assert bad.returncode == 2 and "must be a number" in bad.stderr
    wrong_attempt = await cis("dag", "kill", f"{first}:t:2", "--state-dir", str(state))
    assert wrong_attempt.returncode == 2 and "no session" in wrong_attempt.stderr
    no_run = await cis("dag", "cancel", "1999", "--state-dir", str(state))
    assert no_run.returncode == 2 and "no run '1999'" in no_run.stderr

    # A live session is found first: a bare task id means the running one.
    live = LocalRun(tmp_path, f"[[tasks]]\nid = \"t\"\ncommand = '{AGENT} --sleep 60'\n")
    try:
        third = await live.wait_for_run_id()
        await live.session("t", "running")
        killed = await cis("dag", "kill", "t", "--state-dir", str(state))
        assert killed.returncode == 0, killed.stderr
        assert killed.stdout.strip() == f"{third}:t:1: killed"
        code, _ = await live.report()
        assert code == 1
    finally:
        live.stop()


@pytest.mark.slow
async def test_a_dead_or_stopped_process_is_reported_not_waited_for(tmp_path: Path) -> None:
    run = LocalRun(tmp_path, ask_dag("ask Continue?"))
    try:
        run_id = await run.wait_for_run_id()
        await run.session("ask", "blocked")
        state = str(run.state)

        os.kill(run.pid, signal.SIGSTOP)
        started = time.monotonic()
        silent = await cis("dag", "input", "ask", "y", "--timeout", "1", "--state-dir", state)
        assert silent.returncode == 1
        assert f"pid {run.pid}" in silent.stderr and "did not answer within 1s" in silent.stderr
        listing = await cis("dag", "sessions", "--timeout", "1", "--state-dir", state)
        assert listing.returncode == 0
        assert "did not answer" in listing.stderr
        assert time.monotonic() - started < 20

        os.kill(run.pid, signal.SIGKILL)
        await run.wait(30)
        gone = await cis("dag", "input", f"{run_id[:15]}:ask", "y", "--state-dir", state)
        assert gone.returncode == 1
        assert f"pid {run.pid}" in gone.stderr and "is gone" in gone.stderr
        # The stale entry was cleaned: the next command does not trip on it.
        assert not list((run.state / "control").glob("*.json"))
        after = await cis("dag", "sessions", "--state-dir", state)
        assert after.returncode == 0 and after.stderr == ""
    finally:
        run.stop()


async def test_the_control_socket_is_private(tmp_path: Path) -> None:
    run = LocalRun(tmp_path, ask_dag("ask Continue?"))
    try:
        await run.wait_for_run_id()
        control = run.state / "control"
        assert control.stat().st_mode & 0o777 == 0o700
        (entry,) = control.glob("*.json")
        assert entry.stat().st_mode & 0o777 == 0o600
        data = json.loads(entry.read_text())
        assert data["pid"] == run.pid and data["kind"] == "execute" and data["node_id"] == "local"
        socket_file = Path(data["socket"])
        assert socket_file.parent == control and socket_file.exists()
    finally:
        run.stop()
    await asyncio.to_thread(run.process.wait, 10)
    assert not list(control.iterdir())  # a clean stop leaves nothing behind

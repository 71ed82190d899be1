"""The live view of `cis dag execute` in a real terminal (a PTY rendered by pyte): the run id in
its title, the commands that answer each blocked task under the table, and keys that attach to
a task right there, Ctrl-B d coming back to the table."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.support.control import AGENT, REPO, cis, cis_argv, cis_env
from tests.support.pty_screen import PtyScreen

RUN_ID = r"\d{8}-\d{6}-[0-9a-f]{4}"
CTRL_B_D = "\x02d"
DOWN = "\x1b[B"
UP = "\x1b[A"


def scenario(tmp_path: Path) -> Path:
    """A five-task DAG as a person meets it: a task that asks, a flaky one, a slow one that
    asks twice, and two plain ones around them."""
    dag = tmp_path / "release.toml"
    dag.write_text(
        'name = "release"\n'
        '[[tasks]]\nid = "build"\ncommand = "echo built"\n'
        '[[tasks]]\nid = "ask"\ndeps = ["build"]\n'
        f"command = '''{AGENT} --script \"ask Run the slow suite too?; print going-on\"'''\n"
        '[[tasks]]\nid = "flaky"\nretry = 1\ncommand = \'test "$CIS_ATTEMPT" = 2\'\n'
        '[[tasks]]\nid = "slow"\ndeps = ["build"]\n'
        f"command = '''{AGENT} --script \"readline Suite? ; readline Really? \"'''\n"
        '[[tasks]]\nid = "ship"\ndeps = ["ask", "slow", "flaky"]\ncommand = "echo shipped"\n'
    )
    return dag


def line_with(screen: str, text: str) -> str:
    return next(line for line in screen.splitlines() if text in line)


@pytest.mark.slow
async def test_the_table_says_how_to_answer_and_keys_attach_right_there(tmp_path: Path) -> None:
    state = tmp_path / "state"
    view = PtyScreen(
        cis_argv("dag", "execute", "--local", str(scenario(tmp_path)), "--state-dir", str(state)),
        env=cis_env(),
        cwd=tmp_path,
        cols=180,
        rows=40,
    )
    try:
        both_blocked = r"blocked ask: .*\n.*\n.*blocked slow: "
        screen = await view.wait_for(both_blocked, 60)
        run_id = re.search(rf"release · run ({RUN_ID})", screen)
        assert run_id, screen
        run = run_id[1]
        # Each command whole on a line of its own, since both do not fit on one.
        where = f"--state-dir {state}"
        assert (
            f"blocked ask: cis dag input {run}:ask TEXT {where}\n"
            f"{' ' * 10}or cis dag attach {run}:ask {where}\n"
        ) in screen
        assert "↑↓ pick a running task · Enter attach to it (Ctrl-B d comes back here)" in screen
        # The first blocked task is picked to begin with.
        assert re.search(r"^│ › ask +│ blocked", screen, re.MULTILINE), screen

        # Down to the slow task, attach: its terminal shows the question; answer, detach.
        view.write(DOWN)
        await view.wait_for(r"› slow", 30)
        view.write("\r")
        await view.wait_for(r"Suite\? *$", 30)
        view.write("full\r")
        await view.wait_for("got: full", 30)
        await view.wait_for(r"Really\? *$", 30)
        view.write(CTRL_B_D)
        screen = await view.wait_for(
            rf"\[cis: {run}:slow:1: detached; the session keeps running\]", 30
        )
        assert "release · run" in screen

        # Up to the asking task, attach, answer: it ends, and the table is back by itself.
        view.write(UP)
        await view.wait_for(r"› ask", 30)
        view.write("\r")
        await view.wait_for(r"Run the slow suite too\? \[y/N\]", 30)
        view.write("y\r")
        await view.wait_for(rf"\[cis: {run}:ask:1: the session ended \(completed\)\]", 30)

        # The slow task, answered from another terminal with the command the table gives.
        screen = await view.wait_for(r"blocked slow: cis dag input", 30)
        command = line_with(screen, "blocked slow:").split(": ", 1)[1]
        argv = shlex.split(command.strip().replace("TEXT", "yes"))
        assert argv[:4] == ["cis", "dag", "input", f"{run}:slow"]
        typed = await cis(*argv[1:])
        assert typed.returncode == 0, typed.stderr

        assert await view.wait_exit(60) == 0
        text = bytes(view.raw).decode(errors="replace")
        assert f"run {run} completed in" in text
        assert "Traceback" not in text
        # The table left on the screen: every task done, no keys that would do nothing now.
        final = view.text().rsplit("release · run", 1)[1]
        assert "5 completed" in final
        assert "Enter attach" not in final and "›" not in final
    finally:
        view.close()


async def test_without_a_terminal_on_stdin_the_view_has_no_keys(tmp_path: Path) -> None:
    dag = tmp_path / "dag.toml"
    dag.write_text(f"[[tasks]]\nid = \"q\"\ncommand = '''{AGENT} --script \"ask Go?\"'''\n")
    execute = shlex.join(cis_argv("dag", "execute", "--local", str(dag)))
    view = PtyScreen(
        ["/bin/sh", "-c", f"exec {execute} < /dev/null"],
        env={**cis_env(), "CIS_STATE_DIR": str(tmp_path / "state")},
        cwd=tmp_path,
        cols=160,
    )
    try:
        screen = await view.wait_for(r"blocked q: cis dag input", 60)
        run = re.search(rf"run ({RUN_ID})", screen)
        assert run, screen
        # No --state-dir was given: the commands need none (the environment names it).
        assert f"blocked q: cis dag input {run[1]}:q TEXT  or  cis dag attach {run[1]}:q" in screen
        assert "Enter attach" not in screen and "› q" not in screen
        answered = await cis(
            "dag", "input", f"{run[1]}:q", "y", "--state-dir", str(tmp_path / "state")
        )
        assert answered.returncode == 0, answered.stderr
        assert await view.wait_exit(60) == 0
    finally:
        view.close()


async def test_a_run_in_the_background_of_a_shell_takes_no_keys_and_is_not_stopped(
    tmp_path: Path,
) -> None:
    """`cis dag execute ... &` at an interactive shell: the terminal is the shell's, so the view
    leaves its modes and input alone (touching them would stop the job), and runs on."""
    dag = tmp_path / "dag.toml"
    dag.write_text(f"[[tasks]]\nid = \"q\"\ncommand = '''{AGENT} --script \"ask Go?\"'''\n")
    state = tmp_path / "state"
    rc = tmp_path / "bashrc"
    rc.write_text("PS1='$ '\n")
    shell = PtyScreen(
        ["bash", "--noprofile", "--rcfile", str(rc), "-i"], env=cis_env(), cwd=tmp_path, cols=160
    )
    try:
        await shell.wait_for(r"\$ *$", 30)
        execute = shlex.join(
            cis_argv("dag", "execute", "--local", str(dag), "--state-dir", str(state))
        )
        shell.write(f"{execute} &\r")
        screen = await shell.wait_for(r"blocked q: cis dag input", 60)
        assert "Enter attach" not in screen
        run = re.search(rf"run ({RUN_ID})", screen)
        assert run, screen
        answered = await cis("dag", "input", f"{run[1]}:q", "y", "--state-dir", str(state))
        assert answered.returncode == 0, answered.stderr
        await shell.wait_for(rf"run {run[1]} completed in", 60)
        shell.write("wait %1; echo status=$?\r")
        await shell.wait_for(r"status=0", 30)
        assert "Stopped" not in shell.text()
    finally:
        shell.close()


@pytest.mark.slow
async def test_the_readme_shows_the_view_as_it_is(tmp_path: Path) -> None:
    """README's "Running a DAG" excerpt: the same DAG, in a terminal as wide, shows the same
    lines under the table (the run id aside), and the same title."""
    readme = (REPO / "README.md").read_text()
    excerpt = next(
        block
        for block in re.findall(r"^```[a-z]*\n(.*?)^```$", readme, re.DOTALL | re.MULTILINE)
        if "blocked ask:" in block
    )
    documented_run = re.search(rf"run ({RUN_ID})", excerpt)
    assert documented_run, excerpt
    view = PtyScreen(
        cis_argv("dag", "execute", "--local", str(scenario(tmp_path))),
        env={**cis_env(), "CIS_STATE_DIR": str(tmp_path / "state")},
        cwd=tmp_path,
        cols=100,
        rows=30,
    )
    try:
        screen = await view.wait_for(
            r"(?s)flaky +│ completed.*blocked ask: .*blocked slow: .*Ctrl-C cancel the run", 60
        )
        run = re.search(rf"release · run ({RUN_ID})", screen)
        assert run, screen
        shown = screen.replace(run[1], documented_run[1]).splitlines()
        documented = excerpt.splitlines()
        assert shown[0].strip() == documented[0].strip()
        under = documented.index(next(line for line in documented if line.startswith("blocked")))
        assert [line.rstrip() for line in shown[under : len(documented)]] == documented[under:]
        view.write("\x03")  # Ctrl-C cancels the run
        assert await view.wait_exit(60) == 1
    finally:
        view.close()

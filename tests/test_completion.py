"""Shell completion, in the real shells: bash and zsh at a prompt in a PTY (Tab pressed, the
command line read back from the screen), fish through its own `complete -C`. Run ids and
RUN:TASK ids come from a state directory real runs left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.control import REPO, cis_argv, cis_env
from tests.support.pty_screen import PtyScreen

#: Where the `cis` the shells run lives (the console script of this environment).
BIN = Path(sys.executable).parent


def shell_env() -> dict[str, str]:
    return {**cis_env(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def need(shell: str) -> str:
    """The shell's path: missing, a skip on a developer's machine and a failure under CI
    (scripts/ensure-shells installs it)."""
    path = shutil.which(shell)
    if path is None:
        problem = f"{shell} is not installed (scripts/ensure-shells installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI is set: the completion tests must run")
        pytest.skip(problem)
    return path


class Runs:
    """Two runs in a state directory: one of tasks build and test, one of task deploy."""

    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.ids: list[str] = []
        for name, tasks in (("one", ("build", "test")), ("two", ("deploy",))):
            dag = root / f"{name}.toml"
            dag.write_text("".join(f'[[tasks]]\nid = "{t}"\ncommand = "true"\n' for t in tasks))
            run = subprocess.run(
                cis_argv("dag", "execute", "--local", str(dag), "--state-dir", str(self.state),
                         "--json"),
                capture_output=True, text=True, env=cis_env(), cwd=REPO, timeout=60,
            )  # fmt: skip
            assert run.returncode == 0, run.stderr
            self.ids.append(json.loads(run.stdout)["run_id"])

    def unique_prefix(self, run_id: str) -> str:
        """The shortest prefix of ``run_id`` that no other run has."""
        other = next(r for r in self.ids if r != run_id)
        shared = next(i for i, (a, b) in enumerate(zip(run_id, other, strict=True)) if a != b)
        return run_id[: shared + 1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("completion"))


def cases(runs: Runs) -> list[tuple[str, str]]:
    """(what is typed before Tab, what the line must read after)."""
    one, two = runs.ids
    where = f"--state-dir {runs.state}"
    return [
        ("cis dag st", "cis dag status "),
        ("cis dag execute --lo", "cis dag execute --local "),
        ("cis comp", "cis completion "),
        (f"cis dag status {where} {runs.unique_prefix(one)}", f"cis dag status {where} {one} "),
        (f"cis dag logs {where} {one}:b", f"cis dag logs {where} {one}:build "),
        (f"cis dag logs {where} {one}:build:", f"cis dag logs {where} {one}:build:1 "),
        # One run fits what was typed: straight to its only task.
        (
            f"cis dag attach {where} {runs.unique_prefix(two)}",
            f"cis dag attach {where} {two}:deploy ",
        ),
    ]


async def complete_at_a_prompt(screen: PtyScreen, typed: str, expected: str) -> None:
    screen.write(typed + "\t")
    try:
        await screen.wait_for(lambda text: _last_line(text) == f"$ {expected}".rstrip(), 30)
    except AssertionError as exc:
        raise AssertionError(f"{typed!r} + Tab should read {expected!r}: {exc}") from None
    finally:
        screen.write("\x15")  # Ctrl-U: an empty line for the next case
    await screen.wait_for(lambda text: _last_line(text) == "$", 30)


def _last_line(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture
async def prompt() -> AsyncIterator[list[PtyScreen]]:
    screens: list[PtyScreen] = []
    yield screens
    for screen in screens:
        screen.close()


@pytest.mark.slow
async def test_bash_completes_commands_flags_and_ids(
    runs: Runs, tmp_path: Path, prompt: list[PtyScreen]
) -> None:
    bash = need("bash")
    rc = tmp_path / "bashrc"
    rc.write_text("PS1='$ '\neval \"$(cis completion bash)\"\n")
    screen = PtyScreen(
        [bash, "--noprofile", "--rcfile", str(rc), "-i"], env=shell_env(), cwd=tmp_path
    )
    prompt.append(screen)
    await screen.wait_for(lambda text: _last_line(text) == "$", 30)
    for typed, expected in cases(runs):
        await complete_at_a_prompt(screen, typed, expected)


@pytest.mark.slow
async def test_zsh_completes_commands_flags_and_ids(
    runs: Runs, tmp_path: Path, prompt: list[PtyScreen]
) -> None:
    zsh = need("zsh")
    (tmp_path / ".zshrc").write_text(
        "PROMPT='$ '\nautoload -U compinit && compinit -u\neval \"$(cis completion zsh)\"\n"
    )
    env = {**shell_env(), "ZDOTDIR": str(tmp_path)}
    screen = PtyScreen([zsh, "-i"], env=env, cwd=tmp_path)
    prompt.append(screen)
    await screen.wait_for(lambda text: _last_line(text) == "$", 30)
    for typed, expected in cases(runs):
        await complete_at_a_prompt(screen, typed, expected)


def test_fish_completes_commands_flags_and_ids(runs: Runs, tmp_path: Path) -> None:
    fish = need("fish")
    one, _ = runs.ids
    where = f"--state-dir {runs.state}"

    def complete(typed: str) -> list[str]:
        result = subprocess.run(
            [fish, "--no-config", "-c", f"cis completion fish | source; complete -C '{typed}'"],
            capture_output=True, text=True, env=shell_env(), cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [line.split("\t")[0] for line in result.stdout.splitlines()]

    assert complete("cis dag st") == ["status"]
    assert "--local" in complete("cis dag execute --lo")
    assert complete(f"cis dag status {where} {runs.unique_prefix(one)}") == [one]
    assert complete(f"cis dag logs {where} {one}:") == [f"{one}:build", f"{one}:test"]


def test_completion_refuses_an_unknown_shell() -> None:
    result = subprocess.run(
        cis_argv("completion", "tcsh"), capture_output=True, text=True, env=cis_env(), timeout=60
    )
    assert result.returncode == 2
    assert "invalid choice: 'tcsh'" in result.stderr and "usage:" in result.stderr

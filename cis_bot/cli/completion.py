"""Shell completion (bash, zsh, fish) through argcomplete: ``cis completion SHELL`` prints a
script that calls back into ``cis`` for each completion, which answers with subcommands, flags,
and the run ids and ``RUN:TASK`` ids of the state directory.

argcomplete (imported only when completing or printing a script, so ``cis`` starts as fast as
before) parses what was typed with the CLI's own parser; the completers here only read
directory names, so a completion costs a start of ``cis`` and no more.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHELLS = ("bash", "zsh", "fish")

Completer = Callable[..., list[str]]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    completion = subparsers.add_parser(
        "completion",
        help="print the shell code that completes cis commands (bash, zsh, fish)",
        description="Load it in your shell's start-up file: bash: eval \"$(cis completion "
        'bash)"; zsh (after compinit): eval "$(cis completion zsh)"; fish: cis completion '
        "fish | source.",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help=" | ".join(SHELLS))
    completion.set_defaults(handler=_print_script)


def _print_script(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["cis"], shell=args.shell), end="")
    return 0


def complete_if_asked(parser: argparse.ArgumentParser) -> None:
    """When a shell asks for completions (argcomplete's ``_ARGCOMPLETE``), answer and exit."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    argcomplete.autocomplete(parser)


def completes(action: argparse.Action, completer: Completer) -> None:
    """Complete ``action``'s values with ``completer`` (argcomplete reads the attribute)."""
    action.completer = completer  # type: ignore[attr-defined]


# --- completers: what is in the state directory ------------------------------------------------


def _state_dir(parsed_args: argparse.Namespace) -> Path:
    given = getattr(parsed_args, "state_dir", None)
    if given:
        return Path(given)
    # As cis_bot.config.default_state_dir, without importing the config's modules on every Tab.
    if env := os.environ.get("CIS_STATE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cis"


def _runs(state_dir: Path) -> list[str]:
    """The run ids under ``<state_dir>/runs/`` (``RunPaths``' layout), newest first."""
    try:
        entries = list(os.scandir(state_dir / "runs"))
    except OSError:
        return []
    return sorted((entry.name for entry in entries if entry.is_dir()), reverse=True)


def _sessions(state_dir: Path, run_id: str) -> list[tuple[str, int]]:
    """(task, attempt) of each transcript the run kept: ``sessions/<task>.<attempt>.log``."""
    found = []
    try:
        names = [path.name for path in (state_dir / "runs" / run_id / "sessions").iterdir()]
    except OSError:
        return []
    for name in names:
        task_id, _, attempt = name.removesuffix(".log").rpartition(".")
        if name.endswith(".log") and task_id and attempt.isdigit():
            found.append((task_id, int(attempt)))
    return sorted(found)


def run_ids(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Run ids starting with what was typed."""
    return [run for run in _runs(_state_dir(parsed_args)) if run.startswith(prefix)]


def session_ids(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """``RUN:TASK`` (``RUN:TASK:ATTEMPT`` once a second ``:`` is typed) of the tasks that have
    had a session. While what was typed fits several runs: their ids and a ``:`` (the shell
    adds no space after it), to pick the run first."""
    state_dir = _state_dir(parsed_args)
    run_part, colon, rest = prefix.partition(":")
    runs = [run for run in _runs(state_dir) if run.startswith(run_part)]
    if colon:
        runs = [run_part] if run_part in runs else []
    elif len(runs) != 1:
        return [f"{run}:" for run in runs]
    candidates = []
    for run in runs:
        sessions = _sessions(state_dir, run)
        if ":" in rest:
            candidates += [f"{run}:{task}:{attempt}" for task, attempt in sessions]
        else:
            candidates += [f"{run}:{task}" for task in dict.fromkeys(t for t, _ in sessions)]
    return [candidate for candidate in candidates if candidate.startswith(prefix)] or [
        f"{run}:" for run in runs if not colon
    ]

"""What the ``cis`` command loads before it runs anything: not rich's console and traceback
renderer, which structlog would load for pretty exceptions we do not use (see
``cis_bot/cli/__init__.py``); rich comes in only for the live table (``cli/live.py``), not for
plain progress lines or ``--json``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
import cis_bot.cli, cis_bot.cli.dag, cis_bot.cli.progress, cis_bot.app.execute
import cis_bot.homeserver.server
import structlog
print(sorted(m for m in ("rich", "pygments") if m in sys.modules))
structlog.get_logger("probe").info("probe.logged", ok=True)
import cis_bot.cli.live
print("rich" in sys.modules)
"""


def test_a_run_imports_rich_only_for_the_live_table() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert probe.stdout.splitlines()[0] == "[]"
    assert probe.stdout.splitlines()[-1] == "True"


COLLECTOR_PROBE = """
import gc, sys
from cis_bot.cli import main
gc.disable()  # as cli.run starts the program
status = main(sys.argv[1:])
print(status, gc.isenabled(), gc.get_freeze_count() > 0)
"""


def test_every_command_runs_with_the_garbage_collector_on(tmp_path: Path) -> None:
    """The program starts with the collector off (``cli.run``); a command's work never runs
    without it: on before a command, or for a run once it is under way."""
    dag = tmp_path / "one.toml"
    dag.write_text('[dag]\nname = "one"\n\n[[dag.tasks]]\nid = "t"\ncommand = "true"\n')
    state = tmp_path / "state"
    env = {**os.environ, "CIS_CONFIG": os.devnull}
    for argv in (
        ["dag", "validate", str(dag)],
        ["dag", "execute", "--local", str(dag), "--json", "--state-dir", str(state)],
    ):
        probe = subprocess.run(
            [sys.executable, "-c", COLLECTOR_PROBE, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=True,
        )
        assert probe.stdout.splitlines()[-1] == "0 True True", (argv, probe.stderr)
